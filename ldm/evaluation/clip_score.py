"""CLIP score (Hessel et al. 2021, as text-to-image papers report it): 100 * max(cos(image, caption), 0) per
image, averaged, with CLIP ViT-L/14's image and text towers (transformers, from the HF cache or a folder)."""

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.errors import UserError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per-pair scores [N] of image embeddings [N, D] and text embeddings [N, D]: 100 * max(cos, 0)."""
    cos = F.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1, eps=1e-12)
    return 100.0 * cos.clamp(min=0.0)


def _projected(output: torch.Tensor | object) -> torch.Tensor:
    """get_*_features' result: a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder:
    """Image and caption embeddings [N, D] of a CLIP model: a Hugging Face id found in the local cache, or a
    folder holding a saved CLIPModel with its tokenizer and image processor."""

    def __init__(self, source: str | Path = DEFAULT_CLIP, device: str | torch.device = "cpu"):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        try:
            self.model = CLIPModel.from_pretrained(str(source), local_files_only=True).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(str(source), local_files_only=True)
            self.processor = CLIPImageProcessor.from_pretrained(str(source), local_files_only=True)
        except OSError:
            raise UserError(
                f"CLIP model {source} not found locally: download it with `huggingface-cli download "
                f"{DEFAULT_CLIP}` (or pass --clip with a saved CLIPModel folder), or pass --no_clip"
            ) from None
        self.device = torch.device(device)
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.name = Path(str(source)).name

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, H, W] -> [B, D], preprocessed by the model's own image processor."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return _projected(self.model.get_image_features(pixel_values=pixels.to(self.device))).float()

    @torch.no_grad()
    def text_embeds(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> [B, D]; longer ones are cut at the text tower's context length (77 tokens)."""
        tokens = self.tokenizer(
            list(captions), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return _projected(self.model.get_text_features(**tokens)).float()

    def scores(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """clip_score of each (image, caption) pair: [B]."""
        return clip_score(self.image_embeds(images), self.text_embeds(captions))
