"""Serve the model over HTTP: AUTOMATIC1111's `/sdapi/v1/` API and a web page at `/`.

`python scripts/server.py` serves on http://127.0.0.1:7860/ with the SD v1 checkpoint at
models/ldm/stable-diffusion-v1/model.ckpt, or the bundled `shapes` model when there is none. `--listen` serves
the network and then needs `--api-auth user:pass` (or `--insecure`).
"""

from collections.abc import Sequence

from ldm.cli import run_cli
from ldm.server.launch import serve


def main(argv: Sequence[str] | None = None) -> None:
    serve(argv, __doc__)


if __name__ == "__main__":
    run_cli(main)
