"""scripts/txt2img.py end to end on the tiny model: files, numbering, seeds, metadata, bad input."""

import gc
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.checkpoint import save_checkpoint
from ldm.outputs import read_parameters

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "txt2img.py"
sys.path.insert(0, str(ROOT / "scripts"))
import txt2img  # noqa: E402

ORIGINAL_FLAGS = [
    "--prompt", "--outdir", "--skip_grid", "--skip_save", "--ddim_steps", "--plms", "--dpm_solver", "--laion400m",
    "--fixed_code", "--ddim_eta", "--n_iter", "--H", "--W", "--C", "--f", "--n_samples", "--n_rows", "--scale",
    "--from-file", "--config", "--ckpt", "--seed", "--precision",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_config):
    from conftest import randomize_

    from ldm.util import instantiate_from_config

    model = randomize_(instantiate_from_config(tiny_config.model), std=0.1)
    path = tmp_path_factory.mktemp("model") / "tiny.ckpt"
    save_checkpoint(path, model.state_dict(), global_step=0)
    return path


def run(tiny_ckpt, outdir, *extra):
    argv = [
        "--config", "tests/configs/tiny-ldm.yaml", "--ckpt", str(tiny_ckpt), "--outdir", str(outdir),
        "--H", "64", "--W", "64", "--ddim_steps", "3", "--n_samples", "2", "--n_iter", "1", "--device", "cpu",
        "--no-safety-checker", *extra,
    ]  # fmt: skip
    txt2img.main(argv)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def test_layout_sizes_grid_and_numbering(tiny_ckpt, tmp_path):
    (tmp_path / "samples").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "samples" / "00007.png")
    (tmp_path / "samples" / "notes.txt").write_text("a stray file must not shift the numbering")
    run(tiny_ckpt, tmp_path, "--n_iter", "2", "--prompt", "a red circle")
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == ["00007.png", "00008.png", "00009.png", "00010.png", "00011.png", "notes.txt"]
    assert all(Image.open(tmp_path / "samples" / n).size == (64, 64) for n in names[1:5])
    with Image.open(tmp_path / "grid-0000.png") as grid:
        assert grid.size == (2 * 66 + 2, 2 * 66 + 2)  # 2 per row (n_rows = n_samples), 2 rows, 2 px padding
    run(tiny_ckpt, tmp_path, "--n_samples", "1", "--n_rows", "1")
    assert (tmp_path / "samples" / "00012.png").exists() and (tmp_path / "grid-0001.png").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_seed_reproducible_and_metadata_remakes_one_image(tiny_ckpt, tmp_path):
    run(tiny_ckpt, tmp_path / "a", "--seed", "5", "--prompt", "a blue square")
    run(tiny_ckpt, tmp_path / "b", "--seed", "5", "--prompt", "a blue square")
    run(tiny_ckpt, tmp_path / "c", "--seed", "6", "--prompt", "a blue square")
    first, second = (tmp_path / "a" / "samples" / f"0000{i}.png" for i in range(2))
    assert np.array_equal(pixels(first), pixels(tmp_path / "b" / "samples" / "00000.png"))
    assert not np.array_equal(pixels(first), pixels(second))
    # image k of a run has seed + k: the second image of seed 5 is the first of seed 6
    assert np.array_equal(pixels(second), pixels(tmp_path / "c" / "samples" / "00000.png"))

    params = read_parameters(second)
    assert params["prompt"] == "a blue square" and params["seed"] == 6
    assert params["sampler"] == "ddim" and params["steps"] == 3 and params["scale"] == 7.5
    assert params["width"] == params["height"] == 64 and len(params["model_hash"]) == 10
    assert "--seed 6 --n_samples 1" in params["remake"]


@pytest.mark.parametrize("sampler_flag", [["--plms"], ["--dpm_solver"], ["--sampler", "plms"]])
def test_other_samplers_write_images(tiny_ckpt, tmp_path, sampler_flag):
    run(tiny_ckpt, tmp_path, "--skip_grid", *sampler_flag)
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2
    assert not (tmp_path / "grid-0000.png").exists()
    assert read_parameters(tmp_path / "samples" / "00000.png")["sampler"] in ("plms", "dpm")


@pytest.mark.parametrize("fixed_code", [False, True])
def test_prompt_file_with_a_partial_last_batch(tiny_ckpt, tmp_path, fixed_code):
    prompts = ["a red circle", "a green square", "", "a blue triangle", "a yellow circle", "a red square"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    extra = ["--fixed_code"] if fixed_code else []
    run(tiny_ckpt, tmp_path / "out", "--from-file", str(tmp_path / "prompts.txt"), "--n_samples", "2", *extra)
    written = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert len(written) == 5  # blank lines are skipped; batches of 2, 2, 1
    assert [read_parameters(p)["prompt"] for p in written] == [p for p in prompts if p]
    seeds = [read_parameters(p)["seed"] for p in written]
    assert seeds == ([42, 43, 42, 43, 42] if fixed_code else [42, 43, 44, 45, 46])


def test_negative_prompt_changes_the_image(tiny_ckpt, tmp_path):
    run(tiny_ckpt, tmp_path / "plain", "--n_samples", "1", "--skip_grid")
    run(
        tiny_ckpt,
        tmp_path / "neg",
        "--n_samples",
        "1",
        "--skip_grid",
        "--negative-prompt",
        "black background",
    )
    plain, neg = (pixels(tmp_path / d / "samples" / "00000.png") for d in ("plain", "neg"))
    assert np.abs(plain - neg).max() > 0
    assert (
        read_parameters(tmp_path / "neg" / "samples" / "00000.png")["negative_prompt"] == "black background"
    )


def test_help_lists_every_original_flag():
    result = cli("--help")
    assert result.returncode == 0
    missing = [flag for flag in ORIGINAL_FLAGS if flag not in result.stdout]
    assert missing == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--H", "60"], "--H 60 is not a multiple of 16, which this model needs: use 48 or 64"),
        (["--W", "100"], "--W 100 is not a multiple of 16"),
        (["--plms", "--dpm_solver"], "conflicting sampler flags"),
        (["--n_samples", "0"], "--n_samples must be at least 1"),
        (["--from-file", "no/such/prompts.txt"], "prompt file no/such/prompts.txt not found"),
        (["--config", "no/such.yaml"], "config file no/such.yaml not found"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_ckpt, tmp_path, args, message):
    base = ["--config", "tests/configs/tiny-ldm.yaml", "--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path)]
    result = cli(*base, "--H", "64", "--W", "64", *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr
    assert not (tmp_path / "samples").exists()


def test_missing_default_checkpoint_says_where_to_put_it(tmp_path):
    result = cli("--outdir", str(tmp_path), "--ckpt", "models/ldm/stable-diffusion-v1/model.ckpt")
    if (ROOT / "models/ldm/stable-diffusion-v1/model.ckpt").exists():
        pytest.skip("a real checkpoint is installed")
    assert result.returncode == 2
    assert "no checkpoint at models/ldm/stable-diffusion-v1/model.ckpt" in result.stderr
    assert (
        "sd-v1-4.ckpt" in result.stderr and "--ckpt shapes" in result.stderr
    )  # real weights, or the bundled model


def test_bundled_model_by_name_uses_its_config_size_and_scale(tmp_path):
    txt2img.main(
        ["--ckpt", "shapes", "--prompt", "a blue square on a white background", "--outdir", str(tmp_path),
         "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "5", "--device", "cpu", "--no-safety-checker"]
    )  # fmt: skip
    params = read_parameters(tmp_path / "samples" / "00000.png")
    assert Image.open(tmp_path / "samples" / "00000.png").size == (64, 64)
    assert params["scale"] == 3.0 and params["config"].endswith("models/ldm/shapes/config.yaml")
    assert "--ckpt" in params["remake"] and "model.safetensors" in params["remake"]


def test_run_cli_reports_user_errors_and_freezes_the_collector_after_a_run(capsys):
    from ldm.cli import run_cli
    from ldm.errors import UserError

    def fail():
        raise UserError("--H 100 is not a multiple of 64", exit_code=3)

    with pytest.raises(SystemExit) as exit_info:
        run_cli(fail)
    assert exit_info.value.code == 3
    assert capsys.readouterr().err == "error: --H 100 is not a multiple of 64\n"
    before = gc.get_freeze_count()
    try:
        run_cli(lambda: None)
        assert gc.get_freeze_count() > before  # exit-time collections skip everything alive now
    finally:
        gc.unfreeze()


def test_cpu_bf16_precision_draws_the_fp32_image(tmp_path):
    """--precision autocast on the CPU (bf16; its products in fp32 where the CPU has no bf16 units) makes the
    same picture as --precision full with the bundled model, to bf16's rounding."""
    images = {}
    for precision in ("full", "autocast"):
        outdir = tmp_path / precision
        txt2img.main(
            ["--ckpt", "shapes", "--prompt", "a red circle on a black background", "--outdir", str(outdir),
             "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "10", "--device", "cpu", "--no-safety-checker",
             "--precision", precision]
        )  # fmt: skip
        images[precision] = pixels(outdir / "samples" / "00000.png")
        assert read_parameters(outdir / "samples" / "00000.png")["precision"] == precision
    diff = np.abs(images["autocast"] - images["full"])
    assert 0 < diff.mean() < 1.5 and diff.max() < 32  # measured: mean 0.42, max 6 (of 255)
