"""Memory options give the plain result: tiled VAE decode/encode (close, no seams), chunked attention and
lowvram (equal), and the script flags that turn them on."""

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoint import save_checkpoint
from ldm.cli import apply_memory_options
from ldm.memory import chunked_attention, enable_lowvram, lowvram_units, set_attention_chunk, tiled_map
from ldm.models.diffusion.ddim import DDIMSampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import txt2img  # noqa: E402


def test_tiled_map_is_exact_for_a_local_function():
    """With a pointwise (upsampling) function, blending the overlaps must give back exactly the untiled result,
    also where the last tile is shifted to stay inside the image."""
    x = torch.randn(2, 3, 21, 30)

    def fn(t):
        return F.interpolate(t, scale_factor=8, mode="nearest") * 2 + 1

    out = tiled_map(fn, x, tile=8, overlap=3)
    assert out.shape == (2, 3, 168, 240)
    torch.testing.assert_close(out, fn(x), rtol=0, atol=1e-6)
    down = tiled_map(lambda t: F.avg_pool2d(t, 8), torch.randn(1, 2, 96, 80), tile=32, overlap=8)
    assert down.shape == (1, 2, 12, 10)


def test_tiled_map_checks_overlap():
    with pytest.raises(ValueError, match="overlap"):
        tiled_map(lambda t: t, torch.zeros(1, 1, 4, 4), tile=2, overlap=2)


def seam_ratio(image: torch.Tensor, boundaries: list[int]) -> float:
    """Largest mean |column step| at the given pixel columns over the median one elsewhere (about 1: no seam)."""
    steps = (image[..., 1:] - image[..., :-1]).abs().mean(dim=(0, 1, 2))  # [W - 1]
    at = steps[boundaries].max()
    return (at / steps.median()).item()


def test_tiled_vae_decode_is_close_and_seamless(tiny_ldm):
    """A 32x32 latent in 24x24 tiles overlapping by 8: 4 tiles. The VAE's GroupNorms and mid attention see a
    tile, not the image, so tiling is close to the untiled decode, not equal (random weights make that gap
    larger than a trained VAE's); the blending leaves no visible borders."""
    vae = tiny_ldm.first_stage_model
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = vae.decode(z)
        vae.enable_tiling(32, 8)
        torch.testing.assert_close(vae.decode(z), plain, rtol=0, atol=1e-6)  # one tile: untiled
        vae.enable_tiling(24, 8)
        tiled = vae.decode(z)
        vae.enable_tiling(None)
    assert tiled.shape == plain.shape == (1, 3, 256, 256)
    diff = (tiled - plain).abs()
    assert diff.mean() < 0.2 * plain.std(), (diff.mean(), plain.std())
    # the blend region of the left/right tiles: pixels 64..191; plain and tiled steps there look alike
    borders = [8 * 8 - 1, 8 * 16 - 1, 8 * 24 - 1]
    assert seam_ratio(tiled, borders) < 1.5 * max(1.0, seam_ratio(plain, borders))


def test_tiled_vae_encode_is_close(tiny_ldm):
    vae = tiny_ldm.first_stage_model
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        plain = vae.encode(x).mean
        vae.enable_tiling(24, 8)  # 192-pixel tiles overlapping by 64
        tiled = vae.encode(x).mean
        vae.enable_tiling(None)
    assert tiled.shape == plain.shape == (1, 4, 32, 32)
    assert (tiled - plain).abs().mean() < 0.2 * plain.std(), ((tiled - plain).abs().mean(), plain.std())


def test_chunked_attention_equals_plain():
    q, k, v = torch.randn(2, 3, 50, 8), torch.randn(2, 3, 77, 8), torch.randn(2, 3, 77, 8)
    mask = torch.rand(2, 1, 1, 77) > 0.3
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(chunked_attention(q, k, v, 7, attn_mask=mask), plain, rtol=0, atol=1e-6)


def test_chunked_attention_in_the_model_equals_plain(tiny_ldm):
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 900])
    c = torch.randn(2, 77, 32)
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        plain_eps, plain_image = tiny_ldm.apply_model(x, t, c), tiny_ldm.decode_first_stage(z)
        set_attention_chunk(tiny_ldm, 5)
        eps, image = tiny_ldm.apply_model(x, t, c), tiny_ldm.decode_first_stage(z)
    torch.testing.assert_close(eps, plain_eps, rtol=0, atol=1e-5)
    torch.testing.assert_close(image, plain_image, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        set_attention_chunk(tiny_ldm, 0)


def ddim_image(model) -> torch.Tensor:
    with torch.no_grad():
        c = model.get_learned_conditioning(["a red square"])
        uc = model.get_learned_conditioning([""])
        x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        z, _ = DDIMSampler(model).sample(
            S=3, batch_size=1, shape=(4, 8, 8), conditioning=c, unconditional_guidance_scale=5.0,
            unconditional_conditioning=uc, x_T=x_T, verbose=False,
        )  # fmt: skip
        return model.decode_first_stage(z)


def test_lowvram_gives_the_plain_image_on_cpu(tiny_ldm):
    plain = ddim_image(tiny_ldm)
    model = copy.deepcopy(tiny_ldm)
    enable_lowvram(model, "cpu")
    units = lowvram_units(model)
    assert len(units) == 4 and all(len(unit._forward_pre_hooks) == 1 for unit in units)
    torch.testing.assert_close(ddim_image(model), plain, rtol=0, atol=1e-6)


def memory_flags(**kw) -> argparse.Namespace:
    flags = dict(vae_tiling=False, attention_chunk=None, lowvram=False, compile=False, threads=None)
    return argparse.Namespace(**{**flags, **kw})


def test_apply_memory_options(tiny_ldm, capsys):
    plain = ddim_image(tiny_ldm)
    apply_memory_options(tiny_ldm, memory_flags(vae_tiling=True, attention_chunk=3, lowvram=True),
                         torch.device("cpu"), "full")  # fmt: skip
    assert "nothing to offload" in capsys.readouterr().out
    assert tiny_ldm.first_stage_model.tiling == (64, 16)
    assert tiny_ldm.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.chunk == 3
    torch.testing.assert_close(ddim_image(tiny_ldm), plain, rtol=0, atol=1e-4)


def test_txt2img_with_memory_flags_makes_the_same_image(tiny_config, tmp_path):
    from conftest import randomize_

    from ldm.util import instantiate_from_config

    ckpt = tmp_path / "tiny.ckpt"
    save_checkpoint(ckpt, randomize_(instantiate_from_config(tiny_config.model), std=0.1).state_dict())
    base = [
        "--config", "tests/configs/tiny-ldm.yaml", "--ckpt", str(ckpt), "--H", "64", "--W", "64",
        "--ddim_steps", "3", "--n_samples", "1", "--n_iter", "1", "--device", "cpu", "--no-safety-checker",
        "--skip_grid",
    ]  # fmt: skip
    txt2img.main([*base, "--outdir", str(tmp_path / "plain")])
    txt2img.main(
        [*base, "--outdir", str(tmp_path / "opts"), "--attention-chunk", "4", "--lowvram", "--vae-tiling"]
    )
    images = [
        np.asarray(Image.open(tmp_path / d / "samples" / "00000.png")).astype(int) for d in ("plain", "opts")
    ]
    assert np.abs(images[0] - images[1]).max() <= 1
