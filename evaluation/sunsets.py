"""The sunsets' palette and the pixel analyser that checks their causal rule on any image, generated ones included.

The synthetic source (`datamodules.sources.synthetic`) renders with this palette: the sun a saturated, full-brightness
hue of `num_hues`; clouds pastel tints whose hues sit between the palette hues, a many-to-one function of the sun's
(`expected_tint`); the sky darker than the sun (tinted by it, or a dim grey-blue dusk); the ground near black. The
analyser reads the parts apart by brightness and saturation, with thresholds set between those levels.
"""

import colorsys
from dataclasses import dataclass

import numpy as np
import torch

# Rendering levels the palette uses (HSV saturation); the source's other levels sit below the thresholds.
_SUN_SATURATION = 0.85
_CLOUD_SATURATION = 0.35
# Analyser thresholds (on HSV value / saturation in [0, 1]), set between the rendering levels.
_SUN_MIN_VALUE, _SUN_MIN_SAT = 0.85, 0.6
_CLOUD_MIN_VALUE, _CLOUD_MAX_SAT = 0.4, 0.5


def num_cloud_tints(num_hues: int) -> int:
    """Number of cloud tints; fewer than hues, so a tint does not identify the sun."""
    return max(2, num_hues // 2)


def expected_tint(hue: int, num_hues: int = 8) -> int:
    """The cloud tint that a sun of palette index `hue` causes (many-to-one)."""
    return hue % num_cloud_tints(num_hues)


def sun_palette(num_hues: int) -> np.ndarray:
    """Sun colours, float RGB in [0, 1] of shape (num_hues, 3)."""
    return np.array([colorsys.hsv_to_rgb(k / num_hues, _SUN_SATURATION, 1.0) for k in range(num_hues)])


def cloud_palette(num_hues: int) -> np.ndarray:
    """Cloud tints, float RGB of shape (num_cloud_tints, 3): pastel, hues midway between sun hues."""
    t_count = num_cloud_tints(num_hues)
    hues = [(t / t_count + 0.5 / num_hues) % 1.0 for t in range(t_count)]
    return np.array([colorsys.hsv_to_rgb(h, _CLOUD_SATURATION, 1.0) for h in hues])


# ---- the analyser: reads pixels only, so it can judge generated images ------------------------------------------
@dataclass(frozen=True)
class SunsetAnalysis:
    """What the analyser read from one image.

    Attributes:
        sun_hue: Nearest sun palette index, or None when no sun was found.
        cloud_tint: Nearest cloud tint index, or None when no cloud was found.
        consistent: Both were found and the tint is the one the sun causes.
    """

    sun_hue: int | None
    cloud_tint: int | None
    consistent: bool


def _opponent(rgb: torch.Tensor) -> torch.Tensor:
    """Brightness-free 2-D chroma of RGB in [0, 1] along dim -3: (..., 2, H, W).

    The red-vs-rest and green-vs-blue axes divided by HSV value; its angle tracks hue and its length
    tracks saturation, so averaging it over pixels is a well-behaved mean colour.
    """
    r, g, b = rgb.unbind(-3)
    value = rgb.amax(-3).clamp_min(1e-3)
    return torch.stack([(r - (g + b) / 2) / value, (g - b) * (3**0.5 / 2) / value], dim=-3)


def _nearest(chroma: torch.Tensor, palette: np.ndarray) -> int:
    """Index of the palette colour whose chroma is closest to `chroma` (2,)."""
    refs = _opponent(torch.as_tensor(palette, dtype=torch.float32)[:, :, None, None])[:, :, 0, 0]
    return int((refs - chroma).norm(dim=1).argmin())


def sunset_pixels(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels `analyse_sunset` reads as sun (bright, saturated) and as cloud (bright, pastel): two bool
    masks (b, H, W) of uint8 images (b, 3, H, W)."""
    rgb = images.float() / 255.0
    value = rgb.amax(1)
    saturation = (value - rgb.amin(1)) / value.clamp_min(1e-3)
    return ((value > _SUN_MIN_VALUE) & (saturation > _SUN_MIN_SAT),
            (value > _CLOUD_MIN_VALUE) & (saturation < _CLOUD_MAX_SAT))


def analyse_sunset(images: torch.Tensor, num_hues: int = 8) -> list[SunsetAnalysis]:
    """Read the sun hue and cloud tint of each image and check the causal rule.

    Sun: the bright, saturated pixels (the sky shares the sun's hue but is darker; clouds are
    pastel), averaged in chroma and matched to the nearest palette hue. Clouds: the bright,
    low-saturation pixels; their median chroma is matched to the nearest cloud tint. The median keeps
    the soft cloud rims, which lean towards the sky colour, from pulling the estimate.

    Args:
        images: uint8 images, (b, 3, H, W) or (3, H, W).
        num_hues: Size of the sun palette the images were made with.

    Returns:
        One `SunsetAnalysis` per image.
    """
    if images.dim() == 3:
        images = images[None]
    rgb = images.float() / 255.0
    chroma = _opponent(rgb)  # (b, 2, H, W)
    sun_mask, cloud_mask = sunset_pixels(images)
    min_pixels = max(3, round(0.005 * sun_mask[0].numel()))
    suns, clouds = sun_palette(num_hues), cloud_palette(num_hues)

    results = []
    for i in range(rgb.shape[0]):
        sun_hue = cloud_tint = None
        if int(sun_mask[i].sum()) >= min_pixels:
            sun_hue = _nearest(chroma[i][:, sun_mask[i]].mean(1), suns)
        if int(cloud_mask[i].sum()) >= min_pixels:
            cloud_tint = _nearest(chroma[i][:, cloud_mask[i]].median(1).values, clouds)
        consistent = (
            sun_hue is not None and cloud_tint is not None and cloud_tint == expected_tint(sun_hue, num_hues)
        )
        results.append(SunsetAnalysis(sun_hue, cloud_tint, consistent))
    return results
