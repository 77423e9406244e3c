"""main.py end to end on tiny configs (CPU): training, logs, signals, resume, DDP, overrides, bad configs."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.training import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]
TINY_LDM = str(ROOT / "tests" / "configs" / "tiny-ldm.yaml")
TINY_TRAIN = str(ROOT / "tests" / "configs" / "tiny-train.yaml")
TINY_AE = str(ROOT / "tests" / "configs" / "tiny-ae.yaml")


def main_py(cwd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("LDM_RUN_TIMESTAMP", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def only_run(cwd: Path) -> Path:
    runs = list((cwd / "logs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def metric(run: Path, name: str) -> list[float]:
    values = []
    for log in sorted((run / "csv").glob("version_*/metrics.csv")):
        with open(log) as f:
            values += [float(row[name]) for row in csv.DictReader(f) if row.get(name)]
    return values


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def trained_ldm(tmp_path_factory) -> Path:
    """50 steps of the tiny LDM, with a dotlist override of the UNet width."""
    cwd = tmp_path_factory.mktemp("ldm")
    result = main_py(
        cwd, "-b", TINY_LDM, TINY_TRAIN, "-t", "-n", "tiny", "--scale_lr", "false",
        "model.base_learning_rate=2e-3", "model.params.unet_config.params.model_channels=64",
        "lightning.trainer.max_steps=50", "lightning.trainer.val_check_interval=25",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run(cwd)


def test_ldm_training_lowers_the_loss_and_writes_the_log_layout(trained_ldm):
    assert trained_ldm.name.endswith("_tiny")
    losses = metric(trained_ldm, "train/loss_simple_step")
    assert len(losses) == 50
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    names = {p.name for p in (trained_ldm / "checkpoints").iterdir()}
    assert "last.ckpt" in names and any(n.startswith("epoch=") for n in names)
    assert ckpt_step(trained_ldm / "checkpoints" / "last.ckpt") == 50
    configs = sorted(p.name for p in (trained_ldm / "configs").iterdir())
    assert [n.split("-")[-1] for n in configs] == ["lightning.yaml", "project.yaml"]
    logged = {p.name.split("_gs-")[0] for p in (trained_ldm / "images" / "train").iterdir()}
    assert {
        "inputs",
        "reconstruction",
        "conditioning",
        "samples",
        "diffusion_row",
        "progressive_row",
    } <= logged


def test_saved_config_recreates_the_model_and_loads_in_txt2img(trained_ldm, tmp_path):
    from ldm.checkpoint import load_model_from_config

    project = next((trained_ldm / "configs").glob("*-project.yaml"))
    config = OmegaConf.load(project)
    assert config.model.params.unet_config.params.model_channels == 64  # the dotlist override was saved
    model = load_model_from_config(config, str(trained_ldm / "checkpoints" / "last.ckpt"))
    assert model.model.diffusion_model.input_blocks[0][0].weight.shape[0] == 64
    saved = torch.load(trained_ldm / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for key, value in model.state_dict().items():
        if key in saved["state_dict"]:
            torch.testing.assert_close(value, saved["state_dict"][key])

    script = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--config", str(project),
         "--ckpt", str(trained_ldm / "checkpoints" / "last.ckpt"), "--outdir", str(tmp_path), "--H", "64", "--W", "64",
         "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "2", "--device", "cpu", "--no-safety-checker"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert script.returncode == 0, script.stderr[-2000:]
    assert (tmp_path / "samples" / "00000.png").exists()


def test_sigterm_saves_last_ckpt_and_resume_continues_exactly(tmp_path):
    first = main_py(
        tmp_path, "-b", TINY_LDM, TINY_TRAIN, "-t", "-n", "stop",
        "lightning.trainer.max_steps=10", "lightning.trainer.val_check_interval=100", "lightning.trainer.limit_val_batches=0",
        "lightning.callbacks.probe.target=training_probe.Probe",
        "lightning.callbacks.probe.params.signal_name=SIGTERM", "lightning.callbacks.probe.params.at_step=4",
    )  # fmt: skip
    assert first.returncode != 0
    run = only_run(tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) == 4
    saved_optimizer = torch.load(last, map_location="cpu", weights_only=False)["optimizer_states"][0]

    record = tmp_path / "resumed.pt"
    second = main_py(
        tmp_path, "-r", str(run), "-t", "lightning.trainer.max_steps=7",
        "lightning.callbacks.probe.params.signal_name=null", f"lightning.callbacks.probe.params.record={record}",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert only_run(tmp_path) == run  # the same log directory continues
    resumed = torch.load(record, weights_only=False)
    assert resumed["global_step"] == 4
    for key, state in saved_optimizer["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(resumed["optimizer"]["state"][key][name], value)
    assert ckpt_step(last) == 7
    assert sorted(p.name for p in last.parent.iterdir() if p.name.startswith("last")) == ["last.ckpt"]
    assert sorted(p.name for p in (run / "csv").iterdir()) == ["version_0", "version_1"]


def test_sigusr1_saves_and_training_goes_on(tmp_path):
    result = main_py(
        tmp_path, "-b", TINY_LDM, TINY_TRAIN, "-t", "lightning.trainer.max_steps=5",
        "lightning.trainer.limit_val_batches=0", "lightning.callbacks.probe.target=training_probe.Probe",
        "lightning.callbacks.probe.params.signal_name=SIGUSR1", "lightning.callbacks.probe.params.at_step=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "last.ckpt at global step 3" in result.stdout
    )  # signalled after step 2, saved at the next batch end
    assert ckpt_step(only_run(tmp_path) / "checkpoints" / "last.ckpt") == 5


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_autoencoder_trains_without_lpips(tmp_path):
    result = main_py(tmp_path, "-b", TINY_AE, "-t", "-n", "ae", "--scale_lr", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    rec = metric(only_run(tmp_path), "train/rec_loss")
    assert len(rec) >= 30
    assert sum(rec[-5:]) / 5 < 0.85 * sum(rec[:5]) / 5


def test_two_process_ddp_on_cpu(tmp_path):
    result = main_py(
        tmp_path, "-b", TINY_LDM, TINY_TRAIN, "-t", "-n", "ddp", "--accelerator", "cpu", "--devices", "2",
        "--strategy", "ddp", "lightning.trainer.max_steps=3", "lightning.trainer.limit_val_batches=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(tmp_path)  # both ranks share rank 0's run directory
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 3
    assert (
        "GLOBAL_RANK: 1" in result.stderr + result.stdout
        or "world_size=2" in (result.stderr + result.stdout).lower()
    )


def write_folder(root: Path, captions: bool = True) -> None:
    from PIL import Image

    root.mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(root / "a.png")
    if captions:
        (root / "a.txt").write_text("a red square")


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_target", "unknown target 'ldm.models.diffusion.ddpm.NoSuchModel'"),
        ("missing_param", "the params of ldm.modules.encoders.modules.FrozenCLIPEmbedder don't fit"),
        ("missing_folder", "does not exist"),
        ("empty_folder", "no images"),
        ("no_caption", "a.png"),
        ("bad_override", "config overrides are written key=value"),
    ],
)
def test_bad_config_stops_before_training(tmp_path, case, message):
    folder_data = tmp_path / "folder-data.yaml"
    folder_data.write_text(
        "data:\n  target: main.DataModuleFromConfig\n  params:\n    batch_size: 2\n    num_workers: 0\n"
        "    train:\n      target: ldm.data.captioned_folder.CaptionedImageFolder\n"
        f"      params:\n        root: {tmp_path / 'images'}\n        size: 64\n"
        "lightning:\n  trainer:\n    max_steps: 2\n"
    )
    args = ["-b", TINY_LDM, TINY_TRAIN]
    if case == "unknown_target":
        args += ["-t", "model.target=ldm.models.diffusion.ddpm.NoSuchModel"]
    elif case == "missing_param":
        args += ["-t", "model.params.cond_stage_config.params.no_such_param=1"]
    elif case == "bad_override":
        args += ["-t", "--not-a-flag"]
    else:
        if case == "empty_folder":
            (tmp_path / "images").mkdir()
        elif case == "no_caption":
            write_folder(tmp_path / "images", captions=False)
        args = ["-b", TINY_LDM, str(folder_data), "-t"]
    result = main_py(tmp_path, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert not list(tmp_path.glob("logs/*/checkpoints/*"))


def test_finetune_config_builds_the_v1_model_with_folder_data():
    from ldm.util import check_targets

    config = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / "v1-finetune.yaml")
    check_targets(config, "config")
    assert config.model.params.ucg_training.txt.p == 0.1
    assert config.data.params.train.target == "ldm.data.captioned_folder.CaptionedImageFolder"
    del config.model.params.ckpt_path
    from ldm.util import instantiate_from_config

    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    assert model.use_ema and sum(p.numel() for p in model.model.parameters()) == 859_520_964


def test_finetune_starts_from_a_checkpoint_on_captioned_images(tmp_path, tiny_ldm):
    from PIL import Image

    from ldm.checkpoint import save_checkpoint

    ckpt = tmp_path / "start.ckpt"
    save_checkpoint(ckpt, tiny_ldm.state_dict(), global_step=123)
    images = tmp_path / "images"
    images.mkdir()
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (80, 72), color).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a {color} picture")
    data = tmp_path / "data.yaml"
    data.write_text(
        "data:\n  target: main.DataModuleFromConfig\n  params:\n    batch_size: 2\n    num_workers: 0\n"
        "    train:\n      target: ldm.data.captioned_folder.CaptionedImageFolder\n"
        f"      params:\n        root: {images}\n        size: 64\n        flip_p: 0.5\n"
        "lightning:\n  trainer:\n    max_steps: 2\n    enable_progress_bar: False\n"
        "  callbacks:\n    image_logger:\n      params:\n        batch_frequency: 1000\n        max_images: 1\n"
    )
    result = main_py(
        tmp_path,
        "-b",
        TINY_LDM,
        str(data),
        "-t",
        f"model.params.ckpt_path={ckpt}",
        "model.params.use_ema=true",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Restored from {ckpt}" in result.stdout
    assert "the EMA starts from the loaded model weights" in result.stdout
    trained = torch.load(
        only_run(tmp_path) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert trained["global_step"] == 2
    key = "first_stage_model.decoder.conv_out.weight"  # frozen: exactly the starting weights
    torch.testing.assert_close(trained["state_dict"][key], tiny_ldm.state_dict()[key])
