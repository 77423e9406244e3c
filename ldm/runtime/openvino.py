"""The OpenVINO backend (`--backend openvino`, the `openvino` extra): a LatentDiffusion's UNet and VAE decoder run
as OpenVINO models on the CPU, converted from this project's own torch modules.

Each module keeps its place (its weights, state_dict keys, LoRA merging, hooks); only its forward is replaced by
an `OpenVINORunner`, which takes and returns torch tensors. A module is converted on its first call
(`openvino.convert_model`, traced on that call's float32 inputs, every dimension left dynamic), so one converted
model serves every batch size, image size and prompt length. Converted models are kept on disk under
`cache_root()/<key>/model.xml` (IR with float32 weights, written atomically), the key a hash of what decides
the graph and the weights: the model's source code, torch and OpenVINO versions, the call's inputs, and what the
caller says the weights are (checkpoint, config, LoRAs or VAE file). The model runs compiled for the shapes of
the calls (static shapes: 0.92x the step time at 256², 0.96x at 512², and about 3 s to compile a full-size
UNet), compiled again when they change (hires fix's second pass); compiled blobs are not cached, which would
cost 3.3 GB of disk a shape to save under a second. When the weights change between calls (another LoRA for the
next batch), the next call loads or converts the model of the new key.
"""

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.files import remove_stale_temporaries, temporary_path

FORMAT = 1  # of what is cached: part of every key
CACHE_LIMIT_BYTES = 20 * 2**30  # the cache keeps at most this much: a full-size converted UNet is ~3.3 GB
Weights = Callable[[str], dict]  # "unet" | "decoder" -> what that module's weights are now (JSON-able)


def cache_root() -> Path:
    """$XDG_CACHE_HOME/stable-diffusion/openvino (default ~/.cache/...)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "stable-diffusion" / "openvino"


def compile_config(precision: str) -> dict:
    """The CPU plugin's settings: torch's thread count; f32 for `--precision full`, else OpenVINO's default
    (bf16 on CPUs with bf16 units, f32 elsewhere)."""
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if precision == "full":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return config


_sources_digest: str | None = None


def sources_digest() -> str:
    """sha256 of the model floor's source files (ldm/models, ldm/modules): the code that makes the graphs."""
    global _sources_digest
    if _sources_digest is None:
        package = Path(__file__).resolve().parents[1]
        digest = hashlib.sha256()
        for path in sorted([*(package / "models").rglob("*.py"), *(package / "modules").rglob("*.py")]):
            digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
        _sources_digest = digest.hexdigest()
    return _sources_digest


def cache_key(role: str, parts: dict) -> str:
    """`role-HASH`: the folder name of a converted model, HASH over `parts` (JSON)."""
    return f"{role}-{hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]}"


class _NamedInputs(nn.Module):
    """`module`'s own forward (its class's, not the runner installed over it) with its named inputs passed
    positionally, the form convert_model traces."""

    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__()
        self.module, self.names = module, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return type(self.module).forward(self.module, **dict(zip(self.names, inputs, strict=True)))


def convert(module: nn.Module, inputs: dict[str, torch.Tensor], folder: Path) -> None:
    """Convert `module` called with `inputs` (traced on them, all dimensions dynamic) and save the model into
    `folder` as IR with float32 weights. Written in a temporary folder renamed at the end: `folder` holds a whole
    model or nothing; what a failed or killed conversion wrote is removed."""
    import openvino as ov
    from torch.utils._python_dispatch import _disable_current_modes

    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder.parent)
    tmp = temporary_path(folder)
    try:
        # traced in float32 without autocast or dispatch modes (ldm.runtime.bf16's), which would enter the graph;
        # the tracer's warnings are about shape checks (channel counts), constant for every input
        with (
            torch.no_grad(),
            torch.autocast("cpu", enabled=False),
            _disable_current_modes(),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
            converted = ov.convert_model(
                _NamedInputs(module, list(inputs)), example_input=tuple(inputs.values())
            )
        ov.save_model(converted, tmp / "model.xml", compress_to_fp16=False)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "model.xml").is_file():  # else another process saved the same model first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class OpenVINORunner:
    """`module`'s forward through OpenVINO: `inputs(*args, **kwargs)` names the call's tensors (float32), the
    converted model of the current key, compiled for their shapes, runs them and its output comes back as a torch
    tensor. The key is recomputed at every call (`weights(role)` may change between calls); a new key loads that
    model from the disk cache, converting it first when it is not there; new shapes compile it again."""

    def __init__(
        self,
        module: nn.Module,
        role: str,
        inputs: Callable[..., dict[str, torch.Tensor]],
        weights: Weights,
        graph: dict,
        precision: str,
    ):
        self.module, self.role, self.inputs, self.weights = module, role, inputs, weights
        self.graph, self.precision = graph, precision
        self.compiled_for: tuple | None = None  # (key, input shapes) of `request`
        self.request: Any = None  # the infer request of the model of that key compiled for those shapes

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        inputs = self.inputs(*args, **kwargs)
        signature = [[name, str(tensor.dtype)] for name, tensor in inputs.items()]
        key = cache_key(self.role, {**self.graph, "weights": self.weights(self.role), "inputs": signature})
        compiled_for = (key, [tuple(tensor.shape) for tensor in inputs.values()])
        if compiled_for != self.compiled_for:
            self.compiled_for = self.request = None  # the previous compiled model is released first
            self.request = self.load(key, inputs)
            self.compiled_for = compiled_for
        self.request.infer([tensor.numpy() for tensor in inputs.values()], share_inputs=True)
        return torch.from_numpy(
            self.request.get_output_tensor(0).data.copy()
        )  # the next call reuses its memory

    def load(self, key: str, inputs: dict[str, torch.Tensor]) -> Any:
        """The infer request of the model of `key` compiled for the CPU and the shapes of `inputs`."""
        import openvino as ov

        root = cache_root()
        folder = root / key
        if not (folder / "model.xml").is_file():
            start = time.perf_counter()
            convert(self.module, inputs, folder)
            print(f"OpenVINO: converted the {self.role} in {time.perf_counter() - start:.1f} s into {folder}")
        core = ov.Core()
        converted = core.read_model(folder / "model.xml")
        converted.reshape(
            {
                port: ov.PartialShape(list(tensor.shape))
                for port, tensor in zip(converted.inputs, inputs.values(), strict=True)
            }
        )
        request = core.compile_model(converted, "CPU", compile_config(self.precision)).create_infer_request()
        os.utime(folder)  # used now: the last to go (`prune_cache`)
        prune_cache(root, CACHE_LIMIT_BYTES, keep=folder)
        return request


def prune_cache(root: Path, limit: int, keep: Path) -> list[Path]:
    """Remove the least recently used converted models (folders under `root`) and the compiled blobs earlier
    versions cached (`root/compiled/*`) until the cache holds at most `limit` bytes, never `keep`. A removed model
    is converted again when next needed. Returns what was removed."""
    entries = []
    for path in [*root.glob("*/model.xml"), *(root / "compiled").glob("*")]:
        entry = path.parent if path.name == "model.xml" else path
        if entry.name.startswith("."):  # another process's conversion in progress
            continue
        files = [entry] if entry.is_file() else [f for f in entry.rglob("*") if f.is_file()]
        entries.append((entry.stat().st_mtime, sum(f.stat().st_size for f in files), entry))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, entry in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if entry == keep:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        total -= size
        removed.append(entry)
    return removed


def unet_inputs(
    x: torch.Tensor,
    timesteps: torch.Tensor,
    context: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """A UNet call's tensors: x [B, C, H, W], timesteps [B] (as float32: the timestep embedding computes in
    float), context [B, M, D] (float32, also from a bf16 text encoder) and class labels y [B] where given."""
    named = {"x": x, "timesteps": timesteps, "context": context}
    named = {name: tensor.float() for name, tensor in named.items() if tensor is not None}
    if y is not None:
        named["y"] = y
    return {name: tensor.detach().contiguous() for name, tensor in named.items()}


def decoder_inputs(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """A VAE decoder call's tensor: latents z [B, z_channels, h, w]."""
    return {"z": z.detach().float().contiguous()}


def use_openvino(model: nn.Module, precision: str, weights: Weights | None, decoder: bool = True) -> None:
    """Run `model`'s UNet (`model.model.diffusion_model`) and, with `decoder`, its VAE decoder through OpenVINO
    (see `OpenVINORunner`), their weights staying float32 in torch for conversion. `weights(role)` says what the
    weights of "unet" and "decoder" are (part of the cache key)."""
    import openvino as ov

    if weights is None:
        raise ValueError("the OpenVINO backend keys its cache by the weights: pass `weights` to prepare()")
    graph = {
        "format": FORMAT,
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "sources": sources_digest(),
        "torch": torch.__version__,
        "openvino": ov.__version__,
        "ema": bool(getattr(model, "use_ema", False)),  # generation runs inside ema_scope: EMA weights
    }
    unet = model.model.diffusion_model
    unet.forward = OpenVINORunner(unet, "unet", unet_inputs, weights, graph, precision)
    vae_decoder = getattr(model.first_stage_model, "decoder", None)
    if decoder and vae_decoder is not None:
        vae_decoder.forward = OpenVINORunner(
            vae_decoder, "decoder", decoder_inputs, weights, graph, precision
        )
