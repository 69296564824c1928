# Shapes: b batch, H/W image size.
"""LPIPS (torchmetrics) with its backbone from a local file, and the image convention it needs.

torchmetrics ships LPIPS's linear heads (`torchmetrics/functional/image/lpips_models/<net>.pth`) but takes
the torchvision ImageNet backbone (AlexNet / VGG16 / SqueezeNet 1.1) through torch.hub, with no way to
pass a file: a local copy reaches it through `evaluation.weights.hub_dir_with`.
"""

import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

from evaluation.weights import download_timeout, hub_dir_with

BACKBONE_URLS = {
    "alex": AlexNet_Weights.IMAGENET1K_V1.url,
    "vgg": VGG16_Weights.IMAGENET1K_V1.url,
    "squeeze": SqueezeNet1_1_Weights.IMAGENET1K_V1.url,
}
# AlexNet's stride-4 stem and pools shrink a 28-32 px image to nothing; LPIPS sees at least this size.
MIN_LPIPS_PX = 64


def build_lpips(net_type: str = "alex", weights_path: str | None = None,
                normalize: bool = True) -> LearnedPerceptualImagePatchSimilarity:
    """torchmetrics LPIPS (images in [0,1] when `normalize`, else [-1,1]); the backbone from `weights_path`.

    Scores are not synced across processes (`sync_on_compute=False`): callers that share work over
    processes sum their own pair scores (`callbacks.lpips`).

    Args:
        net_type: "alex", "vgg" or "squeeze".
        weights_path: local copy of the torchvision checkpoint named in `BACKBONE_URLS[net_type]`; None
            takes the torch hub cache (or a download, bounded by a socket timeout).
        normalize: passed to torchmetrics: True for [0,1] inputs.
    """
    kwargs = {"net_type": net_type, "normalize": normalize, "sync_on_compute": False}
    if weights_path is None:
        with download_timeout():
            return LearnedPerceptualImagePatchSimilarity(**kwargs)
    with hub_dir_with(weights_path, os.path.basename(BACKBONE_URLS[net_type])):
        return LearnedPerceptualImagePatchSimilarity(**kwargs)


def lpips_input(images: Tensor) -> Tensor:
    """uint8 images (b,3,H,W) -> float in [0,1], upsampled to at least MIN_LPIPS_PX a side (bilinear)."""
    x = images.float() / 255
    if min(x.shape[-2:]) < MIN_LPIPS_PX:
        # clamp: rounding may overshoot 1 by an ulp, and torchmetrics rejects that
        x = F.interpolate(x, size=MIN_LPIPS_PX, mode="bilinear").clamp(0, 1)
    return x


@torch.no_grad()
def mean_pairwise_lpips(metric: LearnedPerceptualImagePatchSimilarity, images: Tensor) -> tuple[float, int]:
    """Mean LPIPS over all pairs i < j of uint8 `images` (b >= 2), and the number of pairs.

    The metric is reset before and after, so calls never mix.
    """
    x = lpips_input(images.to(metric.device))
    first, second = torch.triu_indices(len(x), len(x), offset=1)
    metric.reset()
    metric.update(x[first], x[second])
    value = float(metric.compute())
    metric.reset()
    return value, len(first)
