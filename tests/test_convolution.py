"""3x3 convolutions as products (`ldm.runtime.convolution`): Winograd's transcribed tiles compute a correlation,
its kernel transforms are G g G^T, and its convolution over plain products is the convolution."""

import pytest
import torch
import torch.nn.functional as F

from ldm.runtime import convolution


@pytest.mark.parametrize("tiles", [convolution.F2X2, convolution.F4X4])
def test_winograd_kernels_are_g_g_gt_transformed_in_chunks(monkeypatch, tiles):
    """G g G^T for every kernel, computed a few output channels at a time (the last chunk shorter) and rounded to
    the asked dtype."""
    monkeypatch.setattr(convolution, "WINOGRAD_CHUNK_KERNELS", 5 * 7)  # 5 output channels of 7 inputs a chunk
    weight = torch.randn(12, 7, 3, 3, generator=torch.Generator().manual_seed(0))
    g = tiles.g.double()
    want = torch.einsum("ij,ocjk,lk->iloc", g, weight.double(), g).reshape(tiles.n**2, 12, 7)
    got = convolution.winograd_weights(weight, torch.float32, tiles)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    in_bf16 = convolution.winograd_weights(weight, torch.bfloat16, tiles)
    torch.testing.assert_close(in_bf16.double(), want, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("tiles", [convolution.F2X2, convolution.F4X4])
def test_winograd_tiles_compute_a_correlation(tiles):
    """A^T [(G g) * (B^T d)] is the correlation of n inputs d with 3 taps g (m outputs), in fp64: the transcribed
    matrices (F4X4's points 0, 1, -1, 2, -1/2, infinity; B^T in integers) are Winograd's."""
    generator = torch.Generator().manual_seed(0)
    d, g = (
        torch.randn(tiles.n, 5, dtype=torch.float64, generator=generator),
        torch.randn(3, 5, dtype=torch.float64),
    )
    got = tiles.at.double() @ ((tiles.g.double() @ g) * (tiles.bt.double() @ d))
    want = torch.stack([sum(d[i + k] * g[k] for k in range(3)) for i in range(tiles.m)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    row, column = divmod(tiles.bias_position, tiles.n)  # summed once into every output: the bias goes there
    assert tiles.at[:, row].eq(1).all() and tiles.at[:, column].eq(1).all()


@pytest.mark.parametrize("tiles", [convolution.F2X2, convolution.F4X4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_winograd_conv3x3_hands_the_products_tiles_in_the_input_dtype(tiles, dtype):
    """The transformed tiles reach the products in x's dtype, computed in fp32 and rounded once: with plain
    products (no oneDNN needed) the output is the convolution of the rounded input, up to the dtype's rounding."""
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 8, 10, 7, generator=generator), torch.randn(5, 8, 3, 3, generator=generator)
    kernels = convolution.winograd_weights(weight, torch.float32, tiles)  # [n^2, C_out, C_in]
    seen = []

    def products(transformed: torch.Tensor) -> torch.Tensor:
        seen.append(transformed.dtype)
        return torch.bmm(transformed.float(), kernels.transpose(1, 2)).to(dtype)

    out = convolution.winograd_conv3x3(x.to(dtype), products, tiles)
    assert seen == [dtype] and out.dtype == dtype and out.shape == (2, 5, 10, 7)
    want = F.conv2d(x.to(dtype).double(), weight.double(), padding=1)
    tolerance = 1e-4 if dtype == torch.float32 else 0.1  # bf16: the tiles and outputs round to 8 bits
    torch.testing.assert_close(out.double(), want, rtol=0, atol=tolerance * want.abs().max().item())
