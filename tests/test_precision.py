"""Low-precision weights: the bf16 CPU path (UNet torso and VAE decoder in bf16, norms and timestep embedding
in fp32) runs and stays close to fp32; fp32 round trips are exact."""

import copy

import pytest
import torch

from ldm.inference import precision_scope
from ldm.memory import low_precision
from ldm.modules.diffusionmodules.util import GroupNorm32


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.tensor([10, 900]),
        torch.randn(2, 77, 32, generator=g),
    )


def test_bf16_path_keeps_sensitive_parts_fp32(tiny_ldm):
    low_precision(tiny_ldm, torch.bfloat16)
    unet = tiny_ldm.model.diffusion_model
    assert unet.dtype == torch.bfloat16
    assert unet.input_blocks[0][0].weight.dtype == torch.bfloat16
    assert unet.time_embed[0].weight.dtype == torch.float32
    assert unet.out[2].weight.dtype == torch.float32
    norms = [m for m in unet.modules() if isinstance(m, GroupNorm32)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    decoder = tiny_ldm.first_stage_model.decoder
    assert decoder.conv_in.weight.dtype == torch.bfloat16 and decoder.norm_out.weight.dtype == torch.float32
    assert tiny_ldm.first_stage_model.encoder.conv_in.weight.dtype == torch.float32


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_unet_and_decoder_close_to_fp32(tiny_ldm, inputs, autocast):
    x, t, c = inputs
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eps32, image32 = tiny_ldm.apply_model(x, t, c), tiny_ldm.decode_first_stage(z)
        model = copy.deepcopy(tiny_ldm)
        low_precision(model, torch.bfloat16)
        with precision_scope("autocast" if autocast else "full", torch.device("cpu")):
            eps, image = model.apply_model(x, t, c), model.decode_first_stage(z)
    if not autocast:  # under autocast the fp32 output layers return bf16, as with fp32 weights
        assert eps.dtype == image.dtype == torch.float32
    eps, image = eps.float(), image.float()
    assert torch.isfinite(eps).all() and torch.isfinite(image).all()
    assert (eps - eps32).abs().max() < 0.05 * eps32.abs().max(), (eps - eps32).abs().max()
    assert (image - image32).abs().max() < 0.05 * image32.abs().max(), (image - image32).abs().max()
    assert (eps - eps32).abs().max() > 0  # it really ran in bf16


def test_convert_to_fp16_and_back_sets_the_dtype(tiny_ldm):
    unet = tiny_ldm.model.diffusion_model
    unet.convert_to_fp16()
    assert unet.dtype == unet.input_blocks[0][0].weight.dtype == torch.float16
    unet.convert_to_fp32()
    assert unet.dtype == unet.input_blocks[0][0].weight.dtype == torch.float32


def test_channels_last_unet_equals_plain(tiny_ldm, inputs):
    """The UNet gives the same eps on a channels_last input and with channels_last weights."""
    x, t, c = inputs
    with torch.no_grad():
        plain = tiny_ldm.apply_model(x, t, c)
        tiny_ldm.model.diffusion_model.to(memory_format=torch.channels_last)
        out = tiny_ldm.apply_model(x.contiguous(memory_format=torch.channels_last), t, c)
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-4)
