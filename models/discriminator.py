"""Patch-GAN discriminator and hinge losses for the tokenizer's adversarial term.

Shapes: b batch, c channels, H/W image size, h/w grid of patch logits.

Modified from: https://github.com/junyanz/pytorch-CycleGAN-and-pix2pix/blob/master/models/networks.py
(`NLayerDiscriminator`: 4x4 convs, stride 2 then 1, LeakyReLU 0.2, width doubling up to 8x).
"""

import math

import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoint import record_init


class PatchDiscriminator(nn.Module):
    """Maps images (b,c,H,W) to a grid of real/fake logits (b,1,h,w), one per receptive-field patch.

    GroupNorm replaces pix2pix's BatchNorm: no running statistics to synchronise under DDP, and the
    real and fake batches do not leak into each other's normalisation.

    Args:
        in_channels: image channels.
        channels: width of the first layer.
        num_layers: number of stride-2 convs (the resolution halves num_layers times); the two
            final stride-1 4x4 convs then need an image side of at least 3 * 2 ** num_layers.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        record_init(self, locals())
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = channels
        for i in range(1, num_layers + 1):
            out_width = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [
                nn.Conv2d(width, out_width, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(math.gcd(32, out_width), out_width),
                nn.LeakyReLU(0.2),
            ]
            width = out_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: push real logits above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def g_loss(logits_fake: Tensor) -> Tensor:
    """Generator (decoder) loss against the hinge discriminator: raise the fake logits."""
    return -logits_fake.mean()
