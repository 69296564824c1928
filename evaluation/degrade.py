# Shapes: b batch, H/W image size, p patch side.
"""Damaged copies of real images, to check that a metric ranks them as it should.

A trustworthy FID ranks real < real blurred < real with shuffled patches < noise: blur keeps the
layout and loses detail, shuffling keeps local detail and colours and loses the layout, noise loses
everything. All take and return uint8 images (b, 3, H, W).
"""

import torch
from einops import rearrange
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur


def blur(images: Tensor, sigma: float = 1.0) -> Tensor:
    """Gaussian blur (kernel 4 sigma + 1 wide)."""
    k = 2 * round(2 * sigma) + 1
    return gaussian_blur(images.float(), [k, k], [sigma, sigma]).round().clamp(0, 255).to(torch.uint8)


def shuffle_patches(images: Tensor, patch: int = 8, generator: torch.Generator | None = None) -> Tensor:
    """Cut each image into p x p patches and put them back in a random order (one per image)."""
    h = images.shape[-2] // patch
    tiles = rearrange(images, "b c (h p) (w q) -> b (h w) c p q", p=patch, q=patch)
    perm = torch.argsort(torch.rand(tiles.shape[:2], generator=generator), dim=1)
    tiles = tiles[torch.arange(len(tiles))[:, None], perm]
    return rearrange(tiles, "b (h w) c p q -> b c (h p) (w q)", h=h)


def uniform_noise(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform noise images of the same shape."""
    return torch.randint(0, 256, images.shape, generator=generator, dtype=torch.uint8)
