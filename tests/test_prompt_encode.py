"""PromptEncoder: chunking, emphasis, BREAK, clip skip, embeddings, padding; plain prompts stay bit-exact."""

import copy

import pytest
import torch
from omegaconf import OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.bundled import BUNDLED
from ldm.checkpoint import load_model_from_config
from ldm.modules.encoders.modules import VIT_L14_TEXT_CONFIG, FrozenCLIPEmbedder
from ldm.prompts import Embedding, PromptEncoder, ScheduledConditioning, encode_conditioning
from ldm.util import instantiate_from_config

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128)
BOS, EOS, COMMA, CAT, DOG = 49406, 49407, 267, 2368, 1929
V1_CONFIG = "configs/stable-diffusion/v1-inference.yaml"


@pytest.fixture(scope="module")
def clip() -> FrozenCLIPEmbedder:
    torch.manual_seed(0)
    encoder = FrozenCLIPEmbedder(text_model_config=SMALL)
    with torch.no_grad():  # CLIP's init leaves biases zero and layer norms identity; make every weight count
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return encoder


@pytest.fixture(scope="module")
def shapes_model():
    return load_model_from_config(
        OmegaConf.load(BUNDLED["shapes"].config), BUNDLED["shapes"].ckpt, verbose=False
    )


@pytest.fixture(scope="module")
def v1_clip() -> FrozenCLIPEmbedder:
    """The full-size SD v1 text encoder of configs/stable-diffusion/v1-inference.yaml, random weights."""
    torch.manual_seed(0)
    return instantiate_from_config(OmegaConf.load(V1_CONFIG).model.params.cond_stage_config)


PLAIN_PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse on mars, trending on artstation, 4k",
    "<b>x</b> &lt;y&gt; naïve café",
    " ".join(["cat"] * 75),  # exactly one full chunk
    "",
]


def test_plain_prompts_equal_get_learned_conditioning_bit_for_bit(shapes_model):
    encoder = PromptEncoder(shapes_model.cond_stage_model)
    with torch.no_grad():
        for prompt in PLAIN_PROMPTS:
            assert torch.equal(encoder.encode([prompt]), shapes_model.get_learned_conditioning([prompt]))
        batch = PLAIN_PROMPTS[:3]
        assert torch.equal(encoder.encode(batch), shapes_model.get_learned_conditioning(batch))


def test_plain_prompts_equal_the_full_size_encoder_bit_for_bit(v1_clip):
    encoder = PromptEncoder(v1_clip)
    with torch.no_grad():
        for prompt in PLAIN_PROMPTS[:2]:
            assert torch.equal(encoder.encode([prompt]), v1_clip.encode([prompt]))


def test_long_prompts_on_the_full_size_config(v1_clip):
    """150 prompt tokens take 2 chunks, 200 negative tokens 3; both come out 3 chunks = 231 tokens."""
    words = ["cat", "dog", "red", "blue", "house"]  # one token each
    prompt = " ".join(words[i % 5] for i in range(150))
    negative = " ".join(words[i % 3] for i in range(200))
    encoder = PromptEncoder(v1_clip)
    c, uc = encode_conditioning(encoder, [prompt], [negative], steps=20)
    assert c.shape == uc.shape == (1, 231, 768)
    assert c.is_constant and uc.is_constant
    with torch.no_grad():
        # each chunk went through CLIP on its own: chunk k is the plain encoding of its 75 words
        for k in range(2):
            chunk_text = " ".join(words[i % 5] for i in range(75 * k, 75 * k + 75))
            assert torch.equal(c.at(0)[:, 77 * k : 77 * (k + 1)], v1_clip.encode([chunk_text]))
        assert torch.equal(c.at(0)[:, 154:], v1_clip.encode([""]))  # padded with the empty prompt
        last = " ".join(words[i % 3] for i in range(150, 200))
        assert torch.equal(uc.at(0)[:, 154:], v1_clip.encode([last]))


def test_long_prompts_on_the_bundled_model(shapes_model):
    prompt = ", ".join(["a red circle on a white background"] * 20)  # 159 tokens
    negative = " ".join(["blurry"] * 200)
    encoder = PromptEncoder(shapes_model.cond_stage_model)
    assert sum(len(ids) for ids in shapes_model.cond_stage_model.token_ids([prompt])) == 159
    c, uc = encode_conditioning(encoder, [prompt, "a blue square"], [negative, ""], steps=10)
    assert c.shape == uc.shape == (2, 231, 64)
    assert torch.isfinite(c.at(0)).all() and torch.isfinite(uc.at(0)).all()


def chunk_ids(encoder: PromptEncoder, text: str) -> list[list[int]]:
    return [chunk.tokens for chunk in encoder.chunks(text)]


def test_chunks_split_at_the_last_comma_within_20_tokens(clip):
    encoder = PromptEncoder(clip)
    # 60 cats, a comma, 20 dogs: the 75-token boundary falls 15 tokens after the comma -> split after it
    ids = chunk_ids(encoder, "cat " * 60 + ", " + "dog " * 20)
    assert ids == [
        [BOS, *[CAT] * 60, COMMA, *[EOS] * 14, EOS],
        [BOS, *[DOG] * 20, *[EOS] * 55, EOS],
    ]
    # comma 25 tokens before the boundary: too far back, the chunk is cut at 75 tokens
    ids = chunk_ids(encoder, "cat " * 50 + ", " + "dog " * 30)
    assert ids == [[BOS, *[CAT] * 50, COMMA, *[DOG] * 24, EOS], [BOS, *[DOG] * 6, *[EOS] * 69, EOS]]
    assert len(chunk_ids(PromptEncoder(clip, comma_backtrack=0), "cat " * 60 + ", " + "dog " * 20)[0]) == 77


def test_break_starts_a_new_chunk(clip):
    encoder = PromptEncoder(clip)
    assert chunk_ids(encoder, "cat BREAK dog") == [
        [BOS, CAT, *[EOS] * 75],
        [BOS, DOG, *[EOS] * 75],
    ]
    assert len(encoder.chunks("cat BREAK")) == 1  # a trailing BREAK adds nothing
    assert len(encoder.chunks("BREAK cat")) == 2  # a leading one leaves an empty first chunk


def test_emphasis_scales_token_outputs_and_restores_the_mean(clip):
    """A1111's "Original" emphasis, transcribed: z * w per token, then z * (mean before / mean after)."""
    encoder = PromptEncoder(clip)
    chunks = encoder.chunks("a (cat:1.5) on [a mat]")
    assert chunks[0].tokens == encoder.chunks("a cat on a mat")[0].tokens  # brackets are not tokens
    weights = torch.tensor(chunks[0].weights)
    assert weights[:7].tolist() == pytest.approx([1, 1, 1.5, 1, 1 / 1.1, 1 / 1.1, 1])
    with torch.no_grad():
        z = clip.encode_tokens(torch.tensor([chunks[0].tokens]))
        expected = z * weights[None, :, None]
        expected = expected * (z.mean() / expected.mean())
        torch.testing.assert_close(encoder.encode(["a (cat:1.5) on [a mat]"]), expected, rtol=0, atol=1e-6)


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_norm(clip):
    """Reference: transformers' CLIPTextModel with one layer fewer and the same weights."""
    config = CLIPTextConfig(
        **{**VIT_L14_TEXT_CONFIG, **SMALL, "num_hidden_layers": SMALL["num_hidden_layers"] - 1}
    )
    reference = CLIPTextModel(config).eval()
    target = getattr(reference, "text_model", reference)
    state = {k.removeprefix("transformer.text_model."): v for k, v in clip.state_dict().items()}
    target.load_state_dict({k: v for k, v in state.items() if k in target.state_dict()}, strict=False)
    prompt = "a photo of a cat"
    ids = clip.tokenize([prompt])
    with torch.no_grad():
        ours = PromptEncoder(clip, clip_skip=2).encode([prompt])
        theirs = reference(input_ids=ids).last_hidden_state
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        assert not torch.allclose(ours, PromptEncoder(clip).encode([prompt]))
    with pytest.raises(ValueError, match="clip_skip"):
        clip.encode_tokens(ids, clip_skip=4)


def test_embeddings_take_their_vectors_token_slots(clip):
    """Reference: the same encoder with two spare vocabulary rows set to the embedding's vectors."""
    torch.manual_seed(3)
    vectors = torch.randn(2, 64)
    encoder = PromptEncoder(clip, {"my-style": Embedding("my-style", vectors, None)})
    chunk = encoder.chunks("a cat, my-style")[0]
    assert chunk.tokens[:6] == [BOS, 320, CAT, COMMA, 0, 0] and chunk.tokens[6] == EOS
    assert [(p, e.name) for p, e in chunk.embeddings] == [(4, "my-style")]
    reference = copy.deepcopy(clip)
    spare = [49400, 49401]
    with torch.no_grad():
        reference.transformer.text_model.embeddings.token_embedding.weight[spare] = vectors
        ids = torch.tensor([[BOS, 320, CAT, COMMA, *spare, *[EOS] * 71]])
        torch.testing.assert_close(
            encoder.encode(["a cat, my-style"]), reference.encode_tokens(ids), rtol=0, atol=0
        )
        # a trigger word that is not in the prompt changes nothing
        assert torch.equal(encoder.encode(["a cat"]), clip.encode(["a cat"]))


def test_a_multi_vector_embedding_moves_to_the_next_chunk_when_it_does_not_fit(clip):
    encoder = PromptEncoder(clip, {"wide": Embedding("wide", torch.zeros(4, 64), None)})
    chunks = encoder.chunks("cat " * 73 + "wide")
    assert chunks[0].tokens == [BOS, *[CAT] * 73, EOS, EOS, EOS]
    assert chunks[1].tokens[:6] == [BOS, 0, 0, 0, 0, EOS]
    assert [p for p, _ in chunks[1].embeddings] == [1]


def test_an_embedding_after_the_last_comma_moves_with_its_words(clip):
    """(A1111 leaves the embedding's splice behind in the first chunk here, over its padding; we move it.)"""
    encoder = PromptEncoder(clip, {"wide": Embedding("wide", torch.zeros(2, 64), None)})
    chunks = encoder.chunks("cat " * 60 + ", wide " + "dog " * 20)
    assert chunks[0].tokens == [BOS, *[CAT] * 60, COMMA, *[EOS] * 15]
    assert chunks[0].embeddings == []
    assert chunks[1].tokens[:24] == [BOS, 0, 0, *[DOG] * 20, EOS]
    assert [p for p, _ in chunks[1].embeddings] == [1]


def test_prompts_of_different_lengths_in_a_batch(clip):
    encoder = PromptEncoder(clip)
    cond = encoder.schedule(["cat " * 100, "dog"], steps=5)
    assert cond.shape == (2, 154, 64)
    z = cond.at(0)
    with torch.no_grad():
        assert torch.equal(z[1, :77], encoder.encode(["dog"])[0])
    assert torch.equal(z[1, 77:], z[1, 76:77].expand(77, -1))  # A1111's stack_conds: last vector repeated


def test_prompt_editing_encodes_each_text(clip):
    encoder = PromptEncoder(clip)
    cond = encoder.schedule(["a [red:blue:0.5] ball", "a green ball"], steps=10)
    assert isinstance(cond, ScheduledConditioning) and not cond.is_constant
    assert cond.end_steps() == [[5, 10], [10]]
    with torch.no_grad():
        red, blue = encoder.encode(["a red ball", "a blue ball"]).chunk(2)
        green = encoder.encode(["a green ball"])
    for step in range(6):
        assert torch.equal(cond.at(step), torch.cat([red, green]))
    for step in range(6, 10):
        assert torch.equal(cond.at(step), torch.cat([blue, green]))


def test_extra_network_tags_are_not_encoded(clip):
    encoder = PromptEncoder(clip)
    c, _ = encode_conditioning(encoder, ["a cat <lora:grain:0.7>"], [""], steps=4)
    with torch.no_grad():
        assert torch.equal(c.at(0), encoder.encode(["a cat "]))
