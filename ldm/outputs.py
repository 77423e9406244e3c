"""Writing generated images: the original's folder layout, never overwriting, never half-written."""

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torchvision.utils import make_grid

from ldm.files import file_mode, remove_stale_temporaries, temporary_path
from ldm.infotext import RECORD_CHUNK, read_png_parameters, record_infotext

WATERMARK = "StableDiffusionV1"
_WATERMARK_MIN_PIXELS = 256 * 256  # dwtDct refuses smaller images


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Decoded images [B, 3, H, W] in about [-1, 1] -> RGB PIL images."""
    images = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in images]


def make_image_grid(images: Sequence[Image.Image], n_rows: int) -> Image.Image:
    """Tile images into a grid with `n_rows` images per row (torchvision's layout, 2 px padding)."""
    batch = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images])
    grid = make_grid(batch, nrow=max(1, n_rows))
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


class Watermarker:
    """Embeds the invisible "StableDiffusionV1" watermark (dwtDct) as the original scripts do."""

    def __init__(self, text: str = WATERMARK):
        from imwatermark import WatermarkEncoder

        self.encoder = WatermarkEncoder()
        self.encoder.set_watermark("bytes", text.encode("utf-8"))
        self.warned_small = False

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.width * image.height < _WATERMARK_MIN_PIXELS:
            if not self.warned_small:
                print(
                    f"note: images smaller than 256x256 pixels ({image.width}x{image.height}) are saved without the watermark"
                )
                self.warned_small = True
            return image
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        marked = self.encoder.encode(bgr, "dwtDct")
        return Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1]))


def png_info(parameters: dict) -> PngImagePlugin.PngInfo:
    """PNG text chunks: `parameters`, A1111's infotext of the record (A1111's PNG Info, Civitai and ComfyUI read
    it), and `ldm-parameters`, the whole record as JSON (everything needed to re-make the image)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", record_infotext(parameters))
    info.add_text(RECORD_CHUNK, json.dumps(parameters, sort_keys=True))
    return info


def read_parameters(path: str | os.PathLike) -> dict:
    """The generation parameters of a PNG: this project's record, or A1111's infotext parsed
    (`ldm.infotext.read_png_parameters`)."""
    return read_png_parameters(path)


def save_png(image: Image.Image, path: Path, parameters: dict | None = None) -> None:
    """Write atomically: a temporary file in the same folder (`ldm.files.temporary_path`), renamed only when
    complete, with the permissions the user's umask gives. Refuses to replace an existing file."""
    path = Path(path)
    tmp = temporary_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_info(parameters) if parameters else None)
        os.link(tmp, path)  # fails instead of overwriting if the name was taken meanwhile
    finally:
        os.unlink(tmp)


class NumberedFolder:
    """Hands out the next free `NNNNN.png`-style names in a folder, after the highest existing number. The folder
    is created at the first save (a run that writes nothing leaves nothing), and temporary files that killed
    runs left in it are removed then."""

    def __init__(self, folder: Path, prefix: str = "", digits: int = 5):
        self.folder = Path(folder)
        self.prefix = prefix
        self.digits = digits
        self.next_number: int | None = None

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.folder)
        pattern = re.compile(rf"^{re.escape(self.prefix)}(\d+)\.png$")
        numbers = [int(m.group(1)) for name in os.listdir(self.folder) if (m := pattern.match(name))]
        self.next_number = max(numbers, default=-1) + 1

    def save(self, image: Image.Image, parameters: dict | None = None) -> Path:
        if self.next_number is None:
            self._open()
        while True:
            path = self.folder / f"{self.prefix}{self.next_number:0{self.digits}d}.png"
            self.next_number += 1
            try:
                save_png(image, path, parameters)
                return path
            except FileExistsError:
                continue  # another process took this number: try the next
