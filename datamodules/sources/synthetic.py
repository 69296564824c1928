"""Procedural "sunset" scenes with a known causal structure.

The sun's hue (the label) causes the rest of the scene: the sky is tinted by it, and the clouds take
a tint that is a many-to-one function of it (`expected_tint`). The sun determines the clouds, but the
clouds do not determine the sun. A raster-order model meets the clouds (top rows) before or beside
the sun and must guess, while an order-aware model can draw the sun first and read the tint off it.
`evaluation.sunsets.analyse_sunset` measures from pixels alone whether generated images keep that rule; the
palette it reads, and the analyser thresholds set between the rendering levels, live there too.

A variant where the order matters more (`tint_sky=False`, `conditional=False`): the sky is a neutral
dusk gradient and the source is unconditional, so the hue exists only in the sun disc and the clouds'
tint; a model that writes a cloud before the sun must commit to a tint first.

Colours: the sun is a saturated, full-brightness hue from a palette of `num_hues` evenly spaced hues;
the sky is the same hue at lower brightness (untinted: a dim grey-blue); clouds are pastel (low
saturation) tints whose hues sit between the palette hues; the ground is near black. Those choices
make the parts separable by brightness and saturation, which is what the analyser relies on.

Geometry is stored in fractions of the image side, so one `SunsetParams` renders at any size.
"""

from __future__ import annotations

import colorsys
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from datamodules.sources.base import DataSource
from evaluation.sunsets import (
    SunsetAnalysis,
    analyse_sunset,
    cloud_palette,
    expected_tint,
    num_cloud_tints,
    sun_palette,
    sunset_pixels,
)

# Bump whenever rendering or sampling changes, so cached tokens made from old images are refused.
RENDER_VERSION = 1

_SKY_SATURATION = 0.8
_SKY_MAX_VALUE = 0.62  # well below the sun's 1.0, so the sun is the only bright saturated region
# The untinted sky: a fixed grey-blue, dim enough (below evaluation.sunsets' cloud threshold) to never read as cloud.
_DUSK_HUE, _DUSK_SATURATION, _DUSK_MAX_VALUE = 0.62, 0.3, 0.36
_CLOUD_EDGE = 0.3  # soft edge width, as a fraction of the cloud's radius
_GROUND_RGB = np.array([0.05, 0.04, 0.07])
MAX_CLOUDS = 3


@dataclass(frozen=True)
class Cloud:
    """One cloud: an ellipse (centre and radii, fractions of the image side) with puffs on top."""

    cx: float
    cy: float
    rx: float
    ry: float


@dataclass(frozen=True)
class SunsetParams:
    """Everything that decides one scene; `render_sunset` is a pure function of it.

    Attributes:
        sun_x: Sun centre, fraction of the width.
        sun_y: Sun centre, fraction of the height (0 = top).
        sun_radius: Fraction of the image side.
        hue: Sun palette index, also the label.
        clouds: The clouds, drawn in front of the sky and the sun.
        cloud_tint: Cloud tint index; `expected_tint(hue)` for a consistent scene.
        ground_height: Mean height of the ground band, fraction of the height.
        ground_phase: Phase of the gentle hills on the ground's top edge, in [0, 1).
    """

    sun_x: float
    sun_y: float
    sun_radius: float
    hue: int
    clouds: tuple[Cloud, ...]
    cloud_tint: int
    ground_height: float
    ground_phase: float


def sample_params(index: int, seed: int = 0, num_hues: int = 8) -> SunsetParams:
    """Draw the scene for item `index`; depends only on (seed, index), not on other items."""
    rng = np.random.default_rng([seed, index])
    hue = int(rng.integers(num_hues))
    radius = rng.uniform(0.08, 0.14)
    ground_height = rng.uniform(0.15, 0.28)
    horizon = 1.0 - ground_height - 0.03  # the hills reach up to 0.02 above the mean height
    sun_x, sun_y = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.45)
    # Points no cloud may cover: the sun's centre, a ring at half its radius, a ring just past its rim.
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    rings = np.array([0.0, 0.5 * radius, radius + 0.03])[:, None]
    probe_x, probe_y = (sun_x + rings * np.cos(angles)).ravel(), (sun_y + rings * np.sin(angles)).ravel()
    clouds: list[Cloud] = []
    for _ in range(int(rng.integers(1, MAX_CLOUDS + 1))):
        # Rejection sampling keeps the sun visible: a cloud may not touch the disc or its rim.
        for _attempt in range(50):
            rx, ry = float(rng.uniform(0.12, 0.22)), float(rng.uniform(0.06, 0.09))
            cloud = Cloud(float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.08, horizon - ry)), rx, ry)
            if not _cloud_alpha(cloud, probe_x, probe_y).any():
                clouds.append(cloud)
                break
    return SunsetParams(
        sun_x=float(sun_x),
        sun_y=float(sun_y),
        sun_radius=float(radius),
        hue=hue,
        clouds=tuple(clouds),
        cloud_tint=expected_tint(hue, num_hues),
        ground_height=float(ground_height),
        ground_phase=float(rng.uniform()),
    )


def scene_heads(num_hues: int = 8) -> dict[str, int]:
    """The scene factors a feature network can learn: classes per factor, or 1 for a regressed number."""
    return {"hue": num_hues, "sun_x": 1, "sun_y": 1, "sun_radius": 1, "clouds": MAX_CLOUDS + 1,
            "cloud_tint": num_cloud_tints(num_hues), "cloud_cover": 1, "cloud_x": 1, "cloud_y": 1,
            "ground_height": 1}


def scene_targets(params: SunsetParams) -> dict[str, float]:
    """The values of `scene_heads` for one scene (class indices as whole numbers).

    Besides the parameters: the share of the image the clouds cover and their centre of mass
    (coverage-weighted, fractions of the side), which tell where the clouds are when they overlap.
    """
    coords = (np.arange(32) + 0.5) / 32
    y, x = coords[:, None], coords[None, :]
    cover = np.zeros((32, 32))
    for cloud in params.clouds:
        cover = np.maximum(cover, _cloud_alpha(cloud, x, y))
    mass = max(float(cover.sum()), 1e-6)
    return {"hue": params.hue, "sun_x": params.sun_x, "sun_y": params.sun_y, "sun_radius": params.sun_radius,
            "clouds": len(params.clouds), "cloud_tint": params.cloud_tint, "cloud_cover": float(cover.mean()),
            "cloud_x": float((cover * x).sum()) / mass, "cloud_y": float((cover * y).sum()) / mass,
            "ground_height": params.ground_height}


def _cloud_alpha(cloud: Cloud, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Soft coverage of a cloud: a flat ellipse plus two round puffs on its upper edge."""
    parts = [
        (cloud.cx, cloud.cy, cloud.rx, cloud.ry),
        (cloud.cx - 0.35 * cloud.rx, cloud.cy - 0.5 * cloud.ry, 0.5 * cloud.rx, 1.1 * cloud.ry),
        (cloud.cx + 0.25 * cloud.rx, cloud.cy - 0.6 * cloud.ry, 0.4 * cloud.rx, 0.9 * cloud.ry),
    ]
    alpha = np.zeros(np.broadcast(x, y).shape)
    for cx, cy, rx, ry in parts:
        dist = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
        alpha = np.maximum(alpha, np.clip((1.0 - dist) / _CLOUD_EDGE, 0.0, 1.0))
    return alpha


def render_sunset(
    params: SunsetParams, image_size: int = 32, num_hues: int = 8, tint_sky: bool = True
) -> torch.Tensor:
    """Render a scene.

    Args:
        params: The scene; its `cloud_tint` is used as given, so a wrong tint can be rendered.
        image_size: Side of the square image in pixels.
        num_hues: Size of the sun palette (sets the colours of both palettes).
        tint_sky: The sky takes the sun's hue; False: a dim grey-blue, the same for every sun.

    Returns:
        uint8 image of shape (3, H, W).
    """
    coords = (np.arange(image_size) + 0.5) / image_size  # pixel centres
    y, x = coords[:, None], coords[None, :]
    sun_rgb = sun_palette(num_hues)[params.hue]
    if tint_sky:
        sky_rgb, sky_max = np.array(colorsys.hsv_to_rgb(params.hue / num_hues, _SKY_SATURATION, 1.0)), _SKY_MAX_VALUE
    else:
        sky_rgb, sky_max = np.array(colorsys.hsv_to_rgb(_DUSK_HUE, _DUSK_SATURATION, 1.0)), _DUSK_MAX_VALUE

    # Sky: brightest in the rows around the sun plus a faint halo (the untinted sky is a dimmer copy).
    sun_dist = np.sqrt((x - params.sun_x) ** 2 + (y - params.sun_y) ** 2)
    light = 0.15 + 0.35 * np.exp(-(((y - params.sun_y) / 0.3) ** 2)) + 0.12 * np.exp(-((sun_dist / 0.2) ** 2))
    light = light * (sky_max / _SKY_MAX_VALUE)
    img = np.minimum(light, sky_max)[..., None] * sky_rgb  # (H, W, 3)

    # Sun: a disc with a one-pixel anti-aliased rim.
    sun_alpha = np.clip((params.sun_radius - sun_dist) * image_size + 0.5, 0.0, 1.0)[..., None]
    img = img * (1 - sun_alpha) + sun_alpha * sun_rgb

    # Clouds: the tint scaled by a shade that is brighter on the side facing the sun.
    tint = cloud_palette(num_hues)[params.cloud_tint]
    for cloud in params.clouds:
        toward = np.array([params.sun_x - cloud.cx, params.sun_y - cloud.cy])
        toward /= max(float(np.linalg.norm(toward)), 1e-6)
        lit = ((x - cloud.cx) * toward[0] + (y - cloud.cy) * toward[1]) / max(cloud.rx, cloud.ry)
        shade = 0.72 + 0.25 * np.clip(lit, -1.0, 1.0)
        alpha = _cloud_alpha(cloud, x, y)[..., None]
        img = img * (1 - alpha) + alpha * shade[..., None] * tint

    # Ground: a dark band whose top edge rolls gently.
    top = 1.0 - params.ground_height + 0.02 * np.sin(2 * np.pi * (1.3 * x + params.ground_phase))
    ground_alpha = np.clip((y - top) * image_size + 0.5, 0.0, 1.0)[..., None]
    img = img * (1 - ground_alpha) + ground_alpha * _GROUND_RGB

    img = np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class SunsetSource(DataSource):
    """Synthetic sunsets, rendered lazily and deterministically from (seed, index).

    Args:
        num_images: Dataset length.
        image_size: Side of the square images in pixels.
        num_hues: Number of sun hues, which are also the classes.
        seed: Base seed; item i is drawn from a generator seeded with (seed, i).
        tint_sky: The sky takes the sun's hue (the default). False: a neutral dusk sky, so the hue is
            only in the sun disc and the clouds' tint.
        conditional: The label is the sun's hue (the default). False: no classes (`num_classes` 0,
            every label 0), so the AR models train unconditionally.
    """

    def __init__(self, num_images: int = 10000, image_size: int = 32, num_hues: int = 8, seed: int = 0,
                 tint_sky: bool = True, conditional: bool = True):
        if num_hues < 2:
            raise ValueError(f"num_hues must be at least 2, got {num_hues}")
        self.num_images = num_images
        self.image_size = image_size
        self.num_hues = num_hues
        self.num_classes = num_hues if conditional else 0
        self.seed = seed
        self.tint_sky, self.conditional = tint_sky, conditional
        self.scene_heads = scene_heads(num_hues)  # what a feature network can learn about each image
        self.label_head = "hue" if conditional else None  # the scene factor the label is

    def __len__(self) -> int:
        return self.num_images

    @classmethod
    def has_scenes(cls) -> bool:
        return True

    @property
    def scene_hues(self) -> int:
        """Every item is a sunset the analyser reads with this palette (`DataSource.scene_hues`)."""
        return self.num_hues

    @classmethod
    def split_overrides(cls, init_args: dict, n_train: int, n_val: int) -> dict:
        """Scenes are rendered on demand: exactly `n_train` + `n_val` of them, split at that ratio."""
        return {"source.init_args.num_images": n_train + n_val, "val_fraction": n_val / (n_train + n_val)}

    def sample_params(self, index: int) -> SunsetParams:
        """The scene parameters of item `index`."""
        return sample_params(index, self.seed, self.num_hues)

    def scene_targets(self, index: int) -> dict[str, float]:
        """The `scene_heads` values of item `index` (from its parameters; nothing is rendered)."""
        return scene_targets(self.sample_params(index))

    def render(self, params: SunsetParams) -> torch.Tensor:
        """Render `params` at this source's size, palette and sky; uint8 (3, H, W)."""
        return render_sunset(params, self.image_size, self.num_hues, self.tint_sky)

    def with_seed(self, seed: int, num_images: int) -> SunsetSource:
        """The same kind of scenes (size, palette, sky, labels) from another seed: fresh images."""
        return SunsetSource(num_images, self.image_size, self.num_hues, seed, self.tint_sky, self.conditional)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        params = self.sample_params(index % self.num_images)
        return self.render(params), params.hue if self.conditional else 0

    def fingerprint(self) -> str:
        """Hash of the parameters, the renderer version and the first image's bytes.

        The image bytes catch renderer edits made without bumping `RENDER_VERSION`. The variant keys
        enter the hash only when they differ from the default, so default fingerprints stay as they were.
        """
        key = f"sunset|v{RENDER_VERSION}|{self.num_images}|{self.image_size}|{self.num_hues}|{self.seed}"
        key += "" if self.tint_sky else "|untinted-sky"
        key += "" if self.conditional else "|unconditional"
        digest = hashlib.sha256(key.encode())
        if self.num_images:
            digest.update(self[0][0].numpy().tobytes())
        return digest.hexdigest()[:16]


__all__ = [
    "Cloud",
    "MAX_CLOUDS",
    "RENDER_VERSION",
    "SunsetAnalysis",
    "SunsetParams",
    "SunsetSource",
    "analyse_sunset",
    "cloud_palette",
    "expected_tint",
    "num_cloud_tints",
    "render_sunset",
    "sample_params",
    "scene_heads",
    "scene_targets",
    "sun_palette",
    "sunset_pixels",
]
