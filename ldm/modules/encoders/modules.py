"""Conditioning encoders: the frozen CLIP text encoder of SD v1, class embeddings, spatial rescaling."""

import contextlib
import functools
import gzip
import importlib.util
import os
import re
from collections.abc import Iterator
from typing import Any

import ftfy
import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Text tower of openai/clip-vit-large-patch14, as in its Hugging Face config.json.
VIT_L14_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)


class AbstractEncoder(nn.Module):
    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class ClassEmbedder(nn.Module):
    """Class label -> learned embedding: `batch[key]` [B] int -> [B, 1, embed_dim]."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class"):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: dict[str, torch.Tensor], key: str | None = None) -> torch.Tensor:
        return self.embedding(batch[key or self.key][:, None])


class SpatialRescaler(nn.Module):
    """Resize [B, C, H, W] by `multiplier` `n_stages` times, then optionally map channels with a 1x1 conv."""

    def __init__(
        self,
        n_stages: int = 1,
        method: str = "bilinear",
        multiplier: float = 0.5,
        in_channels: int = 3,
        out_channels: int | None = None,
        bias: bool = False,
    ):
        super().__init__()
        assert n_stages >= 0
        assert method in ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")
        self.n_stages = n_stages
        self.multiplier = multiplier
        self.interpolator = functools.partial(nn.functional.interpolate, mode=method)
        self.remap_output = out_channels is not None
        if self.remap_output:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            x = self.interpolator(x, scale_factor=self.multiplier)
        if self.remap_output:
            x = self.channel_mapper(x)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


def clean_text(text: str) -> str:
    """The original tokenizer's cleaning (transformers 4.x `CLIPTokenizer` with ftfy installed): ftfy fixes
    mojibake and ligatures (and HTML entities, only in text without `<`), then whitespace is collapsed and
    stripped and the text lowercased. No further HTML unescaping: that belongs to open_clip's tokenizer."""
    return re.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character table of byte-level BPE: printable Latin-1 bytes stand for themselves,
    the other bytes take the characters from U+0100 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(printable))
    return table


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary (token -> id, 49,408 entries) and merge rules, from the merges file open_clip
    ships (the source of the offline tokenizer, and of the tokenizer files a diffusers folder gets)."""
    package_dir = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    with gzip.open(os.path.join(package_dir, "bpe_simple_vocab_16e6.txt.gz")) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(_bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


@functools.cache
def builtin_clip_tokenizer() -> CLIPTokenizer:
    """The exact CLIP BPE tokenizer (49,408 tokens) built offline from the merges file open_clip ships."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _local_hub_files(version: str) -> bool:
    """Whether `version` is a local directory or a hub repo whose config and tokenizer are in the HF cache."""
    if os.path.isdir(version):
        return True
    cached = [
        isinstance(try_to_load_from_cache(version, name), str)
        for name in ("config.json", "vocab.json", "merges.txt")
    ]
    return all(cached)


@functools.cache
def _local_tokenizer(version: str) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(version, local_files_only=True)


class _TextTransformer(nn.Module):
    """Holds the CLIP text transformer as `.text_model`, so state-dict keys read `text_model.embeddings.*`,
    `text_model.encoder.*`, `text_model.final_layer_norm.*` with any transformers version (from 5.6 on
    `CLIPTextModel` is itself the text transformer; before, it wrapped one as `.text_model`)."""

    def __init__(self, model: CLIPTextModel):
        super().__init__()
        self.text_model = getattr(model, "text_model", model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> last hidden state after the final layer norm [B, T, hidden]."""
        return self.text_model(input_ids=input_ids).last_hidden_state


class FrozenCLIPEmbedder(AbstractEncoder):
    """CLIP ViT-L/14 text encoder of SD v1: prompts -> last hidden state [B, 77, 768].

    Works offline: tokenizer and config come from `version` when it is a local directory or already in the
    HF cache, else from the tokenizer and ViT-L/14 config built in. Weights are never downloaded; they come
    from the SD checkpoint. `text_model_config` overrides the text model config (a smaller model, same
    tokenizer). `device` is accepted for config compatibility; the module follows `.to()` like any other.
    """

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str | torch.device | None = None,
        max_length: int = 77,
        freeze: bool = True,
        text_model_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        overrides = dict(text_model_config or {})
        if _local_hub_files(version):
            self.tokenizer = _local_tokenizer(version)
            config = CLIPTextConfig.from_pretrained(version, local_files_only=True, **overrides)
        else:
            self.tokenizer = builtin_clip_tokenizer()
            config = CLIPTextConfig(**{**VIT_L14_TEXT_CONFIG, **overrides})
        self.transformer = _TextTransformer(CLIPTextModel(config))
        self.max_length = max_length
        self.frozen = False
        if freeze:
            self.freeze()

    @property
    def device(self) -> torch.device:
        return self.transformer.text_model.embeddings.token_embedding.weight.device

    def freeze(self) -> None:
        """Eval mode and no gradients, for good: `train()` keeps a frozen encoder in eval mode."""
        self.frozen = True
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenCLIPEmbedder":
        return super().train(mode and not self.frozen)

    @property
    def hidden_size(self) -> int:
        return self.transformer.text_model.config.hidden_size

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Cleaned and BPE-tokenized texts: ids without BOS/EOS, untruncated."""
        return self.tokenizer([clean_text(t) for t in texts], add_special_tokens=False)["input_ids"]

    def tokenize(self, text: str | list[str]) -> torch.Tensor:
        """Prompts -> token ids [B, max_length]: BOS, tokens, EOS, padded with EOS, truncated to fit."""
        text = [text] if isinstance(text, str) else text
        batch = self.tokenizer(
            [clean_text(t) for t in text],
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return batch["input_ids"]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> their token embeddings [B, T, hidden] (before position embeddings)."""
        return self.transformer.text_model.embeddings.token_embedding(ids)

    def encode_tokens(
        self, ids: torch.Tensor, clip_skip: int = 1, token_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids [B, T] (T <= 77) -> hidden states [B, T, hidden].

        `clip_skip` 1 gives the last layer's output through the final layer norm (what `forward` returns);
        n > 1 the output of the n-th layer from the end, through the final layer norm (A1111's "Clip skip").
        `token_embeddings` [B, T, hidden], when given, stands in for the token-embedding lookup of `ids`
        (textual-inversion vectors spliced in); position embeddings are added to it as usual.
        """
        layers = self.transformer.text_model.config.num_hidden_layers
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip must be in 1..{layers}, got {clip_skip}")
        if clip_skip == 1:
            with self._token_embeddings(token_embeddings):
                return self.transformer(ids)
        text_model = self.transformer.text_model
        with self._token_embeddings(token_embeddings):
            hidden = text_model(input_ids=ids, output_hidden_states=True).hidden_states[-clip_skip]
        return text_model.final_layer_norm(hidden)

    @contextlib.contextmanager
    def _token_embeddings(self, token_embeddings: torch.Tensor | None) -> Iterator[None]:
        """While open, the token-embedding layer returns `token_embeddings` instead of its lookup."""
        if token_embeddings is None:
            yield
            return
        layer = self.transformer.text_model.embeddings.token_embedding
        hook = layer.register_forward_hook(lambda module, args, output: token_embeddings.to(output))
        try:
            yield
        finally:
            hook.remove()

    def forward(self, text: str | list[str]) -> torch.Tensor:
        """Prompts -> CLIP last hidden state [B, max_length, hidden]."""
        return self.encode_tokens(self.tokenize(text).to(self.device))

    def encode(self, text: str | list[str]) -> torch.Tensor:
        return self(text)
