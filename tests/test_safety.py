"""The safety checker: loaded only from a local folder, flags by concept similarity, blacks out flagged images."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig

from ldm.errors import UserError
from ldm.safety import SafetyChecker, load_safety_checker


def tiny_checker_folder(tmp_path, flag_everything: bool):
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 224, "patch_size": 32},
        projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    checker = SafetyChecker(config)
    with torch.no_grad():
        # thresholds: a cosine can't exceed 1, so -1 flags every image and 2 flags none
        checker.concept_embeds_weights.fill_(-1.0 if flag_everything else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in checker.state_dict().items()}, tmp_path / "model.safetensors")
    assert any(k.startswith("vision_model.vision_model.") for k in checker.state_dict())
    return tmp_path


def test_flagged_images_become_black_and_others_stay(tmp_path):
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    flag_all = load_safety_checker(str(tiny_checker_folder(tmp_path / "a", True)), torch.device("cpu"))
    flag_none = load_safety_checker(str(tiny_checker_folder(tmp_path / "b", False)), torch.device("cpu"))
    assert np.asarray(flag_all([image])[0]).max() == 0
    assert np.array_equal(np.asarray(flag_none([image])[0]), np.asarray(image))


def test_no_checker_in_the_cache_warns_and_returns_none(monkeypatch, capsys):
    import ldm.safety

    monkeypatch.setattr(ldm.safety, "find_safety_checker", lambda path: None)
    assert load_safety_checker(None, torch.device("cpu")) is None
    assert "safety checker not found" in capsys.readouterr().out


def test_an_explicit_checker_must_be_there_and_loadable(tmp_path):
    """--safety-checker PATH asked for explicitly: missing, without weights, with a bad config or a pickle that
    would run code is an error, never unchecked images."""
    with pytest.raises(UserError, match="no config.json there"):
        load_safety_checker(str(tmp_path / "nowhere"), torch.device("cpu"))
    folder = tiny_checker_folder(tmp_path / "c", False)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="has no model.safetensors or pytorch_model.bin"):
        load_safety_checker(str(folder), torch.device("cpu"))

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": RunsCode()}, f, protocol=2)
    with pytest.raises(UserError, match="cannot be loaded: .*refused for safety"):
        load_safety_checker(str(folder), torch.device("cpu"))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json is not a CLIP config"):
        load_safety_checker(str(folder), torch.device("cpu"))
