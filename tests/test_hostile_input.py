"""Careless and hostile input, one row per class: the real script as a subprocess ends with exactly one stderr
line and exit status 2, no traceback, and nothing written; the checks that need no model run before it loads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/configs/tiny-ldm.yaml"
sys.path.insert(0, str(ROOT / "scripts"))
import img2img  # noqa: E402
import txt2img  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_config):
    """A tiny checkpoint, broken copies of it, bad configs, a latin-1 prompt file and an input image."""
    from conftest import randomize_
    from PIL import Image

    from ldm.util import instantiate_from_config

    d = tmp_path_factory.mktemp("hostile")
    save_checkpoint(d / "tiny.ckpt", randomize_(instantiate_from_config(tiny_config.model)).state_dict())
    data = (d / "tiny.ckpt").read_bytes()
    (d / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (d / "empty.safetensors").write_bytes(b"")
    (d / "garbage.safetensors").write_bytes(os.urandom(4096))
    tiny = (ROOT / TINY).read_text()
    (d / "os-system.yaml").write_text("model:\n  target: os.system\n  params:\n    command: echo pwned\n")
    (d / "unknown.yaml").write_text(
        tiny.replace("ldm.models.diffusion.ddpm.LatentDiffusion", "ldm.nope.Model")
    )
    (d / "extra-param.yaml").write_text(tiny.replace("  params:\n", "  params:\n    nonexistent: 3\n", 1))
    (d / "invalid.yaml").write_text("model: [unclosed\n  target: x\n")
    (d / "latin1.txt").write_bytes("a red circle\ncaf\xe9 au lait\n".encode("latin-1"))
    (d / "a-file").write_text("not a folder")
    Image.new("RGB", (64, 64), "white").save(d / "in.png")
    return d


BASE = ["--config", TINY, "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1",
        "--device", "cpu"]  # fmt: skip
# (id, script, extra args, message, decided before the model loads); {d} is the files folder, {out} the outdir
CASES = [
    ("safety-checker-missing", "txt2img", ["--safety-checker", "{d}/nowhere"], "no config.json there", True),
    ("huge-size", "txt2img", ["--W", "100000", "--H", "512", "--no-safety-checker"], "needs about", True),
    ("config-runs-code", "txt2img", ["--config", "{d}/os-system.yaml"], "is outside ldm., torch.", True),
    ("config-unknown-target", "txt2img", ["--config", "{d}/unknown.yaml"], "unknown target 'ldm.nope.Model'", True),
    ("config-extra-param", "txt2img", ["--config", "{d}/extra-param.yaml"], "takes no parameter 'nonexistent'", True),
    ("config-invalid-yaml", "txt2img", ["--config", "{d}/invalid.yaml"], "is not valid YAML", True),
    ("ckpt-truncated", "txt2img", ["--ckpt", "{d}/truncated.ckpt"], "is not a readable checkpoint", False),
    ("ckpt-empty", "txt2img", ["--ckpt", "{d}/empty.safetensors"], "is empty", False),
    ("ckpt-garbage", "txt2img", ["--ckpt", "{d}/garbage.safetensors"], "is not a readable checkpoint", False),
    ("outdir-is-a-file", "txt2img", ["--outdir", "{d}/a-file"], "is not a folder", True),
    ("outdir-under-a-file", "txt2img", ["--outdir", "{d}/a-file/out"], "which is not a folder", True),
    ("outdir-dev-null", "txt2img", ["--outdir", "/dev/null"], "is not a folder", True),
    ("outdir-read-only-fs", "txt2img", ["--outdir", "/proc/ldm-out"], "cannot write in /proc", True),
    ("outdir-empty", "txt2img", ["--outdir", ""], "--outdir is empty", True),
    ("steps-over-1000", "txt2img", ["--ddim_steps", "1001"], "--ddim_steps must be between 1 and 1000", True),
    ("scale-nan", "txt2img", ["--scale", "nan"], "--scale must be a finite number", True),
    ("scale-inf", "txt2img", ["--scale", "inf"], "--scale must be a finite number", True),
    ("eta-inf", "txt2img", ["--ddim_eta", "inf"], "--ddim_eta must be a finite number", True),
    ("strength-nan", "img2img", ["--init-img", "{d}/in.png", "--strength", "nan"], "--strength must be a finite", True),
    ("seed-too-large", "txt2img", ["--seed", str(2**64)], "--seed must be between -1 and", True),
    ("seed-overflows", "txt2img", ["--seed", str(2**64 - 1), "--n_samples", "2"], "past the largest seed", True),
    ("prompt-file-latin1", "txt2img", ["--from-file", "{d}/latin1.txt"], "is not UTF-8 text (byte 16", True),
]  # fmt: skip


def argv(files: Path, outdir: Path, extra: list[str], script: str = "txt2img") -> list[str]:
    base = BASE if script == "txt2img" else [a for a in BASE if a not in ("--H", "--W", "64")]
    args = [*base, "--ckpt", str(files / "tiny.ckpt"), "--outdir", str(outdir)]
    if "--safety-checker" not in extra:
        args.append("--no-safety-checker")
    return [*args, *(a.format(d=files, out=outdir) for a in extra)]


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.is_dir() else set()


@pytest.mark.parametrize("case, script, extra, message, before_load", CASES, ids=[c[0] for c in CASES])
def test_one_line_exit_2_nothing_written(files, tmp_path, case, script, extra, message, before_load):
    outdir = tmp_path / "out"
    (outdir / "samples").mkdir(parents=True)
    (outdir / "samples" / "00003.png").write_bytes(b"an earlier result")
    before = snapshot(tmp_path)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{script}.py"), *argv(files, outdir, extra, script)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in lines[0]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "case, script, extra, message, before_load", [c for c in CASES if c[4]], ids=[c[0] for c in CASES if c[4]]
)
def test_checks_that_need_no_model_run_before_it_loads(
    files, tmp_path, monkeypatch, case, script, extra, message, before_load
):
    import ldm.pipeline
    from ldm.cli import run_cli

    def loader_called(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(ldm.pipeline, "load_model", loader_called)
    main = {"txt2img": txt2img.main, "img2img": img2img.main}[script]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv(files, tmp_path / "out", extra, script)))
    assert exit_info.value.code == 2


def test_a_full_disk_mid_run_keeps_what_was_written(files, tmp_path, monkeypatch, capsys):
    """The second image hits ENOSPC: the first stays, the message says how many were kept."""
    import errno

    from ldm.cli import run_cli
    from ldm.outputs import NumberedFolder

    real_save, calls = NumberedFolder.save, []

    def save(self, image, parameters=None):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, image, parameters)

    monkeypatch.setattr(NumberedFolder, "save", save)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: txt2img.main(argv(files, tmp_path / "out", ["--n_samples", "2"])))
    assert exit_info.value.code == 2
    assert "No space left on device): the 1 file written before are kept" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out" / "samples").iterdir()] == ["00000.png"]


def test_stale_temporary_files_of_dead_runs_are_removed_and_outputs_get_the_umask(files, tmp_path):
    samples = tmp_path / "out" / "samples"
    samples.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = samples / f".00000.png.{dead.stdout.strip()}-0123abcd.tmp"  # a killed run's half-written file
    stale.write_bytes(b"half")
    other = samples / ".notes.tmp"  # not of our naming: left alone
    other.write_bytes(b"x")
    old = os.umask(0o022)
    try:
        txt2img.main(argv(files, tmp_path / "out", ["--skip_grid"]))
    finally:
        os.umask(old)
    assert not stale.exists() and other.exists()
    written = samples / "00000.png"
    assert written.stat().st_mode & 0o777 == 0o644


def test_a_run_that_fails_before_writing_leaves_no_folder(files, tmp_path):
    outdir = tmp_path / "new" / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "txt2img.py"), *argv(files, outdir, ["--ckpt", str(files / "truncated.ckpt")])],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2 and not (tmp_path / "new").exists()


def test_prompt_file_with_a_byte_order_mark(files, tmp_path):
    from ldm.outputs import read_parameters

    (tmp_path / "bom.txt").write_bytes("\ufeffa red circle\n".encode())
    txt2img.main(argv(files, tmp_path / "out", ["--from-file", str(tmp_path / "bom.txt"), "--skip_grid"]))
    assert read_parameters(tmp_path / "out" / "samples" / "00000.png")["prompt"] == "a red circle"


def test_seed_minus_one_picks_a_random_seed_and_records_it(files, tmp_path, capsys):
    from ldm.outputs import read_parameters

    txt2img.main(argv(files, tmp_path / "out", ["--seed", "-1", "--skip_grid"]))
    seed = read_parameters(tmp_path / "out" / "samples" / "00000.png")["seed"]
    assert f"seed -1: picked seed {seed}" in capsys.readouterr().out and seed >= 0


MAIN_CASES = [
    ("invalid-yaml", ["-b", "{d}/invalid.yaml", "-t"], "is not valid YAML"),
    ("unknown-target", ["-b", "{d}/unknown.yaml", "-t"], "unknown target 'ldm.nope.Model'"),
    ("unknown-param", ["-b", TINY, "tests/configs/tiny-train.yaml", "-t", "model.params.nonexistent=3"],
     "takes no parameter 'nonexistent'"),
    ("wrong-type", ["-b", TINY, "tests/configs/tiny-train.yaml", "-t", "lightning.trainer.max_steps=abc"],
     "lightning.trainer.max_steps must be a whole number, got 'abc'"),
    ("negative-batch", ["-b", TINY, "tests/configs/tiny-train.yaml", "-t", "data.params.batch_size=-1"],
     "data.params.batch_size must be a positive whole number, got -1"),
]  # fmt: skip


@pytest.mark.parametrize("case, args, message", MAIN_CASES, ids=[c[0] for c in MAIN_CASES])
def test_main_py_config_mistakes_are_one_line(files, tmp_path, case, args, message):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("LDM_RUN_TIMESTAMP", None)
    args = [
        a.format(d=files) if a.startswith("{d}") else str(ROOT / a) if a.endswith(".yaml") else a
        for a in args
    ]
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "-l", str(tmp_path / "logs"), *args],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("logs/*/checkpoints/*"))


def test_a_full_filesystem_is_refused_before_any_work(tmp_path):
    """A tiny tmpfs, filled up (needs root and mount; skipped where the sandbox forbids it)."""
    from ldm.errors import UserError
    from ldm.files import check_output_folder

    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mount / "fill").write_bytes(bytes(128 * 1024))
        with pytest.raises(UserError, match="No space left on device"):
            check_output_folder(str(mount / "out"))
        assert not (mount / "out").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=False)
