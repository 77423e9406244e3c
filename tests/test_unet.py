"""The SD v1 UNet: checkpoint layout, agreement with diffusers, checkpointing, attention variants."""

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.attention import CrossAttention, SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, ResBlock, UNetModel
from ldm.modules.diffusionmodules.util import GroupNorm32, checkpoint, timestep_embedding

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "model.diffusion_model."

V1_DIFFUSERS_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)

# Reduced SD-like UNet: attention at the first two levels, heads of 16 channels, two transformer layers.
SMALL_KWARGS = dict(
    image_size=16,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 2],
    num_head_channels=16,
    use_spatial_transformer=True,
    transformer_depth=2,
    context_dim=32,
    legacy=False,
)
SMALL_DIFFUSERS_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=(2, 4, 4),
    transformer_layers_per_block=2,
)

TINY_KWARGS = dict(
    image_size=8,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[1],
    num_res_blocks=1,
    channel_mult=[1, 2],
    num_heads=2,
    use_spatial_transformer=True,
    context_dim=16,
    legacy=False,
)


def v1_unet_config():
    return OmegaConf.load(ROOT / "configs/stable-diffusion/v1-inference.yaml").model.params.unet_config.params


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Non-trivial random weights (zero-initialized convs included): norms ~1, weights ~1/sqrt(fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm)}
    state = {}
    for name, p in model.named_parameters():
        module, leaf = name.rsplit(".", 1)
        t = torch.randn(p.shape, generator=gen)
        if module in norms:
            t = 1 + 0.1 * t if leaf == "weight" else 0.1 * t
        elif t.ndim > 1:
            t = t / math.sqrt(p[0].numel())
        else:
            t = 0.05 * t
        state[name] = t
    return state


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    model.load_state_dict(random_state_dict(model, seed), assign=True)
    return model.eval()


def assert_matches_diffusers(ours_kwargs, diffusers_config, size, context_dim, timesteps):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        ours = UNetModel(**ours_kwargs)
        theirs = UNet2DConditionModel(**diffusers_config)
    state = random_state_dict(ours)
    ours.load_state_dict(state, assign=True)
    converted = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in state.items()}, diffusers_config)
    theirs.load_state_dict(converted, assign=True)
    ours.eval()
    theirs.eval()

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, size, size, generator=gen)
    context = torch.randn(1, 77, context_dim, generator=gen)
    diffs = []
    with torch.no_grad():
        for t in timesteps:
            t = torch.tensor([t])
            ours_out = ours(x, t, context=context)
            theirs_out = theirs(x, t, encoder_hidden_states=context).sample
            assert ours_out.shape == (1, 4, size, size)
            assert ours_out.std() > 0.1  # the comparison is not between two near-zero outputs
            diffs.append((ours_out - theirs_out).abs().max().item())
    print(f"max abs diff vs diffusers: {diffs}")
    assert max(diffs) <= 1e-4


def test_v1_keys_and_shapes_match_manifest():
    manifest = json.loads((ROOT / "tests/data/sd-v1-state-dict-manifest.json").read_text())
    expected = {e["key"][len(PREFIX) :]: e["shape"] for e in manifest["keys"] if e["key"].startswith(PREFIX)}
    with torch.device("meta"):
        unet = UNetModel(**v1_unet_config())
    ours = {k: list(v.shape) for k, v in unet.state_dict().items()}
    assert len(ours) == len(expected) == 686
    assert ours == expected
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


@pytest.mark.slow
def test_matches_diffusers_sd_v1_full_width():
    kwargs = dict(v1_unet_config())
    assert_matches_diffusers(kwargs, V1_DIFFUSERS_CONFIG, size=16, context_dim=768, timesteps=[999.0, 37.5])


def test_matches_diffusers_reduced():
    assert_matches_diffusers(
        SMALL_KWARGS, SMALL_DIFFUSERS_CONFIG, size=16, context_dim=32, timesteps=[999.0, 899.1, 537.3, 1]
    )


def test_output_depends_on_fractional_timestep_and_context():
    unet = randomized(UNetModel(**TINY_KWARGS))
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 16)
    with torch.no_grad():
        base = unet(x, torch.tensor([899.1]), context)
        assert (base - unet(x, torch.tensor([899.0]), context)).abs().max() > 1e-4
        assert (base - unet(x, torch.tensor([899.1]), context.flip(1) * 2)).abs().max() > 1e-2
        int_t = unet(x, torch.tensor([899]), context)
        assert torch.equal(int_t, unet(x, torch.tensor([899.0]), context))


def test_checkpointing_same_output_and_gradients():
    plain = randomized(UNetModel(**TINY_KWARGS)).train()
    ckpt = UNetModel(**TINY_KWARGS, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.5]), torch.randn(2, 77, 16)

    calls = {"plain": 0, "ckpt": 0}
    plain.input_blocks[1][0].in_layers.register_forward_hook(
        lambda *_: calls.__setitem__("plain", calls["plain"] + 1)
    )
    ckpt.input_blocks[1][0].in_layers.register_forward_hook(
        lambda *_: calls.__setitem__("ckpt", calls["ckpt"] + 1)
    )

    outputs, grads = [], []
    for model in (plain, ckpt):
        out = model(x, t, context)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert calls == {"plain": 1, "ckpt": 2}  # checkpointed blocks are recomputed in the backward pass
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)

    with torch.no_grad():
        ckpt(x, t, context)
    assert calls["ckpt"] == 3  # no recomputation when no gradients are recorded


def test_checkpoint_helper_only_with_grad():
    seen = []

    def f(a):
        seen.append(torch.is_grad_enabled())
        return a * a

    a = torch.ones(3, requires_grad=True)
    checkpoint(f, (a,), [], True).sum().backward()
    assert seen == [True, True] and torch.equal(a.grad, torch.full((3,), 2.0))
    with torch.no_grad():
        checkpoint(f, (a,), [], True)
    assert len(seen) == 3


def test_timestep_embedding():
    t = torch.tensor([0.0, 1.0, 899.1, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)], dtype=torch.float64)
    args = t.double()[:, None] * freqs
    expected = torch.cat([args.cos(), args.sin()], dim=1).float()
    assert emb.dtype == torch.float32 and emb.shape == (4, 8)
    torch.testing.assert_close(emb, expected, rtol=0, atol=2e-4)
    assert timestep_embedding(t.half(), 8).dtype == torch.float32
    odd = timestep_embedding(t, 9)
    assert odd.shape == (4, 9) and torch.equal(odd[:, :8], emb) and not odd[:, 8].any()
    assert torch.equal(timestep_embedding(t, 3, repeat_only=True), t[:, None].expand(4, 3))


def test_group_norm_runs_in_fp32():
    norm = GroupNorm32(4, 8)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 8, 5, 5) * 300 + 100
    expected = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    # bf16 on the CPU: torch's mixed-dtype kernel, the fp32 computation rounded once (up to its sums' order)
    via_fp32 = torch.nn.functional.group_norm(x.bfloat16().float(), 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(out, via_fp32.bfloat16(), rtol=2**-7, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x.bfloat16()).equal(out)
    norm.bfloat16()  # weights in low precision too (a model cast with .to(bfloat16))
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_channels_last_and_bf16_autocast():
    unet = randomized(UNetModel(**TINY_KWARGS))
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 999.0]), torch.randn(2, 77, 16)
    with torch.no_grad():
        ref = unet(x, t, context)
        out = unet.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, context)
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = unet(x, t, context)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_use_fp16_torso():
    unet = randomized(UNetModel(**TINY_KWARGS))
    half = UNetModel(**TINY_KWARGS, use_fp16=True).eval()
    half.load_state_dict(unet.state_dict())
    assert half.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert half.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32
    assert half.time_embed[0].weight.dtype == torch.float32
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 16)
    with torch.no_grad():
        ref, out = unet(x, t, context), half(x, t, context)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-2)
    half.convert_to_fp32()
    assert all(p.dtype == torch.float32 for p in half.parameters())


def reference_attention(q, k, v, mask=None):
    """Softmax attention the way the original writes it: q, k, v [B, T, C] -> [B, T, C]."""
    weight = torch.einsum("btc,bsc->bts", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        weight = weight.masked_fill(~mask, -torch.finfo(weight.dtype).max)
    return torch.einsum("bts,bsc->btc", weight.softmax(dim=-1), v)


def test_cross_attention_matches_softmax_reference():
    torch.manual_seed(0)
    attn = CrossAttention(24, context_dim=10, heads=3, dim_head=8).eval()
    x, context = torch.randn(2, 7, 24), torch.randn(2, 5, 10)
    mask = torch.tensor([[True, True, False, True, False], [True] * 5])

    def split(t):
        return t.reshape(2, -1, 3, 8).transpose(1, 2).reshape(6, -1, 8)

    q, k, v = split(attn.to_q(x)), split(attn.to_k(context)), split(attn.to_v(context))
    for m in (None, mask):
        out = reference_attention(q, k, v, None if m is None else m.repeat_interleave(3, 0)[:, None])
        expected = attn.to_out(out.reshape(2, 3, 7, 8).transpose(1, 2).reshape(2, 7, 24))
        torch.testing.assert_close(attn(x, context, mask=m), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn(x[:1], context[:1], mask=mask[:1]), attn(x[:1], context[:1, [0, 1, 3]]))


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_matches_reference(new_order):
    torch.manual_seed(0)
    block = AttentionBlock(64, num_head_channels=16, use_new_attention_order=new_order).eval()
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    x = torch.randn(2, 64, 3, 5)
    flat = x.reshape(2, 64, 15)
    qkv = block.qkv(block.norm(flat))
    if new_order:
        q, k, v = (t.reshape(8, 16, 15) for t in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(8, 48, 15).split(16, dim=1)
    a = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    expected = (flat + block.proj_out(a.reshape(2, 64, 15))).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def attention_layers(unet):
    return [m for m in unet.modules() if isinstance(m, AttentionBlock | SpatialTransformer)]


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("new_order", [False, True])
def test_class_conditional_attention_block_unet(legacy, new_order):
    unet = UNetModel(
        image_size=8,
        in_channels=3,
        model_channels=32,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=[2],
        channel_mult=[1, 2, 2],
        num_classes=10,
        num_heads=4,
        num_heads_upsample=2,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=new_order,
        legacy=legacy,
    ).eval()
    blocks = attention_layers(unet)
    assert len(blocks) == 4 and all(isinstance(b, AttentionBlock) for b in blocks)
    # legacy passes num_heads_upsample to the decoder's blocks; otherwise num_heads sets the head width
    assert [b.num_heads for b in blocks] == ([4, 4, 2, 2] if legacy else [4, 4, 4, 4])
    assert any(isinstance(m, ResBlock) and m.updown for m in unet.modules())
    randomized(unet)
    x = torch.randn(2, 3, 8, 8)
    y = torch.tensor([1, 7])
    with torch.no_grad():
        out = unet(x, torch.tensor([5, 500]), y=y)
        assert out.shape == (2, 6, 8, 8)
        assert (out - unet(x, torch.tensor([5, 500]), y=torch.tensor([2, 7]))).abs()[0].max() > 1e-4
    with pytest.raises(ValueError):
        unet(x, torch.tensor([5, 500]))


def test_num_head_channels_and_legacy_head_arithmetic():
    def heads(**kwargs):
        unet = UNetModel(
            image_size=8,
            in_channels=4,
            model_channels=32,
            out_channels=4,
            num_res_blocks=1,
            attention_resolutions=[1, 2],
            channel_mult=[1, 2],
            **kwargs,
        )
        return [
            (b.transformer_blocks[0].attn1.heads, b.transformer_blocks[0].attn1.to_q.out_features)
            if isinstance(b, SpatialTransformer)
            else (b.num_heads, b.channels)
            for b in attention_layers(unet)
        ]

    def per_head(layers):
        return [(n, width // n) for n, width in layers]

    st = dict(use_spatial_transformer=True, context_dim=8)
    # layers at channels 32 (input), 64 (input), 64 (middle), 64, 64, 32, 32 (output); (heads, head width)
    assert (
        per_head(heads(num_head_channels=16, **st, legacy=False)) == [(2, 16)] + [(4, 16)] * 4 + [(2, 16)] * 2
    )
    assert per_head(heads(num_heads=4, **st, legacy=True)) == [(4, 8)] + [(4, 16)] * 4 + [(4, 8)] * 2
    assert per_head(heads(num_head_channels=8)) == [(4, 8)] + [(8, 8)] * 4 + [(4, 8)] * 2
    assert per_head(heads(num_heads=2)) == [(2, 16)] + [(2, 32)] * 4 + [(2, 16)] * 2


def test_codebook_head():
    unet = UNetModel(
        image_size=8,
        in_channels=4,
        model_channels=32,
        out_channels=4,
        num_res_blocks=1,
        attention_resolutions=[2],
        channel_mult=[1, 2],
        num_heads=2,
        use_spatial_transformer=True,
        context_dim=8,
        n_embed=17,
    ).eval()
    assert unet.state_dict()["id_predictor.1.weight"].shape == (17, 32, 1, 1)
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), context=torch.randn(1, 3, 8))
    assert out.shape == (1, 17, 8, 8)
