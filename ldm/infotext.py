"""AUTOMATIC1111's "infotext": the generation parameters it writes into a PNG's `parameters` text chunk and
that A1111's PNG Info, Civitai and ComfyUI read back.

    a red fox in the snow, (detailed fur:1.2)
    Negative prompt: blurry, lowres
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x512, ...

The prompt (any number of lines), an optional `Negative prompt:` line (continued by the lines after it),
then one line of `key: value` pairs separated by ", ". A value holding ",", ":" or a newline is written as
a JSON string. Reading follows A1111's `parse_generation_parameters`: the last line is the parameters line
when A1111's key-value pattern finds at least 3 pairs in it.
"""

import json
import re
from collections.abc import Mapping
from typing import Any

NEGATIVE_PREFIX = "Negative prompt:"
# A1111's `re_param`: a key (a word character, then word characters, spaces, '-' or '/'), ':', and either a
# JSON-quoted value or everything up to the next ','.
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value: Any) -> str:
    """`value` as text, JSON-quoted when it holds ",", ":", a newline or a double quote.

    A1111 quotes on the first three only; a bare value that starts and ends with a double quote would be
    read back without them, so values holding one are quoted too (A1111 reads either form)."""
    text = str(value)
    if any(c in text for c in ',:\n"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    """A value as written: a JSON string decoded, anything else unchanged."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def format_infotext(prompt: str, negative_prompt: str, fields: Mapping[str, Any]) -> str:
    """A1111's infotext: prompt, `Negative prompt: ...` (left out when empty), the `key: value` line.

    `fields` in the order they are to appear, e.g. {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type":
    "Karras", "CFG scale": 7, "Seed": 42, "Size": "512x512", "Model hash": "...", "Model": "...",
    "Clip skip": 2}; None values are left out, a value equal to its key is written as the key alone.
    """
    params = ", ".join(
        key if key == value else f"{key}: {quote(value)}"
        for key, value in fields.items()
        if value is not None
    )
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{params}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """{"Prompt": ..., "Negative prompt": ..., key: value, ...} from an infotext, ours or A1111's.

    Values are strings as written (JSON-quoted ones decoded), keys in the order they appear; lines are
    joined as A1111 joins them (a blank line before any text is dropped). Unlike A1111's
    UI, nothing is split ("Size" stays "512x512") and no defaults are filled in (A1111 reads a missing
    "Clip skip" as 1).
    """
    *lines, last = text.strip().split("\n")
    if len(PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    # A1111 skips a pair whose value is empty
    fields = {key: unquote(value) for key, value in PARAM.findall(last) if value}
    return {"Prompt": prompt, "Negative prompt": negative, **fields}


# This project's PNGs: A1111's infotext in `parameters` (what A1111, Civitai and ComfyUI read), and the whole
# record (everything needed to re-make the image, `remake` included) as JSON in `RECORD_CHUNK`.
RECORD_CHUNK = "ldm-parameters"
_DDIM_FAMILY = ("ddim", "plms", "dpm")


def display_name(sampler: str) -> str:
    """A1111's display name of a registry sampler name ("dpmpp_2m" -> "DPM++ 2M"); the name itself if none."""
    from ldm.models.diffusion.registry import ALIASES

    return next((alias for alias, name in ALIASES.items() if name == sampler), sampler)


def record_infotext(record: Mapping[str, Any]) -> str:
    """A1111's infotext of one of this project's image records (ldm.cli's metadata keys)."""
    from ldm.models.diffusion.registry import SCHEDULER_LABELS

    sampler = record.get("sampler")
    scheduler = record.get("scheduler")
    k_family = sampler is not None and sampler not in _DDIM_FAMILY
    width, height = record.get("width"), record.get("height")
    subseed = record.get("subseed")
    hires = record.get("hr_width") is not None
    fields = {
        "Steps": record.get("steps"),
        "Sampler": display_name(sampler) if sampler else None,
        "Schedule type": SCHEDULER_LABELS.get(scheduler) if k_family and scheduler else None,
        "CFG scale": record.get("scale"),
        "Seed": record.get("seed"),
        "Size": f"{width}x{height}" if width and height else None,
        "Model hash": record.get("model_hash"),
        "Model": str(record["model"]).rsplit(".", 1)[0] if record.get("model") else None,
        "VAE": record.get("vae"),
        "Denoising strength": record.get("hr_strength") if hires else record.get("strength"),
        **(hires_fields(record) if hires else {}),
        "Clip skip": record.get("clip_skip") if record.get("clip_skip", 1) != 1 else None,
        "Eta DDIM": record.get("eta") if sampler == "ddim" and record.get("eta") else None,
        "Eta": record.get("ancestral_eta") if k_family else None,
        "Variation seed": subseed,
        "Variation seed strength": record.get("subseed_strength") if subseed is not None else None,
        "Lora hashes": record.get("lora_hashes"),
        "Version": "ldm-sd-v1",
    }
    prompt = record.get("prompt", "\n".join(record.get("prompts", [])))
    return format_infotext(prompt, record.get("negative_prompt", ""), fields)


def hires_fields(record: Mapping[str, Any]) -> dict:
    """A1111's infotext fields of a hires fix record (ldm.hires.hires_record's keys and the --hr-* flags')."""
    from ldm.hires import UPSCALERS

    scale = record.get("hr_scale")
    sampler = record.get("hr_sampler")
    return {
        "Hires upscale": scale,
        "Hires resize-1": record.get("hr_width") if scale is None else None,
        "Hires resize-2": record.get("hr_height") if scale is None else None,
        "Hires steps": record.get("hr_steps"),
        "Hires upscaler": UPSCALERS[record["hr_upscaler"]][0] if record.get("hr_upscaler") else None,
        "Hires sampler": display_name(sampler) if sampler else None,
        "Hires prompt": record.get("hr_prompt"),
        "Hires negative prompt": record.get("hr_negative_prompt"),
    }


def read_png_parameters(path: Any) -> dict:
    """The generation parameters of a PNG: this project's whole record when it has one (also the JSON
    `parameters` of its older images), else A1111's infotext parsed (`parse_infotext`); {} when it has none."""
    from PIL import Image

    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}))
    if RECORD_CHUNK in text:
        return json.loads(text[RECORD_CHUNK])
    parameters = text.get("parameters", "")
    if parameters.lstrip().startswith("{"):
        try:
            return json.loads(parameters)
        except ValueError:
            pass
    return parse_infotext(parameters) if parameters.strip() else {}
