"""AUTOMATIC1111's prompt language on top of the model's text encoder (see each module's docstring).

Usage:

clip = model.cond_stage_model
encoder = PromptEncoder(clip, load_embeddings("models/embeddings", clip.hidden_size), clip_skip=1)
c, uc = encode_conditioning(encoder, prompts, negative_prompts, steps)
sampler.sample(steps, ..., conditioning=c, unconditional_conditioning=uc)  # c.at(step) at each step
"""

from ldm.prompts.embeddings import Embedding, load_embedding, load_embeddings
from ldm.prompts.encode import PromptEncoder, encode_conditioning
from ldm.prompts.schedule import ScheduledConditioning
from ldm.prompts.syntax import (
    ExtraNetwork,
    extract_extra_networks,
    lora_tags,
    parse_prompt_attention,
    prompt_schedule,
)

__all__ = [
    "Embedding",
    "ExtraNetwork",
    "PromptEncoder",
    "ScheduledConditioning",
    "encode_conditioning",
    "extract_extra_networks",
    "load_embedding",
    "load_embeddings",
    "lora_tags",
    "parse_prompt_attention",
    "prompt_schedule",
]
