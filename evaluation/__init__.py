"""Evaluation (pure torch + torchmetrics, no Lightning): the domain feature network, FID/KID against a
fixed real set, and damaged images that check a metric's ranking. Benchmarks call it; models/ keeps
only networks and decoding."""

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
from evaluation.fid import FeatureDistances

__all__ = [
    "FeatureDistances",
    "SmallConvNetFeatures",
    "class_heads",
    "features",
    "head_scores",
    "label_accuracy",
    "predictions",
    "targets_for",
    "train_feature_net",
]
