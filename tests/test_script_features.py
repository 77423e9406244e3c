"""The features users reach through the scripts, end to end on the tiny model: k-diffusion samplers and their
seeds, A1111's prompt language, LoRAs and VAEs from the command line and prompt tags, A1111 infotext in the PNG
and --from-png."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from test_lora import random_kohya_lora

from ldm.checkpoint import save_checkpoint
from ldm.infotext import PARAM, parse_infotext
from ldm.outputs import read_parameters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import img2img  # noqa: E402
import txt2img  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_config):
    from conftest import randomize_

    from ldm.util import instantiate_from_config

    d = tmp_path_factory.mktemp("features")
    model = randomize_(instantiate_from_config(tiny_config.model), std=0.1)
    save_checkpoint(d / "tiny.ckpt", model.state_dict())
    (d / "lora").mkdir()
    random_kohya_lora(model, d / "lora" / "detail.safetensors", seed=1)
    other = randomize_(instantiate_from_config(tiny_config.model), std=0.1, seed=5)
    first_stage = {k: v for k, v in other.state_dict().items() if k.startswith("first_stage_model.")}
    save_checkpoint(d / "other-vae.safetensors", first_stage)
    return d


def run(files, outdir, *extra, script=txt2img):
    size = ["--H", "64", "--W", "64"] if script is txt2img else []
    script.main([
        "--config", "tests/configs/tiny-ldm.yaml", "--ckpt", str(files / "tiny.ckpt"), "--outdir", str(outdir),
        *size, "--ddim_steps", "4", "--n_samples", "1", "--n_iter", "1", "--device", "cpu",
        "--no-safety-checker", "--skip_grid", "--lora-dir", str(files / "lora"), *extra,
    ])  # fmt: skip
    return sorted((Path(outdir) / "samples").glob("*.png"))


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("sampler", ["Euler a", "dpmpp_2m_sde", "DPM++ 2M Karras"])
def test_an_image_does_not_depend_on_its_batch(files, tmp_path, sampler):
    """A1111's CPU-generator rule: image k of a batch of 3 is the image of seed + k made alone."""
    batch = run(files, tmp_path / "batch", "--sampler", sampler, "--n_samples", "3", "--seed", "10")
    alone = run(files, tmp_path / "alone", "--sampler", sampler, "--seed", "12")
    assert np.abs(pixels(batch[2]) - pixels(alone[0])).max() <= 1  # batched products may round differently
    assert np.abs(pixels(batch[0]) - pixels(batch[2])).max() > 10
    params = read_parameters(alone[0])
    expected = {"Euler a": ("euler_a", "normal"), "dpmpp_2m_sde": ("dpmpp_2m_sde", "exponential"),
                "DPM++ 2M Karras": ("dpmpp_2m", "karras")}[sampler]  # fmt: skip
    assert (params["sampler"], params["scheduler"]) == expected
    assert f"--sampler {expected[0]} --scheduler {expected[1]}" in params["remake"]


def test_eta_and_variation_seeds_change_the_image_and_are_recorded(files, tmp_path):
    plain = run(files, tmp_path / "a", "--sampler", "euler_a")[0]
    no_noise = run(files, tmp_path / "b", "--sampler", "euler_a", "--eta", "0")[0]
    varied = run(
        files, tmp_path / "c", "--sampler", "euler_a", "--subseed", "7", "--subseed_strength", "0.5"
    )[0]
    assert np.abs(pixels(plain) - pixels(no_noise)).max() > 0
    assert np.abs(pixels(plain) - pixels(varied)).max() > 0
    infotext = parse_infotext(Image.open(varied).text["parameters"])
    assert infotext["Variation seed"] == "7" and infotext["Variation seed strength"] == "0.5"
    assert infotext["Sampler"] == "Euler a" and infotext["Schedule type"] == "Normal"


def test_k_sampler_img2img_runs_a1111s_steps(files, tmp_path, capsys):
    init = run(files, tmp_path / "t")[0]
    out = run(files, tmp_path / "i", "--init-img", str(init), "--sampler", "euler", "--strength", "0.5",
              script=img2img)  # fmt: skip
    assert "target t_enc is 3 steps" in capsys.readouterr().out  # int(0.5 * 4) + 1, as A1111
    assert read_parameters(out[0])["strength"] == 0.5


def test_png_holds_a1111_infotext_and_the_record(files, tmp_path):
    path = run(files, tmp_path, "--prompt", "a (red:1.2) square, big", "--negative-prompt", "blue",
               "--sampler", "dpmpp_2m", "--scale", "6.5")[0]  # fmt: skip
    text = Image.open(path).text["parameters"]
    prompt, negative, line = text.split("\n")
    assert prompt == "a (red:1.2) square, big" and negative == "Negative prompt: blue"
    pairs = dict(PARAM.findall(line))  # A1111's published key-value pattern
    assert pairs["Steps"] == "4" and pairs["Sampler"] == "DPM++ 2M" and pairs["Schedule type"] == "Karras"
    assert pairs["CFG scale"] == "6.5" and pairs["Seed"] == "42" and pairs["Size"] == "64x64"
    assert "Clip skip" not in pairs and len(pairs["Model hash"]) == 10  # 1, the default, is left out
    assert read_parameters(path)["remake"].startswith("python scripts/txt2img.py")


def test_from_png_remakes_our_image_and_reads_a1111s(files, tmp_path, capsys):
    first = run(
        files, tmp_path / "a", "--sampler", "euler_a", "--seed", "3", "--prompt", "[red:blue:0.5] circle"
    )
    again = run(files, tmp_path / "b", "--from-png", str(first[0]))
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert read_parameters(again[0])["prompt"] == "[red:blue:0.5] circle"

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a green triangle\nNegative prompt: ugly\nSteps: 3, Sampler: DPM++ 2M, "
                  "Schedule type: Karras, CFG scale: 5, Seed: 77, Size: 64x64, Model hash: 0123456789, "
                  "Face restoration: CodeFormer")  # fmt: skip
    Image.new("RGB", (64, 64)).save(tmp_path / "a1111.png", pnginfo=info)
    txt2img.main([
        "--config", "tests/configs/tiny-ldm.yaml", "--ckpt", str(files / "tiny.ckpt"), "--outdir", str(tmp_path / "c"),
        "--device", "cpu", "--no-safety-checker", "--from-png", str(tmp_path / "a1111.png"), "--n_iter", "1",
    ])  # fmt: skip
    params = read_parameters(tmp_path / "c" / "samples" / "00000.png")
    assert (params["prompt"], params["negative_prompt"], params["seed"]) == ("a green triangle", "ugly", 77)
    assert (params["steps"], params["sampler"], params["scheduler"], params["scale"]) == (
        3,
        "dpmpp_2m",
        "karras",
        5.0,
    )
    out = capsys.readouterr().out
    assert "Face restoration cannot be honoured" in out and "model hash 0123456789" in out


def test_lora_from_a_prompt_tag_and_the_flag(files, tmp_path):
    plain = run(files, tmp_path / "a", "--prompt", "a red circle")[0]
    tagged = run(files, tmp_path / "b", "--prompt", "a red circle <lora:detail:0.8>")[0]
    flagged = run(files, tmp_path / "c", "--prompt", "a red circle", "--lora", "detail:0.8")[0]
    assert np.abs(pixels(plain) - pixels(tagged)).max() > 0
    assert np.array_equal(pixels(tagged), pixels(flagged))  # the tag is removed from the text it encodes
    params = read_parameters(tagged)
    assert params["lora_weights"] == [["detail", 0.8]] and params["lora_hashes"].startswith("detail: ")
    assert "Lora hashes" in parse_infotext(Image.open(tagged).text["parameters"])
    again = run(files, tmp_path / "d", "--prompt", "a red circle")[0]  # a fresh session: nothing left merged
    assert np.array_equal(pixels(plain), pixels(again))


def test_vae_flag_changes_only_the_decoding(files, tmp_path):
    plain = run(files, tmp_path / "a")[0]
    swapped = run(files, tmp_path / "b", "--vae", str(files / "other-vae.safetensors"))[0]
    assert np.abs(pixels(plain) - pixels(swapped)).max() > 0
    assert read_parameters(swapped)["vae"] == "other-vae.safetensors"


def test_clip_skip_beyond_the_text_encoder_is_one_line(files, tmp_path, capsys):
    from ldm.cli import run_cli

    with pytest.raises(SystemExit):
        run_cli(lambda: run(files, tmp_path, "--clip-skip", "2"))  # the tiny text encoder has one layer
    assert "--clip-skip 2: this model's text encoder has 1 layers" in capsys.readouterr().err


def test_long_prompts_run_and_plain_syntax_warns_about_the_cut(files, tmp_path, capsys):
    long_prompt = ", ".join(["a red circle on a white background"] * 20)  # ~160 tokens
    run(files, tmp_path / "a", "--prompt", long_prompt)
    assert "warning" not in capsys.readouterr().out
    run(files, tmp_path / "b", "--prompt", long_prompt, "--prompt-syntax", "plain")
    assert "past the 75 the text encoder takes" in capsys.readouterr().out


def test_missing_lora_is_refused_before_loading(files, tmp_path, monkeypatch):
    import ldm.pipeline
    from ldm.cli import run_cli

    monkeypatch.setattr(ldm.pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: run(files, tmp_path, "--prompt", "x <lora:nope:1>"))
    assert exit_info.value.code == 2
