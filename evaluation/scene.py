"""Scene rates of synthetic sunsets: the share of images whose cloud tint is the one their sun causes.

The analyser that reads one image (`evaluation.sunsets.analyse_sunset`) knows the palette and the causal rule the
synthetic source renders with; the share of a set of images that passes it is a metric, here.
"""

import math

import torch
import torch.nn.functional as F

from evaluation.sunsets import analyse_sunset, sunset_pixels


def scene_rates(images: torch.Tensor, num_hues: int = 8) -> dict[str, float]:
    """Shares of uint8 images (N,3,H,W) that are consistent, in which a sun is found, and in which clouds are found.

    An image without a sun or without clouds is not consistent.

    Returns:
        {"consistency": float, "sun_share": float, "cloud_share": float}.
    """
    results = analyse_sunset(images, num_hues)
    n = max(len(results), 1)
    return {"consistency": sum(r.consistent for r in results) / n,
            "sun_share": sum(r.sun_hue is not None for r in results) / n,
            "cloud_share": sum(r.cloud_tint is not None for r in results) / n}


def content_steps(images: torch.Tensor, step_maps: torch.Tensor) -> dict[str, float]:
    """When an order writes the content: the mean writing step, as a share of the steps (0 first, 1 last), of
    the cells that hold sun pixels, of those that hold cloud pixels (as the analyser reads them), and of the
    other cells (sky and ground), averaged per image, then over the images that have such cells.

    Args:
        images: uint8 images (N, 3, H, W), H and W multiples of the grid's.
        step_maps: (N, h, w), the step at which each cell was written.

    Returns:
        {"sun_step", "cloud_step", "rest_step"}: a uniformly random order gives 0.5 to each; nan where no image
        has such cells.
    """
    n, h, w = step_maps.shape
    sun, cloud = (F.adaptive_max_pool2d(m.float()[:, None], (h, w))[:, 0] > 0 for m in sunset_pixels(images))
    share = step_maps.float() / max(h * w - 1, 1)

    def mean_step(cells: torch.Tensor) -> float:
        counts = cells.flatten(1).sum(1)
        per_image = (share * cells).flatten(1).sum(1)[counts > 0] / counts[counts > 0]
        return float(per_image.mean()) if len(per_image) else math.nan

    return {"sun_step": mean_step(sun), "cloud_step": mean_step(cloud), "rest_step": mean_step(~(sun | cloud))}
