"""`scripts/server.py`: the server's flags, the refusal to listen on the network without credentials, and
uvicorn serving the app."""

import argparse
import ipaddress
from collections.abc import Sequence

from ldm.cli import FLAGS, HelpFormatter, OneLineParser
from ldm.errors import UserError
from ldm.loading import DEFAULT_CKPT, resolve_path

# the generation scripts' flags that choose and run the model, passed through to them
MODEL_FLAGS = ("--config", "--device", "--precision", "--safety-checker", "--no-safety-checker", "--vae-tiling",
               "--attention-chunk", "--lowvram", "--threads", "--compile", "--backend")  # fmt: skip


def default_ckpt() -> str:
    """The SD v1 checkpoint where the scripts expect it, else the bundled `shapes` model (a fresh checkout)."""
    return DEFAULT_CKPT if resolve_path(DEFAULT_CKPT).is_file() else "shapes"


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(description=description, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to serve on")
    add("--port", type=int, default=7860, help="port to serve on")
    add(
        "--listen",
        action="store_true",
        help="serve on every interface (0.0.0.0); needs --api-auth or --insecure",
    )
    add("--api-auth", metavar="USER:PASS[,USER2:PASS2]", help="require HTTP basic auth with one of these")
    add("--insecure", action="store_true", help="allow --listen without --api-auth")
    add("--ckpt", default=default_ckpt(), help="checkpoint to start with, or a bundled model's name (shapes)")
    add(
        "--models-dir", default="models", help="clients may switch among the checkpoints under MODELS_DIR/ldm"
    )
    add("--max-size", type=int, default=2048, help="largest image side in pixels (outputs and input images)")
    add("--max-batch", type=int, default=8, help="largest batch_size")
    add("--max-images", type=int, default=64, help="most images per request (batch_size * n_iter)")
    add("--max-steps", type=int, default=150, help="most sampling steps")
    add("--max-body-mb", type=float, default=50.0, help="largest request body in MiB")
    add("--save-outputs", action="store_true", help="also write every image to outputs/ as the scripts do")
    for flag in FLAGS:
        if flag.name not in MODEL_FLAGS:
            continue
        if flag.type is None:
            add(flag.name, action="store_true", help=flag.help)
        else:
            kwargs = {k: v for k, v in {"choices": flag.choices, "metavar": flag.metavar}.items() if v}
            add(flag.name, type=flag.type, default=None, help=flag.help, **kwargs)
    return parser


def model_flags(args: argparse.Namespace) -> list[str]:
    """The model flags as given, as the generation scripts' argv."""
    argv = []
    for name in MODEL_FLAGS:
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if value is True:
            argv.append(name)
        elif value not in (None, False):
            argv += [name, str(value)]
    return argv


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(argv: Sequence[str] | None = None, description: str | None = None) -> None:
    """Parse the server's flags, check them, load the model and serve until stopped."""
    args = build_parser(description).parse_args(argv)
    host = "0.0.0.0" if args.listen else args.host
    if not is_loopback(host) and not args.api_auth and not args.insecure:
        raise UserError(
            f"serving on {host} lets anyone on the network use this machine: add --api-auth USER:PASS, "
            "or --insecure to serve without it"
        )
    for name in ("max_size", "max_batch", "max_images", "max_steps", "max_body_mb"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")

    import uvicorn

    from ldm.server.app import Settings, create_app, parse_credentials
    from ldm.server.engine import Engine
    from ldm.server.generation import Limits

    try:
        credentials = parse_credentials(args.api_auth or "")
    except ValueError as error:
        raise UserError(str(error)) from None
    limits = Limits(args.max_size, args.max_batch, args.max_images, args.max_steps)
    settings = Settings(limits, credentials, int(args.max_body_mb * 2**20), args.save_outputs)
    engine = Engine(resolve_path(args.models_dir), model_flags(args), args.ckpt, args.config)
    print(f"model {engine.title()} loaded; serving on http://{host}:{args.port}/")
    uvicorn.run(create_app(engine, settings), host=host, port=args.port, log_level="warning")
