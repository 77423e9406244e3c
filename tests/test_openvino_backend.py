"""--backend openvino: the UNet and VAE decoder converted to OpenVINO give torch's numbers at f32, at every
shape; a whole txt2img gives torch's image; converted models are cached on disk per weights, written atomically,
and reused by the next session; the contradictory and impossible combinations are refused in one line."""

import sys
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ov = pytest.importorskip("openvino")

from ldm.cli import run_cli  # noqa: E402
from ldm.errors import UserError  # noqa: E402
from ldm.outputs import read_parameters  # noqa: E402
from ldm.runtime import RuntimeOptions, prepare  # noqa: E402
from ldm.runtime.openvino import (  # noqa: E402
    OpenVINORunner,
    cache_key,
    cache_root,
    compile_config,
    convert,
    decoder_inputs,
    prune_cache,
    use_openvino,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import txt2img  # noqa: E402
from test_layers import imports_torch  # noqa: E402


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture(autouse=True)
def one_thread(shared_cache, monkeypatch):
    """One torch thread (OpenVINO takes as many); the OpenVINO cache in this module's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared_cache))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The OpenVINO cache in a fresh folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return cache_root()


def fixed_weights(role: str) -> dict:
    return {"test": "fixed"}


class SmallDecoder(torch.nn.Module):
    """A module called as the VAE decoder is (`forward(z)`), quick to convert."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv(z)


def test_unet_and_decoder_give_torch_numbers_at_f32_at_every_shape(tiny_ldm):
    unet, decoder = tiny_ldm.model.diffusion_model, tiny_ldm.first_stage_model.decoder
    generator = torch.Generator().manual_seed(0)
    calls = [  # the first call's shapes are traced; the others differ in batch, size and prompt length
        (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([999.0, 10.5]), 77),
        (torch.randn(3, 4, 16, 8, generator=generator), torch.tensor([1, 500, 980]), 154),
    ]
    calls = [(x, t, torch.randn(len(x), n, 32, generator=generator)) for x, t, n in calls]
    latents = [torch.randn(1, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 16, generator=generator)]
    with torch.no_grad():
        eps = [unet(x, t, context=c) for x, t, c in calls]
        images = [tiny_ldm.decode_first_stage(z) for z in latents]
    use_openvino(tiny_ldm, "full", fixed_weights)
    with torch.no_grad():
        for (x, t, c), expected in zip(calls, eps, strict=True):
            out = unet(x, t, context=c)
            assert out.shape == expected.shape and out.dtype == torch.float32
            assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
        for z, expected in zip(latents, images, strict=True):
            out = tiny_ldm.decode_first_stage(z)
            assert out.shape == expected.shape
            assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
    for runner, last_shape in ((unet.forward, (3, 4, 16, 8)), (decoder.forward, (2, 4, 8, 16))):
        assert isinstance(runner, OpenVINORunner)
        compiled = runner.request.get_compiled_model()
        assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
        assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
        # compiled for the last call's shapes (static), the same request while they stay
        assert all(port.get_partial_shape().is_static for port in compiled.inputs)
        assert tuple(compiled.inputs[0].get_shape()) == last_shape
    request = unet.forward.request
    with torch.no_grad():
        unet(*calls[1][:2], context=calls[1][2])
    assert unet.forward.request is request


def test_precision_and_threads_settings():
    torch.set_num_threads(2)
    assert compile_config("full") == {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32"}
    assert compile_config("autocast") == {"INFERENCE_NUM_THREADS": 2}  # OpenVINO's default: bf16 where fast


def txt2img_run(outdir: Path, *flags: str) -> np.ndarray:
    txt2img.main(
        ["--ckpt", "shapes", "--prompt", "a red circle on a black background", "--outdir", str(outdir),
         "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "6", "--no-safety-checker", "--precision", "full",
         "--skip_grid", *flags]
    )  # fmt: skip
    return pixels(outdir / "samples" / "00000.png")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def test_txt2img_gives_torch_image_records_the_backend_and_reuses_the_cache(tmp_path, cache, monkeypatch):
    torch_image = txt2img_run(tmp_path / "torch")
    first = txt2img_run(tmp_path / "openvino", "--backend", "openvino")
    assert np.abs(first - torch_image).max() <= 3  # measured: 1 level of 255
    params = read_parameters(tmp_path / "openvino" / "samples" / "00000.png")
    assert params["backend"] == "openvino" and "--backend openvino" in params["remake"]
    assert read_parameters(tmp_path / "torch" / "samples" / "00000.png")["backend"] == "torch"
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["decoder", "unet"]  # no compiled blobs

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(ov, "convert_model", no_conversion)
    second = txt2img_run(tmp_path / "again", "--backend", "openvino")
    assert np.array_equal(second, first)


def test_hires_fix_runs_the_second_pass_at_its_own_size(tmp_path):
    flags = ("--hr-scale", "2", "--hr-steps", "3")
    torch_image = txt2img_run(tmp_path / "torch", *flags)
    image = txt2img_run(tmp_path / "openvino", "--backend", "openvino", *flags)
    assert image.shape == torch_image.shape == (128, 128, 3)
    assert np.abs(image - torch_image).max() <= 3


def test_changed_weights_get_their_own_model_and_each_is_reused(cache, monkeypatch):
    """A LoRA merged for the next batch changes the weights and what `weights` says: the next call converts the
    new weights under their own key; going back loads the first model again without converting."""
    torch.manual_seed(0)
    module = SmallDecoder()
    said = {"loras": []}
    module.forward = OpenVINORunner(module, "decoder", decoder_inputs, lambda role: dict(said), {}, "full")
    z = torch.randn(1, 4, 8, 8)
    original = module.conv.weight
    with torch.no_grad():
        expected = SmallDecoder.forward(module, z)
        assert torch.allclose(module(z), expected, atol=1e-5)
        module.conv.weight = torch.nn.Parameter(original + 0.5)  # as LoRAs do: new tensors for the old
        said["loras"] = [["lora-hash", 0.8]]
        changed = SmallDecoder.forward(module, z)
        assert torch.allclose(module(z), changed, atol=1e-5)
        assert len([p for p in cache.iterdir() if p.name.startswith("decoder-")]) == 2
        monkeypatch.setattr(ov, "convert_model", lambda *args, **kwargs: pytest.fail("converted again"))
        module.conv.weight, said["loras"] = original, []
        assert torch.allclose(module(z), expected, atol=1e-5)


def test_weights_identity_names_the_loras_and_vae_in_use(tmp_path, tiny_config):
    from ldm.pipeline import weights_identity

    for name in ("a.safetensors", "b.safetensors", "vae.safetensors"):
        (tmp_path / name).write_bytes(name.encode())
    ckpt_hash = Future()
    ckpt_hash.set_result("0123456789")
    loras = SimpleNamespace(loras=[])
    opt = SimpleNamespace(vae=None, vae_dir=str(tmp_path))
    identity = weights_identity(opt, tiny_config, ckpt_hash, loras)
    keys = set()
    for in_use in ([], [(tmp_path / "a.safetensors", 1.0)], [(tmp_path / "a.safetensors", 0.5)],
                   [(tmp_path / "b.safetensors", 1.0)], [(tmp_path / "a.safetensors", 1.0), (tmp_path / "b.safetensors", 1.0)]):  # fmt: skip
        loras.loras = in_use
        keys.add(cache_key("unet", identity("unet")))
        assert identity("decoder") == weights_identity(opt, tiny_config, ckpt_hash, SimpleNamespace())(
            "decoder"
        )
    assert len(keys) == 5
    with_vae = SimpleNamespace(vae="vae", vae_dir=str(tmp_path))
    assert identity("decoder") != weights_identity(with_vae, tiny_config, ckpt_hash, loras)("decoder")


@pytest.mark.parametrize("failing", ["convert_model", "save_model"])
def test_a_failed_conversion_leaves_nothing_behind(cache, monkeypatch, failing):
    save_model = ov.save_model

    def fail(*args, **kwargs):
        if failing == "save_model":
            save_model(*args, **kwargs)  # the files are written, then it fails
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(ov, failing, fail)
    stale = cache / ".unet-x.4194305-0123abcd.tmp"  # a killed conversion's (no such process id)
    (stale / "model.xml").parent.mkdir(parents=True)
    (stale / "model.xml").write_text("<half")
    module = SmallDecoder()
    with pytest.raises(RuntimeError, match="conversion failed"):
        convert(module, decoder_inputs(torch.randn(1, 4, 8, 8)), cache / "decoder-x")
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--compile"], "--compile is for --backend torch"),
        (["--attention-chunk", "64"], "--attention-chunk is for --backend torch"),
        (["--device", "cuda"], "--backend openvino runs on the CPU: drop --device cuda"),
    ],
)
def test_contradictions_are_refused_in_one_line_without_torch(tmp_path, args, message):
    torch_imported, result = imports_torch(
        "txt2img.py", "--ckpt", "shapes", "--outdir", str(tmp_path), "--backend", "openvino", *args
    )
    assert result.returncode == 2 and not torch_imported
    assert result.stderr.count("\n") == 0 and message in result.stderr, result.stderr


def test_missing_openvino_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("ldm.pipeline.open_session", load)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: txt2img_run(tmp_path, "--backend", "openvino"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --backend openvino needs OpenVINO: pip install .[openvino]\n"


def test_prepare_refuses_other_devices_and_compile(tiny_ldm):
    for device, options in (
        (torch.device("cuda"), RuntimeOptions(backend="openvino")),
        (torch.device("cpu"), RuntimeOptions(backend="openvino", compile=True)),
    ):
        with pytest.raises(UserError, match="--backend openvino runs on the CPU"):
            prepare(tiny_ldm, device, "full", options, fixed_weights)


def test_img2img_and_a_9_channel_inpainting_unet_give_torch_images(tmp_path):
    import img2img
    import inpaint
    from omegaconf import OmegaConf
    from test_inpaint import INPAINT_CONFIG, make_ckpt, make_inputs

    init_img, mask, _ = make_inputs(tmp_path, 96, 64)
    inpaint_ckpt = make_ckpt(tmp_path, OmegaConf.load(ROOT / INPAINT_CONFIG))
    common = ["--init-img", str(init_img), "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "4",
              "--no-safety-checker", "--precision", "full", "--skip_grid", "--prompt", "a red circle"]  # fmt: skip
    runs = {
        "img2img": lambda outdir, *flags: img2img.main(
            ["--ckpt", "shapes", "--outdir", str(outdir), "--strength", "0.6", *common, *flags]
        ),
        "inpaint": lambda outdir, *flags: inpaint.main(
            [
                "--config",
                INPAINT_CONFIG,
                "--ckpt",
                str(inpaint_ckpt),
                "--mask",
                str(mask),
                "--outdir",
                str(outdir),
                *common,
                *flags,
            ]
        ),  # fmt: skip
    }
    for name, run in runs.items():
        run(tmp_path / name / "torch")
        run(tmp_path / name / "openvino", "--backend", "openvino")
        images = [
            pixels(tmp_path / name / backend / "samples" / "00000.png") for backend in ("torch", "openvino")
        ]
        assert images[0].shape == images[1].shape == (64, 96, 3)
        assert np.abs(images[0] - images[1]).max() <= 3, name


def test_conversion_inside_a_bf16_scope_traces_float32(cache):
    """The first call may come inside the session's precision scope (bf16 autocast, and on CPUs without bf16
    units ldm.runtime.bf16's dispatch mode): the model is still traced in float32, with f32 numbers."""
    from ldm.runtime.bf16 import Bf16ProductsInFp32

    torch.manual_seed(0)
    module = SmallDecoder()
    z = torch.randn(2, 4, 8, 8).bfloat16()  # as the bf16 text encoder's context comes
    module.forward = OpenVINORunner(module, "decoder", decoder_inputs, fixed_weights, {}, "full")
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16), Bf16ProductsInFp32():
            out = module(z)
        expected = SmallDecoder.forward(module, z.float())
    assert out.dtype == torch.float32 and (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_lora_for_the_next_batch_is_converted_not_stale(tmp_path, tiny_config, cache):
    """One session, two batches: the second merges a LoRA (a prompt tag); its UNet is converted under its own
    key, and both images are torch's."""
    from conftest import randomize_
    from test_lora import random_kohya_lora

    from ldm.checkpoint import save_checkpoint
    from ldm.util import instantiate_from_config

    model = randomize_(instantiate_from_config(tiny_config.model), std=0.1)
    save_checkpoint(tmp_path / "tiny.ckpt", model.state_dict())
    (tmp_path / "lora").mkdir()
    random_kohya_lora(model, tmp_path / "lora" / "detail.safetensors", seed=1)
    (tmp_path / "prompts.txt").write_text("a red circle\na red circle <lora:detail:0.8>\n")
    images = {}
    for backend in ("torch", "openvino"):
        outdir = tmp_path / backend
        txt2img.main(
            ["--config", "tests/configs/tiny-ldm.yaml", "--ckpt", str(tmp_path / "tiny.ckpt"), "--outdir",
             str(outdir), "--H", "64", "--W", "64", "--ddim_steps", "4", "--n_samples", "1", "--n_iter", "1",
             "--no-safety-checker", "--skip_grid", "--precision", "full", "--lora-dir", str(tmp_path / "lora"),
             "--from-file", str(tmp_path / "prompts.txt"), "--backend", backend]
        )  # fmt: skip
        images[backend] = [pixels(outdir / "samples" / f"0000{i}.png") for i in range(2)]
    assert np.abs(images["torch"][0] - images["torch"][1]).max() > 10  # the LoRA changes the image
    for ours, theirs in zip(images["openvino"], images["torch"], strict=True):
        assert np.abs(ours - theirs).max() <= 3
    assert len(list(cache.glob("unet-*"))) == 2 and len(list(cache.glob("decoder-*"))) == 1


def test_a_tiled_vae_decodes_in_torch_and_the_server_passes_the_flag(tiny_ldm):
    prepare(
        tiny_ldm,
        torch.device("cpu"),
        "full",
        RuntimeOptions(backend="openvino", vae_tiling=True),
        fixed_weights,
    )
    assert isinstance(tiny_ldm.model.diffusion_model.forward, OpenVINORunner)
    assert "forward" not in vars(tiny_ldm.first_stage_model.decoder)  # tiled windows: torch's decoder

    from ldm.server.launch import build_parser, model_flags

    assert model_flags(build_parser().parse_args(["--backend", "openvino"])) == ["--backend", "openvino"]


def test_the_cache_keeps_its_size_by_dropping_the_least_recently_used(tmp_path):
    """Models and compiled blobs beyond the limit go, oldest use first; the model in use never does."""
    import os

    def entry(path: Path, size: int, used: float) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)
        os.utime(path, (used, used))
        if path.name == "model.xml":
            os.utime(path.parent, (used, used))
        return path.parent if path.name == "model.xml" else path

    old_unet = entry(tmp_path / "unet-a" / "model.xml", 400, 1000)
    old_blob = entry(tmp_path / "compiled" / "1.blob", 300, 1001)
    current = entry(tmp_path / "unet-b" / "model.xml", 500, 999)  # in use, though its time is older
    recent = entry(tmp_path / "decoder-c" / "model.xml", 100, 2000)
    converting = entry(
        tmp_path / ".unet-d.123-abc.tmp" / "model.xml", 5000, 0
    )  # another process's, unfinished
    assert prune_cache(tmp_path, 10_000, keep=current) == []
    assert prune_cache(tmp_path, 700, keep=current) == [old_unet, old_blob]
    assert current.is_dir() and recent.is_dir() and not old_unet.exists() and not old_blob.exists()
    assert prune_cache(tmp_path, 0, keep=current) == [recent] and current.is_dir() and converting.is_dir()
