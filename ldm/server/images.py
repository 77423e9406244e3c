"""Images over the wire: base64 in (decoded under a size limit, before any work), base64 PNG out with the
generation metadata embedded as the CLI embeds it."""

import base64
import binascii
import io
import json

from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.infotext import RECORD_CHUNK, parse_infotext, record_infotext
from ldm.outputs import png_info


class ImageError(ValueError):
    """A request's image that cannot be used; the message names the field and the reason."""


def decode_image(data: str, field: str, max_side: int) -> Image.Image:
    """The image in base64 `data` (a bare string or a `data:image/...;base64,` URL), upright per its EXIF.

    Its size is read from the header and refused past `max_side` pixels per side before any pixel is decoded
    (no decompression bombs)."""
    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{field} is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        if max(image.size) > max_side:
            raise ImageError(
                f"{field} is {image.width}x{image.height}, more than --max-size {max_side} pixels per side: "
                "downscale it"
            )
        image.load()
        return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError:
        raise ImageError(f"{field} is too large to decode safely: downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageError(f"{field} is not a readable image ({error}): send a PNG, JPEG or WebP") from None


def encode_png(image: Image.Image, metadata: dict | None = None) -> str:
    """Base64 PNG with `metadata` in its "parameters" text chunk (as `ldm.outputs.save_png` writes it)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(metadata) if metadata else None)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def infotext(metadata: dict) -> str:
    """An image's parameters as text (A1111's `infotexts` entries): A1111's infotext of its record."""
    return record_infotext(metadata)


def read_png_info(image: Image.Image) -> tuple[str, dict, dict]:
    """(info text, the other text chunks, the parsed parameters) of a PNG, for /png-info."""
    items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    info = items.pop("parameters", "")
    record = items.pop(RECORD_CHUNK, None)
    try:
        parameters = json.loads(record) if record else parse_infotext(info) if info.strip() else {}
    except ValueError:
        parameters = {}
    return info, items, parameters if isinstance(parameters, dict) else {}
