"""The Stable Diffusion safety checker (CompVis/stable-diffusion-safety-checker), loaded only from disk.

A CLIP ViT-L/14 image embedding is compared (cosine) with 17 concept and 3 "special care" embeddings, each
with its own threshold; a flagged image is replaced by a black one, as the original replaces it.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ldm.errors import UserError

SAFETY_CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"


class _VisionModelHolder(nn.Module):
    """Keeps the checkpoint's `vision_model.vision_model.*` key layout whatever the transformers version:
    from transformers 5.6 on, CLIPVisionModel has no inner `vision_model` level."""

    def __init__(self, vision_config):
        super().__init__()
        from transformers import CLIPVisionModel

        model = CLIPVisionModel(vision_config)
        self.vision_model = getattr(model, "vision_model", model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled image features [B, hidden]."""
        return self.vision_model(pixel_values=pixel_values).pooler_output


class SafetyChecker(nn.Module):
    """Flags images whose CLIP embedding is close to any of the checker's concept embeddings."""

    def __init__(self, config):
        super().__init__()
        self.vision_model = _VisionModelHolder(config.vision_config)
        self.visual_projection = nn.Linear(
            config.vision_config.hidden_size, config.projection_dim, bias=False
        )
        self.concept_embeds = nn.Parameter(torch.ones(17, config.projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(3, config.projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(17), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(3), requires_grad=False)

    @torch.no_grad()
    def flags(self, pixel_values: torch.Tensor) -> list[bool]:
        """One flag per image of pixel_values [B, 3, 224, 224] (CLIP-normalized)."""
        embeds = F.normalize(self.visual_projection(self.vision_model(pixel_values)).float(), dim=-1)
        special = (
            embeds @ F.normalize(self.special_care_embeds.float(), dim=-1).T
            - self.special_care_embeds_weights
        )
        concept = embeds @ F.normalize(self.concept_embeds.float(), dim=-1).T - self.concept_embeds_weights
        # an image near a "special care" concept is checked against the others with a 0.01 lower threshold
        adjustment = (special.round(decimals=3) > 0).any(dim=1, keepdim=True).float() * 0.01
        return ((concept + adjustment).round(decimals=3) > 0).any(dim=1).tolist()


class SafetyFilter:
    """Callable on a list of PIL images: returns them with flagged ones replaced by black images."""

    def __init__(self, checker: SafetyChecker, processor, device: torch.device):
        self.checker = checker.to(device).eval()
        self.processor = processor
        self.device = device

    def __call__(self, images: list[Image.Image]) -> list[Image.Image]:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        flagged = self.checker.flags(pixels)
        if any(flagged):
            print(
                f"Potential NSFW content was detected in {sum(flagged)} image(s): replaced by black images."
            )
        return [
            Image.fromarray(np.zeros_like(np.asarray(image))) if flag else image
            for image, flag in zip(images, flagged, strict=True)
        ]


def find_safety_checker(path: str | None) -> Path | None:
    """The local folder of the checker: `path` if given (it must hold config.json), else the HF cache's
    snapshot, None if absent."""
    if path is not None:
        if not Path(path, "config.json").is_file():
            raise UserError(
                f"--safety-checker {path}: no config.json there: pass the folder of a local "
                f"{SAFETY_CHECKER_REPO} copy, or --no-safety-checker"
            )
        return Path(path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(SAFETY_CHECKER_REPO, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def load_safety_checker(path: str | None, device: torch.device) -> SafetyFilter | None:
    """The safety filter from a local copy, or None with one warning when there is none."""
    from transformers import CLIPConfig, CLIPImageProcessor

    from ldm.checkpoint import CheckpointError, load_weights, read_state_dict

    folder = find_safety_checker(path)
    if folder is None:
        where = path or f"the Hugging Face cache ({SAFETY_CHECKER_REPO})"
        print(
            f"warning: safety checker not found in {where}: images are not checked (--no-safety-checker hides this)"
        )
        return None
    weights = next(
        (folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()),
        None,
    )
    if weights is None:
        raise UserError(
            f"safety checker {folder} has no model.safetensors or pytorch_model.bin: restore its weights, "
            "or pass --no-safety-checker"
        )
    try:
        config = CLIPConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"safety checker {folder}/config.json is not a CLIP config ({reason})") from None
    try:
        checker = SafetyChecker(config)
        state_dict, _ = read_state_dict(weights)
        load_weights(checker, state_dict, strict=True, verbose=False)
    except (CheckpointError, AttributeError, TypeError, ValueError) as error:
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"safety checker {folder} cannot be loaded: {reason}") from None
    return SafetyFilter(checker, CLIPImageProcessor(), device)
