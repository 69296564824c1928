# Shapes: N images, H/W image size.
"""Every image-level metric of one row of a comparison, measured the same way for samples and real images."""

from dataclasses import dataclass

from torch import Tensor, nn
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

from evaluation.diversity import diversity
from evaluation.feature_net import label_accuracy
from evaluation.fid import FeatureDistances
from evaluation.scene import scene_rates


@dataclass
class ImageMetrics:
    """FID/KID against the real set, diversity, class accuracy (conditional data), scene rates (synthetic).

    Attributes:
        distances: FID/KID against the fixed real set (half B).
        feature_net: the domain feature network (diversity without LPIPS, class accuracy).
        label_head: the feature network's head whose class is the label; None when unconditional.
        num_hues: the sunsets' hues, for the scene rates; 0 for data other than the synthetic sunsets.
        lpips: diversity as LPIPS instead of feature distances.
    """

    distances: FeatureDistances
    feature_net: nn.Module
    label_head: str | None = None
    num_hues: int = 0
    lpips: LearnedPerceptualImagePatchSimilarity | None = None

    def __call__(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        """The metrics of uint8 images (N,3,H,W) sampled for (or labelled) `labels` (N,)."""
        m = {**self.distances(images), "diversity": diversity(images, labels, self.feature_net, self.lpips)}
        if self.label_head is not None:
            m["class_accuracy"] = label_accuracy(self.feature_net, self.label_head, images, labels)
        if self.num_hues:
            m.update(scene_rates(images, self.num_hues))
        return m
