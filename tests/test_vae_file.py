"""--vae: an autoencoder file replaces exactly the first stage (every other tensor identical), in each of the
layouts VAE files come in, and is undone exactly; files that are no autoencoder for the model are one-line errors."""

import pytest
import safetensors.torch
import torch
from adapters_common import tiny_model

from ldm.adapters.diffusers_layout import KeyMap, Structure, to_diffusers_tensor
from ldm.adapters.vae import find_vae, load_vae
from ldm.errors import UserError

PREFIX = "first_stage_model."


def vae_files(tmp_path):
    """The first stage of another random tiny model, saved as VAE files come: inside a whole checkpoint, bare
    with training weights and EMA counters (.ckpt), and in diffusers' layout."""
    other, _ = tiny_model(seed=9)
    state = other.state_dict()
    first = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    whole = tmp_path / "whole.safetensors"
    safetensors.torch.save_file(state, whole)
    bare = tmp_path / "vae-ft-mse.ckpt"
    training = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)}
    counters = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(3)}
    torch.save({"state_dict": {**first, **training, **counters}, "global_step": 840000}, bare)
    key_map = KeyMap(Structure.from_ours(state))
    diffusers = {}
    for key, value in state.items():
        mapped = key_map.to_diffusers(key)
        if mapped and mapped[0] == "vae":
            diffusers[mapped[1]] = to_diffusers_tensor(key, value).contiguous()
    layout = tmp_path / "diffusion_pytorch_model.safetensors"
    safetensors.torch.save_file(diffusers, layout)
    return {k: v for k, v in state.items() if k.startswith(PREFIX)}, [whole, bare, layout]


def test_vae_file_replaces_exactly_the_first_stage(tmp_path):
    model, _ = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected, files = vae_files(tmp_path)
    for path in files:
        handle = load_vae(model, path)
        after = model.state_dict()
        for key, value in after.items():
            assert torch.equal(value, expected[key] if key.startswith(PREFIX) else before[key]), (
                path.name,
                key,
            )
        assert any(not torch.equal(after[k], before[k]) for k in expected)
        handle.remove()
        assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_vae_keeps_dtype_and_is_found_in_the_vae_folder(tmp_path):
    model, _ = tiny_model()
    model.first_stage_model.half()
    _, files = vae_files(tmp_path)
    assert find_vae("whole", tmp_path) == tmp_path / "whole.safetensors"
    load_vae(model, find_vae("whole.safetensors", tmp_path))
    assert all(p.dtype == torch.float16 for p in model.first_stage_model.parameters())
    with pytest.raises(UserError, match="not found"):
        find_vae("nothing", tmp_path)


def test_not_an_autoencoder_is_a_one_line_error(tmp_path):
    model, _ = tiny_model()
    unet_only = tmp_path / "unet.safetensors"
    safetensors.torch.save_file(
        {k: v for k, v in model.state_dict().items() if k.startswith("model.")}, unet_only
    )
    wider, _ = tiny_model()
    state = {k: v for k, v in model.state_dict().items() if k.startswith(PREFIX)}
    state[PREFIX + "decoder.conv_out.weight"] = torch.zeros(3, 64, 3, 3)
    wrong = tmp_path / "wrong.safetensors"
    safetensors.torch.save_file(state, wrong)
    evil = tmp_path / "evil.ckpt"

    class Payload:
        def __reduce__(self):
            return print, ("ran",)

    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload()}, evil)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for path, message in ((unet_only, "lacks"), (wrong, "does not fit"), (evil, "refused for safety")):
        with pytest.raises(UserError, match=message) as error:
            load_vae(model, path)
        assert "\n" not in str(error.value)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
