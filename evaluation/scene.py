"""Scene rates of synthetic sunsets: the share of images whose cloud tint is the one their sun causes.

The analyser that reads one image belongs to the source that renders them
(`datamodules.sources.synthetic.analyse_sunset`: it knows the palette and the causal rule); the share
of a set of images that passes it is a metric and lives here, with the other metrics.
"""

import torch

from datamodules.sources.synthetic import analyse_sunset


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
