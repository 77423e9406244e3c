"""A1111 infotext: written as A1111 writes it, read as A1111 reads it, round trips, real A1111 examples."""

import json
import re

from PIL import Image, PngImagePlugin

from ldm.infotext import format_infotext, parse_infotext

# Transcribed from AUTOMATIC1111's modules/infotext_utils.py (`re_param`, `quote`, `unquote`) and
# modules/processing.py (`create_infotext`'s last lines): the published grammar the tests hold us to.
A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def a1111_create_infotext(prompt, negative_prompt, params):
    text = ", ".join([k if k == v else f"{k}: {a1111_quote(v)}" for k, v in params.items() if v is not None])
    negative_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative_text}\n{text}".strip()


def a1111_params(infotext: str) -> dict[str, str]:
    """The `key: value` pairs of an infotext's last line as A1111's parser reads them."""
    last = infotext.strip().split("\n")[-1]
    return {k: a1111_unquote(v) for k, v in A1111_RE_PARAM.findall(last)}


FIELDS = {
    "Steps": 20,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 7,
    "Seed": 42,
    "Size": "512x512",
    "Model hash": "cc6cb27103",
    "Model": "v1-5-pruned-emaonly",
    "Clip skip": 2,
    "Lora hashes": "film grain: 1a2b3c4d5e6f, add_detail: 7c6bad76eb54",
    "Hires prompt": "line one\nline two: (detailed:1.2)",
    "Unused": None,
    "Version": "ldm 1.0",
}


def test_written_as_a1111_writes_it():
    prompt = "a red fox in the snow, (detailed fur:1.2)\n[winter:spring:0.5] forest <lora:film grain:0.8>"
    negative = "blurry, lowres, (worst quality:1.4)"
    text = format_infotext(prompt, negative, FIELDS)
    assert text == a1111_create_infotext(prompt, negative, FIELDS)
    assert text.split("\n")[:3] == [
        prompt.split("\n")[0],
        prompt.split("\n")[1],
        f"Negative prompt: {negative}",
    ]
    assert text.split("\n")[3].startswith(
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7,"
    )
    assert 'Lora hashes: "film grain: 1a2b3c4d5e6f, add_detail: 7c6bad76eb54"' in text
    assert "Unused" not in text
    assert format_infotext("a cat", "", {"Steps": 20}) == "a cat\nSteps: 20"


def test_a1111_grammar_reads_what_we_write():
    fields = {**FIELDS, "Note": 'say "hi"', "Emoji": "猫 🐱, ok"}
    text = format_infotext("a cat", "a dog", fields)
    expected = {k: str(v) for k, v in fields.items() if v is not None}
    assert a1111_params(text) == expected


def test_round_trip():
    prompt = "line one, (cat:1.3)\n\nline three: with colon"
    negative = "bad hands\nsecond negative line"
    fields = {k: v for k, v in FIELDS.items() if v is not None}
    parsed = parse_infotext(format_infotext(prompt, negative, fields))
    assert parsed == {"Prompt": prompt, "Negative prompt": negative, **{k: str(v) for k, v in fields.items()}}
    assert list(parsed)[2:] == list(fields)
    assert parse_infotext(format_infotext("just a prompt", "", {})) == {
        "Prompt": "just a prompt",
        "Negative prompt": "",
    }


def test_parses_a1111s_documented_example():
    text = (
        "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
        "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
        "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly "
        "drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
    )
    parsed = parse_infotext(text)
    assert parsed["Prompt"].startswith("girl with an artist's beret,") and parsed["Prompt"].endswith(
        "intricate"
    )
    assert parsed["Negative prompt"].startswith("ugly, fat,") and parsed["Negative prompt"].endswith(
        "drawing"
    )
    assert {k: v for k, v in parsed.items() if k not in ("Prompt", "Negative prompt")} == {
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size": "512x512",
        "Model hash": "45dee52b",
    }


A1111_HIRES_LORA = (
    "masterpiece, best quality, (1girl:1.2), solo, <lora:add_detail:0.6>,\n"
    "detailed background, [cherry blossoms:autumn leaves:0.4] BREAK sunset\n"
    "Negative prompt: (worst quality, low quality:1.4), EasyNegative, bad-hands-5\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.45, Clip skip: 2, "
    'Hires prompt: "masterpiece, (1girl:1.2)\\nsharp focus", Hires upscale: 2, Hires steps: 15, '
    "Hires upscaler: R-ESRGAN 4x+ Anime6B, "
    'Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "EasyNegative: c74b4e810b03, bad-hands-5: aa7651be154c", '
    "Emphasis: Original, Version: v1.10.1"
)


def test_parses_a_real_looking_a1111_infotext():
    parsed = parse_infotext(A1111_HIRES_LORA)
    assert parsed["Prompt"] == (
        "masterpiece, best quality, (1girl:1.2), solo, <lora:add_detail:0.6>,\n"
        "detailed background, [cherry blossoms:autumn leaves:0.4] BREAK sunset"
    )
    assert parsed["Negative prompt"] == "(worst quality, low quality:1.4), EasyNegative, bad-hands-5"
    assert (
        parsed["Size"] == "512x768" and parsed["Clip skip"] == "2" and parsed["Denoising strength"] == "0.45"
    )
    assert parsed["Hires prompt"] == "masterpiece, (1girl:1.2)\nsharp focus"
    assert parsed["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert parsed["TI hashes"] == "EasyNegative: c74b4e810b03, bad-hands-5: aa7651be154c"
    assert parsed["Version"] == "v1.10.1"
    assert {k: v for k, v in parsed.items() if k not in ("Prompt", "Negative prompt")} == a1111_params(
        A1111_HIRES_LORA
    )


def test_a_prompt_line_that_looks_like_parameters_needs_three_pairs():
    """A1111's rule: the last line is parameters only when its pattern finds at least 3 pairs."""
    assert parse_infotext("style: watercolor, mood: calm") == {
        "Prompt": "style: watercolor, mood: calm",
        "Negative prompt": "",
    }


def test_png_text_chunk_round_trip(tmp_path):
    """What a PNG's `parameters` chunk holds comes back intact (PIL writes iTXt for non-Latin-1 text)."""
    text = format_infotext("一只猫, (cute:1.2)", "blurry", {"Steps": 20, "Sampler": "DDIM", "Seed": 1})
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png", pnginfo=info)
    read = Image.open(tmp_path / "x.png").text["parameters"]
    assert read == text
    assert a1111_params(read) == {"Steps": "20", "Sampler": "DDIM", "Seed": "1"}
    assert parse_infotext(read)["Prompt"] == "一只猫, (cute:1.2)"
