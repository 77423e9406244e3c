"""FrozenCLIPEmbedder: exact CLIP tokenization offline, checkpoint key layout, numerics, frozen mode."""

import gzip
import importlib.util
import json
import os
import re

import ftfy
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders.modules import (
    VIT_L14_TEXT_CONFIG,
    ClassEmbedder,
    FrozenCLIPEmbedder,
    SpatialRescaler,
    builtin_clip_tokenizer,
)

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
BOS, EOS = 49406, 49407
MANIFEST = os.path.join(os.path.dirname(__file__), "data", "sd-v1-state-dict-manifest.json")


@pytest.fixture(scope="module")
def small() -> FrozenCLIPEmbedder:
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(text_model_config=SMALL)


def test_tokenize_a_photo_of_a_cat(small):
    ids = small.tokenize(["a photo of a cat"])
    assert ids.dtype == torch.long
    assert ids.tolist() == [[BOS, 320, 1125, 539, 320, 2368, EOS] + [EOS] * 70]


def test_tokenize_matches_open_clip_reference(small):
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    prompts = [
        "A painting of a fox, trending on ArtStation!!",
        "naïve café — 日本語 🤖 👍🏽",
        "don't   you'll\twe've 1234 3.14",
        "supercalifragilisticexpialidocious",
    ]
    ids = small.tokenize(prompts)
    for prompt, row in zip(prompts, ids.tolist(), strict=True):
        expected = [BOS, *reference.encode(prompt), EOS]
        assert row == expected + [EOS] * (77 - len(expected))


def test_text_is_cleaned_like_clip(small):
    ids = small.tokenize(["fish &amp; chips", "fish &amp;amp; chips", "ﬁsh & chips", "  FISH\n&  Chips "])
    assert ids[:, :5].tolist() == [[BOS, 2759, 261, 8855, EOS]] * 4
    # Without cleaning the entity and the ligature tokenize differently.
    raw = builtin_clip_tokenizer()(["fish &amp; chips", "ﬁsh & chips"])["input_ids"]
    assert raw[0] != [BOS, 2759, 261, 8855, EOS]
    assert raw[1] != [BOS, 2759, 261, 8855, EOS]


def _transformers4_ids(text: str) -> list[int]:
    """Ids as the original's tokenizer (transformers 4.x `CLIPTokenizer` with ftfy) gives them: its cleaning
    `whitespace_clean(ftfy.fix_text(text)).lower()`, then CLIP's BPE, here open_clip's own implementation
    applied word by word (bypassing open_clip's cleaning, which also unescapes HTML)."""
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    text = re.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()
    ids = []
    for word in reference.pat.findall(text):
        word = "".join(reference.byte_encoder[b] for b in word.encode("utf-8"))
        ids += [reference.encoder[piece] for piece in reference.bpe(word).split(" ")]
    return ids


def test_cleaning_is_the_originals_without_extra_html_unescape(small):
    from open_clip.tokenizer import SimpleTokenizer

    prompts = ["<b>x</b> &lt;y&gt;", "a &amp; b <i>", "&lt;3 cafÃ© ﬁsh &amp; chips", "  A\tB  "]
    ids = small.tokenize(prompts)
    for prompt, row in zip(prompts, ids.tolist(), strict=True):
        expected = [BOS, *_transformers4_ids(prompt), EOS]
        assert row == expected + [EOS] * (77 - len(expected))
    # open_clip's cleaning unescapes entities next to markup too, so these two differ from the original's
    assert ids[0, 1:].tolist()[: len(SimpleTokenizer().encode(prompts[0]))] != SimpleTokenizer().encode(
        prompts[0]
    )
    assert small.token_ids(prompts[:1]) == [_transformers4_ids(prompts[0])]


def test_long_prompt_is_truncated_keeping_eos(small):
    ids = small.tokenize(["cat " * 100, "a photo of a cat"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == BOS and ids[0, 76] == EOS
    assert ids[0, 1:76].tolist() == [2368] * 75


def test_builtin_tokenizer_vocabulary():
    tokenizer = builtin_clip_tokenizer()
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512
    assert tokenizer is builtin_clip_tokenizer()


def test_small_model_output_and_key_layout(small):
    z = small(["a photo of a cat", "a dog"])
    assert z.shape == (2, 77, 64) and z.dtype == torch.float32
    assert torch.isfinite(z).all()
    assert not torch.allclose(z[0], z[1])
    keys = list(small.state_dict())
    assert all(k.startswith("transformer.text_model.") for k in keys)
    assert "transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "transformer.text_model.encoder.layers.1.mlp.fc2.bias" in keys
    assert "transformer.text_model.final_layer_norm.weight" in keys
    assert torch.equal(small.encode(["a dog"]), z[1:])


def test_vit_l14_keys_and_shapes_match_manifest():
    with open(MANIFEST) as f:
        manifest = json.load(f)["keys"]
    prefix = "cond_stage_model."
    expected = {e["key"][len(prefix) :]: tuple(e["shape"]) for e in manifest if e["key"].startswith(prefix)}
    position_ids = "transformer.text_model.embeddings.position_ids"
    assert expected.pop(position_ids) == (1, 77)
    with torch.device("meta"):
        model = FrozenCLIPEmbedder()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert dict(model.named_buffers())[position_ids].shape == (1, 77)
    assert sum(p.numel() for p in model.parameters()) == 123_060_480


def test_matches_plain_transformers_clip_text_model(small):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = CLIPTextConfig(**{**VIT_L14_TEXT_CONFIG, **SMALL})
    config._attn_implementation = "eager"
    reference = CLIPTextModel(config).eval()
    target = getattr(reference, "text_model", reference)
    state = {k.removeprefix("transformer.text_model."): v for k, v in small.state_dict().items()}
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert unexpected == [] and missing in ([], ["embeddings.position_ids"])
    prompts = ["a photo of a cat", "an astronaut riding a horse on mars"]
    with torch.no_grad():
        ours = small(prompts)
        theirs = reference(input_ids=small.tokenize(prompts)).last_hidden_state
    assert (ours - theirs).abs().max() <= 1e-4


def test_frozen_stays_in_eval_mode():
    encoder = FrozenCLIPEmbedder(text_model_config=SMALL)
    parent = torch.nn.ModuleDict({"cond_stage_model": encoder, "other": torch.nn.Linear(2, 2)})
    parent.train()
    assert parent.other.training
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())


def test_trainable_when_not_frozen():
    encoder = FrozenCLIPEmbedder(freeze=False, text_model_config=SMALL)
    encoder.train()
    assert all(m.training for m in encoder.modules())
    assert all(p.requires_grad for p in encoder.parameters())
    encoder(["a cat"]).mean().backward()
    assert encoder.transformer.text_model.embeddings.token_embedding.weight.grad is not None


def test_follows_to(small):
    encoder = FrozenCLIPEmbedder(text_model_config=SMALL).to(torch.float64)
    assert encoder.device == torch.device("cpu")
    assert encoder(["a cat"]).dtype == torch.float64


def test_loads_tokenizer_and_config_from_local_directory(tmp_path, small):
    """A local directory in the hub layout (vocab.json, merges.txt, config.json) is used as is."""
    package_dir = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    with gzip.open(os.path.join(package_dir, "bpe_simple_vocab_16e6.txt.gz")) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tmp_path / "vocab.json").write_text(json.dumps(builtin_clip_tokenizer().get_vocab()))
    CLIPTextConfig(
        **{**VIT_L14_TEXT_CONFIG, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    ).save_pretrained(tmp_path)
    encoder = FrozenCLIPEmbedder(version=str(tmp_path))
    prompts = ["a photo of a cat", "ﬁsh &amp; chips", "naïve café 🤖"]
    assert torch.equal(encoder.tokenize(prompts), small.tokenize(prompts))
    assert encoder(prompts[:1]).shape == (1, 77, 32)


def test_class_embedder():
    embedder = ClassEmbedder(embed_dim=8, n_classes=10)
    c = embedder({"class": torch.tensor([3, 7])})
    assert c.shape == (2, 1, 8)
    assert torch.equal(c[:, 0], embedder.embedding.weight[[3, 7]])


def test_spatial_rescaler():
    x = torch.randn(2, 3, 16, 16)
    rescaler = SpatialRescaler(n_stages=2, method="bilinear", multiplier=0.5, in_channels=3, out_channels=5)
    assert rescaler.encode(x).shape == (2, 5, 4, 4)
    plain = SpatialRescaler(n_stages=1, method="nearest")
    assert torch.equal(plain(x), x[:, :, ::2, ::2])
