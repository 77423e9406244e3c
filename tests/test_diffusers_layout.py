"""The key mapping to diffusers' layout agrees with diffusers' own single-file converter on the full SD v1 layout,
and configs survive the trip to diffusers' JSON and back."""

import json

import pytest
import torch
from adapters_common import ROOT
from omegaconf import OmegaConf

from ldm.adapters.diffusers_layout import (
    KeyMap,
    Structure,
    config_from_diffusers,
    diffusers_configs,
    to_diffusers_tensor,
)

V1_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"


def test_v1_mapping_pairs_keys_as_diffusers_converter_does():
    """Each SD v1 tensor gets a distinct value; diffusers' converter and ours must put each value under the same
    diffusers key (1x1 convs of the autoencoder attention become linears in both)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    manifest = json.loads((ROOT / "tests" / "data" / "sd-v1-state-dict-manifest.json").read_text())["keys"]
    state = {e["key"]: torch.full([1] * len(e["shape"]), float(i)) for i, e in enumerate(manifest)}
    shapes = {e["key"]: tuple(e["shape"]) for e in manifest}
    configs = diffusers_configs(OmegaConf.load(V1_CONFIG))
    public = {c: {k: v for k, v in configs[c].items() if not k.startswith("_")} for c in ("unet", "vae")}
    reference = {
        "unet": convert_ldm_unet_checkpoint(state, public["unet"]),
        "vae": convert_ldm_vae_checkpoint(state, public["vae"]),
    }
    key_map = KeyMap(Structure.from_ours(shapes))
    ours = {"unet": {}, "vae": {}, "text_encoder": {}}
    for key, value in state.items():
        mapped = key_map.to_diffusers(key)
        if mapped is not None:
            ours[mapped[0]][mapped[1]] = to_diffusers_tensor(key, value)
            assert key_map.from_diffusers(*mapped) == key
    assert len(ours["unet"]) == 686 and len(ours["vae"]) == 248 and len(ours["text_encoder"]) == 196
    for component in ("unet", "vae"):
        assert ours[component].keys() == reference[component].keys()
        for key, value in ours[component].items():
            assert value.shape == reference[component][key].shape and torch.equal(
                value, reference[component][key]
            ), key


@pytest.mark.parametrize(
    "path",
    [
        V1_CONFIG,
        ROOT / "tests" / "configs" / "tiny-ldm.yaml",
        ROOT / "models" / "ldm" / "shapes" / "config.yaml",
    ],
)
def test_configs_round_trip_through_diffusers_json(tmp_path, path):
    config = OmegaConf.load(path)
    for name, value in diffusers_configs(config).items():
        target = {"model_index": "model_index.json", "scheduler": "scheduler/scheduler_config.json"}.get(name)
        target = tmp_path / (target or f"{name}/config.json")
        target.parent.mkdir(exist_ok=True)
        target.write_text(json.dumps(value))
    back = config_from_diffusers(tmp_path).model.params
    p = config.model.params
    for field in ("image_size", "linear_start", "linear_end", "timesteps", "scale_factor"):
        assert back[field] == p[field], field
    unet = {
        k: v for k, v in p.unet_config.params.items() if k not in ("use_checkpoint", "legacy", "image_size")
    }
    back_unet = {k: back.unet_config.params.get(k) for k in unet}
    for params in (unet, back_unet):  # a set of downsampling factors, in any order
        params["attention_resolutions"] = sorted(params["attention_resolutions"])
    assert back_unet == unet
    # `resolution` only places attention levels, and SD autoencoders have none (attn_resolutions: [])
    ddconfig = {
        k: v for k, v in p.first_stage_config.params.ddconfig.items() if k not in ("dropout", "resolution")
    }
    assert {k: back.first_stage_config.params.ddconfig.get(k) for k in ddconfig} == ddconfig
    text = (p.cond_stage_config.get("params") or {}).get("text_model_config") or {}
    assert dict((back.cond_stage_config.get("params") or {}).get("text_model_config") or {}) == dict(text)


def test_folder_with_bin_weights_and_old_attention_names_reads_back(tmp_path):
    """Older diffusers folders: pickled `.bin` weights (read with the allow-list) and the autoencoder attention
    named query/key/value/proj_attn (diffusers < 0.14)."""
    import safetensors.torch
    from adapters_common import tiny_model

    from ldm.adapters.diffusers_layout import read_diffusers_folder, write_diffusers_folder

    model, config = tiny_model()
    folder = tmp_path / "pipeline"
    write_diffusers_folder(folder, model.state_dict(), config)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(safetensors.torch.load_file(unet), unet.with_suffix(".bin"))
    unet.unlink()
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in safetensors.torch.load_file(vae).items():
        for new, old in old_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[key] = value
    assert any(".query." in k for k in renamed)
    safetensors.torch.save_file(renamed, vae)
    state, _ = read_diffusers_folder(folder)
    original = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)
