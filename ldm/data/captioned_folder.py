"""A folder of captioned images for text-to-image training.

Captions come from `metadata.jsonl` in the folder (one `{"file_name": ..., "text": ...}` per line) when it
exists, otherwise from a text file next to each image (`cat.png` + `cat.txt`). Problems with the folder
are reported when the dataset is built, so training stops before it starts.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def _read_metadata(path: Path) -> list[tuple[Path, str]]:
    pairs = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                pairs.append((path.parent / record["file_name"], str(record["text"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f'{path}, line {line_no}: expected {{"file_name": ..., "text": ...}} ({e}).'
                ) from None
    for image, _ in pairs:
        if not image.is_file():
            raise FileNotFoundError(f"{path} names {image}, which does not exist.")
    return pairs


def _pair_captions(root: Path, caption_ext: str) -> list[tuple[Path, str]]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    pairs = []
    for image in images:
        caption = image.with_suffix(caption_ext)
        if not caption.is_file():
            raise FileNotFoundError(f"Image {image} has no caption file {caption.name} next to it.")
        pairs.append((image, caption.read_text(encoding="utf-8").strip()))
    return pairs


class CaptionedImageFolder(Dataset):
    """Examples {"jpg": float32 [size, size, 3] in [-1, 1], "txt": caption}.

    Each image is resized so that its shorter side is `size`, cropped to a `size` square (centre, or a
    random position with `random_crop`), and flipped left-right with probability `flip_p`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int = 512,
        random_crop: bool = False,
        flip_p: float = 0.0,
        caption_ext: str = ".txt",
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Image folder {self.root} does not exist.")
        if not caption_ext.startswith("."):
            caption_ext = "." + caption_ext
        metadata = self.root / "metadata.jsonl"
        self.pairs = (
            _read_metadata(metadata) if metadata.is_file() else _pair_captions(self.root, caption_ext)
        )
        if not self.pairs:
            raise ValueError(
                f"Image folder {self.root} has no images ({', '.join(IMAGE_EXTENSIONS)}) with captions."
            )
        self.size = size
        self.random_crop = random_crop
        self.flip_p = flip_p

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        path, text = self.pairs[index]
        with Image.open(path) as im:
            image = im.convert("RGB")
        scale = self.size / min(image.size)
        width, height = (max(self.size, round(side * scale)) for side in image.size)
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        if self.random_crop:
            left = int(torch.randint(width - self.size + 1, ()))
            top = int(torch.randint(height - self.size + 1, ()))
        else:
            left, top = (width - self.size) // 2, (height - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        if self.flip_p > 0 and float(torch.rand(())) < self.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {"jpg": np.asarray(image, dtype=np.float32) / 127.5 - 1.0, "txt": text}
