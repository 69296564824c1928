# Shapes: N images, C classes, d feature width.
"""Sample diversity: the mean pairwise distance among samples of one class, averaged over classes.

Two distances: LPIPS (`evaluation.lpips`, when a backbone is at hand) or the Euclidean distance of
L2-normalised features of the domain feature network (`evaluation.feature_net`). A model that
collapses to a few images per class drifts towards 0; compare with real images of the same classes.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

from evaluation.feature_net import features
from evaluation.lpips import mean_pairwise_lpips


def mean_pairwise_feature_distance(feature_net: nn.Module, images: Tensor) -> float:
    """Mean Euclidean distance over all pairs i < j of L2-normalised features of uint8 `images` (N >= 2)."""
    device = next(feature_net.parameters()).device
    x = F.normalize(features(feature_net, images.to(device)), dim=1)
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    return float((x[i] - x[j]).norm(dim=1).mean())


@torch.no_grad()
def diversity(images: Tensor, labels: Tensor, feature_net: nn.Module | None = None,
              lpips: LearnedPerceptualImagePatchSimilarity | None = None, per_class: int = 16) -> float:
    """Mean over classes (with >= 2 images) of the mean pairwise distance among a class's images.

    Args:
        images: uint8 (N,3,H,W).
        labels: (N,) classes.
        feature_net: the feature network (used when `lpips` is None).
        lpips: LPIPS on the first `per_class` images of each class (its pairs grow as per_class^2).
        per_class: images per class for LPIPS; features use them all.
    """
    if lpips is None and feature_net is None:
        raise ValueError("diversity needs a feature_net or an lpips metric")
    values = []
    for c in labels.unique():
        group = images[labels == c]
        if len(group) < 2:
            continue
        if lpips is None:
            values.append(mean_pairwise_feature_distance(feature_net, group))
        else:
            values.append(mean_pairwise_lpips(lpips, group[:per_class])[0])
    return sum(values) / max(len(values), 1)
