"""ldm.checkpoint: safe reading, key fix-ups, dtype casts, meta-device loading, atomic saving."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.checkpoint import (
    CheckpointError,
    cached_model_hash,
    hash_cache_path,
    load_model_from_config,
    load_weights,
    model_hash,
    model_hash_in_background,
    read_state_dict,
    save_checkpoint,
)
from ldm.modules.encoders.modules import FrozenCLIPEmbedder

SMALL_CLIP = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


class Tiny(nn.Module):
    """A small tree like LatentDiffusion's: nested weights, a persistent buffer and the small CLIP encoder."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Linear(8, 4))
        self.register_buffer("scale", torch.tensor([0.5, 2.0]))
        self.cond_stage_model = FrozenCLIPEmbedder(text_model_config=SMALL_CLIP)


def checkpoint_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Tiny state dict as a transformers-4.x era checkpoint holds it (with the CLIP position ids)."""
    torch.manual_seed(seed)
    state = {k: torch.randn_like(v) for k, v in Tiny().state_dict().items()}
    state[POSITION_IDS] = torch.arange(77)[None]
    return state


def assert_loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, state[key].float()), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lightning_ckpt_round_trip(tmp_path, dtype):
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in checkpoint_state().items()}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 7, "epoch": 2}, path)
    loaded, metadata = read_state_dict(path)
    assert metadata == {"global_step": 7, "epoch": 2}
    assert loaded.keys() == state.keys()
    torch.manual_seed(1)
    model = Tiny()
    missing, unexpected = load_weights(model, loaded, verbose=False)
    assert missing == [] and unexpected == []
    assert_loaded(model, state)
    assert torch.equal(
        model.cond_stage_model.transformer.text_model.embeddings.position_ids, state[POSITION_IDS]
    )


def test_bare_state_dict_and_safetensors(tmp_path):
    state = checkpoint_state()
    torch.save(state, tmp_path / "bare.pt")
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    for name in ("bare.pt", "model.safetensors"):
        loaded, metadata = read_state_dict(tmp_path / name)
        assert metadata == {}
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("name", ["out.ckpt", "out.safetensors"])
def test_save_checkpoint_round_trip(tmp_path, name):
    state = checkpoint_state()
    save_checkpoint(tmp_path / name, state, global_step=7)
    loaded, metadata = read_state_dict(tmp_path / name)
    assert metadata == {"global_step": 7}
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert os.listdir(tmp_path) == [name]


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused for safety") as error:
        read_state_dict(path)
    assert str(path) in str(error.value) and "`exec`" in str(error.value)
    assert not marker.exists()
    # The file really runs code when unpickled without the allow-list.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


def test_lightning_callback_reference_is_allowed(tmp_path):
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    path = tmp_path / "sd-v1.ckpt"
    callbacks = {ModelCheckpoint: {"best_model_path": "last.ckpt", "best_model_score": torch.tensor(0.1)}}
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3, "callbacks": callbacks}, path)
    loaded, metadata = read_state_dict(path)
    assert torch.equal(loaded["w"], torch.ones(2)) and metadata == {"global_step": 3}


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nothing.ckpt"):
        read_state_dict(tmp_path / "nothing.ckpt")


def test_shape_mismatch_names_key_and_shapes():
    state = checkpoint_state()
    state["body.2.weight"] = torch.zeros(5, 8)
    with pytest.raises(CheckpointError, match=r"body\.2\.weight.*\(5, 8\).*\(4, 8\)"):
        load_weights(Tiny(), state, verbose=False)


def test_text_model_keys_without_text_model_level_are_mapped():
    state = checkpoint_state()
    flat = {k.replace("transformer.text_model.", "transformer."): v for k, v in state.items()}
    assert not any("text_model" in k for k in flat)
    model = Tiny()
    missing, unexpected = load_weights(model, flat, verbose=False)
    assert missing == [] and unexpected == []
    assert_loaded(model, state)


def test_model_ema_keys_are_ignored_unless_the_model_has_them():
    state = checkpoint_state()
    ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5, dtype=torch.int)}
    ema["model_ema.body0weight"] = torch.randn(8, 3, 3, 3)
    missing, unexpected = load_weights(Tiny(), {**state, **ema}, verbose=False)
    assert missing == [] and unexpected == []

    model = Tiny()
    model.model_ema = nn.Module()
    model.model_ema.register_buffer("decay", torch.tensor(0.5))
    missing, unexpected = load_weights(model, {**state, **ema}, verbose=False)
    assert missing == [] and unexpected == ["model_ema.num_updates", "model_ema.body0weight"]
    assert model.model_ema.decay.item() == pytest.approx(0.9999)


def test_ignore_keys_drop_prefixes():
    state = checkpoint_state()
    model = Tiny()
    before = model.body[2].weight.clone()
    missing, unexpected = load_weights(model, state, ignore_keys=["body.2."], verbose=False)
    assert missing == ["body.2.weight", "body.2.bias"] and unexpected == []
    assert torch.equal(model.body[2].weight, before)
    assert torch.equal(model.body[0].weight, state["body.0.weight"])


def test_strict_refuses_mismatched_keys():
    state = checkpoint_state()
    del state["scale"]
    with pytest.raises(CheckpointError, match="1 missing keys:\n  scale"):
        load_weights(Tiny(), {**state, "extra": torch.zeros(1)}, strict=True, verbose=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_meta_model_is_fully_materialized(tmp_path, dtype):
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in checkpoint_state().items()}
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "model.ckpt")
    loaded, _ = read_state_dict(tmp_path / "model.ckpt")
    with torch.device("meta"):
        model = Tiny()
    missing, unexpected = load_weights(model, loaded, verbose=False)
    assert missing == [] and unexpected == []
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert not any(t.is_meta for t in tensors.values())
    assert_loaded(model, state)
    position_ids = model.cond_stage_model.transformer.text_model.embeddings.position_ids
    assert torch.equal(position_ids, torch.arange(77)[None])
    assert model.body[0].weight.requires_grad
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())
    if dtype == torch.float32:  # the memory-mapped checkpoint tensors are the model's weights, not copies
        assert model.body[0].weight.data_ptr() == loaded["body.0.weight"].data_ptr()


def test_meta_model_with_missing_weights_is_an_error():
    state = checkpoint_state()
    del state["body.1.weight"]
    with torch.device("meta"):
        model = Tiny()
    with pytest.raises(CheckpointError, match="lacks 1 weights.*\n  body.1.weight"):
        load_weights(model, state, verbose=False)


def test_load_model_from_config(tmp_path):
    config = OmegaConf.create(
        {
            "model": {
                "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                "params": {"text_model_config": SMALL_CLIP},
            }
        }
    )
    torch.manual_seed(0)
    reference = FrozenCLIPEmbedder(text_model_config=SMALL_CLIP)
    save_checkpoint(tmp_path / "clip.ckpt", reference.state_dict(), global_step=1)
    model = load_model_from_config(config, tmp_path / "clip.ckpt", verbose=False)
    assert isinstance(model, FrozenCLIPEmbedder) and not model.training
    with torch.no_grad():
        assert torch.equal(model(["a photo of a cat"]), reference(["a photo of a cat"]))
    random = load_model_from_config(config, None, verbose=False)
    assert random.device == torch.device("cpu")
    key = "transformer.text_model.embeddings.token_embedding.weight"
    assert not torch.equal(random.state_dict()[key], reference.state_dict()[key])


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, {"w": torch.ones(3)}, global_step=1)
    original = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(3)}, global_step=2)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "new.ckpt", {"w": torch.zeros(3)})
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt"]
    assert path.read_bytes() == original


def test_model_hash(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, {"w": torch.arange(4.0)})
    assert model_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert len(model_hash(path)) == 10


def test_model_hash_in_background(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, {"w": torch.randn(1000)})
    assert model_hash_in_background(path).result(timeout=60) == model_hash(path)
    with pytest.raises(FileNotFoundError):
        model_hash_in_background(tmp_path / "missing.ckpt").result(timeout=60)


def test_cached_model_hash_reads_a_file_once_per_size_and_mtime(tmp_path):
    path, cache = tmp_path / "model.safetensors", tmp_path / "cache" / "hashes.json"
    save_checkpoint(path, {"w": torch.arange(4.0)})
    first = cached_model_hash(path, cache)
    assert first == model_hash(path)
    assert json.loads(cache.read_text())[str(path.resolve())]["hash"] == first
    stat = path.stat()
    path.write_bytes(path.read_bytes()[::-1])  # same size; put the old mtime back: the cache answers
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cached_model_hash(path, cache) == first
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # modified: hashed again
    assert cached_model_hash(path, cache) == model_hash(path) != first
    assert [p.name for p in cache.parent.iterdir()] == ["hashes.json"]  # no temporary file left


def test_cached_model_hash_survives_a_broken_or_unwritable_cache(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, {"w": torch.arange(4.0)})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert cached_model_hash(path, broken) == model_hash(path)
    assert str(path.resolve()) in json.loads(broken.read_text())  # rewritten whole
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cached_model_hash(path, blocker / "hashes.json") == model_hash(path)  # its folder is a file


def test_hash_cache_path_from_the_environment(monkeypatch, tmp_path, hash_cache):
    assert hash_cache_path() == hash_cache  # tests never touch the user's cache
    monkeypatch.delenv("LDM_HASH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hash_cache_path() == tmp_path / "ldm" / "model-hashes.json"
    monkeypatch.delenv("XDG_CACHE_HOME")

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", no_home)
    assert hash_cache_path() is None
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, {"w": torch.arange(4.0)})
    assert cached_model_hash(path) == model_hash(path)  # hashed, nothing remembered
