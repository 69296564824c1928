"""Evaluation (pure torch + torchmetrics, no Lightning): every metric of the project, each in one place.

- `fid`: FID/KID on a pluggable feature network (`FidKid`, streamed and DDP-synced; `FeatureDistances`
  against one fixed real set);
- `feature_net`: the domain feature network (a small multi-task CNN) and its training;
- `lpips`, `weights`: LPIPS with its backbone from a local file (hub folder and socket timeout changed
  only inside context managers);
- `diversity`: mean pairwise LPIPS or feature distance within classes;
- `nll`: bits per token under the raster, a random and the model's inferred order;
- `scene`: consistency and sun/cloud rates of synthetic sunsets;
- `order_stats`: mean step maps, agreement and adjacency of orders;
- `sampling`, `distributed`: the seeded, batched sampling every metric draws with, and its share per process;
- `degrade`: damaged real images that check a metric's ranking.

Callbacks, the AR module's validation and the benchmarks call it; `models/` keeps only networks and decoding.
"""

from evaluation.feature_net import (
    SmallConvNetFeatures,
    class_heads,
    features,
    head_scores,
    label_accuracy,
    predictions,
    targets_for,
    train_feature_net,
)
from evaluation.fid import FeatureDistances, FidKid

__all__ = [
    "FeatureDistances",
    "FidKid",
    "SmallConvNetFeatures",
    "class_heads",
    "features",
    "head_scores",
    "label_accuracy",
    "predictions",
    "targets_for",
    "train_feature_net",
]
