"""The HTTP server (ldm.server) with FastAPI's test client on the bundled shapes model: every endpoint, the CLI's
pixels for the same settings, progress/interrupt/skip, limits, bad requests, auth and model selection."""

import base64
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ldm.bundled import BUNDLED
from ldm.outputs import read_parameters
from ldm.server.app import Settings, create_app, parse_credentials
from ldm.server.engine import Engine
from ldm.server.generation import Limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import img2img  # noqa: E402
import txt2img  # noqa: E402

MODEL_FLAGS = ["--device", "cpu", "--no-safety-checker", "--threads", "1"]
PROMPT = "a red circle on a white background"
SHAPES = BUNDLED["shapes"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A models folder holding a copy of the shapes model (ldm/copy/), a file that is no model (ldm/broken/) and
    a link that leads outside the folder."""
    root = tmp_path_factory.mktemp("models")
    copy = root / "ldm" / "copy"
    copy.mkdir(parents=True)
    shutil.copy(SHAPES.ckpt, copy / "model.safetensors")
    shutil.copy(SHAPES.config, copy / "config.yaml")
    broken = root / "ldm" / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"not a model")
    shutil.copy(SHAPES.config, broken / "config.yaml")
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.ckpt"
    outside.write_bytes(b"not a model")
    (root / "ldm" / "escape.ckpt").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def engine(models_dir):
    return Engine(models_dir, MODEL_FLAGS, "shapes", None)


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(create_app(engine, Settings(Limits(max_size=512, max_batch=4, max_steps=200))))


def png_bytes(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def field_error(response, field: str) -> str:
    """The message of a 422 about `field`."""
    assert response.status_code == 422, response.text
    errors = [e for e in response.json()["detail"] if e["loc"][-1] == field]
    assert errors, response.json()
    return errors[0]["msg"]


def test_txt2img_images_info_and_parameters(client, engine):
    request = {"prompt": PROMPT, "seed": 5, "steps": 3, "batch_size": 2, "n_iter": 2, "unknown_field": [1]}
    response = client.post("/sdapi/v1/txt2img", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["images"]) == 4
    assert body["parameters"]["seed"] == 5 and "unknown_field" not in body["parameters"]
    info = json.loads(body["info"])
    assert info["all_seeds"] == [5, 6, 7, 8] and info["seed"] == 5
    assert info["all_prompts"] == 4 * [PROMPT] and info["sampler_name"] == "DDIM"
    assert (info["width"], info["height"], info["cfg_scale"]) == (64, 64, SHAPES.scale)
    assert info["sd_model_hash"] == engine.session.model_hash
    for b64, text, seed in zip(body["images"], info["infotexts"], info["all_seeds"], strict=True):
        image = decoded(b64)
        assert image.size == (64, 64)
        metadata = json.loads(image.text["ldm-parameters"])
        assert text == image.text["parameters"] and f"Seed: {seed}," in text  # A1111 infotext
        assert metadata["seed"] == seed and metadata["steps"] == 3 and metadata["prompt"] == PROMPT
        assert f"--seed {seed} " in metadata["remake"]
    images = [pixels(decoded(b64)) for b64 in body["images"]]
    assert not np.array_equal(images[0], images[1])  # different seeds, different images


def test_same_pixels_as_the_cli(client, tmp_path):
    """txt2img and img2img requests draw the CLI's images (pixels and metadata) for the same settings."""
    request = {
        "prompt": PROMPT,
        "seed": 11,
        "steps": 4,
        "batch_size": 2,
        "sampler_name": "PLMS",
        "cfg_scale": 2.5,
    }
    body = client.post("/sdapi/v1/txt2img", json=request).json()
    txt2img.main([
        "--ckpt", "shapes", "--prompt", PROMPT, "--seed", "11", "--ddim_steps", "4", "--n_samples", "2",
        "--n_iter", "1", "--sampler", "plms", "--scale", "2.5", "--outdir", str(tmp_path / "t"), "--skip_grid",
        *MODEL_FLAGS,
    ])  # fmt: skip
    for k, b64 in enumerate(body["images"]):
        cli = tmp_path / "t" / "samples" / f"{k:05d}.png"
        assert np.array_equal(pixels(decoded(b64)), pixels(Image.open(cli)))
        assert json.loads(decoded(b64).text["ldm-parameters"]) == read_parameters(cli)

    init = Image.open(tmp_path / "t" / "samples" / "00000.png").convert("RGB")
    init.save(tmp_path / "init.png")
    request = {"prompt": "a blue square", "seed": 3, "steps": 6, "denoising_strength": 0.5,
               "init_images": [png_bytes(init)]}  # fmt: skip
    body = client.post("/sdapi/v1/img2img", json=request).json()
    img2img.main([
        "--ckpt", "shapes", "--prompt", "a blue square", "--seed", "3", "--ddim_steps", "6", "--strength", "0.5",
        "--n_samples", "1", "--init-img", str(tmp_path / "init.png"), "--outdir", str(tmp_path / "i"),
        "--skip_grid", "--scale", str(SHAPES.scale), *MODEL_FLAGS,
    ])  # fmt: skip
    cli = Image.open(tmp_path / "i" / "samples" / "00000.png")
    assert np.array_equal(pixels(decoded(body["images"][0])), pixels(cli))


def test_inpainting_keeps_the_unmasked_pixels(client):
    image = Image.new("RGB", (64, 64), (250, 250, 250))
    image.paste((200, 30, 30), (8, 8, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # repaint the right half
    request = {"prompt": "a blue square on a white background", "seed": 2, "steps": 5, "sampler_name": "ddim",
               "init_images": [png_bytes(image)], "mask": png_bytes(mask)}  # fmt: skip
    response = client.post("/sdapi/v1/img2img", json=request)
    assert response.status_code == 200, response.text
    result = pixels(decoded(response.json()["images"][0]))
    assert np.array_equal(result[:, :32], pixels(image)[:, :32])
    assert not np.array_equal(result[:, 32:], pixels(image)[:, 32:])
    assert response.json()["parameters"]["init_images"] is None  # not echoed back, as A1111
    dpm = {**request, "sampler_name": "DPM-Solver"}
    assert "masked sampling" in field_error(client.post("/sdapi/v1/img2img", json=dpm), "sampler_name")


def run_in_thread(client, path: str, request: dict) -> tuple[threading.Thread, dict]:
    out = {}
    thread = threading.Thread(target=lambda: out.update(response=client.post(path, json=request)))
    thread.start()
    return thread, out


def wait_for(client, condition, timeout: float = 60.0, **params) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = client.get("/sdapi/v1/progress", params=params).json()
        if condition(progress):
            return progress
        time.sleep(0.02)
    raise AssertionError(f"progress never reached the condition: {progress}")


def test_progress_queue_and_interrupt(client):
    """A running job's progress and current image, a queued job's position; interrupt returns the finished
    batches and the queued job still runs."""
    long = {"prompt": PROMPT, "seed": 20, "steps": 150, "n_iter": 3, "force_task_id": "long"}
    thread, out = run_in_thread(client, "/sdapi/v1/txt2img", long)
    first = wait_for(client, lambda p: p["state"]["job"] == "long" and p["state"]["sampling_step"] >= 2)
    assert first["state"]["sampling_steps"] == 150 and first["state"]["job_count"] == 3
    assert 0 < first["progress"] < 1 and first["eta_relative"] > 0
    queued, queued_out = run_in_thread(
        client, "/sdapi/v1/txt2img", {"steps": 2, "seed": 1, "force_task_id": "next"}
    )
    waiting = wait_for(client, lambda p: p["state"]["queue_position"] == 1, id_task="next")
    assert waiting["state"]["queue_pending"] == 1
    later = wait_for(
        client, lambda p: p["state"]["job_no"] >= 1 and p["current_image"], skip_current_image=False
    )
    assert later["progress"] > first["progress"] and decoded(later["current_image"]).size == (64, 64)
    assert client.post("/sdapi/v1/interrupt").json() == {}
    thread.join(60)
    info = json.loads(out["response"].json()["info"])
    assert info["interrupted"] and 1 <= len(info["all_seeds"]) < 3
    assert info["all_seeds"] == list(range(20, 20 + len(info["all_seeds"])))
    queued.join(60)
    assert queued_out["response"].status_code == 200 and len(queued_out["response"].json()["images"]) == 1


def test_skip_drops_the_running_batch(client):
    request = {"prompt": PROMPT, "seed": 40, "steps": 150, "n_iter": 2, "force_task_id": "skipped"}
    thread, out = run_in_thread(client, "/sdapi/v1/txt2img", request)
    wait_for(client, lambda p: p["state"]["job"] == "skipped" and p["state"]["sampling_step"] >= 1)
    assert client.post("/sdapi/v1/skip").json() == {}
    thread.join(120)
    info = json.loads(out["response"].json()["info"])
    assert info["all_seeds"] == [41] and not info["interrupted"]


def test_listing_endpoints(client, engine):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"DDIM", "PLMS"} <= {s["name"] for s in samplers}
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    assert client.get("/sdapi/v1/schedulers").status_code == 200
    models = client.get("/sdapi/v1/sd-models").json()
    assert {m["title"] for m in models} == {
        "broken/model.safetensors",
        "copy/model.safetensors",
        engine.title(),
    }  # not the escaping link
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == engine.title() and engine.session.model_hash in engine.title()
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}  # no models/embeddings
    assert client.get("/sdapi/v1/loras").json() == []
    memory = client.get("/sdapi/v1/memory").json()
    assert memory["ram"]["total"] > memory["ram"]["free"] > 0 and memory["ram"]["process"] > 0
    assert "error" in memory["cuda"] or "system" in memory["cuda"]
    page = client.get("/")
    assert page.status_code == 200 and "progress?skip_current_image" in page.text and "Generate" in page.text


def test_png_info(client):
    body = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 9, "steps": 2}).json()
    info = client.post("/sdapi/v1/png-info", json={"image": body["images"][0]}).json()
    assert info["parameters"]["seed"] == 9 and "Seed: 9" in info["info"]  # A1111's infotext and our record
    plain = client.post(
        "/sdapi/v1/png-info", json={"image": "data:image/png;base64," + png_bytes(Image.new("RGB", (4, 4)))}
    )
    assert plain.json() == {"info": "", "items": {}, "parameters": {}}
    assert "base64" in field_error(client.post("/sdapi/v1/png-info", json={"image": "%%%"}), "image")


@pytest.mark.parametrize(
    "request_body, field, words",
    [
        ({"steps": "many"}, "steps", "integer"),
        ({"width": -64}, "width", "between"),
        ({"height": 70}, "height", "multiple of"),
        ({"width": 1024}, "width", "--max-size 512"),
        ({"steps": 10**6}, "steps", "--max-steps 200"),
        ({"batch_size": 5}, "batch_size", "--max-batch 4"),
        ({"n_iter": 0}, "n_iter", "at least 1"),
        ({"cfg_scale": "NaN"}, "cfg_scale", "finite"),
        ({"seed": -2}, "seed", "-1"),
        ({"sampler_name": "Euler z"}, "sampler_name", "unknown sampler"),
        ({"scheduler": "wobbly"}, "scheduler", "unknown scheduler"),
        ({"prompt": ["a", "list"]}, "prompt", "string"),
    ],
)
def test_bad_txt2img_requests(client, request_body, field, words):
    assert words in field_error(client.post("/sdapi/v1/txt2img", json=request_body), field)


def test_bad_images(client):
    def img2img(**fields):
        return client.post("/sdapi/v1/img2img", json={"steps": 2, **fields})

    assert "needs an image" in field_error(img2img(), "init_images")
    assert "base64" in field_error(img2img(init_images=["not base64!"]), "init_images")
    assert "readable image" in field_error(
        img2img(init_images=[base64.b64encode(b"hello").decode()]), "init_images"
    )
    huge = png_bytes(Image.new("1", (20000, 20000)))  # a few KB that decode to 400 megapixels
    assert len(huge) < 100_000
    assert "too large to decode safely" in field_error(img2img(init_images=[huge]), "init_images")
    wide = png_bytes(Image.new("RGB", (4000, 8)))
    assert "4000x8, more than --max-size 512" in field_error(img2img(init_images=[wide]), "init_images")
    image, small_mask = png_bytes(Image.new("RGB", (64, 64))), png_bytes(Image.new("L", (32, 32)))
    assert "same size" in field_error(img2img(init_images=[image], mask=small_mask), "mask")
    assert "between 0 and 1" in field_error(
        img2img(init_images=[image], denoising_strength=1.5), "denoising_strength"
    )


def test_body_size_limit(engine):
    client = TestClient(create_app(engine, Settings(max_body_bytes=1000)))
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x" * 2000})
    assert response.status_code == 413 and "--max-body-mb" in response.json()["detail"]
    chunked = client.post("/sdapi/v1/txt2img", content=iter([b'{"prompt": "', b"x" * 2000, b'"}']))
    assert chunked.status_code == 413


def test_auth(engine):
    client = TestClient(
        create_app(engine, Settings(credentials=parse_credentials("alice:s3cret, bob:pa:ss")))
    )
    for path in ("/", "/sdapi/v1/options", "/sdapi/v1/progress"):
        assert client.get(path).status_code == 401
        assert client.get(path).headers["www-authenticate"] == "Basic"
    assert client.get("/sdapi/v1/options", auth=("alice", "wrong")).status_code == 401
    assert client.get("/sdapi/v1/options", auth=("mallory", "s3cret")).status_code == 401
    assert (
        client.post("/sdapi/v1/txt2img", json={"steps": 10**6}).status_code == 401
    )  # auth before the checks
    assert client.get("/sdapi/v1/options", auth=("alice", "s3cret")).status_code == 200
    assert client.get("/sdapi/v1/samplers", auth=("bob", "pa:ss")).status_code == 200
    with pytest.raises(ValueError, match="user:password"):
        parse_credentials("alice")


def test_save_outputs_as_the_cli(engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = TestClient(create_app(engine, Settings(save_outputs=True)))
    body = client.post(
        "/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 3, "steps": 2, "batch_size": 2}
    ).json()
    folder = tmp_path / "outputs" / "txt2img-samples"
    for k, b64 in enumerate(body["images"]):
        saved = folder / "samples" / f"{k:05d}.png"
        assert np.array_equal(pixels(Image.open(saved)), pixels(decoded(b64)))
        assert read_parameters(saved) == json.loads(decoded(b64).text["ldm-parameters"])
    assert read_parameters(folder / "grid-0000.png")["prompts"] == [PROMPT]
    image = png_bytes(Image.new("RGB", (64, 64), (255, 255, 255)))
    body = client.post(
        "/sdapi/v1/img2img", json={"prompt": PROMPT, "steps": 2, "init_images": [image]}
    ).json()
    saved = tmp_path / "outputs" / "img2img-samples" / "samples" / "00000.png"
    remake = read_parameters(saved)["remake"]
    assert "--init-img" in remake and str(tmp_path / "outputs" / "img2img-samples" / "inputs") in remake


def test_model_selection_stays_in_the_models_folder(client, engine, models_dir):
    outside = str(next((models_dir / "ldm").glob("escape.ckpt")).resolve())
    for name in ("../../etc/passwd", "/etc/passwd", "copy/../../../etc/passwd", "escape.ckpt", outside,
                 str(SHAPES.ckpt) + "x", "copy/model.safetensors; rm -rf /"):  # fmt: skip
        response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert "choose a title" in field_error(response, "sd_model_checkpoint")
    start = engine.title()
    broken = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken/model.safetensors"})
    assert broken.status_code == 422 and "model.safetensors" in broken.json()["detail"][0]["msg"]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == start  # the model it had
    assert client.post("/sdapi/v1/txt2img", json={"steps": 2}).status_code == 200
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "copy_model"}).status_code == 200
    assert (
        client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("copy/model.safetensors [")
    )
    assert engine.checkpoint.path == (models_dir / "ldm" / "copy" / "model.safetensors").resolve()
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": start}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == start


def test_listen_needs_auth():
    """--listen without --api-auth: one line, exit status 2, before any model loads."""
    for flags in (["--listen"], ["--host", "0.0.0.0"]):
        run = subprocess.run([sys.executable, str(ROOT / "scripts" / "server.py"), *flags], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert run.returncode == 2
        assert run.stderr.count("\n") == 1 and "--api-auth" in run.stderr and "--insecure" in run.stderr


def test_an_unreadable_safetensors_file_is_a_user_error(models_dir):
    """What the broken model above meets in ldm.loading: one line naming the file, not a traceback."""
    from ldm.errors import UserError
    from ldm.loading import load_config, load_model

    broken = models_dir / "ldm" / "broken" / "model.safetensors"
    with pytest.raises(UserError, match="is not a readable checkpoint"):
        load_model(load_config(str(SHAPES.config)), broken, "cpu")


def test_embeddings_lists_the_files_that_fit_the_model(client, engine, models_dir):
    import safetensors.torch
    import torch

    folder = models_dir / "embeddings"
    folder.mkdir(exist_ok=True)
    width = engine.session.model.cond_stage_model.hidden_size
    safetensors.torch.save_file({"emb_params": torch.randn(2, width)}, folder / "my-style.safetensors")
    safetensors.torch.save_file({"emb_params": torch.randn(1, width + 1)}, folder / "other-model.safetensors")
    try:
        listed = client.get("/sdapi/v1/embeddings").json()
    finally:
        for path in folder.iterdir():
            path.unlink()
    assert listed["loaded"]["my-style"]["vectors"] == 2 and listed["loaded"]["my-style"]["shape"] == width
    assert list(listed["skipped"]) == ["other-model"]


def test_interrupt_returns_the_running_batch_from_the_samplers_estimate(client):
    """As A1111: stopping mid-batch decodes the sampler's last denoised estimate instead of dropping it."""
    request = {"prompt": PROMPT, "seed": 60, "steps": 150, "n_iter": 1, "force_task_id": "cut"}
    thread, out = run_in_thread(client, "/sdapi/v1/txt2img", request)
    wait_for(client, lambda p: p["state"]["job"] == "cut" and p["state"]["sampling_step"] >= 5)
    assert client.post("/sdapi/v1/interrupt").json() == {}
    thread.join(60)
    body = out["response"].json()
    info = json.loads(body["info"])
    assert info["interrupted"] and info["all_seeds"] == [60] and len(body["images"]) == 1
    assert decoded(body["images"][0]).size == (64, 64)
