"""scripts/server.py as a real uvicorn process on a free local port: 16 concurrent requests all come back with
the images a sequential run gives for their seeds, and the process's memory does not grow with them."""

import base64
import io
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODEL_FLAGS = ["--ckpt", "shapes", "--device", "cpu", "--no-safety-checker", "--threads", "1"]
AUTH = ("user", "pw")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    """The server process and its base URL, once it answers."""
    port = free_port()
    command = [sys.executable, str(ROOT / "scripts" / "server.py"), "--port", str(port), *MODEL_FLAGS, *flags]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stderr.read()}")
        try:
            httpx.get(url + "/sdapi/v1/options", timeout=5)
            return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError("the server did not answer within 180 s")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server():
    process, url = start_server("--api-auth", "user:pw")
    yield process, url
    stop_server(process)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def generate(url: str, seed: int) -> tuple[list[int], np.ndarray, dict]:
    request = {
        "prompt": "a blue triangle on a white background",
        "seed": seed,
        "steps": 4,
        "sampler_name": "ddim",
    }
    response = httpx.post(url + "/sdapi/v1/txt2img", json=request, auth=AUTH, timeout=600)
    assert response.status_code == 200, response.text
    body = response.json()
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    return (
        json.loads(body["info"])["all_seeds"],
        np.asarray(image.convert("RGB")),
        json.loads(image.text["ldm-parameters"]),
    )


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc (Linux)")
def test_16_concurrent_requests_match_a_sequential_run(server):
    process, url = server
    generate(url, 999)
    first_rss = rss_kib(process.pid)
    seeds = [100 + 7 * i for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda seed: generate(url, seed), seeds))
    sequential = [generate(url, seed) for seed in seeds]
    for seed, (c_seeds, c_image, c_meta), (s_seeds, s_image, s_meta) in zip(
        seeds, concurrent, sequential, strict=True
    ):
        assert c_seeds == s_seeds == [seed] and c_meta["seed"] == s_meta["seed"] == seed
        assert np.array_equal(c_image, s_image)
    assert len({image.tobytes() for _, image, _ in concurrent}) == 16  # sixteen different images
    final_rss = rss_kib(process.pid)
    print(
        f"server RSS after the first request {first_rss / 1024:.0f} MiB, after 32 more {final_rss / 1024:.0f} MiB"
    )
    assert final_rss <= 1.10 * first_rss


def test_chunked_body_over_the_limit_is_refused(server):
    _, url = server
    with httpx.Client() as client:
        chunks = iter([b'{"prompt": "', b"x" * (51 << 20), b'"}'])  # no Content-Length: counted while read
        response = client.post(url + "/sdapi/v1/txt2img", content=chunks, auth=AUTH, timeout=120)
    assert response.status_code == 413


def test_credentials_are_checked(server):
    _, url = server
    assert httpx.get(url + "/sdapi/v1/options", timeout=10).status_code == 401
    assert httpx.get(url + "/sdapi/v1/options", auth=("user", "nope"), timeout=10).status_code == 401
    assert httpx.get(url + "/sdapi/v1/options", auth=AUTH, timeout=10).status_code == 200
