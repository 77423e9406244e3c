"""Prompts in AUTOMATIC1111's language -> CLIP conditioning, over the model's own text encoder.

A prompt is split into runs of equal emphasis weight, tokenized with the model's tokenizer and laid out
in chunks of 75 tokens, each wrapped in BOS/EOS to 77 (a chunk that would split a phrase ends after the
last comma within its last 20 tokens, and `BREAK` starts a new chunk). Each chunk goes through CLIP on its
own and the outputs are concatenated along the sequence: [B, 77 * chunks, width]. Emphasis multiplies each
token's output vector by its weight, then rescales the chunk so its mean is unchanged (A1111's "Original"
emphasis). Textual-inversion vectors replace the token embeddings of their trigger words.

A plain prompt of at most 75 tokens gives exactly `model.get_learned_conditioning([prompt])`.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.prompts.embeddings import Embedding
from ldm.prompts.schedule import ScheduledConditioning
from ldm.prompts.syntax import BREAK, extract_extra_networks, parse_prompt_attention, prompt_schedule

CHUNK_TOKENS = 75  # prompt tokens per chunk; with BOS and EOS a chunk is CLIP's 77
COMMA_BACKTRACK = 20  # A1111's default "comma padding backtrack"


@dataclass
class Chunk:
    """One CLIP input: 77 ids (BOS, tokens, EOS padding), their emphasis weights, and where embeddings go."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    embeddings: list[tuple[int, Embedding]] = field(default_factory=list)  # (position in tokens, embedding)


class PromptEncoder:
    """Encodes prompts in A1111's language with `text_encoder` (a model's `cond_stage_model`).

    `embeddings`: trigger word -> Embedding (see `load_embeddings`). `clip_skip`: 1 = the last layer, as
    SD v1 was trained; 2 = the penultimate layer's output through the final layer norm (A1111's Clip skip).
    """

    def __init__(
        self,
        text_encoder: FrozenCLIPEmbedder,
        embeddings: Mapping[str, Embedding] | None = None,
        clip_skip: int = 1,
        comma_backtrack: int = COMMA_BACKTRACK,
    ):
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        self.comma_backtrack = comma_backtrack
        tokenizer = text_encoder.tokenizer
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.comma = tokenizer.get_vocab().get(",</w>")
        # first token id of a trigger word -> [(its ids, embedding)], longest first
        self.triggers: dict[int, list[tuple[list[int], Embedding]]] = {}
        for embedding in (embeddings or {}).values():
            ids = text_encoder.token_ids([embedding.name])[0]
            candidates = self.triggers.setdefault(ids[0], [])
            candidates.append((ids, embedding))
            candidates.sort(key=lambda entry: len(entry[0]), reverse=True)

    def _embedding_at(self, ids: list[int], position: int) -> tuple[Embedding, int] | None:
        """(embedding, its trigger's length in tokens) when a trigger word starts at ids[position]."""
        for trigger, embedding in self.triggers.get(ids[position], []):
            if ids[position : position + len(trigger)] == trigger:
                return embedding, len(trigger)
        return None

    def chunks(self, text: str) -> list[Chunk]:
        """The 77-token chunks of one prompt (at least one)."""
        runs = parse_prompt_attention(text)
        run_ids = self.text_encoder.token_ids([run_text for run_text, _ in runs])
        done: list[Chunk] = []
        chunk = Chunk()
        last_comma = -1  # index in chunk.tokens of its last comma

        def close() -> Chunk:
            """Finish the chunk being built (wrap in BOS/EOS, pad to 77); return a fresh one."""
            nonlocal last_comma
            padding = CHUNK_TOKENS - len(chunk.tokens)
            done.append(
                Chunk(
                    [self.bos, *chunk.tokens, *[self.eos] * padding, self.eos],
                    [1.0, *chunk.weights, *[1.0] * padding, 1.0],
                    [(position + 1, embedding) for position, embedding in chunk.embeddings],
                )
            )
            last_comma = -1
            return Chunk()

        for ids, run in zip(run_ids, runs, strict=True):
            if run == BREAK:
                chunk = close()
                continue
            weight = run[1]
            position = 0
            while position < len(ids):
                if ids[position] == self.comma:
                    last_comma = len(chunk.tokens)
                elif (
                    len(chunk.tokens) == CHUNK_TOKENS
                    and last_comma != -1
                    and CHUNK_TOKENS - last_comma <= self.comma_backtrack
                ):
                    # move the words after the last comma to the next chunk
                    cut = last_comma + 1
                    moved = Chunk(
                        chunk.tokens[cut:],
                        chunk.weights[cut:],
                        [(p - cut, e) for p, e in chunk.embeddings if p >= cut],
                    )
                    del chunk.tokens[cut:], chunk.weights[cut:]
                    chunk.embeddings = [(p, e) for p, e in chunk.embeddings if p < cut]
                    close()
                    chunk = moved
                if len(chunk.tokens) == CHUNK_TOKENS:
                    chunk = close()
                found = self._embedding_at(ids, position)
                if found is None:
                    chunk.tokens.append(ids[position])
                    chunk.weights.append(weight)
                    position += 1
                    continue
                embedding, trigger_length = found
                if len(chunk.tokens) + embedding.num_vectors > CHUNK_TOKENS:
                    chunk = close()
                chunk.embeddings.append((len(chunk.tokens), embedding))
                chunk.tokens += [0] * embedding.num_vectors  # placeholder ids; their embeddings are replaced
                chunk.weights += [weight] * embedding.num_vectors
                position += trigger_length
        if chunk.tokens or not done:
            close()
        return done

    def _encode_chunks(self, batch: list[Chunk]) -> torch.Tensor:
        """One chunk per prompt -> [B, 77, width], emphasis applied over the whole batch as A1111 does."""
        device = self.text_encoder.device
        ids = torch.tensor([chunk.tokens for chunk in batch], device=device)
        token_embeddings = None
        if any(chunk.embeddings for chunk in batch):
            token_embeddings = self.text_encoder.embed_tokens(ids)
            for row, chunk in enumerate(batch):
                for position, embedding in chunk.embeddings:
                    vectors = embedding.vectors.to(token_embeddings)
                    token_embeddings[row, position : position + embedding.num_vectors] = vectors
        z = self.text_encoder.encode_tokens(ids, self.clip_skip, token_embeddings)
        weights = torch.tensor([chunk.weights for chunk in batch], device=device, dtype=z.dtype)
        if (weights != 1).any():
            original_mean = z.mean()
            z = z * weights[..., None]
            z = z * (original_mean / z.mean())
        return z

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Prompts (no editing syntax left) -> [B, 77 * chunks, width]; a prompt with fewer chunks than the
        longest is filled with empty chunks (BOS, EOS padding), encoded along with the others."""
        cache: dict[str, list[Chunk]] = {}
        per_text = [cache.setdefault(text, self.chunks(text)) for text in texts]
        empty = Chunk([self.bos] + [self.eos] * (CHUNK_TOKENS + 1), [1.0] * (CHUNK_TOKENS + 2))
        count = max(len(chunks) for chunks in per_text)
        outputs = [
            self._encode_chunks([chunks[i] if i < len(chunks) else empty for chunks in per_text])
            for i in range(count)
        ]
        return torch.cat(outputs, dim=1)

    def schedule(self, prompts: list[str], steps: int) -> ScheduledConditioning:
        """A batch of prompts with prompt editing over `steps` sampler steps.

        Each distinct prompt's texts over the run are encoded together (as A1111 does); batch entries with
        fewer tokens than the longest are padded by repeating their last vector (A1111's stack_conds).
        """
        encoded: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for prompt in dict.fromkeys(prompts):
            schedule = prompt_schedule(prompt, steps)
            z = self.encode([text for _, text in schedule])
            encoded[prompt] = [(end, z[i]) for i, (end, _) in enumerate(schedule)]
        length = max(z.shape[0] for entries in encoded.values() for _, z in entries)
        padded = {
            prompt: [(end, _repeat_last(z, length)) for end, z in entries]
            for prompt, entries in encoded.items()
        }
        return ScheduledConditioning([padded[prompt] for prompt in prompts])


def _repeat_last(z: torch.Tensor, length: int) -> torch.Tensor:
    """z [T, width] extended to [length, width] by repeating its last vector."""
    return torch.cat([z, z[-1:].expand(length - z.shape[0], -1)]) if z.shape[0] < length else z


def encode_conditioning(
    encoder: PromptEncoder, prompts: list[str], negative_prompts: list[str], steps: int
) -> tuple[ScheduledConditioning, ScheduledConditioning]:
    """(conditioning, unconditioning) for a batch, as the samplers take them, padded to the same length.

    Extra-network tags (`<lora:name:0.8>`) are removed from the prompts first (A1111 leaves the negative
    prompts' tags as text). The shorter of the two is padded with the empty prompt's encoding, chunk by
    chunk (A1111's "Pad prompt/negative prompt").
    """
    if len(prompts) != len(negative_prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    cond = encoder.schedule([extract_extra_networks(p)[0] for p in prompts], steps)
    uncond = encoder.schedule(negative_prompts, steps)
    if cond.shape[1] == uncond.shape[1]:
        return cond, uncond
    empty = encoder.encode([""])[0]
    length = max(cond.shape[1], uncond.shape[1])
    return cond.padded(length, empty), uncond.padded(length, empty)
