"""Textual-inversion embedding files: the three layouts people share, safe loading, one-line errors."""

from pathlib import Path

import pytest
import safetensors.torch
import torch

from ldm.errors import UserError
from ldm.prompts import load_embedding, load_embeddings


def one_line_error(excinfo: pytest.ExceptionInfo, path: Path) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message or path.name in message
    return message


def save_a1111(path: Path, vectors: torch.Tensor) -> None:
    """The layout A1111's Embedding.save writes."""
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(vectors)},
            "name": path.stem,
            "step": 3000,
            "sd_checkpoint": "7460a6fa",
            "sd_checkpoint_name": "sd-v1-4",
        },
        path,
    )


def test_a1111_pt(tmp_path):
    vectors = torch.randn(4, 768)
    save_a1111(tmp_path / "my-style.pt", vectors)
    embedding = load_embedding(tmp_path / "my-style.pt", width=768)
    assert embedding.name == "my-style" and embedding.num_vectors == 4 and embedding.width == 768
    assert torch.equal(embedding.vectors, vectors) and embedding.vectors.dtype == torch.float32


def test_diffusers_bin(tmp_path):
    vector = torch.randn(768, dtype=torch.float16)
    torch.save({"<cat-toy>": vector}, tmp_path / "cat-toy.bin")
    embedding = load_embedding(tmp_path / "cat-toy.bin", width=768)
    assert embedding.name == "cat-toy" and embedding.vectors.shape == (1, 768)
    assert torch.equal(embedding.vectors, vector.float()[None])


def test_safetensors_emb_params(tmp_path):
    vectors = torch.randn(8, 768)
    safetensors.torch.save_file({"emb_params": vectors}, tmp_path / "EasyNegative.safetensors")
    embedding = load_embedding(tmp_path / "EasyNegative.safetensors", width=768)
    assert embedding.name == "EasyNegative" and torch.equal(embedding.vectors, vectors)


class _RunsCode:
    """Pickles as a call to Path.touch: loading it with plain pickle would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(UserError) as excinfo:
        load_embedding(path)
    assert "refused for safety" in one_line_error(excinfo, path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("garbage.pt", b"not a torch file at all", "not a readable embedding file"),
        ("garbage.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}", "not a readable embedding file"),
        ("two.bin", {"a": torch.zeros(768), "b": torch.zeros(768)}, "expected A1111's string_to_param"),
        (
            "terms.pt",
            {"string_to_param": {"*": torch.zeros(1, 768), "#": torch.zeros(1, 768)}},
            "exactly one",
        ),
        ("text.bin", {"a": "not a tensor"}, "not a [vectors, width] tensor"),
        ("ints.bin", {"a": torch.zeros(2, 768, dtype=torch.long)}, "not floating point"),
        ("sdxl.safetensors", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "SDXL"),
        (
            "wide.pt",
            {"string_to_param": {"*": torch.zeros(2, 1024)}},
            "1024 wide but this model's text encoder",
        ),
        ("long.bin", {"a": torch.zeros(80, 768)}, "more than the 75"),
    ],
)
def test_malformed_files_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif path.suffix == ".safetensors":
        safetensors.torch.save_file(content, path)
    else:
        torch.save(content, path)
    with pytest.raises(UserError) as excinfo:
        load_embedding(path, width=768)
    assert message in one_line_error(excinfo, path)


def test_folder(tmp_path):
    save_a1111(tmp_path / "style.pt", torch.randn(2, 768))
    torch.save({"<toy>": torch.randn(768)}, tmp_path / "toy.bin")
    safetensors.torch.save_file({"emb_params": torch.randn(3, 768)}, tmp_path / "neg.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")  # skipped, as A1111 skips empty files
    (tmp_path / "notes.txt").write_text("not an embedding")
    (tmp_path / "sub").mkdir()
    found = load_embeddings(tmp_path, width=768)
    assert sorted(found) == ["neg", "style", "toy"]
    assert [found[n].num_vectors for n in ("neg", "style", "toy")] == [3, 2, 1]
    torch.save({"<toy>": torch.randn(768)}, tmp_path / "toy.pt")
    with pytest.raises(UserError, match="share the trigger word 'toy'"):
        load_embeddings(tmp_path)
    with pytest.raises(UserError, match="embeddings folder not found"):
        load_embeddings(tmp_path / "missing")
