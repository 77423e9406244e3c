"""Memory options give the plain result: tiled VAE decode/encode, chunked attention,
lowvram and releasing memory-mapped pages (equal), and the script flags that turn them on."""

import copy
import mmap
import sys
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoint import load_model_from_config, read_state_dict, save_checkpoint
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.attention import attention
from ldm.modules.diffusionmodules.model import Downsample, ResnetBlock, Upsample
from ldm.modules.tiling import tiled_blocks, windows
from ldm.runtime import RuntimeOptions, prepare
from ldm.runtime.memory import (
    enable_lowvram,
    lowvram_units,
    release_idle_units,
    release_pages,
    set_attention_chunk,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import txt2img  # noqa: E402
from conftest import randomize_  # noqa: E402


def test_windows_cover_the_side_once_and_stay_inside():
    spans = windows(21, 8, 2)
    assert spans == [(0, 8, 0, 10), (8, 16, 6, 18), (16, 21, 14, 21)]


def test_tiled_blocks_give_every_block_its_plain_output():
    """A ResnetBlock (two GroupNorms, whole-map statistics), an Upsample and a Downsample (asymmetric padding,
    stride 2) in windows of 8 x 8 pixels, on a 22 x 30 map: the plain numbers, borders included."""
    blocks = [ResnetBlock(in_channels=32, out_channels=64, dropout=0.0, temb_channels=0)]
    blocks += [Upsample(32, with_conv=True), Downsample(32, with_conv=True), Downsample(32, with_conv=False)]
    x = torch.randn(2, 32, 22, 30, generator=torch.Generator().manual_seed(0)) * 3 + 1
    for block in blocks:
        randomize_(block, std=0.2)
        with torch.no_grad():
            plain = block(x)
            with tiled_blocks(block, elements=64 * 64):  # 8 x 8 windows of 64 channels
                tiled = block(x)
        torch.testing.assert_close(tiled, plain, rtol=0, atol=1e-5)
        assert "forward" not in vars(block)  # unpatched after use


def test_tiled_vae_decode_equals_untiled(tiny_ldm):
    """A 32x32 latent (a 256x256 image) with 4x4-latent tiles: the decoder's level-0 blocks run in 16 x 16
    windows of 32 px and its GroupNorms use whole-image statistics, so the image is the untiled one."""
    vae = randomize_(tiny_ldm.first_stage_model, std=0.1)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = vae.decode(z)
        vae.enable_tiling(4)
        tiled = vae.decode(z)
        vae.enable_tiling(None)
    assert tiled.shape == plain.shape == (1, 3, 256, 256)
    assert plain.std() > 0.1
    torch.testing.assert_close(tiled, plain, rtol=0, atol=1e-4)


def test_tiled_vae_encode_equals_untiled(tiny_ldm):
    vae = randomize_(tiny_ldm.first_stage_model, std=0.1)
    x = torch.rand(2, 3, 200, 264, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        plain = vae.encode(x).parameters
        vae.enable_tiling(4)
        tiled = vae.encode(x).parameters
        vae.enable_tiling(None)
    assert tiled.shape == plain.shape == (2, 8, 25, 33)
    torch.testing.assert_close(tiled, plain, rtol=0, atol=1e-4)


def test_chunked_attention_equals_plain():
    q, k, v = torch.randn(2, 3, 50, 8), torch.randn(2, 3, 77, 8), torch.randn(2, 3, 77, 8)
    mask = torch.rand(2, 1, 1, 77) > 0.3
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention(q, k, v, 7, mask=mask), plain, rtol=0, atol=1e-6)


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


def resident_bytes(module: torch.nn.Module | torch.Tensor) -> int:
    """Bytes of the pages under `module`'s tensors (or a tensor) that this process has mapped in now
    (/proc/self/pagemap)."""
    page = mmap.PAGESIZE
    pages = set()
    tensors = [module] if isinstance(module, torch.Tensor) else chain(module.parameters(), module.buffers())
    for t in tensors:
        end = t.data_ptr() + t.numel() * t.element_size()
        pages.update(range(t.data_ptr() // page, -(-end // page)))
    with open("/proc/self/pagemap", "rb") as pagemap:
        present = 0
        for index in sorted(pages):
            pagemap.seek(index * 8)
            present += int.from_bytes(pagemap.read(8), "little") >> 63
    return present * page


def mapped_linear(tmp_path: Path) -> torch.nn.Linear:
    """A 512x512 Linear whose weights are views of a memory-mapped .safetensors file."""
    import safetensors.torch

    path = tmp_path / "linear.safetensors"
    safetensors.torch.save_file(randomize_(torch.nn.Linear(512, 512)).state_dict(), path)
    layer = torch.nn.Linear(512, 512, device="meta")
    layer.load_state_dict(read_state_dict(path)[0], assign=True)
    return layer


needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/pagemap")


@needs_linux
def test_release_pages_unmaps_checkpoint_pages_and_keeps_the_values(tmp_path):
    layer = mapped_linear(tmp_path)
    x = torch.randn(3, 512)
    with torch.no_grad():
        y = layer(x)
        assert resident_bytes(layer) >= 512 * 512 * 4
        assert release_pages(layer) >= 512 * 512 * 4
        assert resident_bytes(layer) == 0
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)  # read back from the file
    assert resident_bytes(layer) >= 512 * 512 * 4


@needs_linux
def test_release_pages_leaves_ordinary_and_modified_memory_alone(tmp_path):
    layer = randomize_(torch.nn.Linear(64, 64))
    before = layer.weight.clone()
    assert release_pages(layer) == 0
    torch.testing.assert_close(layer.weight, before, rtol=0, atol=0)
    mapped = mapped_linear(tmp_path)
    with torch.no_grad():
        mapped.weight[0, 0] += 1.0  # a private copy of one page: the mapping no longer matches the file
    edited = mapped.weight.clone()
    assert release_pages(mapped) == 0
    torch.testing.assert_close(mapped.weight, edited, rtol=0, atol=0)


@needs_linux
def test_packed_fp32_weights_hand_back_the_plain_weights_pages(tmp_path):
    """A layer prepacked for oneDNN holds its packed copy in ordinary memory; the plain weight's checkpoint pages
    go back to the OS after the forward that packed it, so packing adds no resident memory; they map back in
    when read (the same values)."""
    from ldm.runtime.fast_paths import use_packed_linears

    layer = mapped_linear(tmp_path)
    x = torch.randn(3, 512)
    with torch.no_grad():
        plain = layer(x)
        assert resident_bytes(layer) >= 512 * 512 * 4
        use_packed_linears(layer, {torch.float32})
        packed = layer(x)
        edge = 0.1 * 512 * 512 * 4  # the kernel maps in a window around the bias pages read since
        assert hasattr(layer, "_packed_weight") and resident_bytes(layer.weight) <= edge
        assert layer(x).equal(packed)  # later calls: the packed copy, the plain pages stay out
        assert resident_bytes(layer.weight) <= edge
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.weight @ x.T, plain.T - layer.bias[:, None], rtol=0, atol=1e-4)


@needs_linux
def test_release_idle_units_gives_the_plain_image_with_one_unit_resident(tiny_ldm, tiny_config, tmp_path):
    """A model read from a checkpoint file: after text encoding, sampling and decoding, only the VAE decoder's
    pages are still mapped (up to the kernel's fault-around window next to them and the few buffers made at
    load time), and the image is the same as without releasing."""
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, tiny_ldm.state_dict())
    model = load_model_from_config(tiny_config, ckpt, verbose=False)
    plain = ddim_image(model)
    text_encoder, unet, _, decoder = lowvram_units(model)
    size = {unit: sum(t.numel() * t.element_size() for t in chain(unit.parameters(), unit.buffers()))
            for unit in (text_encoder, unet, decoder)}  # fmt: skip
    assert resident_bytes(unet) >= size[unet] and resident_bytes(decoder) >= size[decoder]
    assert resident_bytes(text_encoder) > 0.1 * size[text_encoder]  # token embedding: only the rows looked up
    release_idle_units(model)
    torch.testing.assert_close(ddim_image(model), plain, rtol=0, atol=0)
    assert resident_bytes(text_encoder) < 0.02 * size[text_encoder]
    assert resident_bytes(unet) < 0.02 * size[unet]
    assert resident_bytes(decoder) >= size[decoder]


HEAP_PROBE = """
import resource, sys, torch
from ldm.heap import keep_freed_memory, trim_heap

def rss_mib():
    return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))

if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)  # 64 MB, above glibc's largest mmap threshold (32 MB)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
before_trim = rss_mib()
trim_heap()
print(sum(faults[-5:]), before_trim - rss_mib())
"""


@needs_linux
def test_keep_freed_memory_stops_page_faults_and_trim_heap_returns_the_memory():
    """Plain glibc maps and unmaps a big block at every allocation (a page fault per 4 KiB page, every time);
    after keep_freed_memory it is reused, and trim_heap hands the kept memory back."""
    import subprocess

    def probe(mode: str) -> tuple[int, int]:
        out = subprocess.run(
            [sys.executable, "-c", HEAP_PROBE, mode], cwd=ROOT, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return tuple(int(v) for v in out.stdout.split())

    plain_faults, _ = probe("plain")
    kept_faults, trimmed_mib = probe("keep")
    assert plain_faults >= 5 * 16000  # 64 MB / 4 KiB per allocation
    assert kept_faults < plain_faults / 10
    assert trimmed_mib >= 60


def test_runtime_prepare_applies_the_memory_options(tiny_ldm, capsys):
    plain = ddim_image(tiny_ldm)
    options = RuntimeOptions(vae_tiling=True, attention_chunk=3, lowvram=True)
    prepare(tiny_ldm, torch.device("cpu"), "full", options)
    assert "nothing to offload" in capsys.readouterr().out
    hooks = [[hook.__name__ for hook in unit._forward_pre_hooks.values()] for unit in lowvram_units(tiny_ldm)]
    assert all(names.count("switch_to") == 1 for names in hooks), hooks  # release_idle_units, once per unit
    assert tiny_ldm.first_stage_model.tiling == 64
    assert tiny_ldm.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.chunk == 3
    torch.testing.assert_close(ddim_image(tiny_ldm), plain, rtol=0, atol=1e-4)


def test_txt2img_with_memory_flags_makes_the_same_image(tiny_config, tmp_path):
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
    # --vae-tiling is recorded and re-made (it changes float summation order); the others change nothing
    from ldm.outputs import read_parameters

    params = read_parameters(tmp_path / "opts" / "samples" / "00000.png")
    assert params["vae_tiling"] is True and "--vae-tiling" in params["remake"]
    assert "--lowvram" not in params["remake"] and "--attention-chunk" not in params["remake"]
