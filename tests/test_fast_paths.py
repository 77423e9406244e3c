"""The CPU fast paths the runtime applies give the plain layers' numbers: matmul convolutions, the decoder's
channels_last levels, prepacked bf16 weights, and all applied to a whole model."""

import copy
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from test_autoencoder import small_ddconfig
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder
from ldm.runtime import convolution, fast_paths, precision_scope
from ldm.runtime.bf16 import cpu_has_fast_bf16
from ldm.runtime.convolution import is_channels_last
from ldm.runtime.fast_paths import (
    MatmulConv2d,
    PackedConv2d,
    PackedGEGLU,
    PackedLinear,
    WinogradConv2d,
    apply_cpu_fast_paths,
    fp32_sources_kept,
    low_precision_with_fast_paths,
    use_channels_last_decoder,
    use_channels_last_in_bf16,
    use_matmul_convolutions,
    use_packed_convolutions,
    use_packed_linears,
    use_winograd_convolutions,
)
from ldm.runtime.memory import low_precision

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch has no oneDNN")
needs_onednn_bf16 = pytest.mark.skipif(
    not cpu_has_fast_bf16(), reason="oneDNN has no bf16 kernels on this CPU"
)
BF16 = pytest.param(torch.bfloat16, marks=needs_onednn_bf16)  # a bf16 case of a test that runs in fp32 too


@pytest.mark.parametrize(
    "kernel, stride, padding, size, bias, channels_last",
    [
        (3, 1, 1, 8, True, False),  # 3x3 on <= 64 pixels: im2col + one matrix product
        (3, 1, 1, 4, False, True),
        (3, 2, 1, 8, True, False),  # stride 2 into <= 64 pixels (the UNet's Downsample): the same
        (3, 2, 1, 7, False, True),
        (3, 2, 1, 16, True, True),
        (3, 1, 1, 16, True, False),  # larger maps, 1x1: torch's own convolution
        (3, 2, 1, 18, True, False),
        (1, 1, 0, 8, True, True),
    ],
)
def test_conv2d_matmul_path_equals_torch_conv(kernel, stride, padding, size, bias, channels_last):
    torch.manual_seed(0)
    conv = MatmulConv2d(24, 40, kernel, stride=stride, padding=padding, bias=bias)
    reference = torch.nn.Conv2d(24, 40, kernel, stride=stride, padding=padding, bias=bias)
    reference.load_state_dict(conv.state_dict())
    assert list(conv.state_dict()) == list(reference.state_dict())
    conv.MATMUL_MIN_CHANNELS = 16  # the path is for wide layers; test it on a narrow one
    x = torch.randn(2, 24, size, size)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        conv.to(memory_format=torch.channels_last)
    small = ((size - 1) // stride + 1) ** 2 <= MatmulConv2d.MATMUL_MAX_PIXELS  # output pixels
    assert conv._as_matmul(x) == (kernel == 3 and small)
    x_ref = x.detach().clone().requires_grad_()
    x.requires_grad_()
    out, expected = conv(x), reference(x_ref)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert out.is_contiguous() or not conv._as_matmul(x)  # the matmul path returns plain NCHW
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-4)


def test_conv2d_matmul_path_only_for_wide_small_maps():
    small_map = torch.empty(2, 1280, 8, 8)
    assert MatmulConv2d(1280, 1280, 3, padding=1)._as_matmul(small_map)  # the SD UNet's 8x8 level
    assert not MatmulConv2d(64, 64, 3, padding=1)._as_matmul(small_map[:, :64])  # narrow: oneDNN is as fast
    assert not MatmulConv2d(1280, 1280, 3, padding=1)._as_matmul(torch.empty(2, 1280, 16, 16))
    assert not MatmulConv2d(1280, 1280, 3, padding=1)._as_matmul(small_map.to("meta"))  # CPU only
    downsample = MatmulConv2d(1280, 1280, 3, stride=2, padding=1)
    assert downsample._as_matmul(torch.empty(2, 1280, 16, 16))  # into 8x8 (the UNet's Downsample at 512²)
    assert not downsample._as_matmul(torch.empty(2, 1280, 18, 18))  # into 9x9
    assert not MatmulConv2d(1280, 1280, 3, stride=3, padding=1)._as_matmul(small_map)
    assert not MatmulConv2d(1280, 1280, 3, stride=2, padding=0)._as_matmul(small_map)  # the VAE encoder's


def test_use_matmul_convolutions_switches_only_wide_3x3_layers_and_keeps_the_numbers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1024, 1024, 3, padding=1),
        torch.nn.Conv2d(1024, 8, 3, stride=2, padding=1),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.Conv2d(1024, 8, 1),
    )
    x = torch.randn(2, 1024, 8, 8)
    with torch.no_grad():
        plain = net[:3](x), net[3](x)
        assert use_matmul_convolutions(net) == 2
        assert [type(conv) for conv in net] == [MatmulConv2d, MatmulConv2d, torch.nn.Conv2d, torch.nn.Conv2d]
        assert net[0]._as_matmul(x) and net[1]._as_matmul(x)
        torch.testing.assert_close(net[:3](x), plain[0], rtol=0, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize(
    "dtype, size, bias, tiles",
    [
        (torch.float32, (16, 16), True, convolution.F2X2),
        (torch.float32, (9, 14), False, convolution.F2X2),
        (torch.float32, (16, 16), True, convolution.F4X4),
        (torch.float32, (9, 14), False, convolution.F4X4),  # sides not multiples of 4: zero rows, cropped
        pytest.param(torch.bfloat16, (12, 12), True, convolution.F2X2, marks=needs_onednn_bf16),
    ],
)
def test_winograd_conv_equals_torch_conv(monkeypatch, dtype, size, bias, tiles):
    """F(2x2, 3x3) and F(4x4, 3x3) over packed products: torch's convolution, with an error against fp64 of the
    same order as torch's own (the transforms add and subtract); the plain path under autograd and without packed
    dtypes; a changed weight is transformed again. (bf16 as on a CPU without AMX.)"""
    monkeypatch.setattr(fast_paths, "winograd_tiles", lambda *shape: tiles)
    torch.manual_seed(0)
    conv = WinogradConv2d(640, 48, 3, padding=1, bias=bias).to(dtype)
    reference = nn.Conv2d(640, 48, 3, padding=1, bias=bias).to(dtype)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(2, 640, *size).to(dtype)
    with torch.no_grad():
        exact = F.conv2d(
            x.double(), conv.weight.double(), None if not bias else conv.bias.double(), padding=1
        )
        plain = conv(x)  # no packed dtypes yet: torch's path
        conv.packed_dtypes = frozenset({dtype})
        assert conv._winograd_tiles(x, dtype) is tiles
        fast = conv(x)
        assert hasattr(conv, f"_winograd{tiles.m}_packed")  # the Winograd path ran
        last = conv(x.contiguous(memory_format=torch.channels_last))  # the same tiles and products
        assert is_channels_last(last) and last.equal(fast)
        conv.weight.mul_(2)
        doubled = conv(x)
    assert fast.shape == plain.shape == exact.shape and fast.is_contiguous() and fast.dtype == dtype
    torch.testing.assert_close(plain, reference(x), rtol=0, atol=0)
    plain_error, fast_error = (plain.double() - exact).abs().max(), (fast.double() - exact).abs().max()
    # measured: F2X2 0.27-0.35x torch's error in fp32 (~1e-6 of outputs ~1), 1.7x in bf16; F4X4 ~4e-6 of the
    # largest output: 1.8-2.6x torch's error with AVX2, 17x with AVX512, whose direct convolution sums closer
    if tiles is convolution.F4X4:
        bound = 2e-5 * exact.abs().max()
    else:
        bound = (4 if dtype == torch.float32 else 2.5) * plain_error
    assert fast_error <= bound, (fast_error, bound)
    with torch.no_grad():
        twice = F.conv2d(
            x.double(), conv.weight.double(), None if not bias else conv.bias.double(), padding=1
        )
    assert (doubled.double() - twice).abs().max() <= 2 * bound  # twice the weight, twice the output
    x.requires_grad_()
    conv(x.float() if dtype == torch.float32 else x).sum().backward()  # autograd: torch's path
    assert x.grad is not None


@needs_onednn_bf16
@pytest.mark.parametrize(
    "c_in, kernel, stride, padding, size",
    [(64, 3, 1, 1, 12), (4, 3, 1, 1, 9), (48, 1, 1, 0, 10), (64, 3, 2, 1, 11), (32, 3, 1, 1, 1)],
)
def test_packed_conv_equals_torch_bf16_conv(c_in, kernel, stride, padding, size):
    """oneDNN's convolution with prepacked kernels (3x3, a 4-channel input, 1x1, stride 2, a 1x1 map): torch's
    own bf16 convolution exactly, channels_last out; NCHW maps, fp32 and autograd take torch's path; a changed
    weight is packed again."""
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, 24, kernel, stride=stride, padding=padding).bfloat16()
    plain = copy.deepcopy(conv)
    x = torch.randn(2, c_in, size, size + (size > 1)).bfloat16()
    x_last = x.contiguous(memory_format=torch.channels_last)
    assert use_packed_convolutions(conv, {torch.bfloat16}) == 1 and type(conv) is PackedConv2d
    with torch.inference_mode():
        packed, nchw = conv(x_last), conv(x)
        assert hasattr(conv, "_packed_conv")  # the packed path ran
        want = plain(x_last)
        conv.weight.mul_(2)
        doubled = conv(x_last)
    assert packed.equal(want) and packed.is_contiguous(memory_format=torch.channels_last)
    assert nchw.equal(plain(x)) and nchw.is_contiguous()
    assert doubled.equal(F.conv2d(x_last, conv.weight, conv.bias, stride, padding))
    fp32 = nn.Conv2d(c_in, 8, kernel, stride=stride, padding=padding)
    use_packed_convolutions(fp32, {torch.bfloat16, torch.float32})
    with torch.no_grad():
        assert fp32(x_last.float()).equal(nn.Conv2d.forward(fp32, x_last.float()))  # fp32: torch's path
    assert not hasattr(fp32, "_packed_conv")
    x_last.requires_grad_()
    conv(x_last).float().sum().backward()  # autograd: torch's path
    assert x_last.grad is not None


@needs_onednn_bf16
def test_fp32_conv_packed_in_bf16_under_autocast_equals_autocasts_conv():
    """As the UNet's convolutions run in bf16: fp32 weights kept (`fp32_sources_kept`), packed in bf16 under
    autocast, with autocast's numbers."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 16, 3, padding=1)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = conv(x)
        use_packed_convolutions(conv, {torch.bfloat16})
        packed = conv(x)
    assert conv.weight.dtype == torch.float32 and conv._packed_conv[-1].dtype == torch.bfloat16
    assert packed.dtype == torch.bfloat16 and packed.equal(plain)


@needs_onednn_bf16
@pytest.mark.parametrize("amx", [False, True])
def test_winograd_in_bf16_only_without_amx(monkeypatch, amx):
    """With AMX, oneDNN's prepacked bf16 convolution beats Winograd's: a Winograd layer convolves its bf16 maps
    packed there (the same numbers as torch's), Winograd's elsewhere; fp32 takes Winograd's on either CPU."""
    monkeypatch.setattr(fast_paths, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    tiles = [fast_paths.winograd_tiles(dtype, 640, 640, 32 * 32) for dtype in (torch.float32, torch.bfloat16)]
    assert tiles == [convolution.F4X4, None if amx else convolution.F2X2]
    torch.manual_seed(0)
    conv = WinogradConv2d(640, 16, 3, padding=1).bfloat16()
    conv.packed_dtypes = frozenset({torch.bfloat16})
    monkeypatch.setattr(fast_paths, "WINOGRAD_BF16_MIN_WORK", 0)  # this small layer too
    x = torch.randn(2, 640, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = conv(x)
        want = nn.Conv2d.forward(conv, x)
    assert hasattr(conv, "_winograd2_packed") != amx and hasattr(conv, "_packed_conv") == amx
    if amx:
        assert out.equal(want)
    else:
        torch.testing.assert_close(out.float(), want.float(), rtol=0.02, atol=0.05)


def test_winograd_takes_only_wide_3x3_layers():
    net = nn.Sequential(
        nn.Conv2d(640, 8, 3, padding=1),
        nn.Conv2d(256, 8, 3, padding=1),
        nn.Conv2d(128, 8, 3, padding=1),  # narrow
        nn.Conv2d(1280, 8, 1),  # 1x1
        nn.Conv2d(1280, 8, 3, stride=2, padding=1),  # a downsampling: a MatmulConv2d, not Winograd
    )
    assert use_matmul_convolutions(net) == 1 and type(net[4]) is MatmulConv2d
    assert use_winograd_convolutions(net, {torch.float32}) == 2
    assert [type(conv) is WinogradConv2d for conv in net] == [True, True, False, False, False]
    assert net[0].packed_dtypes == {torch.float32}


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
def test_winograd_where_it_pays_on_this_cpu(monkeypatch, capability):
    """From 256 channels; F(4x4) from 16x16 on into up to 640 channels. AVX2 only (Zen 1, slow fp32 units): on
    maps of up to 128x128. AVX512 (Zen 4), fp32: F(4x4) on maps of up to 64x64, F(2x2) from 640 channels on 8x8
    to 32x32; bf16: F(2x2) from 640 channels on 8x8 to 64x64 where pixels x C_in x C_out reach 2^28."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(fast_paths, "cpu_has_amx", lambda: False)
    f32, bf16, f2, f4 = torch.float32, torch.bfloat16, convolution.F2X2, convolution.F4X4
    for c_in, c_out, side, avx2, avx512, avx512_bf16 in [
        (640, 640, 32, f4, f4, f2),
        (640, 640, 8, f2, f2, None),  # bf16: too little work for Winograd's transforms (2^24.6)
        (640, 320, 64, f4, f4, f2),  # bf16: 64x64 maps too (2^29.6)
        (640, 640, 128, f4, None, None),  # larger maps: oneDNN's convolution with AVX512
        (512, 512, 128, f4, None, None),  # the VAE decoder's 128x128 level
        (256, 256, 256, None, None, None),
        (320, 320, 32, f4, f4, None),
        (960, 320, 32, f4, f4, f2),
        (128, 128, 32, None, None, None),
        (1280, 1280, 8, f2, f2, None),  # the matmul path's size: it is faster in bf16 (2^26.6)
        (2560, 1280, 8, f2, f2, None),  # 2^27.6
        (640, 640, 4, f2, None, None),
        (1280, 1280, 4, f2, None, None),
        (1280, 1280, 16, f2, f2, f2),  # F(4x4) kernels of the 1280-channel levels would take 6.8 GB more
        (1920, 640, 16, f4, f4, f2),  # 2^28.2
        (640, 640, 16, f4, f4, None),  # 2^26.6
        (1280, 640, 16, f4, f4, None),  # 2^27.6
    ]:
        wants = {f32: avx2} if capability == "AVX2" else {f32: avx512, bf16: avx512_bf16}
        for dtype, want in wants.items():
            shape = (c_in, c_out, side, dtype)
            assert fast_paths.winograd_tiles(dtype, c_in, c_out, side * side) is want, shape
            conv = WinogradConv2d(c_in, c_out, 3, padding=1, device="meta")
            assert conv._winograd_tiles(torch.empty(2, c_in, side, side), dtype) is want
    strided = WinogradConv2d(640, 8, 3, stride=2, padding=1)
    assert strided._winograd_tiles(torch.empty(2, 640, 16, 16), f32) is None


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
def test_winograd_only_with_room_for_its_kernels(monkeypatch, capability):
    """Twice the transformed kernels' fp32 bytes must be free: 36 positions where F(4x4) may run."""
    from types import SimpleNamespace

    kernel_bytes = 518_400 * 36 // 9 * 4
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    net = nn.Sequential(nn.Conv2d(640, 90, 3, padding=1))  # 518,400 weights
    monkeypatch.setattr(fast_paths, "available_bytes", lambda device: 2 * kernel_bytes - 1)
    assert not fast_paths.winograd_fits(net)
    monkeypatch.setattr(fast_paths, "available_bytes", lambda device: 2 * kernel_bytes)
    assert fast_paths.winograd_fits(net)
    monkeypatch.setattr(fast_paths, "available_bytes", lambda device: None)  # unknown: on
    assert fast_paths.winograd_fits(net)
    for free, switched in ((0, False), (None, True)):
        monkeypatch.setattr(fast_paths, "available_bytes", lambda device, free=free: free)
        unet = nn.Sequential(nn.Conv2d(640, 90, 3, padding=1))
        apply_cpu_fast_paths(
            SimpleNamespace(model=SimpleNamespace(diffusion_model=unet), first_stage_model=None)
        )
        assert isinstance(unet[0], WinogradConv2d) == switched


def test_decoder_top_levels_in_channels_last_equal_plain():
    decoder = Decoder(**small_ddconfig(ch_mult=[1, 2], num_res_blocks=1)).eval()
    randomize_(decoder, seed=0)
    z = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0))  # -> 256x256: the path is on
    layouts = []
    decoder.conv_out.register_forward_pre_hook(
        lambda _, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        plain = decoder(z)
        use_channels_last_decoder(decoder)
        fast = decoder(z)
        small = decoder(z[..., :32, :32])  # -> 64x64: below the threshold, plain layout
    assert layouts == [False, True, False]
    assert fast.shape == (1, 3, 256, 256) and fast.is_contiguous() and 0.1 < plain.std() < 100
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)  # the fp32 bar for optimized paths
    assert small.shape == (1, 3, 64, 64)


@needs_onednn
@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_decoder_convolutions_as_winograd_in_fp32(monkeypatch, capability):
    """In fp32 the VAE decoder's 3x3 convolutions of >= 256 channels run as Winograd's (`winograd_tiles`: F(4x4)
    on its 16x16 level), the plain decoder's image up to fp32 error."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    decoder = Decoder(**small_ddconfig(ch=64, ch_mult=[1, 4], num_res_blocks=1)).eval()
    randomize_(decoder, seed=0)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = decoder(z)
        apply_cpu_fast_paths(SimpleNamespace(first_stage_model=SimpleNamespace(decoder=decoder)), unet=False)
        fast = decoder(z)
    convs = [
        conv for conv in decoder.modules() if isinstance(conv, nn.Conv2d) and fast_paths.is_plain_3x3(conv)
    ]
    wide = [conv for conv in convs if conv.in_channels >= 256]
    assert wide and all(type(conv) is WinogradConv2d for conv in wide)
    assert all(hasattr(conv, "_winograd4_packed") for conv in wide)
    assert fast.shape == (1, 3, 32, 32) and 0.1 < plain.std() < 100
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)  # the fp32 bar for optimized paths


def test_apply_cpu_fast_paths_on_a_model_keeps_its_output(tiny_ldm):
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    z = torch.randn(1, 4, 40, 40)
    with torch.no_grad():
        plain_eps, plain_image = tiny_ldm.apply_model(x, t, c), tiny_ldm.decode_first_stage(z)
        apply_cpu_fast_paths(tiny_ldm)
        eps, image = tiny_ldm.apply_model(x, t, c), tiny_ldm.decode_first_stage(z)
    assert tiny_ldm.first_stage_model.decoder._forward_hooks  # the channels_last levels are installed
    assert tiny_ldm.model.diffusion_model._forward_pre_hooks  # channels_last in bf16
    torch.testing.assert_close(eps, plain_eps, rtol=0, atol=1e-5)
    # the large levels' GroupNorms sum on one thread, in another order than torch's NCHW kernel
    torch.testing.assert_close(image, plain_image, rtol=0, atol=2e-4)


def test_bf16_runs_in_channels_last_fp32_as_before():
    """torch reorders NCHW maps for oneDNN's bf16 convolutions at every layer: a module run in bf16 (autocast or
    bf16 weights) takes channels_last maps from its input on, its output contiguous NCHW; fp32 is untouched."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 4, 3, padding=1)
    )
    plain, x = copy.deepcopy(net), torch.randn(2, 4, 12, 12)
    use_channels_last_in_bf16(net)
    layouts = []
    net[3].register_forward_pre_hook(lambda _, args: layouts.append(is_channels_last(args[0])))
    with torch.inference_mode():
        fp32 = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast, autocast_plain = net(x), plain(x)
        bf16 = net.bfloat16()(x.bfloat16())
    assert layouts == [False, True, True]
    assert fp32.equal(plain(x)) and autocast.is_contiguous() and bf16.is_contiguous()
    assert autocast.dtype == bf16.dtype == torch.bfloat16
    torch.testing.assert_close(
        autocast.float(), autocast_plain.float(), rtol=0.02, atol=0.02
    )  # bf16 sums' order


@needs_onednn_bf16
def test_packed_bf16_linear_and_matmul_conv_equal_the_plain_bf16_layers():
    torch.manual_seed(0)
    linear, conv = nn.Linear(48, 40).bfloat16(), nn.Conv2d(1024, 16, 3, padding=1).bfloat16()
    x, maps = torch.randn(2, 7, 48).bfloat16(), torch.randn(2, 1024, 4, 6).bfloat16()
    with torch.inference_mode():
        plain = linear(x), conv(maps)
        switched = (
            use_packed_linears(linear, {torch.bfloat16}),
            use_matmul_convolutions(conv),
            use_packed_linears(conv, {torch.bfloat16}),
        )
        packed = linear(x), conv(maps)
        linear.weight.mul_(2)  # a changed weight is packed again
        doubled = linear(x)
    assert switched == (1, 1, 1) and type(linear) is PackedLinear and conv.packed_dtypes
    torch.testing.assert_close(packed[0], plain[0], rtol=0, atol=0)  # the same oneDNN product
    torch.testing.assert_close(packed[1].float(), plain[1].float(), rtol=0.02, atol=0.02)  # bf16 sums' order
    assert packed[1].shape == (2, 16, 4, 6) and packed[1].is_contiguous()
    with torch.inference_mode():
        last = conv(
            maps.contiguous(memory_format=torch.channels_last)
        )  # the same product, seen channels_last
    assert is_channels_last(last) and last.equal(packed[1])
    torch.testing.assert_close(
        doubled.float(), F.linear(x, linear.weight, linear.bias).float(), rtol=0, atol=0
    )
    with torch.no_grad():
        fp32 = nn.Linear(48, 40)
        use_packed_linears(fp32, {torch.bfloat16})
        assert fp32(x.float()).equal(F.linear(x.float(), fp32.weight, fp32.bias))  # fp32: plain nn.Linear


@needs_onednn
def test_packed_fp32_linear_and_matmul_conv_equal_the_plain_layers():
    """fp32 weights prepacked for oneDNN (`packed_dtypes` has fp32 on AVX2 and AVX512 CPUs): the plain layers'
    numbers up to the order of fp32 sums; autograd still takes the plain path."""
    torch.manual_seed(0)
    linear, conv = nn.Linear(320, 640), nn.Conv2d(1024, 64, 3, padding=1)
    x, maps = torch.randn(2, 77, 320), torch.randn(2, 1024, 8, 8)
    with torch.no_grad():
        plain = linear(x), conv(maps)
        use_matmul_convolutions(conv)
        assert use_packed_linears(linear, {torch.float32}) == 1 == use_packed_linears(conv, {torch.float32})
        packed = linear(x), conv(maps)
    assert hasattr(linear, "_packed_weight") and hasattr(conv, "_packed_weight")  # the packed path ran
    torch.testing.assert_close(packed[0], plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[1], plain[1], rtol=0, atol=1e-4)
    assert packed[1].shape == (2, 64, 8, 8) and packed[1].is_contiguous()
    downsample, odd_maps = nn.Conv2d(1024, 64, 3, stride=2, padding=1), torch.randn(2, 1024, 15, 15)
    with torch.no_grad():
        plain_down = downsample(odd_maps)
        use_matmul_convolutions(downsample)
        use_packed_linears(downsample, {torch.float32})
        packed_down = downsample(odd_maps)
    assert hasattr(downsample, "_packed_weight") and packed_down.shape == (2, 64, 8, 8)
    torch.testing.assert_close(packed_down, plain_down, rtol=0, atol=1e-4)
    x.requires_grad_()
    linear(x).sum().backward()  # autograd: nn.Linear's path
    torch.testing.assert_close(x.grad, linear.weight.sum(0).expand_as(x))


def test_packed_dtypes_follow_the_cpu(monkeypatch):
    for capability, native_bf16, expected in [
        ("AVX512", True, {torch.bfloat16, torch.float32}),
        ("AVX512", False, {torch.float32}),
        ("AVX2", False, {torch.float32}),  # AVX2-only (Zen 1): 0.84-0.87x the UNet step with MKL's products
        ("DEFAULT", False, set()),  # no oneDNN JIT kernels to speak of: plain layers
    ]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(fast_paths, "cpu_has_native_bf16", lambda b=native_bf16: b)
        assert fast_paths.packed_dtypes() == expected


@needs_onednn_bf16
def test_bf16_unet_with_packed_weights_matches_the_plain_bf16_eps(tiny_ldm):
    """Packed layers keep their fp32 weights through the bf16 conversion (`fp32_sources_kept`) and pack them in
    bf16 under autocast: the plain bf16 UNet's eps (up to the GEGLUs, whose GELU and gating now act on fp32 sums),
    as close to the fp32 eps, and no bf16 copy of those weights."""
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    randomize_(tiny_ldm.model.diffusion_model, std=0.05)
    fast = copy.deepcopy(tiny_ldm)
    with torch.inference_mode():
        exact = tiny_ldm.apply_model(x, t, c)
    low_precision(tiny_ldm, torch.bfloat16)
    unet = fast.model.diffusion_model
    assert use_packed_linears(unet, {torch.bfloat16}) > 10
    with fp32_sources_kept(unet):
        low_precision(fast, torch.bfloat16)
    linears = [m for m in unet.modules() if isinstance(m, PackedLinear)]
    assert linears and all(m.weight.dtype == torch.float32 for m in linears)
    assert unet.input_blocks[1][0].in_layers[2].weight.dtype == torch.bfloat16  # the rest is converted
    with torch.inference_mode(), precision_scope("autocast", torch.device("cpu")):
        plain = tiny_ldm.apply_model(x, t, c).float()
        packed = fast.apply_model(x, t, c).float()
    plain_error, packed_error = (plain - exact).abs().max(), (packed - exact).abs().max()
    assert exact.abs().max() > 0.1 and 0 < packed_error <= 1.1 * plain_error, (packed_error, plain_error)
    torch.testing.assert_close(packed, plain, rtol=0, atol=2 * plain_error.item())
    assert all(m._packed_weight[-1].dtype == torch.bfloat16 for m in linears if hasattr(m, "_packed_weight"))
    geglus = [m for m in unet.modules() if isinstance(m, PackedGEGLU)]
    assert geglus and all(m._packed_gate[-1].dtype == torch.bfloat16 for m in geglus)


def test_fp32_sources_are_placeholders_during_the_conversion_and_come_back_after_an_error():
    layer = nn.Linear(8, 4)
    use_packed_linears(layer, {torch.bfloat16})
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    with pytest.raises(RuntimeError), fp32_sources_kept(layer):
        assert layer.weight.numel() == layer.bias.numel() == 0  # nothing for the conversion to copy
        raise RuntimeError("a conversion that fails")
    assert layer.weight.equal(weight) and layer.bias.equal(bias)


def test_channels_last_group_norm_does_not_depend_on_threads_or_batch():
    """torch's channels_last GroupNorm sums groups in per-thread parts from 32x32 maps on: `OneThreadGroupNorm`
    gives one result for any thread count and batch, torch's own numbers on one thread, and leaves the caller's
    thread count as it was; smaller maps and NCHW maps take torch's call as they are."""
    from ldm.modules.diffusionmodules.util import GroupNorm32
    from ldm.runtime.fast_paths import OneThreadGroupNorm, use_one_thread_norms

    torch.manual_seed(0)
    net = nn.Sequential(GroupNorm32(32, 64, eps=1e-6))
    randomize_(net, std=1.0)
    plain = copy.deepcopy(net[0])
    assert use_one_thread_norms(net) == 1 and type(net[0]) is OneThreadGroupNorm
    x = (torch.randn(3, 64, 40, 48) * 3 + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    outs = []
    with torch.inference_mode():
        for count in (1, 2):
            torch.set_num_threads(count)
            outs.append(net(x))
        torch.set_num_threads(1)
        one_thread = plain(x)
        torch.set_num_threads(threads)
        alone = net(x[2:])
    assert torch.get_num_threads() == threads
    assert outs[0].equal(outs[1]) and outs[0].equal(one_thread) and alone.equal(outs[0][2:])
    assert is_channels_last(outs[0])
    with torch.inference_mode():
        small = x[..., :16, :16]
        assert net(small).equal(plain(small)) and net(x.contiguous()).equal(plain(x.contiguous()))


def test_bf16_model_holds_its_plain_convolutions_channels_last(tiny_ldm):
    """`low_precision_with_fast_paths`: the bf16 weights of the UNet's and decoder's plain convolutions laid out
    channels_last like their bf16 inputs, packed layers kept fp32; the numbers of the NCHW weights (a layout)."""
    x, t, c, z = (
        torch.randn(2, 4, 16, 16),
        torch.tensor([10, 900]),
        torch.randn(2, 77, 32),
        torch.randn(1, 4, 8, 8),
    )
    apply_cpu_fast_paths(tiny_ldm)
    nchw = copy.deepcopy(tiny_ldm)
    low_precision(nchw, torch.bfloat16)
    low_precision_with_fast_paths(tiny_ldm, torch.bfloat16)
    unet, decoder = tiny_ldm.model.diffusion_model, tiny_ldm.first_stage_model.decoder
    convs = [m for module in (unet, decoder) for m in module.modules() if isinstance(m, nn.Conv2d)]
    bf16 = [m for m in convs if m.weight.dtype == torch.bfloat16]
    assert len(bf16) > 10 and all(is_channels_last(m.weight) for m in bf16 if m.kernel_size == (3, 3))
    assert not is_channels_last(tiny_ldm.first_stage_model.encoder.conv_in.weight)  # fp32, as it was
    with torch.inference_mode(), precision_scope("autocast", torch.device("cpu")):
        for run in (lambda m: m.apply_model(x, t, c), lambda m: m.decode_first_stage(z)):
            got, want = run(tiny_ldm).float(), run(nchw).float()
            assert got.is_contiguous()
            torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())


@needs_onednn_bf16
def test_fp32_linear_packed_in_bf16_under_autocast_equals_autocasts_linear():
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 48), torch.randn(3, 5, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = linear(x)
        use_packed_linears(linear, {torch.bfloat16})
        packed = linear(x)
    assert packed.dtype == plain.dtype == torch.bfloat16 and linear._packed_weight[-1].dtype == torch.bfloat16
    torch.testing.assert_close(packed, plain, rtol=0, atol=0)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_packed_geglu_equals_geglu(dtype):
    """Two packed products with GELU and the gating fused as post-ops: GEGLU's output (fp32: up to the order of
    sums; bf16: at least as close to the fp32 result as the plain bf16 layer), repacked when the weight changes,
    and GEGLU's own path under autograd."""
    from ldm.modules.attention import GEGLU

    torch.manual_seed(0)
    geglu, x = GEGLU(64, 96), torch.randn(2, 37, 64)
    with torch.no_grad():
        exact = geglu(x)
        plain = copy.deepcopy(geglu).to(dtype)(x.to(dtype)).float()
        use_packed_linears(geglu.to(dtype), {dtype})
        packed = geglu(x.to(dtype)).float()
        geglu.proj.weight.mul_(2)
        doubled = geglu(x.to(dtype)).float()
    assert type(geglu) is PackedGEGLU and hasattr(geglu, "_packed_gate")  # the packed path ran
    if dtype == torch.float32:
        torch.testing.assert_close(packed, exact, rtol=0, atol=1e-5)
    else:
        assert (packed - exact).abs().max() <= (plain - exact).abs().max()
    with torch.no_grad():
        expected = GEGLU(64, 96).to(dtype)
        expected.load_state_dict(geglu.state_dict())
        tolerance = 1e-5 if dtype == torch.float32 else 0.02  # bf16: a few units in the last place
        torch.testing.assert_close(doubled, expected(x.to(dtype)).float(), rtol=tolerance, atol=tolerance)
    x.requires_grad_()
    geglu.float()(x).sum().backward()  # autograd: GEGLU's own path
    assert x.grad is not None


@pytest.mark.parametrize("n, m, heads, d", [(300, 300, 2, 24), (64, 1030, 3, 40), (1100, 260, 1, 32)])
def test_blocked_attention_equals_attention(n, m, heads, d):
    """Blocks of queries, one head at a time, values padded to 16 columns (24 and 40 wide) or not (32), products
    through oneDNN: exact attention up to fp32 rounding."""
    from ldm.modules.attention import attention
    from ldm.runtime.fast_paths import blocked_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, heads, n, d), torch.randn(2, heads, m, d), torch.randn(2, heads, m, d)
    scale = d**-0.5
    exact = attention(q.double(), k.double(), v.double(), scale=scale)
    blocked = blocked_attention(q, k, v, scale)
    assert blocked.dtype == torch.float32
    torch.testing.assert_close(blocked.double(), exact, rtol=0, atol=2e-5)


@needs_onednn_bf16
def test_blocked_attention_in_bf16_rounds_as_bf16_products():
    """In bf16, each block is bf16 scores of q and the scaled keys, their softmax rounded to bf16, then its bf16
    product with the values: torch's bf16 matrix products' numbers, within bf16 rounding of exact attention."""
    from ldm.runtime.fast_paths import blocked_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 600, 40).bfloat16() for _ in range(3))
    scale = 40**-0.5
    expected = torch.softmax(q @ (k * scale).transpose(-1, -2), dim=-1) @ v
    blocked = blocked_attention(q, k, v, scale)
    assert blocked.dtype == torch.bfloat16
    torch.testing.assert_close(blocked.float(), expected.float(), rtol=0, atol=0.02)
    exact = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1) @ v.double()
    assert (blocked.double() - exact).abs().max() < 0.05


@needs_onednn_bf16
def test_blocked_bf16_attention_takes_exp_of_bounded_scores_and_the_softmax_of_others():
    """Heads whose scores are bounded below EXP_SCORE_LIMIT (|q_i| |k_j|) weigh the values by exp(scores) (as
    exp2 of scores in base 2: the keys carry log2 e) and divide by the sums the ones column gives; a head with
    scores of up to ~150, whose exp overflows bf16, subtracts each row's maximum first. Both finite, within bf16
    rounding of attention over their bf16 scores."""
    from ldm.runtime.fast_paths import EXP_SCORE_LIMIT, _exp_without_maximum, blocked_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3, 600, 40) for _ in range(3))
    q[0, 1] *= 30  # head 1's scores reach ~150: exp(150) is inf in bf16
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    scale = 40**-0.5
    keys = k[0] * scale
    assert (q[0, 1].float() @ keys[0].float().t()).abs().max() > 100
    assert _exp_without_maximum(q[0], keys * math.log2(math.e)) == [True, False, True]
    assert not _exp_without_maximum(q[0].float(), keys.float())[0]  # fp32: always the softmax
    bound = q[0, 0].float().norm(dim=-1).amax() * keys[0].float().norm(dim=-1).amax()
    assert bound < EXP_SCORE_LIMIT
    blocked = blocked_attention(q, k, v, scale).double()
    assert torch.isfinite(blocked).all()
    exact = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1) @ v.double()
    assert (blocked - exact)[:, [0, 2]].abs().max() < 0.05
    # head 1's bf16 scores (base 2, ~216) are off by up to half a unit: compare with the softmax of those scores
    base2_scores = q @ (k * (scale * math.log2(math.e))).transpose(-1, -2)
    bf16_math = torch.softmax(base2_scores.double() * math.log(2), dim=-1) @ v.double()
    assert (blocked - bf16_math)[:, 1].abs().max() < 0.05


@needs_onednn
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_blocked_attention_layer_takes_self_attention_in_its_dtypes_only(dtype):
    from ldm.modules.attention import CrossAttention
    from ldm.runtime.fast_paths import BlockedAttention, use_blocked_attention

    torch.manual_seed(0)
    layers = nn.ModuleList(
        [CrossAttention(64, heads=4, dim_head=16), CrossAttention(64, 32, heads=4, dim_head=16)]
    )
    x, context = torch.randn(2, fast_paths.BLOCKED_MIN_KEYS[dtype], 64), torch.randn(2, 77, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        plain_self, plain_cross = layers[0](x), layers[1](x, context)
        plain_shorter = layers[0](x[:, 1:])
        assert use_blocked_attention(layers, {dtype}) == 2 and type(layers[0]) is BlockedAttention
        calls = []
        with mock.patch.object(fast_paths, "blocked_attention", wraps=fast_paths.blocked_attention) as spy:
            blocked_self, blocked_cross = layers[0](x), layers[1](x, context)
            calls.append(spy.call_count)
            assert layers[0](x[:, 1:]).equal(plain_shorter)  # one key fewer: the flash kernel
            layers[0].blocked_dtypes = frozenset({torch.float16})  # not this call's dtype: the flash kernel
            assert layers[0](x).equal(plain_self)
            calls.append(spy.call_count)
    assert calls == [1, 1]  # self-attention over BLOCKED_MIN_KEYS keys: blocked; 77 context tokens: flash
    tolerance = 0.02 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(blocked_self.float(), plain_self.float(), rtol=0, atol=tolerance)
    assert blocked_cross.equal(plain_cross)
    assert list(layers[0].state_dict()) == list(CrossAttention(64, heads=4, dim_head=16).state_dict())


@pytest.mark.parametrize(
    "capability, zen5, packed, amx, blocked",
    [
        ("AVX512", True, {torch.bfloat16, torch.float32}, False, {torch.bfloat16, torch.float32}),  # Zen 5
        ("AVX512", False, {torch.bfloat16, torch.float32}, False, {torch.bfloat16}),  # Zen 4
        ("AVX512", True, {torch.float32}, False, {torch.float32}),  # no bf16 units
        ("AVX512", False, {torch.float32}, False, None),  # Intel's AVX512 without bf16 units
        ("AVX512", False, {torch.bfloat16, torch.float32}, True, None),  # Sapphire Rapids and later Xeons
        ("AVX2", False, {torch.float32}, False, None),  # AVX2 only (Zen 1)
        ("DEFAULT", False, set(), False, None),
    ],
)
def test_blocked_attention_without_amx_in_the_packed_dtypes(
    monkeypatch, capability, zen5, packed, amx, blocked
):
    """With AMX, torch's bf16 flash kernel is faster than the blocked one (512² bf16 step 1.13x, BENCHMARKS.md);
    in fp32 the flash kernel is faster except where oneDNN's products outrun its MKL ones by 2x (full-width
    AVX512 on AMD, Zen 5; Zen 4's 512² step 0.94x with the flash kernel); otherwise blocked attention takes the
    dtypes whose products run through oneDNN."""
    from types import SimpleNamespace

    from ldm.modules.attention import CrossAttention
    from ldm.runtime.fast_paths import BlockedAttention

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(fast_paths, "packed_dtypes", lambda: frozenset(packed))
    monkeypatch.setattr(fast_paths, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(fast_paths, "cpu_has_full_width_avx512_on_amd", lambda: zen5)
    unet = nn.Sequential(CrossAttention(64, heads=4, dim_head=16))
    apply_cpu_fast_paths(SimpleNamespace(model=SimpleNamespace(diffusion_model=unet), first_stage_model=None))
    assert (type(unet[0]) is BlockedAttention) == (blocked is not None)
    if blocked is not None:
        assert unet[0].blocked_dtypes == blocked


@needs_onednn
def test_context_projections_skip_a_repeated_context_with_the_same_numbers():
    """The cross-attention's key and value projections (`ContextLinear`) return their previous output for an equal
    context, and compute afresh for a new context, a new weight (a merged LoRA) or autograd."""
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.runtime.fast_paths import ContextLinear, use_context_cache

    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 2, 16, context_dim=24).eval()
    plain = copy.deepcopy(block)
    use_packed_linears(block, {torch.float32, torch.bfloat16})
    assert use_context_cache(block) == 2
    assert type(block.attn2.to_k) is ContextLinear and type(block.attn1.to_k) is PackedLinear
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    other = torch.randn(2, 7, 24)
    with (
        torch.inference_mode(),
        mock.patch.object(fast_paths, "packed_linear", wraps=fast_paths.packed_linear) as spy,
    ):
        first = block.attn2(x, context)
        products = spy.call_count  # q, k, v, out
        again = block.attn2(x, context.clone())
        assert spy.call_count - products == 2  # q and out only: k and v came back
        assert again.equal(first)
        passed = other.clone()
        block.attn2(x, passed)
        passed.mul_(3)  # the caller changes its tensor afterwards: the cache kept its own copy
        torch.testing.assert_close(block.attn2(x, passed), plain.attn2(x, passed), rtol=0, atol=1e-5)
        torch.testing.assert_close(block.attn2(x, other), plain.attn2(x, other), rtol=0, atol=1e-5)
        for layer in (block, plain):  # a LoRA merges into a new tensor
            layer.attn2.to_k.weight.data = layer.attn2.to_k.weight.data * 2
        torch.testing.assert_close(block.attn2(x, other), plain.attn2(x, other), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            block.attn2(x, other[:, :5]), plain.attn2(x, other[:, :5]), rtol=0, atol=1e-5
        )
    with torch.no_grad():
        torch.testing.assert_close(block.attn2(x, other), plain.attn2(x, other), rtol=0, atol=1e-5)
    x.requires_grad_()
    block.attn2(x, other).sum().backward()  # autograd: nn.Linear's path, nothing cached
    assert x.grad is not None
