"""The FastAPI app: AUTOMATIC1111's `/sdapi/v1/` endpoints and the web page, in front of one worker thread that
owns the model.

Security: optional HTTP basic auth on every route (credentials compared in constant time), a request body
limit, every value checked before any work, and model selection only by name among listed checkpoints.
"""

import asyncio
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.types import ASGIApp, Receive, Scope, Send

from ldm.errors import UserError
from ldm.models.diffusion import registry
from ldm.server import generation
from ldm.server.checkpoints import lora_files
from ldm.server.engine import Engine
from ldm.server.generation import Limits, RequestError, display_name, plan, schedulers
from ldm.server.images import ImageError, decode_image, encode_png, read_png_info
from ldm.server.jobs import Worker
from ldm.server.models import (
    EmbeddingsResponse,
    ImageResponse,
    Img2ImgRequest,
    LoraItem,
    MemoryResponse,
    PngInfoRequest,
    PngInfoResponse,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    Txt2ImgRequest,
)

PAGE = Path(__file__).parent / "static" / "index.html"


@dataclass(frozen=True)
class Settings:
    """The server's own options (scripts/server.py's flags)."""

    limits: Limits = Limits()
    credentials: tuple[tuple[str, str], ...] = ()  # (user, password) pairs; empty: no auth
    max_body_bytes: int = 50 << 20
    save_outputs: bool = False


def parse_credentials(value: str) -> tuple[tuple[str, str], ...]:
    """`user:pass[,user2:pass2]` (A1111's --api-auth) -> pairs; ValueError on an entry without a colon."""
    pairs = []
    for entry in filter(None, (part.strip() for part in value.split(","))):
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth entry {entry.split(':')[0]!r} needs the form user:password")
        pairs.append((user, password))
    return tuple(pairs)


def authenticator(credentials: tuple[tuple[str, str], ...]):
    """A dependency that lets a request through only with one of `credentials` (HTTP basic)."""
    scheme = HTTPBasic(auto_error=False)

    def check(given: Annotated[HTTPBasicCredentials | None, Depends(scheme)]) -> None:
        ok = False
        if given is not None:
            user, password = given.username.encode(), given.password.encode()
            for known_user, known_password in credentials:  # every pair compared: time does not tell which
                ok |= secrets.compare_digest(user, known_user.encode()) & secrets.compare_digest(
                    password, known_password.encode()
                )
        if not ok:
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return check


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413: by their Content-Length before reading, and while
    reading when the length is not declared."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            response = JSONResponse({"detail": self.message()}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, self.message())
            return message

        await self.app(scope, counted, send)

    def message(self) -> str:
        return f"request body larger than --max-body-mb {self.max_bytes / 2**20:g} MiB"


def invalid(field: str, message: str) -> HTTPException:
    """A 422 in FastAPI's validation format, naming the body field."""
    return HTTPException(422, [{"loc": ["body", field], "msg": message, "type": "value_error"}])


def memory() -> dict:
    """A1111's /memory: system RAM (and this process's resident size), and CUDA's where there is one."""
    page = os.sysconf("SC_PAGE_SIZE")
    total, free = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    ram = {"free": free, "used": total - free, "total": total, "process": process_rss()}
    import torch

    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "CUDA is not available"}}
    cuda_free, cuda_total = torch.cuda.mem_get_info()
    cuda = {
        "system": {"free": cuda_free, "used": cuda_total - cuda_free, "total": cuda_total},
        "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()},
        "reserved": {"current": torch.cuda.memory_reserved(), "peak": torch.cuda.max_memory_reserved()},
    }
    return {"ram": ram, "cuda": cuda}


def process_rss() -> int | None:
    """This process's resident set size in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def create_app(engine: Engine, settings: Settings = Settings()) -> FastAPI:
    """The app serving `engine`'s model; its worker thread starts now and lives as long as the process."""
    auth = [Depends(authenticator(settings.credentials))] if settings.credentials else []
    app = FastAPI(title="Stable Diffusion (latent-diffusion)", dependencies=auth)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    worker = Worker()
    app.state.worker, app.state.engine = worker, engine

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": ["body"], "msg": str(error), "type": "value_error"}]}, 422)

    async def generate(request: Txt2ImgRequest) -> dict:
        try:
            checked = await run_in_threadpool(plan, request, engine, settings.limits)
        except RequestError as error:
            raise invalid(error.field, str(error)) from None

        def work(job):
            return generation.run(checked, engine, job, settings.save_outputs)

        job = worker.submit(checked.script, work, request.force_task_id, batches=request.n_iter)
        result = await asyncio.wrap_future(job.future)
        return await run_in_threadpool(generation.response, checked, result, engine, job)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @app.post("/sdapi/v1/txt2img", response_model=ImageResponse)
    async def txt2img(request: Txt2ImgRequest) -> dict:
        return await generate(request)

    @app.post("/sdapi/v1/img2img", response_model=ImageResponse)
    async def img2img(request: Img2ImgRequest) -> dict:
        return await generate(request)

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = False, id_task: str | None = None) -> dict:
        job = worker.current
        state: dict[str, Any] = {
            "skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0",
            "job_no": 0, "sampling_step": 0, "sampling_steps": 0, "queue_pending": worker.pending(),
        }  # fmt: skip
        if id_task is not None:
            state["queue_position"] = worker.position(id_task)
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state}
        fraction, elapsed = job.progress, time.time() - job.started
        state |= {
            "skipped": job.skipped, "interrupted": job.interrupted, "job": job.id, "job_count": job.batches,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started)), "job_no": job.batch,
            "sampling_step": job.step, "sampling_steps": job.steps,
        }  # fmt: skip
        image = job.latest_image
        return {
            "progress": fraction,
            "eta_relative": elapsed / fraction - elapsed if fraction > 0 else 0.0,
            "state": state,
            "current_image": encode_png(image) if image is not None and not skip_current_image else None,
            "textinfo": f"{job.kind}: batch {job.batch + 1}/{job.batches}, step {job.step}/{job.steps}",
        }

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> dict:
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip() -> dict:
        worker.skip()
        return {}

    @app.post("/sdapi/v1/png-info", response_model=PngInfoResponse)
    def png_info(request: PngInfoRequest) -> dict:
        try:
            image = decode_image(request.image, "image", settings.limits.max_size)
        except ImageError as error:
            raise invalid("image", str(error)) from None
        info, items, parameters = read_png_info(image)
        return {"info": info, "items": items, "parameters": parameters}

    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem])
    def samplers() -> list[dict]:
        def aliases(name: str) -> list[str]:
            return [name] + [a for a, target in registry.ALIASES.items() if target == name][1:]

        return [{"name": display_name(n), "aliases": aliases(n), "options": {}} for n in registry.SAMPLERS]

    @app.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem])
    def scheduler_list() -> list[dict]:
        return [{"name": str(s), "label": str(s)} for s in schedulers()]

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem])
    def sd_models() -> list[dict]:
        current = engine.checkpoint
        models = []
        for checkpoint in engine.checkpoints():
            short = engine.session.model_hash if checkpoint.path == current.path else None
            models.append({
                "title": checkpoint.title(short), "model_name": checkpoint.model_name, "hash": short,
                "sha256": None, "filename": str(checkpoint.path),
                "config": str(checkpoint.config) if checkpoint.config else None,
            })  # fmt: skip
        return models

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        """The list is read from the models folder at every /sd-models request: nothing to refresh."""

    @app.get("/sdapi/v1/options")
    def get_options() -> dict:
        return {
            "sd_model_checkpoint": engine.title(),
            "sd_checkpoint_hash": engine.session.model_hash,
            "samples_save": settings.save_outputs,
            "outdir_txt2img_samples": generation.outdir("txt2img"),
            "outdir_img2img_samples": generation.outdir("img2img"),
        }

    @app.post("/sdapi/v1/options")
    async def set_options(options: dict[str, Any]) -> None:
        """Only `sd_model_checkpoint` acts (a switch queued behind the running jobs); other keys are ignored."""
        wanted = options.get("sd_model_checkpoint")
        if wanted is None:
            return
        checkpoint = engine.find(str(wanted))
        if checkpoint is None:
            raise invalid(
                "sd_model_checkpoint",
                f"{wanted!r} is not among the checkpoints in {engine.models_dir / 'ldm'}: "
                "choose a title from /sdapi/v1/sd-models",
            )
        if checkpoint.path != engine.checkpoint.path:
            job = worker.submit("load", lambda job: engine.load(checkpoint))
            await asyncio.wrap_future(job.future)

    @app.get("/sdapi/v1/embeddings", response_model=EmbeddingsResponse)
    def embeddings() -> dict:
        """The textual-inversion files under models/embeddings, as A1111 lists them: those that fit the loaded
        model's text encoder, and those that do not (with the reason)."""
        from ldm.errors import UserError
        from ldm.prompts.embeddings import SUFFIXES, load_embedding

        folder = engine.models_dir / "embeddings"
        width = getattr(engine.session.model.cond_stage_model, "hidden_size", None)
        loaded, skipped = {}, {}
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.suffix.lower() not in SUFFIXES or not path.is_file():
                continue
            try:
                embedding = load_embedding(path, width)
            except UserError as error:
                skipped[path.stem] = {"error": str(error)}
                continue
            loaded[embedding.name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                      "shape": embedding.vectors.shape[-1], "vectors": embedding.num_vectors}  # fmt: skip
        return {"loaded": loaded, "skipped": skipped}

    @app.get("/sdapi/v1/loras", response_model=list[LoraItem])
    def loras() -> list[dict]:
        files = lora_files(engine.models_dir / "lora")
        return [{"name": f.stem, "alias": f.stem, "path": str(f), "metadata": {}} for f in files]

    @app.get("/sdapi/v1/memory", response_model=MemoryResponse)
    def memory_stats() -> dict:
        return memory()

    return app
