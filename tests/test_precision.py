"""Low-precision weights: the bf16 CPU path (UNet torso and VAE decoder in bf16, norms and timestep embedding
in fp32) runs and stays close to fp32, with its products in fp32 on CPUs without bf16 units; fp32 round trips
are exact."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ldm.runtime
from ldm.modules.diffusionmodules.util import GroupNorm32
from ldm.runtime import precision_scope
from ldm.runtime.bf16 import Bf16ProductsInFp32
from ldm.runtime.memory import low_precision


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


class ProductLog(TorchDispatchMode):
    """Records the dtypes of the operands that reach any product kernel (matched by name, independently of
    ldm.runtime.bf16.s list)."""

    NAMES = ("mm", "linear", "matmul", "einsum", "conv", "attention")

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in func._opname for name in self.NAMES):
            self.dtypes += [a.dtype for a in args if isinstance(a, torch.Tensor)]
        return func(*args, **(kwargs or {}))


def products(x, weight, conv_weight, q):
    """Every product kind a bf16 model runs: linear, matmul, einsum, conv2d, attention (bmm-based too)."""
    return (
        F.linear(x, weight),
        x @ weight.T,
        torch.einsum("nc,dc->nd", x, weight),
        F.conv2d(x.view(1, 8, 4, 4), conv_weight, padding=1),
        F.scaled_dot_product_attention(q, q, q),
        torch.baddbmm(q[0][..., :1], q[0], q[0].transpose(1, 2)),
    )


@pytest.mark.parametrize("inference", [False, True])
def test_bf16_products_in_fp32_are_rounded_fp32_products(inference):
    """Under Bf16ProductsInFp32 each product equals the fp32 product of the same bf16 values, rounded to bf16,
    and is close to torch's own bf16 kernel; with or without autograd (composite ops arrive undecomposed in
    inference mode)."""
    g = torch.Generator().manual_seed(0)
    operands = [
        torch.randn(16, 8, generator=g),
        torch.randn(12, 8, generator=g),
        torch.randn(5, 8, 3, 3, generator=g),
        torch.randn(1, 2, 16, 8, generator=g),
    ]
    bf16 = [t.bfloat16() for t in operands]
    with torch.inference_mode(inference):
        reference = [out.bfloat16() for out in products(*[t.float() for t in bf16])]
        native = products(*bf16)
        log = ProductLog()
        with log, Bf16ProductsInFp32():
            emulated = products(*bf16)
    assert log.dtypes and torch.bfloat16 not in log.dtypes
    for out, ref, nat in zip(emulated, reference, native, strict=True):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(out.float(), nat.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_cpu_bf16_scope_runs_products_in_fp32_without_bf16_units(tiny_ldm, inputs, monkeypatch, fast_bf16):
    """precision_scope("autocast") on the CPU: bf16 products reach the kernels as fp32 only where the CPU lacks
    bf16 units, and the eps is the same bf16 computation either way."""
    monkeypatch.setattr(ldm.runtime, "cpu_has_fast_bf16", lambda: fast_bf16)
    low_precision(tiny_ldm, torch.bfloat16)
    x, t, c = inputs
    log = ProductLog()
    with torch.no_grad(), log, precision_scope("autocast", torch.device("cpu")):
        eps = tiny_ldm.apply_model(x, t, c)
    assert log.dtypes and (torch.bfloat16 in log.dtypes) == fast_bf16
    assert eps.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        native = tiny_ldm.apply_model(x, t, c)
    # torch's own bf16 kernels round in another order (Zen 1 without bf16 units: up to 2.05% of the largest eps)
    torch.testing.assert_close(eps.float(), native.float(), rtol=0, atol=0.03 * native.abs().max().item())
