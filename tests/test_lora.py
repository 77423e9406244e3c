"""LoRA: kohya and diffusers files merged into our weights agree with diffusers' load_lora_weights + fuse_lora on
the same base weights; several add; removal restores every tensor bit for bit; bad files are one-line errors."""

import json
import warnings

import pytest
import safetensors.torch
import torch
from adapters_common import diffusers_twin, inputs, outputs_diffusers, outputs_ours, tiny_model

from ldm.adapters.diffusers_layout import KeyMap, Structure
from ldm.adapters.lora import LoraSet, apply_loras, lora_hash, lora_hashes, parse_lora_arg
from ldm.errors import UserError
from ldm.runtime.bf16 import cpu_has_native_bf16

# layers a LoRA of each kind touches: attention and feed-forward linears, 1x1 conv projections, 3x3 resnet convs
# (LoCon), time-embedding linears, 1x1 shortcuts; q/v/out projections and the MLP of the text encoder
UNET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
               "proj_in", "proj_out", "in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection")  # fmt: skip
TEXT_LAYERS = ("q_proj", "v_proj", "self_attn.out_proj", "fc1", "fc2")


def random_kohya_lora(model, path, seed: int, rank: int = 4, alpha: float = 3.0) -> None:
    """A kohya-format LoRA (`lora_unet_*` / `lora_te_*`, diffusers layer names with `_`) with random factors,
    for the layers of UNET_LAYERS and TEXT_LAYERS. One alpha for all layers: diffusers 0.42 drops per-layer alphas
    of kohya attention layers (its alpha names do not match its own module names), so only then is it a
    reference (per-layer alphas are tested below against the formula)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    key_map = KeyMap(Structure.from_ours(shapes))
    tensors = {}
    for key, shape in shapes.items():
        module = key.removesuffix(".weight")
        unet = key.startswith("model.") and module.endswith(UNET_LAYERS)
        if not key.endswith(".weight") or not (unet or module.endswith(TEXT_LAYERS)) or len(shape) < 2:
            continue
        component, theirs = key_map.to_diffusers(key)
        prefix = "lora_unet_" if component == "unet" else "lora_te_"
        name = prefix + theirs.removesuffix(".weight").replace(".", "_")
        kernel = shape[2:]
        fan_in = shape[1] * (kernel[0] * kernel[1] if kernel else 1)
        down = torch.randn(rank, shape[1], *kernel, generator=generator) / fan_in**0.5
        up = torch.randn(shape[0], rank, *([1] * len(kernel)), generator=generator) * 0.3
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    safetensors.torch.save_file(tensors, path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model, config = tiny_model()
    return model, config, tmp_path_factory.mktemp("lora")


def fused_diffusers(model, config, folder, loras):
    """diffusers' pipeline on the same weights with `loras` [(path, weight)] loaded and fused."""
    pipe = diffusers_twin(model, config, folder / "pipeline")
    names = [f"lora{i}" for i in range(len(loras))]
    for (path, _), name in zip(loras, names, strict=True):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    pipe.fuse_lora(adapter_names=names)
    return pipe


def assert_same(ours, theirs, base_ours):
    for name in ("eps", "text"):
        difference = (ours[name] - theirs[name]).abs().max().item()
        change = (ours[name] - base_ours[name]).abs().max().item()
        print(f"{name}: |ours - diffusers| {difference:.1e}, change by the LoRA {change:.2f}")
        assert change > 0.05  # the LoRA changes the output, so agreement means something
        assert difference <= 1e-4


def test_kohya_lora_matches_diffusers_and_is_removed_exactly(base):
    model, config, folder = base
    path = folder / "a.safetensors"
    random_kohya_lora(model, path, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, context = inputs()
    plain = outputs_ours(model, x, t, context)

    handle = apply_loras(model, [(path, 0.7)], verbose=False)
    ours = outputs_ours(model, x, t, context)
    theirs = outputs_diffusers(
        fused_diffusers(base_model(before), config, folder, [(path, 0.7)]), x, t, context
    )
    assert_same(ours, theirs, plain)

    handle.remove()
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def base_model(state):
    """A tiny model holding the weights `state` (diffusers must start from the LoRA-free weights)."""
    model, _ = tiny_model()
    model.load_state_dict(state)
    return model


def test_two_loras_add_up_as_in_diffusers(base):
    model, config, folder = base
    a, b = folder / "a2.safetensors", folder / "b2.safetensors"
    random_kohya_lora(model, a, seed=2)
    random_kohya_lora(model, b, seed=3, rank=2, alpha=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, context = inputs()
    plain = outputs_ours(model, x, t, context)
    loras = LoraSet(model)
    loras.use([(a, 0.8), (b, -0.5)], verbose=False)
    ours = outputs_ours(model, x, t, context)
    theirs = outputs_diffusers(
        fused_diffusers(base_model(before), config, folder, [(a, 0.8), (b, -0.5)]), x, t, context
    )
    assert_same(ours, theirs, plain)

    loras.use([(a, 0.8)], verbose=False)  # another set: the previous one is undone first
    alone = apply_loras(base_model(before), [(a, 0.8)], verbose=False).model.state_dict()
    assert all(torch.equal(model.state_dict()[k], alone[k]) for k in alone)
    loras.clear()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_diffusers_format_lora_loads(base):
    """A LoRA saved by diffusers (PEFT `lora_A`/`lora_B` keys, alphas in the file's metadata) gives the same
    weights as the kohya file it was converted from."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    model, config, folder = base
    kohya = folder / "k.safetensors"
    random_kohya_lora(model, kohya, seed=4)
    pipe = diffusers_twin(model, config, folder / "pipeline")
    pipe.load_lora_weights(str(kohya), adapter_name="k")
    StableDiffusionPipeline.save_lora_weights(
        folder / "saved",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="k"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="k"),
        unet_lora_adapter_metadata=pipe.unet.peft_config["k"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["k"].to_dict(),
    )
    saved = folder / "saved" / "pytorch_lora_weights.safetensors"
    keys = list(safetensors.torch.load_file(saved))
    assert any(".lora_A." in k for k in keys) and all(k.startswith(("unet.", "text_encoder.")) for k in keys)

    with_kohya = apply_loras(model, [(kohya, 0.6)], verbose=False)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with_kohya.remove()
    with_diffusers = apply_loras(model, [(saved, 0.6)], verbose=False)
    got = model.state_dict()
    worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
    with_diffusers.remove()
    assert set(with_diffusers.loras) == {(str(saved), 0.6)}
    assert worst <= 1e-6


def test_compvis_layer_names_and_unknown_keys(base, tmp_path):
    model, _, _ = base
    generator = torch.Generator().manual_seed(5)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    out, inp = model.state_dict()[key].shape[:2]
    down, up = torch.randn(2, inp, 1, 1, generator=generator), torch.randn(out, 2, 1, 1, generator=generator)
    path = tmp_path / "compvis.safetensors"
    safetensors.torch.save_file(
        {
            "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": down,
            "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": up,
            "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(1.0),
            "lora_unet_nonexistent_layer.lora_down.weight": down.clone(),
            "lora_unet_input_blocks_1_1_proj_in.hada_w1_a": down.clone(),
        },  # fmt: skip
        path,
    )
    before = model.state_dict()[key].clone()
    with pytest.warns(UserWarning, match="skipped 2 tensors"):
        handle = apply_loras(model, [(path, 1.0)], verbose=False)
    expected = before + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(before.shape)
    assert torch.allclose(model.state_dict()[key], expected, atol=1e-6)
    handle.remove()


def test_lora_for_another_architecture_is_one_line_error(base, tmp_path):
    model, _, _ = base
    sdxl = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file(
        {
            "lora_unet_output_blocks_9_1_transformer_blocks_3_attn1_to_q.lora_down.weight": torch.zeros(
                4, 640
            ),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4),
        },  # fmt: skip
        sdxl,
    )
    with pytest.raises(UserError, match="no layer of this model") as error:
        apply_loras(model, [(sdxl, 1.0)], verbose=False)
    assert "\n" not in str(error.value)
    wide = tmp_path / "wide.safetensors"  # SD 2.x: a 1024-wide context for cross-attention
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    safetensors.torch.save_file(
        {f"{name}.lora_down.weight": torch.zeros(4, 1024), f"{name}.lora_up.weight": torch.zeros(32, 4)}, wide
    )
    with pytest.raises(UserError, match="does not fit this model"):
        apply_loras(model, [(wide, 1.0)], verbose=False)
    kernel = tmp_path / "kernel.safetensors"  # a 3x3 LoCon pair for a 1x1 projection
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    safetensors.torch.save_file(
        {
            f"{name}.lora_down.weight": torch.zeros(4, 32, 3, 3),
            f"{name}.lora_up.weight": torch.zeros(32, 4, 1, 1),
        },
        kernel,
    )
    with pytest.raises(UserError, match="cannot add to"):
        apply_loras(model, [(kernel, 1.0)], verbose=False)
    truncated = tmp_path / "truncated.safetensors"
    random_kohya_lora(model, truncated, seed=6)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        apply_loras(model, [(truncated, 1.0)], verbose=False)


def test_lora_hash_is_a1111s_addnet_hash(tmp_path):
    """A1111's `Lora hashes` value: sha256 of the bytes after the safetensors header, first 12 hex digits;
    metadata edits leave it unchanged."""
    import hashlib

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tensors = {"w": torch.arange(10.0)}
    safetensors.torch.save_file(tensors, a, metadata={"ss_note": "one"})
    safetensors.torch.save_file(tensors, b, metadata={"ss_note": "a longer note"})
    data = a.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert lora_hash(a) == hashlib.sha256(data[8 + header :]).hexdigest()[:12]
    assert lora_hash(a) == lora_hash(b) and a.read_bytes() != b.read_bytes()
    assert lora_hashes([a, b]) == f"a: {lora_hash(a)}, b: {lora_hash(b)}"
    ckpt = tmp_path / "c.pt"
    torch.save(tensors, ckpt)
    assert lora_hash(ckpt) == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:12]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("x.safetensors", ("x.safetensors", 1.0)),
        ("x.safetensors:0.5", ("x.safetensors", 0.5)),
        ("dir/x:-1", ("dir/x", -1.0)),
        ("C:\\loras\\x.safetensors", ("C:\\loras\\x.safetensors", 1.0)),
    ],  # fmt: skip
)
def test_parse_lora_arg(value, expected):
    assert parse_lora_arg(value) == expected


def test_warning_is_one_per_file(base, tmp_path):
    model, _, _ = base
    path = tmp_path / "extra.safetensors"
    random_kohya_lora(model, path, seed=7)
    tensors = safetensors.torch.load_file(path)
    tensors.update({f"lora_unet_unknown_{i}.lora_down.weight": torch.zeros(1) for i in range(3)})
    safetensors.torch.save_file(tensors, path, metadata={"note": json.dumps({"x": 1})})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_loras(model, [(path, 1.0)], verbose=False).remove()
    assert [str(w.message) for w in caught] == [
        "LoRA extra.safetensors: skipped 3 tensors this model has no layer for"
    ]


def test_lora_sets_switched_on_packed_layers_give_the_plain_models_eps(base):
    """The CPU fast paths pack weights once (`ldm.runtime.fast_paths`): switching LoRA sets between batches (new
    merged tensors, freed and allocated again) repacks, so each set's eps are the plain model's."""
    import copy

    from ldm.heap import keep_freed_memory
    from ldm.runtime.fast_paths import use_packed_linears

    model, _, folder = base
    keep_freed_memory()  # as the scripts run: freed blocks come back for the next tensors of the same size
    fast, plain = copy.deepcopy(model), copy.deepcopy(model)
    assert use_packed_linears(fast.model.diffusion_model, {torch.float32}) > 10
    paths = [folder / "switch_a.safetensors", folder / "switch_b.safetensors"]
    for seed, path in enumerate(paths):
        random_kohya_lora(model, path, seed=10 + seed)
    x, t, c = inputs()
    fast_set, plain_set = LoraSet(fast), LoraSet(plain)
    with torch.inference_mode():
        for loras in ([(paths[0], 1.0)], [(paths[1], 1.0)], [], [(paths[0], 0.5)], [(paths[1], 1.0)]):
            fast_set.use(loras, verbose=False)
            plain_set.use(loras, verbose=False)
            expected = plain.apply_model(x, t, c)
            torch.testing.assert_close(fast.apply_model(x, t, c), expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 packs only on CPUs with bf16 units")
def test_lora_sets_switched_on_packed_bf16_layers_give_a_fresh_models_eps(base):
    """bf16 as the scripts run it on CPUs with bf16 units (fp32 sources packed in bf16, convolutions prepacked,
    channels_last): after each switch of LoRA sets, exactly the eps of a model prepared afresh with that set."""
    import copy

    from ldm.heap import keep_freed_memory
    from ldm.runtime import precision_scope
    from ldm.runtime.fast_paths import apply_cpu_fast_paths, low_precision_with_fast_paths

    model, _, folder = base
    keep_freed_memory()

    def prepared():
        fresh = copy.deepcopy(model)
        apply_cpu_fast_paths(fresh)
        low_precision_with_fast_paths(fresh, torch.bfloat16)
        return fresh

    paths = [folder / "bf16_a.safetensors", folder / "bf16_b.safetensors"]
    for seed, path in enumerate(paths):
        random_kohya_lora(model, path, seed=20 + seed)
    x, t, c = inputs()
    fast = prepared()
    fast_set = LoraSet(fast)
    for loras in ([(paths[0], 1.0)], [(paths[1], 1.0)], [], [(paths[0], 0.5)], [(paths[1], 1.0)]):
        fast_set.use(loras, verbose=False)
        fresh = prepared()
        LoraSet(fresh).use(loras, verbose=False)
        with torch.inference_mode(), precision_scope("autocast", torch.device("cpu")):
            assert fast.apply_model(x, t, c).equal(fresh.apply_model(x, t, c)), loras
