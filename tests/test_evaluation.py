"""FID, CLIP score and the sweep report (ldm.evaluation, scripts/evaluate.py): against torchmetrics, transformers
and closed forms, with small fixed random networks (no downloads)."""

import csv
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.data.shape_analysis import caption_attributes
from ldm.data.shapes import caption, make_example
from ldm.errors import UserError
from ldm.evaluation import features as features_module
from ldm.evaluation.clip_score import ClipEmbedder, clip_score
from ldm.evaluation.features import InceptionV3Features, RandomConvFeatures
from ldm.evaluation.fid import FeatureStats, feature_stats, fid_from_stats, frechet_distance, reference_stats
from ldm.evaluation.images import load_images

_spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
evaluate_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_script)


def random_images(n: int, seed: int, low: int = 0, high: int = 256, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, 3, size, size), generator=generator, dtype=torch.uint8)


def shapes_images(indices: range) -> torch.Tensor:
    """uint8 [B, 3, 64, 64] examples of ldm.data.shapes."""
    return torch.stack([torch.from_numpy(make_example(i)[0]).permute(2, 0, 1) for i in indices])


class Float64(torch.nn.Module):
    """An extractor's features in float64, so that torchmetrics returns its FID unrounded."""

    def __init__(self, extractor: torch.nn.Module):
        super().__init__()
        self.extractor, self.num_features = extractor, extractor.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor(images).double()


def test_fid_equals_torchmetrics_on_the_same_features():
    extractor = RandomConvFeatures(num_features=16, seed=3)
    real = [random_images(50, seed, size=64) for seed in range(3)]
    fake = [shapes_images(range(40 * k, 40 * k + 40)) for k in range(3)]
    metric = FrechetInceptionDistance(feature=Float64(extractor), normalize=False)
    for batch in real:
        metric.update(batch, real=True)
    for batch in fake:
        metric.update(batch, real=False)
    expected = metric.compute().item()
    ours = fid_from_stats(feature_stats(extractor, fake), feature_stats(extractor, real))
    assert expected > 0.5  # the two sets differ (noise vs shapes)
    assert ours == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    var1, var2 = rng.uniform(0.1, 2.0, size=8), rng.uniform(0.1, 2.0, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-10)


def test_feature_stats_are_mean_and_unbiased_covariance():
    features = torch.randn(30, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = FeatureStats(5)
    stats.add(features[:11])
    stats.add(features[11:])
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, features.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.numpy(), rowvar=False), rtol=1e-10)


def test_reference_stats_are_cached_by_content(tmp_path):
    folder = tmp_path / "reference"
    folder.mkdir()
    for k, image in enumerate(random_images(6, 0)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{k}.png")
    extractor = RandomConvFeatures(num_features=8)
    calls = []
    extractor.register_forward_hook(lambda *args: calls.append(1))
    first = reference_stats(folder, extractor, tmp_path / "cache", batch_size=4)
    assert len(calls) == 2 and len(list((tmp_path / "cache").iterdir())) == 1
    second = reference_stats(folder, extractor, tmp_path / "cache", batch_size=4)
    assert len(calls) == 2  # read from the cache
    np.testing.assert_array_equal(first.outer, second.outer)
    Image.fromarray(random_images(1, 9)[0].permute(1, 2, 0).numpy()).save(folder / "0.png")  # new content
    third = reference_stats(folder, extractor, tmp_path / "cache", batch_size=4)
    assert len(calls) == 4 and not np.array_equal(first.sum, third.sum)


def test_clip_score_formula_on_fixed_embeddings():
    rng = np.random.default_rng(1)
    images, texts = rng.normal(size=(10, 12)), rng.normal(size=(10, 12))
    texts[0] = -images[0]  # cos -1: clamped to 0
    cos = np.sum(images * texts, axis=1) / np.linalg.norm(images, axis=1) / np.linalg.norm(texts, axis=1)
    expected = 100 * np.maximum(cos, 0)
    scores = clip_score(torch.from_numpy(images).float(), torch.from_numpy(texts).float())
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-6, atol=1e-5)
    assert scores[0] == 0


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A small random CLIPModel saved with the real CLIP tokenizer and an image processor (32x32)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from ldm.modules.encoders.modules import builtin_clip_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    builtin_clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def test_clip_embedder_matches_clip_model_logits(tiny_clip):
    from transformers import CLIPModel

    embedder = ClipEmbedder(tiny_clip)
    images = random_images(3, 0, size=48)
    captions = [
        "a red circle on a white background",
        "a photo of a cat",
        "two dogs " * 40,
    ]  # the last is cut at 77
    scores = embedder.scores(images, captions)

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tokens = embedder.tokenizer(captions, padding=True, truncation=True, max_length=77, return_tensors="pt")
    pixels = embedder.processor(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels
        )
    cos = output.logits_per_image.diagonal() / model.logit_scale.detach().exp()
    np.testing.assert_allclose(scores.numpy(), (100 * cos.clamp(min=0)).numpy(), rtol=1e-5, atol=1e-4)


def test_missing_weights_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(features_module, "inception_weights_path", lambda: tmp_path / "none.pth")
    with pytest.raises(UserError, match="download https://download.pytorch.org/models/inception_v3_google"):
        InceptionV3Features()
    with pytest.raises(UserError, match="huggingface-cli download openai/clip-vit-large-patch14"):
        ClipEmbedder(tmp_path / "no-clip")


def test_inception_features_load_a_weights_file(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    extractor = InceptionV3Features(path)
    features = extractor(random_images(2, 0, size=64))
    assert features.shape == (2, 2048) and extractor.num_features == 2048
    assert torch.isfinite(features).all() and features.std() > 0


def write_fake_sweep(folder, scales_correct: dict[float, bool], n: int = 24) -> None:
    """A sweep folder of shapes images: at each scale the images show their captions, or not (background
    swapped in the caption)."""
    rows = []
    for scale, correct in scales_correct.items():
        (folder / f"scale_{scale:g}").mkdir(parents=True)
        for i in range(n):
            image, text = make_example(i, seed=5)
            if not correct:
                a = caption_attributes(text)
                text = caption(a["color"], a["shape"], "black" if a["background"] == "white" else "white")
            path = f"scale_{scale:g}/{i:06d}_0.png"
            Image.fromarray(image).save(folder / path)
            rows.append({"id": str(i), "prompt": text, "scale": scale, "seed": i, "path": path})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_evaluate_script_writes_csv_and_plot(tmp_path):
    sweep = tmp_path / "sweep"
    write_fake_sweep(sweep, {1.5: False, 3.0: True})
    out = tmp_path / "eval"
    flags = [
        "--sweeps",
        str(sweep),
        "--labels",
        "fake",
        "--reference",
        str(tmp_path / "ref"),
        "--shapes_reference",
        "40",
    ]
    flags += [
        "--features",
        "random",
        "--no_clip",
        "--stats_cache",
        str(tmp_path / "cache"),
        "--outdir",
        str(out),
    ]
    evaluate_script.main(flags)
    assert len(list((tmp_path / "ref").glob("*.png"))) == 40
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["label"], float(r["scale"]), int(r["n_images"])) for r in rows] == [
        ("fake", 1.5, 24),
        ("fake", 3.0, 24),
    ]
    assert float(rows[1]["shape_adherence"]) == 100.0 and float(rows[0]["shape_adherence"]) == 0.0
    assert rows[0]["fid"] == rows[1]["fid"] and float(rows[0]["fid"]) > 0  # the same images at both scales
    assert rows[0]["clip_score"] == ""
    with Image.open(out / "fid_vs_shape_adherence.png") as plot:
        assert plot.size == (600, 420)


def test_reference_images_of_mixed_sizes_need_a_size(tmp_path):
    folder = tmp_path / "reference"
    folder.mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "wide.png")
    Image.new("RGB", (20, 50), (0, 0, 255)).save(folder / "tall.bmp")
    extractor = RandomConvFeatures(num_features=8)
    with pytest.raises(UserError, match="--reference_size"):
        reference_stats(folder, extractor, None)
    stats = reference_stats(folder, extractor, tmp_path / "cache", size=16)
    assert stats.n == 2
    assert [p.name.split("-")[3] for p in (tmp_path / "cache").iterdir()] == [
        "16px"
    ]  # random_conv-8-seed0-16px-...
    images = load_images(sorted(folder.iterdir()), size=16)
    assert images.shape == (2, 3, 16, 16)
    assert images[0, :, 8, 8].tolist() == [0, 0, 255] and images[1, :, 8, 8].tolist() == [255, 0, 0]
