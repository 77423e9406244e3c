"""Every sampler by name, in one place: `{name: "module.Class"}`, imported on first use.

Reading names and aliases imports nothing (the scripts list them in `--help` without loading torch); a
sampler's capabilities are attributes of its class (see `ldm.models.diffusion.sampling.Sampler`). Adding a
sampler is one module with its class and one line in `SAMPLERS`.
"""

import importlib
from typing import Any

SAMPLERS: dict[str, str] = {
    "ddim": "ldm.models.diffusion.ddim.DDIMSampler",
    "plms": "ldm.models.diffusion.plms.PLMSSampler",
    "dpm": "ldm.models.diffusion.dpm_solver.sampler.DPMSolverSampler",
    "euler": "ldm.models.diffusion.k_diffusion.sampler.EulerSampler",
    "euler_a": "ldm.models.diffusion.k_diffusion.sampler.EulerAncestralSampler",
    "heun": "ldm.models.diffusion.k_diffusion.sampler.HeunSampler",
    "dpm2": "ldm.models.diffusion.k_diffusion.sampler.DPM2Sampler",
    "dpm2_a": "ldm.models.diffusion.k_diffusion.sampler.DPM2AncestralSampler",
    "lms": "ldm.models.diffusion.k_diffusion.sampler.LMSSampler",
    "dpm_fast": "ldm.models.diffusion.k_diffusion.sampler.DPMFastSampler",
    "dpm_adaptive": "ldm.models.diffusion.k_diffusion.sampler.DPMAdaptiveSampler",
    "dpmpp_2s_a": "ldm.models.diffusion.k_diffusion.sampler.DPMPP2SAncestralSampler",
    "dpmpp_2m": "ldm.models.diffusion.k_diffusion.sampler.DPMPP2MSampler",
    "dpmpp_sde": "ldm.models.diffusion.k_diffusion.sampler.DPMPPSDESampler",
    "dpmpp_2m_sde": "ldm.models.diffusion.k_diffusion.sampler.DPMPP2MSDESampler",
    "dpmpp_2m_sde_heun": "ldm.models.diffusion.k_diffusion.sampler.DPMPP2MSDEHeunSampler",
    "dpmpp_3m_sde": "ldm.models.diffusion.k_diffusion.sampler.DPMPP3MSDESampler",
    "unipc": "ldm.models.diffusion.k_diffusion.sampler.UniPCSampler",
}

# Noise schedules of the k-diffusion samplers (ComfyUI's names; ldm.models.diffusion.k_diffusion.schedules).
SCHEDULERS: tuple[str, ...] = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform")

# Display names (AUTOMATIC1111's "Sampler:" values and the samplers' own names) -> registry names.
ALIASES: dict[str, str] = {
    "DDIM": "ddim",
    "PLMS": "plms",
    "DPM-Solver": "dpm",
    "DPM-Solver++(2M)": "dpm",
    "Euler": "euler",
    "Euler a": "euler_a",
    "Heun": "heun",
    "DPM2": "dpm2",
    "DPM2 a": "dpm2_a",
    "LMS": "lms",
    "DPM fast": "dpm_fast",
    "DPM adaptive": "dpm_adaptive",
    "DPM++ 2S a": "dpmpp_2s_a",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ SDE": "dpmpp_sde",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Heun": "dpmpp_2m_sde_heun",
    "DPM++ 3M SDE": "dpmpp_3m_sde",
    "UniPC": "unipc",
}

# AUTOMATIC1111's "Schedule type" labels -> SCHEDULERS names; "Automatic" is each sampler's own default (None).
SCHEDULER_ALIASES: dict[str, str | None] = {
    "Automatic": None,
    "Uniform": "normal",
    "Normal": "normal",
    "Karras": "karras",
    "Exponential": "exponential",
    "SGM Uniform": "sgm_uniform",
    "Simple": "simple",
    "DDIM": "ddim_uniform",
}
# SCHEDULERS name -> AUTOMATIC1111's label, for the "Schedule type" of generation parameters.
SCHEDULER_LABELS: dict[str, str] = {
    "normal": "Normal",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
}


def canonical_name(name: str) -> str:
    """The registry name of `name`, a registry name or an alias (case and surrounding spaces ignored);
    ValueError naming the choices when it is neither."""
    key = name.strip().lower()
    if key in SAMPLERS:
        return key
    for alias, target in ALIASES.items():
        if alias.lower() == key:
            return target
    raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")


def canonical_scheduler(name: str | None) -> str | None:
    """The SCHEDULERS name of `name` (a name or an AUTOMATIC1111 label, case ignored), None for None or
    "automatic" (the sampler's own default); ValueError naming the choices otherwise."""
    if name is None:
        return None
    key = name.strip().lower()
    if key in SCHEDULERS:
        return key
    for alias, target in SCHEDULER_ALIASES.items():
        if alias.lower() == key:
            return target
    raise ValueError(f"unknown scheduler {name!r}: choose one of automatic, {', '.join(SCHEDULERS)}")


def split_sampler_name(name: str) -> tuple[str, str | None]:
    """(sampler, scheduler or None) of a sampler name that may end in a schedule label, as AUTOMATIC1111's
    older combined names do: "DPM++ 2M Karras" -> ("dpmpp_2m", "karras"), "Euler a" -> ("euler_a", None)."""
    try:
        return canonical_name(name), None
    except ValueError:
        pass
    for label in sorted(SCHEDULER_ALIASES, key=len, reverse=True):
        stem = name.strip()
        if label != "Automatic" and stem.lower().endswith(" " + label.lower()):
            try:
                return canonical_name(stem[: -len(label)]), SCHEDULER_ALIASES[label]
            except ValueError:
                continue
    raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")


def sampler_class(name: str) -> type:
    """The sampler class registered under `name` (or an alias of it)."""
    module, _, cls = SAMPLERS[canonical_name(name)].rpartition(".")
    return getattr(importlib.import_module(module), cls)


def make_sampler(name: str, model: Any) -> Any:
    """A sampler of kind `name` driving `model`."""
    return sampler_class(name)(model)
