"""Train or fine-tune from YAML configs: `python main.py --base configs/latent-diffusion/XYZ.yaml -t --gpus 0,`.

Configs given with -b are merged left to right, then `key=value` overrides from the command line; the
`lightning:` block configures the Trainer and callbacks, `model:` and `data:` are instantiated by target.
Runs log to logs/<timestamp>_<name>/{checkpoints,configs,images}; -r resumes a run where it stopped.
"""

import argparse
import datetime
import glob
import os
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import LearningRateMonitor  # noqa: F401  (main.LearningRateMonitor)
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException
from yaml import YAMLError

from ldm.data.datamodule import DataModuleFromConfig, WrappedDataset  # noqa: F401  (configs name main.*)
from ldm.errors import ConfigError
from ldm.training import (
    AtomicCheckpointIO,
    ImageLogger,  # noqa: F401  (configs name main.ImageLogger)
    ModelCheckpoint,
    ProgressBar,
    SaveOnSignal,
    SetupCallback,
    instantiate_checked,
    trainer_kwargs,
)


def str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("Boolean value expected.")


class OptionalBool(argparse.Action):
    """`-t`, `-t true`, `-t false`; a following `key=value` is an override, not the flag's value."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values is None:
            setattr(namespace, self.dest, True)
            return
        try:
            setattr(namespace, self.dest, str2bool(values))
        except argparse.ArgumentTypeError:
            setattr(namespace, self.dest, True)
            namespace.overrides_after_flags = [*getattr(namespace, "overrides_after_flags", []), values]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-n", "--name", type=str, const=True, default="", nargs="?", help="postfix for logdir"
    )
    parser.add_argument(
        "-r",
        "--resume",
        type=str,
        const=True,
        default="",
        nargs="?",
        help="resume from logdir or checkpoint in logdir",
    )
    parser.add_argument(
        "-b",
        "--base",
        nargs="*",
        metavar="base_config.yaml",
        default=list(),
        help="paths to base configs, merged left to right; `key=value` arguments override them",
    )
    parser.add_argument(
        "-t", "--train", action=OptionalBool, const=True, default=False, nargs="?", help="train"
    )
    parser.add_argument(
        "--no-test", action=OptionalBool, const=True, default=False, nargs="?", help="disable test"
    )
    parser.add_argument(
        "-p", "--project", help="name of new or path to existing project: the run's log directory"
    )
    parser.add_argument(
        "-d",
        "--debug",
        type=str2bool,
        nargs="?",
        const=True,
        default=False,
        help="enable post-mortem debugging (the run is moved to debug_runs/)",
    )
    parser.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    parser.add_argument("-f", "--postfix", type=str, default="", help="post-postfix for default name")
    parser.add_argument("-l", "--logdir", type=str, default="logs", help="directory for logging dat shit")
    parser.add_argument(
        "--scale_lr",
        type=str2bool,
        nargs="?",
        const=True,
        default=True,
        help="scale base-lr by ngpu * batch_size * n_accumulate",
    )
    trainer = parser.add_argument_group("trainer", "override lightning.trainer settings of the config")
    trainer.add_argument(
        "--gpus", type=str, default=None, help='GPU ids in the Lightning 1.x form, e.g. "0," or "0,1"'
    )
    trainer.add_argument("--accelerator", type=str, default=None, help="cpu, gpu, mps or auto")
    trainer.add_argument(
        "--devices", type=str, default=None, help='number of devices or ids, e.g. 2 or "0,1"'
    )
    trainer.add_argument("--num_nodes", type=int, default=None)
    trainer.add_argument("--strategy", type=str, default=None, help="e.g. ddp")
    trainer.add_argument("--precision", type=str, default=None, help="e.g. 32, 16-mixed, bf16-mixed")
    trainer.add_argument("--max_steps", type=int, default=None)
    trainer.add_argument("--max_epochs", type=int, default=None)
    trainer.add_argument("--accumulate_grad_batches", type=int, default=None)
    trainer.add_argument("--limit_train_batches", type=float, default=None)
    trainer.add_argument("--limit_val_batches", type=float, default=None)
    trainer.add_argument("--val_check_interval", type=float, default=None)
    trainer.add_argument("--check_val_every_n_epoch", type=int, default=None)
    trainer.add_argument("--log_every_n_steps", type=int, default=None)
    trainer.add_argument("--gradient_clip_val", type=float, default=None)
    return parser  # fmt: skip


TRAINER_FLAGS = (
    "gpus", "accelerator", "devices", "num_nodes", "strategy", "precision", "max_steps", "max_epochs",
    "accumulate_grad_batches", "limit_train_batches", "limit_val_batches", "val_check_interval",
    "check_val_every_n_epoch", "log_every_n_steps", "gradient_clip_val",
)  # fmt: skip


def resolve_run(opt: argparse.Namespace, now: str) -> tuple[Path, str | None]:
    """The run's log directory and, when resuming, the checkpoint to resume from."""
    if opt.resume:
        resume = Path(opt.resume)
        if not resume.exists():
            raise ConfigError(
                f"cannot find {opt.resume} to resume from: pass -r with a log directory or a checkpoint"
            )
        if resume.is_file():
            logdir, ckpt = resume.parent.parent, resume
        else:
            logdir, ckpt = resume, resume / "checkpoints" / "last.ckpt"
            if not ckpt.is_file():
                raise ConfigError(f"{logdir} has no checkpoints/last.ckpt: pass -r with a checkpoint file")
        opt.base = sorted(glob.glob(str(logdir / "configs" / "*.yaml"))) + opt.base
        return logdir, str(ckpt)
    if opt.project:
        return Path(opt.project), None
    if opt.name:
        name = "_" + opt.name
    elif opt.base:
        name = "_" + Path(opt.base[0]).stem
    else:
        name = ""
    return Path(opt.logdir) / f"{now}{name}{opt.postfix}", None


def load_configs(opt: argparse.Namespace, overrides: list[str]):
    for path in opt.base:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} not found: pass -b with existing YAML files")
    bad = [arg for arg in overrides if "=" not in arg or arg.startswith("-")]
    if bad:
        raise ConfigError(f"unrecognized arguments {' '.join(bad)}: config overrides are written key=value")
    configs = []
    for path in opt.base:
        try:
            configs.append(OmegaConf.load(path))
        except (YAMLError, OmegaConfBaseException, UnicodeDecodeError) as error:
            reason = " ".join(str(error).split())
            raise ConfigError(f"config file {path} is not valid YAML ({reason}): fix it") from None
    try:
        config = OmegaConf.merge(*configs, OmegaConf.from_dotlist(overrides))
    except (YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(f"the configs and overrides do not merge: {' '.join(str(error).split())}") from None
    if "model" not in config:
        raise ConfigError("the merged config has no `model:` section: pass -b with a model config")
    lightning_config = config.pop("lightning", OmegaConf.create())
    return config, lightning_config


def main(argv: list[str] | None = None) -> None:
    sys.path.append(os.getcwd())
    opt, overrides = get_parser().parse_known_args(argv)
    overrides += getattr(opt, "overrides_after_flags", [])
    if opt.name and opt.resume:
        raise ConfigError("-n/--name and -r/--resume cannot be given together: resume keeps its run's name")
    if opt.resume and not opt.train:
        rank_zero_info("note: -r resumes training, so -t is implied")
        opt.train = True
    # DDP launches this script again for the other ranks: they must share rank 0's run directory
    now = os.environ.get("LDM_RUN_TIMESTAMP") or datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    os.environ["LDM_RUN_TIMESTAMP"] = now
    logdir, resume_ckpt = resolve_run(opt, now)
    ckptdir, cfgdir = logdir / "checkpoints", logdir / "configs"
    pl.seed_everything(opt.seed, workers=True)

    config, lightning_config = load_configs(opt, overrides)
    trainer_config = trainer_kwargs(lightning_config.get("trainer", OmegaConf.create()), opt, TRAINER_FLAGS)
    lightning_config.trainer = OmegaConf.create(
        {k: v for k, v in trainer_config.items() if not k.startswith("_")}
    )

    model = instantiate_checked(config.model, "model")
    data = instantiate_checked(config.data, "data") if "data" in config else None
    if data is None and opt.train:
        raise ConfigError("training needs a `data:` section in the config (see configs/latent-diffusion/)")
    if data is not None:
        data.prepare_data()
        try:
            data.setup("fit")
        except (FileNotFoundError, NotADirectoryError, ValueError) as error:
            raise ConfigError(f"data: {error}") from None
        for split, dataset in data.datasets.items():
            rank_zero_info(f"{split}: {dataset.__class__.__name__}, {len(dataset)} examples")

    batch_size = config.data.params.batch_size if data is not None else 1
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"data.params.batch_size must be a positive whole number, got {batch_size!r}")
    base_lr = config.model.get("base_learning_rate", 1e-4)
    n_devices = trainer_config.get("_n_devices", 1) * trainer_config.get("num_nodes", 1)
    accumulate = trainer_config.get("accumulate_grad_batches", 1) or 1
    if opt.scale_lr:
        model.learning_rate = accumulate * n_devices * batch_size * base_lr
        rank_zero_info(
            f"Setting learning rate to {model.learning_rate:.2e} = {accumulate} (accumulate_grad_batches) * "
            f"{n_devices} (num_gpus) * {batch_size} (batchsize) * {base_lr:.2e} (base_lr)"
        )
    else:
        model.learning_rate = base_lr
        rank_zero_info(f"Setting learning rate to {model.learning_rate:.2e}")

    checkpoint_kwargs = {"dirpath": ckptdir, "filename": "{epoch:06}", "verbose": True, "save_last": True}
    if getattr(model, "monitor", None):
        checkpoint_kwargs.update(monitor=model.monitor, save_top_k=3)
    checkpoint_kwargs.update(lightning_config.get("modelcheckpoint", {}).get("params", {}))
    default_callbacks = {
        "image_logger": {
            "target": "main.ImageLogger",
            "params": {"batch_frequency": 750, "max_images": 4, "clamp": True},
        },
        "learning_rate_logger": {
            "target": "main.LearningRateMonitor",
            "params": {"logging_interval": "step"},
        },
    }
    callbacks_config = OmegaConf.merge(default_callbacks, lightning_config.get("callbacks", {}))
    callbacks = [
        SetupCallback(resume_ckpt, now, logdir, ckptdir, cfgdir, config, lightning_config),
        ModelCheckpoint(**checkpoint_kwargs),
        SaveOnSignal(ckptdir / "last.ckpt"),
        *(instantiate_checked(cfg, f"lightning.callbacks.{name}") for name, cfg in callbacks_config.items()),
    ]
    if trainer_config.get("enable_progress_bar", True):
        callbacks.append(ProgressBar())

    trainer_args = {k: v for k, v in trainer_config.items() if not k.startswith("_")}
    try:
        trainer = pl.Trainer(
            **trainer_args,
            default_root_dir=str(logdir),
            logger=CSVLogger(save_dir=str(logdir), name="csv"),  # csv/version_N: a resume adds a version
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
        )
    except (TypeError, ValueError, MisconfigurationException) as error:
        raise ConfigError(f"lightning.trainer: {' '.join(str(error).split())}") from None

    try:
        if opt.train:
            trainer.fit(model, data, ckpt_path=resume_ckpt)
        if not opt.no_test and not trainer.interrupted and data is not None and "test" in data.datasets:
            trainer.test(model, data)
    finally:
        if opt.debug and not opt.resume and trainer.global_rank == 0 and logdir.exists():
            debug_dir = logdir.parent / "debug_runs" / logdir.name
            debug_dir.parent.mkdir(parents=True, exist_ok=True)
            logdir.rename(debug_dir)


def run() -> None:
    try:
        main()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:
        sys.exit(128 + signal.SIGTERM)  # last.ckpt was saved; exit as a process stopped by SIGTERM


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, SaveOnSignal.request)
    run()
