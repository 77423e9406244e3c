"""scripts/convert.py: a diffusers folder it writes loads in diffusers' StableDiffusionPipeline and computes what
this project computes; converting back restores every tensor bit for bit; EMA extraction, pruning, fp16 and baked
LoRAs; bad inputs end in one line, exit status 2 and no output."""

import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from adapters_common import ROOT, TINY_CONFIG, inputs, outputs_diffusers, outputs_ours, tiny_model
from omegaconf import OmegaConf
from test_lora import random_kohya_lora

from ldm.adapters.convert import convert, ema_key
from ldm.adapters.diffusers_layout import config_from_diffusers, read_diffusers_folder
from ldm.adapters.lora import apply_loras
from ldm.checkpoint import load_model_from_config
from ldm.errors import UserError

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "scripts" / name), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    """A training checkpoint of the tiny model: weights, EMA copies of the UNet weights, the autoencoder's loss
    weights, optimizer state beside the state dict."""
    model, config = tiny_model()
    state = model.state_dict()
    generator = torch.Generator().manual_seed(3)
    ema = {
        ema_key(k): v + 0.01 * torch.randn(v.shape, generator=generator)
        for k, v in state.items()
        if k.startswith("model.")
    }
    ema.update(
        {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(100, dtype=torch.int)}
    )
    loss = {
        "first_stage_model.loss.logvar": torch.zeros(()),
        "first_stage_model.loss.disc.weight": torch.randn(4, 3),
    }
    path = tmp_path_factory.mktemp("convert") / "full.ckpt"
    optimizer = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}
    torch.save(
        {"state_dict": {**state, **ema, **loss}, "global_step": 7, "optimizer_states": [optimizer]}, path
    )
    return path, model, config, ema


def test_diffusers_folder_matches_and_converts_back_bit_for_bit(full_checkpoint):
    from diffusers import StableDiffusionPipeline

    path, model, _, _ = full_checkpoint
    folder = path.parent / "pipeline"
    result = run_script("convert.py", path, folder, "--config", TINY_CONFIG)
    assert result.returncode == 0, result.stderr
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)

    x, t, context = inputs()
    ours, theirs = outputs_ours(model, x, t, context), outputs_diffusers(pipe, x, t, context)
    with torch.no_grad():
        ours["image"] = model.decode_first_stage(x)
        theirs["image"] = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    for name in ("eps", "text", "image"):
        print(f"{name}: max |ours - diffusers| = {(ours[name] - theirs[name]).abs().max():.1e}")
        assert ours[name].std() > 0.01  # not a comparison of near-constant outputs
        assert (ours[name] - theirs[name]).abs().max() <= 1e-4

    # `--ckpt FOLDER`: ldm.checkpoint reads a diffusers folder into this layout, memory-mapped loading included
    loaded = load_model_from_config(
        config_from_diffusers(folder), read_diffusers_folder(folder)[0], verbose=False
    )
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    back = path.parent / "back.safetensors"
    result = run_script("convert.py", folder, back)
    assert result.returncode == 0, result.stderr
    restored, original = safetensors.torch.load_file(back), model.state_dict()
    assert restored.keys() == original.keys()
    assert all(
        restored[k].dtype == original[k].dtype and torch.equal(restored[k], original[k]) for k in original
    )


def test_ema_extraction_pruning_fp16_and_baked_lora(full_checkpoint, tmp_path):
    path, model, _, ema = full_checkpoint
    lora = tmp_path / "style.safetensors"
    random_kohya_lora(model, lora, seed=11)
    out = tmp_path / "ema.safetensors"
    result = run_script("convert.py", path, out, "--ema", "--fp16", "--lora", f"{lora}:0.6")
    assert result.returncode == 0, result.stderr
    converted = safetensors.torch.load_file(out)
    state = model.state_dict()
    assert converted.keys() == state.keys()  # EMA copies, loss weights and optimizer state are gone
    assert converted["betas"].dtype == torch.float32 and torch.equal(converted["betas"], state["betas"])

    expected_model, _ = tiny_model()
    expected_model.load_state_dict(
        {k: ema[ema_key(k)] if k.startswith("model.") else v for k, v in state.items()}
    )
    apply_loras(expected_model, [(lora, 0.6)], verbose=False)
    expected = expected_model.state_dict()
    for key, value in converted.items():
        if (
            key.startswith(("model.", "first_stage_model.", "cond_stage_model."))
            and value.is_floating_point()
        ):
            assert value.dtype == torch.float16, key
            assert torch.equal(value, expected[key].half()), key


def test_help_does_not_import_torch():
    for script in ("convert.py", "merge.py"):
        code = (
            "import runpy, sys; sys.argv = ['x', '--help']\n"
            f"try: runpy.run_path({str(ROOT / 'scripts' / script)!r}, run_name='__main__')\n"
            "except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT
        )
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


def test_bad_inputs_are_one_line_errors_and_write_nothing(full_checkpoint, tmp_path):
    path, model, _, _ = full_checkpoint
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload()}, evil)
    truncated = tmp_path / "truncated.safetensors"
    safetensors.torch.save_file(model.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    sdxl_lora = tmp_path / "sdxl.safetensors"
    name = "lora_unet_output_blocks_9_1_transformer_blocks_3_attn1_to_q"
    safetensors.torch.save_file(
        {f"{name}.lora_down.weight": torch.zeros(4, 640), f"{name}.lora_up.weight": torch.zeros(640, 4)},
        sdxl_lora,
    )
    out = tmp_path / "out.safetensors"
    cases = [
        ((evil, out), "refused for safety"),
        ((truncated, out), "truncated"),
        ((path, out, "--lora", f"{sdxl_lora}:0.5"), "LoRA"),
    ]
    for args, message in cases:
        assert_user_error(run_script("convert.py", *args), message)
    assert not marker.exists()
    # the same checks in-process (each script run costs seconds of imports)
    v1 = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml")
    with pytest.raises(UserError, match="does not match the config"):
        convert(path, tmp_path / "folder", config=v1)
    with pytest.raises(UserError, match="--overwrite"):
        convert(path, evil)
    plain = path.parent / "plain.safetensors"  # EMA-only already
    safetensors.torch.save_file(model.state_dict(), plain)
    with pytest.raises(UserError, match="no EMA weights"):
        convert(plain, out, ema=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "evil.ckpt",
        "sdxl.safetensors",
        "truncated.safetensors",
    ]
