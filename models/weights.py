"""Pretrained metric networks (LPIPS backbones) from a local file or the torch hub cache, never a hang.

torchmetrics' LPIPS ships its linear heads but takes the torchvision ImageNet backbone through
torch.hub (`<hub dir>/checkpoints/<file>`, `BACKBONE_URLS`), with no way to pass a file. A local
copy is honoured by pointing torch.hub at a temporary folder whose expected file name links to it;
torch.hub loads a cached file as is (the hash is only checked on download).
"""

import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

BACKBONE_URLS = {
    "alex": AlexNet_Weights.IMAGENET1K_V1.url,
    "vgg": VGG16_Weights.IMAGENET1K_V1.url,
    "squeeze": SqueezeNet1_1_Weights.IMAGENET1K_V1.url,
}
# torch.hub downloads without a timeout; on a network that drops packets instead of refusing, a
# blocked socket read would hang training. Bounds each socket operation, not the whole download.
DOWNLOAD_TIMEOUT_S = 30.0


@contextmanager
def download_timeout(seconds: float = DOWNLOAD_TIMEOUT_S) -> Iterator[None]:
    """Bound every socket operation opened inside (torch.hub offers no timeout of its own)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def hub_checkpoint_dir() -> Path:
    """Where torch.hub (hence torch-fidelity and torchvision) caches downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


@contextmanager
def hub_dir_with(file: str, name: str) -> Iterator[None]:
    """Point torch.hub at a temporary folder whose `checkpoints/<name>` links to `file`."""
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:
        link = Path(hub) / "checkpoints" / name
        link.parent.mkdir()
        link.symlink_to(Path(file).resolve())
        torch.hub.set_dir(hub)
        try:
            yield
        finally:
            torch.hub.set_dir(previous)


def build_lpips(net_type: str = "alex", weights_path: str | None = None,
                normalize: bool = True) -> LearnedPerceptualImagePatchSimilarity:
    """torchmetrics LPIPS (images in [0,1] when `normalize`, else [-1,1]); the backbone from `weights_path`.

    Args:
        net_type: "alex", "vgg" or "squeeze".
        weights_path: local copy of the torchvision checkpoint named in `BACKBONE_URLS[net_type]`.
        normalize: passed to torchmetrics: True for [0,1] inputs.
    """
    kwargs = {"net_type": net_type, "normalize": normalize, "sync_on_compute": False}
    if weights_path is None:
        with download_timeout():
            return LearnedPerceptualImagePatchSimilarity(**kwargs)
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f"weights_path {weights_path!r} does not exist")
    with hub_dir_with(weights_path, os.path.basename(BACKBONE_URLS[net_type])):
        return LearnedPerceptualImagePatchSimilarity(**kwargs)
