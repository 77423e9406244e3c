from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "tests" / "configs" / "tiny-ldm.yaml"


def randomize_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise (zero-initialized layers too) so comparisons bite;
    normalization scales stay near 1."""
    generator = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for submodule in module.modules():
            for name, param in submodule.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator) * std
                param.copy_(noise + 1.0 if isinstance(submodule, norms) and name == "weight" else noise)
    return module


@pytest.fixture(scope="session", autouse=True)
def hash_cache(tmp_path_factory):
    """Checkpoint hashes that the scripts remember go to a throwaway file, not the user's cache (subprocesses
    inherit the variable)."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("hash-cache") / "model-hashes.json"
        patch.setenv("LDM_HASH_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_config():
    return OmegaConf.load(TINY_CONFIG)


@pytest.fixture
def tiny_ldm(tiny_config):
    torch.manual_seed(0)
    return randomize_(instantiate_from_config(tiny_config.model)).eval()
