"""The data sources: synthetic sunsets and their analyser, Fashion-MNIST idx files, image folders."""

import dataclasses
import gzip
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.sources import FashionMNISTSource, ImageFolderSource, SunsetSource, analyse_sunset
from datamodules.sources.synthetic import (
    RENDER_VERSION,
    expected_tint,
    num_cloud_tints,
    render_sunset,
    sample_params,
)
from evaluation.scene import scene_rates

# ---------------------------------------------------------------------------------------------
# Synthetic sunsets



def with_wrong_cloud_tints(source: SunsetSource, seed: int) -> torch.Tensor:
    """Every image of `source` rendered again with its clouds in another (random) tint."""
    rng = np.random.default_rng(seed)
    tints = num_cloud_tints(source.num_hues)
    wrong = []
    for i in range(len(source)):
        params = source.sample_params(i)
        bad_tint = (params.cloud_tint + int(rng.integers(1, tints))) % tints
        wrong.append(source.render(dataclasses.replace(params, cloud_tint=bad_tint)))
    return torch.stack(wrong)

def test_sunset_items_are_deterministic_and_independent():
    a, b = SunsetSource(num_images=50, seed=3), SunsetSource(num_images=50, seed=3)
    image, label = a[17]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert 0 <= label < a.num_classes == 8
    assert torch.equal(image, b[17][0]) and label == b[17][1]
    # Item 17 of a longer dataset is the same scene: items do not depend on each other.
    assert torch.equal(image, SunsetSource(num_images=5000, seed=3)[17][0])
    assert not torch.equal(image, SunsetSource(num_images=50, seed=4)[17][0])
    assert not torch.equal(image, a[18][0])


def test_sunset_fingerprint_tracks_parameters():
    base = SunsetSource(num_images=10, seed=0).fingerprint()
    assert base == SunsetSource(num_images=10, seed=0).fingerprint()
    variants = [
        SunsetSource(num_images=11, seed=0),
        SunsetSource(num_images=10, seed=1),
        SunsetSource(num_images=10, image_size=64),
        SunsetSource(num_images=10, num_hues=6),
        SunsetSource(num_images=10, tint_sky=False),
        SunsetSource(num_images=10, conditional=False),  # same images, other labels
        SunsetSource(num_images=10, tint_sky=False, conditional=False),
    ]
    assert len({base, *(v.fingerprint() for v in variants)}) == 1 + len(variants)
    # The default's fingerprint is the formula of before the variant keys existed (no cache is invalidated).
    old = hashlib.sha256(f"sunset|v{RENDER_VERSION}|10|32|8|0".encode())
    old.update(SunsetSource(num_images=10)[0][0].numpy().tobytes())
    assert base == old.hexdigest()[:16]


def test_untinted_sky_carries_no_hue_and_unconditional_has_no_labels():
    params = sample_params(4, seed=0)
    other_hue = dataclasses.replace(params, hue=(params.hue + 3) % 8, cloud_tint=params.cloud_tint)
    plain = [render_sunset(p, tint_sky=False).float() for p in (params, other_hue)]
    tinted = [render_sunset(p).float() for p in (params, other_hue)]
    # Away from the sun disc, the untinted images are identical whatever the sun's hue; tinted ones are not.
    x, y = ((torch.arange(32) + 0.5) / 32)[None, :], ((torch.arange(32) + 0.5) / 32)[:, None]
    far = ((x - params.sun_x) ** 2 + (y - params.sun_y) ** 2).sqrt() > params.sun_radius + 0.05
    assert torch.equal(plain[0][:, far], plain[1][:, far])
    assert (tinted[0][:, far] - tinted[1][:, far]).abs().amax() > 20
    # The default rendering is untouched by the variant's code path.
    assert torch.equal(SunsetSource(num_images=5, seed=0).render(params), render_sunset(params))

    source = SunsetSource(num_images=30, seed=2, tint_sky=False, conditional=False)
    assert source.num_classes == 0 and {source[i][1] for i in range(30)} == {0}
    assert source.label_head is None and SunsetSource(num_images=1).label_head == "hue"
    assert torch.equal(source[3][0], SunsetSource(num_images=30, seed=2, tint_sky=False)[3][0])
    fresh = source.with_seed(9, 4)
    assert len(fresh) == 4 and fresh.seed == 9 and not fresh.tint_sky and not fresh.conditional


def test_analyser_reads_the_untinted_variant():
    source = SunsetSource(num_images=500, seed=404, tint_sky=False, conditional=False)
    images = torch.stack([source[i][0] for i in range(len(source))])
    results = analyse_sunset(images)
    assert all(r.sun_hue == source.sample_params(i).hue for i, r in enumerate(results))
    assert scene_rates(images) == {"consistency": 1.0, "sun_share": 1.0, "cloud_share": 1.0}
    assert scene_rates(with_wrong_cloud_tints(source, seed=1))["consistency"] <= 0.05  # recoloured clouds are flagged


def test_scene_heads_name_every_target():
    source = SunsetSource(num_images=4, seed=505)
    assert set(source.scene_heads) == set(source.scene_targets(0))


def test_sunset_shapes_labels_and_causal_rule():
    source = SunsetSource(num_images=200, image_size=48, num_hues=6, seed=1)
    assert source.num_classes == 6 and source.image_size == 48
    assert source[0][0].shape == (3, 48, 48)
    labels = {source[i][1] for i in range(len(source))}
    assert labels == set(range(6))
    for i in range(20):
        params = source.sample_params(i)
        assert 1 <= len(params.clouds) <= 3
        assert params.cloud_tint == expected_tint(params.hue, 6)
    # Many-to-one: more hues than tints, so a tint leaves the sun undecided.
    assert num_cloud_tints(8) < 8
    assert len({expected_tint(h, 8) for h in range(8)}) == num_cloud_tints(8)
    with pytest.raises(IndexError):
        source[200]


def _fresh(n: int, seed: int) -> tuple[SunsetSource, torch.Tensor, list[int]]:
    source = SunsetSource(num_images=n, seed=seed)
    items = [source[i] for i in range(n)]
    return source, torch.stack([image for image, _ in items]), [label for _, label in items]


def test_analyser_reads_fresh_samples():
    _, images, labels = _fresh(1000, seed=101)  # a seed the generator defaults never use
    results = analyse_sunset(images)
    sun_ok = np.mean([r.sun_hue == y for r, y in zip(results, labels, strict=True)])
    tint_ok = np.mean([r.cloud_tint == expected_tint(y) for r, y in zip(results, labels, strict=True)])
    assert sun_ok >= 0.99 and tint_ok >= 0.99
    assert scene_rates(images)["consistency"] >= 0.99
    # A single (3, H, W) image works too.
    assert analyse_sunset(images[0])[0].sun_hue == labels[0]


def test_analyser_flags_wrong_cloud_tints():
    source = SunsetSource(num_images=1000, seed=202)
    results = analyse_sunset(with_wrong_cloud_tints(source, seed=0))
    assert np.mean([not r.consistent for r in results]) >= 0.95


def test_analyser_survives_mild_noise():
    _, images, labels = _fresh(400, seed=303)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * 8.0
    noisy = (images.float() + noise).round().clamp(0, 255).to(torch.uint8)
    results = analyse_sunset(noisy)
    ok = [r.sun_hue == y and r.consistent for r, y in zip(results, labels, strict=True)]
    assert np.mean(ok) >= 0.95


def test_analyser_reports_missing_parts():
    black = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    assert all(r.sun_hue is None and r.cloud_tint is None and not r.consistent for r in analyse_sunset(black))
    assert scene_rates(black)["consistency"] == 0.0


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


def _write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _tiny_fashion(root: Path, split: str = "train", n: int = 5, compress: bool = True):
    prefix = {"train": "train", "test": "t10k"}[split]
    images = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    _write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
    _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_reads_idx_files(tmp_path, compress):
    images, labels = _tiny_fashion(tmp_path, "test", n=5, compress=compress)
    source = FashionMNISTSource(root=str(tmp_path), split="test")
    assert len(source) == 5 and source.num_classes == 10 and len(source.class_names) == 10
    assert source.image_size == 32
    for i in range(5):
        image, label = source[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert label == labels[i]
        assert torch.equal(image[0], image[2])
        assert np.array_equal(image[1, 2:30, 2:30].numpy(), images[i])
        border = image.clone()
        border[:, 2:30, 2:30] = 0
        assert border.sum() == 0


def test_fashion_fingerprint_and_errors(tmp_path):
    _tiny_fashion(tmp_path, "train")
    source = FashionMNISTSource(root=str(tmp_path))
    first = source.fingerprint()
    os.utime(tmp_path / "train-labels-idx1-ubyte.gz", ns=(1, 1))
    assert source.fingerprint() != first
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTSource(root=str(tmp_path), split="test")
    message = str(err.value)
    assert "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message and "download: true" in message
    # A corrupt file names itself.
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        FashionMNISTSource(root=str(tmp_path))
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))  # 2 images, 5 labels
    with pytest.raises(ValueError, match="labels"):
        FashionMNISTSource(root=str(tmp_path))


REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (REAL_FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_real_files_smoke():
    source = FashionMNISTSource(split="test")
    assert len(source) == 10000
    image, label = source[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10 and image.max() > 0


# ---------------------------------------------------------------------------------------------
# Image folders


def _folder(root: Path) -> None:
    """Two classes: a grayscale landscape + a truncated PNG in "a", an RGBA portrait in "b"."""
    (root / "a").mkdir(parents=True)
    (root / "b" / "deeper").mkdir(parents=True)
    gray = np.tile(np.linspace(0, 255, 80, dtype=np.uint8), (40, 1))  # 40 x 80, wider than tall
    Image.fromarray(gray, mode="L").save(root / "a" / "gray.png")
    rgba = np.zeros((60, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:30, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(root / "b" / "deeper" / "rgba.png")
    good = root / "a" / "gray.png"
    (root / "a" / "broken.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (root / "a" / "notes.txt").write_text("not an image")


def test_folder_bad_file_error_names_it(tmp_path):
    _folder(tmp_path)
    source = ImageFolderSource(str(tmp_path), image_size=16)
    assert source.num_skipped == 0 and len(source) == 3
    broken = source.files.index(tmp_path / "a" / "broken.png")
    with pytest.raises(ValueError) as err:
        source[broken]
    assert "broken.png" in str(err.value) and "skip_bad_files: true" in str(err.value)
    assert "\n" not in str(err.value)


def test_folder_skips_converts_and_crops(tmp_path, caplog):
    _folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="oar.data"):
        source = ImageFolderSource(str(tmp_path), image_size=16, skip_bad_files=True)
    assert source.num_skipped == 1 and len(source) == 2
    assert any("skipped 1" in r.getMessage() for r in caplog.records)
    assert source.class_names == ["a", "b"] and source.num_classes == 2
    assert [source[i][1] for i in range(2)] == [0, 1]
    gray, _ = source[0]
    assert gray.dtype == torch.uint8 and gray.shape == (3, 16, 16)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    # Landscape 40x80 -> 16x32 -> centre 16 columns of a left-to-right ramp: mid-grey, increasing.
    assert 64 < gray[0, 8].float().mean() < 192 and gray[0, 8, -1] > gray[0, 8, 0]
    rgba, _ = source[1]
    assert rgba.shape == (3, 16, 16)
    assert tuple(rgba[:, 2, 8].tolist()) == (200, 0, 0)  # opaque red stays red
    assert tuple(rgba[:, -2, 8].tolist()) == (255, 255, 255)  # transparent -> white background


def test_folder_single_class_fingerprint_and_errors(tmp_path):
    Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.full((20, 20, 3), 9, np.uint8)).save(tmp_path / "y.jpg")
    source = ImageFolderSource(str(tmp_path), image_size=8)
    assert source.num_classes == 1 and len(source) == 2 and {source[i][1] for i in range(2)} == {0}
    first = source.fingerprint()
    assert first == ImageFolderSource(str(tmp_path), image_size=8).fingerprint()
    assert first != ImageFolderSource(str(tmp_path), image_size=16).fingerprint()
    os.utime(tmp_path / "x.png", ns=(1, 1))
    assert source.fingerprint() != first
    with pytest.raises(FileNotFoundError, match="root"):
        ImageFolderSource(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="root"):
        ImageFolderSource(str(tmp_path / "empty"))
