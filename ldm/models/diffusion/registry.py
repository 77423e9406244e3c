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
}

# Display names (AUTOMATIC1111's "Sampler:" values and the samplers' own names) -> registry names.
ALIASES: dict[str, str] = {
    "DDIM": "ddim",
    "PLMS": "plms",
    "DPM-Solver": "dpm",
    "DPM-Solver++(2M)": "dpm",
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


def sampler_class(name: str) -> type:
    """The sampler class registered under `name` (or an alias of it)."""
    module, _, cls = SAMPLERS[canonical_name(name)].rpartition(".")
    return getattr(importlib.import_module(module), cls)


def make_sampler(name: str, model: Any) -> Any:
    """A sampler of kind `name` driving `model`."""
    return sampler_class(name)(model)
