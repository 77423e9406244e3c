"""Shared by the adapter tests: a random tiny SD-v1-shaped model and its twin in diffusers (same weights, through
a diffusers folder written by ldm.adapters.diffusers_layout and loaded by diffusers' own pipeline loader)."""

from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.adapters.diffusers_layout import write_diffusers_folder
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "tests" / "configs" / "tiny-ldm.yaml"
PROMPT = "a photo of a cat riding a bicycle"


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn from a seeded generator: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.05^2), norm
    scales ~ 1 + N(0, 0.1^2), so outputs are O(1) and comparisons bite."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model.eval()


def tiny_model(seed: int = 0):
    config = OmegaConf.load(TINY_CONFIG)
    return randomized(instantiate_from_config(config.model), seed), config


def diffusers_twin(model: torch.nn.Module, config, folder: Path):
    """StableDiffusionPipeline (offline, from `folder`) holding `model`'s weights."""
    from diffusers import StableDiffusionPipeline

    write_diffusers_folder(folder, model.state_dict(), config, overwrite=True)
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)


def inputs(seed: int = 1, context_dim: int = 32):
    """Latents [1, 4, 8, 8], a timestep and a random context [1, 77, context_dim]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    return x, torch.tensor([537]), torch.randn(1, 77, context_dim, generator=generator)


def token_ids(pipe, prompt: str = PROMPT) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def outputs_ours(model, x, t, context, prompt: str = PROMPT) -> dict[str, torch.Tensor]:
    return {"eps": model.apply_model(x, t, context), "text": model.get_learned_conditioning([prompt])}


@torch.no_grad()
def outputs_diffusers(pipe, x, t, context, prompt: str = PROMPT) -> dict[str, torch.Tensor]:
    return {
        "eps": pipe.unet(x, t, encoder_hidden_states=context).sample,
        "text": pipe.text_encoder(token_ids(pipe, prompt))[0],
    }
