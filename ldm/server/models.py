"""The request and response bodies of the `/sdapi/v1/` endpoints, with AUTOMATIC1111's field names.

Unknown fields are ignored (A1111 clients send many this project has no use for); a field left out takes the
loaded model's default (its size and guidance scale) where A1111 has a fixed one.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Txt2ImgRequest(Lenient):
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1: a random seed; image k of the request gets seed + k")
    sampler_name: str | None = Field(
        None, description="a registry name or an A1111 display name (default ddim)"
    )
    sampler_index: str | None = Field(None, description="older A1111 clients' name for sampler_name")
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float | None = Field(None, description="default: the model's (7.5 for SD, 3 for shapes)")
    width: int | None = Field(None, description="default: the model's size (512 for SD, 64 for shapes)")
    height: int | None = None
    eta: float | None = Field(None, description="used by samplers that take eta (ddim), ignored by others")
    send_images: bool = True
    force_task_id: str | None = Field(
        None, description="an id to follow this request with /progress?id_task="
    )


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(default_factory=list, description="base64 images; the first is used")
    mask: str | None = Field(
        None, description="base64 mask, white = repaint (then scripts/inpaint.py's method)"
    )
    denoising_strength: float = 0.75


class ImageResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


class PngInfoRequest(Lenient):
    image: str


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, Any]
    skipped: dict[str, Any]


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class MemoryResponse(BaseModel):
    ram: dict[str, Any]
    cuda: dict[str, Any]
