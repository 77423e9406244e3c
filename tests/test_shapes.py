"""The synthetic shapes dataset, its image analysis, and the captioned image folder."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.captioned_folder import CaptionedImageFolder
from ldm.data.shape_analysis import analyze_shape_image, caption_attributes
from ldm.data.shapes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    ShapesDataset,
    coverage,
    make_example,
    render,
    sample_attributes,
)

# ---------------------------------------------------------------------------------------------- shapes


def test_example_format_and_determinism():
    ds = ShapesDataset(size=100, seed=3)
    assert len(ds) == 100
    ex = ds[7]
    assert set(ex) == {"jpg", "txt"}
    assert ex["jpg"].dtype == np.float32 and ex["jpg"].shape == (64, 64, 3)
    assert ex["jpg"].min() >= -1.0 and ex["jpg"].max() <= 1.0
    levels = (ex["jpg"] + 1.0) * 127.5  # quantised like an 8-bit image
    np.testing.assert_allclose(levels, np.rint(levels), atol=1e-4)
    np.testing.assert_array_equal(ex["jpg"], ShapesDataset(size=100, seed=3)[7]["jpg"])
    assert ex["txt"] == ShapesDataset(size=100, seed=3)[7]["txt"]
    assert not np.array_equal(ex["jpg"], ShapesDataset(size=100, seed=4)[7]["jpg"])
    with pytest.raises(IndexError):
        ds[100]


def test_caption_matches_draws_and_border_is_background():
    for i in range(50):
        a = sample_attributes(i, seed=0)
        image, text = make_example(i, seed=0)
        assert text == f"a {a['color']} {a['shape']} on a {a['background']} background"
        assert 24.0 <= a["size"] <= 44.0
        assert a["x"] >= 2.0 and a["y"] >= 2.0
        assert a["x"] + a["size"] <= 62.0 and a["y"] + a["size"] <= 62.0
        bg = np.array(BACKGROUNDS[a["background"]], dtype=np.uint8)
        for strip in (image[:2], image[-2:], image[:, :2], image[:, -2:]):
            assert (strip == bg).all()  # the 2 px margin is pure background
        assert (image == np.array(COLORS[a["color"]], dtype=np.uint8)).all(-1).sum() > 200


def test_attribute_balance():
    counts = Counter()
    for i in range(600):
        a = sample_attributes(i, seed=0)
        counts.update([a["shape"], a["color"], a["background"]])
    for name in SHAPES:
        assert 150 <= counts[name] <= 250, counts
    for name in COLORS:
        assert 100 <= counts[name] <= 200, counts
    for name in BACKGROUNDS:
        assert 250 <= counts[name] <= 350, counts


@pytest.mark.parametrize(
    ("shape", "area"),
    [("circle", math.pi * 15**2), ("square", 30.0**2), ("triangle", math.sqrt(3) / 4 * 30.0**2)],
)
def test_geometry(shape, area):
    cov = coverage(shape, 30.0, 10.3, 17.6, 64)
    assert cov.min() == 0.0 and cov.max() == 1.0
    assert ((cov > 0) & (cov < 1)).any()  # anti-aliased edge
    assert cov.sum() == pytest.approx(area, rel=0.01)
    rows = cov.sum(axis=1)
    occupied = np.nonzero(rows)[0]
    if shape == "triangle":  # apex up, base s, height s*sqrt(3)/2, centred in the bounding square
        assert rows[occupied[-1] - 1] > 5 * rows[occupied[0] + 1]
        assert occupied[-1] - occupied[0] + 1 == pytest.approx(30.0 * math.sqrt(3) / 2, abs=2)
    else:
        assert occupied[-1] - occupied[0] + 1 == pytest.approx(30.0, abs=2)
    # Higher resolutions scale the shape with the image.
    assert coverage(shape, 60.0, 20.6, 35.2, 128).sum() == pytest.approx(4 * area, rel=0.01)


def test_render_colors():
    image = render("square", "blue", "black", 30.0, 10.0, 10.0)
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert tuple(image[25, 25]) == COLORS["blue"]
    assert tuple(image[5, 5]) == BACKGROUNDS["black"]
    with pytest.raises(ValueError, match="Unknown shape"):
        render("hexagon", "blue", "black", 30.0, 10.0, 10.0)


def test_analysis_recognises_generated_images():
    n, correct = 600, 0
    for i in range(n):
        image, text = make_example(i, seed=11)
        correct += analyze_shape_image(image) == caption_attributes(text)
    assert correct / n >= 0.99, f"{correct}/{n}"


def test_analysis_tolerates_noise():
    rng = np.random.default_rng(0)
    n, correct = 200, 0
    for i in range(n):
        image, text = make_example(i, seed=12)
        noisy = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        correct += analyze_shape_image(noisy) == caption_attributes(text)
    assert correct / n >= 0.97, f"{correct}/{n}"


def test_analysis_of_blank_image_and_caption_parsing():
    blank = np.full((64, 64, 3), BACKGROUNDS["white"], dtype=np.uint8)
    assert analyze_shape_image(blank) == {"background": "white", "color": None, "shape": None}
    assert caption_attributes("a red triangle on a black background") == {
        "color": "red",
        "shape": "triangle",
        "background": "black",
    }
    for bad in ("a purple circle on a white background", "a red circle", "red circle on a white background"):
        with pytest.raises(ValueError, match="Not a shapes caption"):
            caption_attributes(bad)


def test_dataloader_batches():
    loader = torch.utils.data.DataLoader(ShapesDataset(size=8), batch_size=4)
    batch = next(iter(loader))
    assert batch["jpg"].shape == (4, 64, 64, 3) and batch["jpg"].dtype == torch.float32
    assert len(batch["txt"]) == 4 and all(t.startswith("a ") for t in batch["txt"])


# ------------------------------------------------------------------------------------ captioned folder


def _two_color_image(path, width: int, height: int) -> None:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    Image.fromarray(pixels).save(path)


def test_folder_with_caption_files(tmp_path):
    _two_color_image(tmp_path / "b.png", 64, 32)
    (tmp_path / "b.txt").write_text("a red and blue image\n")
    Image.new("RGB", (40, 80), (0, 255, 0)).save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("green")
    ds = CaptionedImageFolder(tmp_path, size=32)
    assert len(ds) == 2
    green, split = ds[0], ds[1]
    assert green["txt"] == "green" and split["txt"] == "a red and blue image"
    assert green["jpg"].shape == (32, 32, 3) and green["jpg"].dtype == np.float32
    np.testing.assert_allclose(green["jpg"][16, 16], [-1.0, 1.0, -1.0], atol=0.02)
    # 64x32 -> centre crop keeps columns 16..47: left half red, right half blue
    np.testing.assert_allclose(split["jpg"][10, 2], [1.0, -1.0, -1.0], atol=0.02)
    np.testing.assert_allclose(split["jpg"][10, 29], [-1.0, -1.0, 1.0], atol=0.02)

    flipped = CaptionedImageFolder(tmp_path, size=32, flip_p=1.0)[1]["jpg"]
    np.testing.assert_array_equal(flipped, split["jpg"][:, ::-1])

    torch.manual_seed(0)
    crops = {
        CaptionedImageFolder(tmp_path, size=32, random_crop=True)[1]["jpg"][:, :, 0].sum() for _ in range(8)
    }
    assert len(crops) > 1  # the crop position varies


def test_folder_with_metadata_and_resize(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (100, 50), (255, 255, 255)).save(tmp_path / "imgs" / "x.webp")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "imgs/x.webp", "text": "white"}) + "\n")
    ds = CaptionedImageFolder(tmp_path, size=64)
    assert len(ds) == 1
    ex = ds[0]
    assert ex["txt"] == "white" and ex["jpg"].shape == (64, 64, 3)
    np.testing.assert_allclose(ex["jpg"], 1.0, atol=0.02)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        CaptionedImageFolder(tmp_path / "missing")
    assert "\n" not in str(info.value)

    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="has no images"):
        CaptionedImageFolder(tmp_path)

    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.png")
    with pytest.raises(FileNotFoundError, match=r"lonely\.png has no caption file lonely\.txt"):
        CaptionedImageFolder(tmp_path)

    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        CaptionedImageFolder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "lonely.png"}\n')
    with pytest.raises(ValueError, match="line 1"):
        CaptionedImageFolder(tmp_path)
