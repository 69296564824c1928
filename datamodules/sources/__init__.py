"""Data sources: datasets of (uint8 image (3, H, W), label) with `num_classes`, `image_size` and
`fingerprint()`; the DataModule picks one and does the scaling, splitting and flipping."""

from datamodules.sources.base import DataSource
from datamodules.sources.fashion_mnist import FashionMNISTSource
from datamodules.sources.folder import ImageFolderSource
from datamodules.sources.synthetic import (
    SunsetAnalysis,
    SunsetSource,
    analyse_sunset,
)

__all__ = [
    "DataSource",
    "FashionMNISTSource",
    "ImageFolderSource",
    "SunsetAnalysis",
    "SunsetSource",
    "analyse_sunset",
]
