"""scripts/merge.py: A1111's weighted sum and add difference, its rules for keys one model lacks, inpainting
UNets, fp16 output, and bad inputs (one line, exit 2, nothing written)."""

import pytest
import safetensors.torch
import torch
from test_convert import assert_user_error, run_script

from ldm.adapters.merge import merge_checkpoints
from ldm.errors import UserError

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"


def checkpoint(seed: int, in_channels: int = 4, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """A small state dict with the kinds of keys a merge treats differently."""
    generator = torch.Generator().manual_seed(seed)
    state = {
        INPUT_CONV: torch.randn(8, in_channels, 3, 3, generator=generator),
        "model.diffusion_model.out.2.bias": torch.randn(4, generator=generator),
        "first_stage_model.decoder.conv_out.weight": torch.randn(3, 8, 3, 3, generator=generator),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(
            16, generator=generator
        ),
        "betas": torch.rand(10, generator=generator),  # no "model" in the key: A's is kept
        POSITION_IDS: torch.arange(77)[None] + seed,  # skipped by A1111: A's is kept
    }
    return {**state, **(extra or {})}


def save(tmp_path, name: str, state: dict) -> str:
    path = tmp_path / name
    if name.endswith(".ckpt"):
        torch.save({"state_dict": state, "global_step": 1}, path)
    else:
        safetensors.torch.save_file(state, path)
    return path


def test_weighted_sum_and_add_difference(tmp_path):
    a = checkpoint(0, extra={"model.only_in_a": torch.ones(3)})
    b = checkpoint(1, extra={"model.only_in_b": torch.ones(3)})
    c = checkpoint(2)
    del c["model.diffusion_model.out.2.bias"]  # C lacks it: add-difference leaves A's value
    paths = [
        save(tmp_path, "a.safetensors", a),
        save(tmp_path, "b.ckpt", b),
        save(tmp_path, "c.safetensors", c),
    ]

    with pytest.warns(UserWarning) as caught:
        counts = merge_checkpoints(paths[0], paths[1], tmp_path / "sum.safetensors", 0.3)
    assert {str(w.message).split(" (")[0] for w in caught} == {
        "1 tensors are only in A",
        "1 tensors are missing from A",
    }
    merged = safetensors.torch.load_file(tmp_path / "sum.safetensors")
    assert merged.keys() == a.keys() and counts == {"merged": 4, "copied": 3, "dropped": 1}
    for key, value in merged.items():
        if key.startswith(
            ("model.diffusion_model", "first_stage", "cond_stage_model.transformer.text_model.final")
        ):
            assert torch.allclose(value, a[key] * 0.7 + b[key] * 0.3, atol=1e-6), key
        else:
            assert torch.equal(value, a[key]), key

    with pytest.warns(UserWarning):
        merge_checkpoints(
            *paths[:2], tmp_path / "diff.safetensors", 0.8, mode="add-difference", c_path=paths[2]
        )
    merged = safetensors.torch.load_file(tmp_path / "diff.safetensors")
    for key in (INPUT_CONV, "first_stage_model.decoder.conv_out.weight"):
        assert torch.allclose(merged[key], a[key] + (b[key] - c[key]) * 0.8, atol=1e-6)
    for key in ("model.diffusion_model.out.2.bias", "betas", POSITION_IDS, "model.only_in_a"):
        assert torch.equal(merged[key], a[key])


def test_inpainting_model_merges_on_shared_channels_and_fp16(tmp_path):
    a, b = checkpoint(0, in_channels=9), checkpoint(1)
    paths = save(tmp_path, "inpaint.safetensors", a), save(tmp_path, "normal.safetensors", b)
    merge_checkpoints(*paths, tmp_path / "out.safetensors", 0.5, dtype=torch.float16)
    merged = safetensors.torch.load_file(tmp_path / "out.safetensors")
    expected = a[INPUT_CONV].clone()
    expected[:, :4] = (a[INPUT_CONV][:, :4] + b[INPUT_CONV]) * 0.5
    assert merged[INPUT_CONV].dtype == torch.float16
    assert torch.allclose(merged[INPUT_CONV].float(), expected, atol=2e-3)
    assert merged["betas"].dtype == torch.float32 and merged[POSITION_IDS].dtype == torch.int64

    with pytest.raises(UserError, match="A must be the inpainting model"):
        merge_checkpoints(paths[1], paths[0], tmp_path / "reversed.safetensors", 0.5)
    assert not (tmp_path / "reversed.safetensors").exists()


def test_merge_script_and_its_errors(tmp_path):
    a, b, c = checkpoint(0), checkpoint(1), checkpoint(2)
    paths = [save(tmp_path, f"{n}.safetensors", s) for n, s in zip("abc", (a, b, c), strict=True)]
    out = tmp_path / "out.safetensors"
    result = run_script("merge.py", paths[0], paths[1], out, "--c", paths[2], "-m", "0.5")
    assert result.returncode == 0, result.stderr
    merged = safetensors.torch.load_file(out)
    assert torch.allclose(
        merged[INPUT_CONV], a[INPUT_CONV] + (b[INPUT_CONV] - c[INPUT_CONV]) * 0.5, atol=1e-6
    )

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(paths[1].read_bytes()[:-10])
    other = save(
        tmp_path,
        "other.safetensors",
        checkpoint(3, extra={"model.diffusion_model.out.2.bias": torch.zeros(5)}),
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_user_error(run_script("merge.py", paths[0], truncated, tmp_path / "x.safetensors"), "truncated")
    assert_user_error(run_script("merge.py", paths[0], other, tmp_path / "x.safetensors"), "cannot merge")
    assert_user_error(run_script("merge.py", paths[0], paths[1], tmp_path / "x.ckpt"), ".safetensors")
    assert_user_error(run_script("merge.py", paths[0], paths[1], out), "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
