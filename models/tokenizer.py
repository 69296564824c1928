"""VQ autoencoder: convolutional encoder, vector quantizer, convolutional decoder.

Shapes: b batch, c channels, H/W image size, h/w token grid (H / downsample), d code dim,
v codebook size.

Modified from: https://github.com/CompVis/taming-transformers/blob/master/taming/modules/diffusionmodules/model.py
(residual GroupNorm+SiLU blocks, stride-2 downsampling, nearest-neighbour upsampling, channel_mult per
level). Differences: the resampling convs also change the width, so full-resolution layers run at the
narrowest width (about half the cost on CPU), and there are no attention blocks.
"""

import math
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoint import record_init
from models.quantizer import VectorQuantizer


def _norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in taming, fewer when the width is not a multiple of 32 (tiny presets).
    return nn.GroupNorm(math.gcd(32, channels), channels)


def token_grid(image_size: int | tuple[int, int], downsample: int) -> tuple[int, int]:
    """Token grid (h, w) of a tokenizer that downsamples by `downsample`, for a square side or an (H, W) pair."""
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    if H % downsample or W % downsample:
        raise ValueError(f"image size {(H, W)} is not divisible by the downsampling factor {downsample}")
    return H // downsample, W // downsample


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice, plus a skip."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            _norm(out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (avoids the checkerboard of transposed convs)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Images (b,c,H,W) -> code vectors (b,d,h,w).

    Level i runs `num_res_blocks` blocks at width channels * channel_mult[i]; a stride-2 conv then
    moves to level i + 1 and its width in one go, so no full-resolution conv pays for a wider level.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        code_dim: int,
    ) -> None:
        super().__init__()
        widths = [channels * m for m in channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        for level, width in enumerate(widths):
            layers += [ResBlock(width, width) for _ in range(num_res_blocks)]
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(width, widths[level + 1], 3, stride=2, padding=1))
        width = widths[-1]
        layers += [ResBlock(width, width), _norm(width), nn.SiLU(), nn.Conv2d(width, code_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """Code vectors (b,d,h,w) -> images (b,c,H,W); mirrors `Encoder` level by level."""

    def __init__(
        self,
        out_channels: int,
        channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        code_dim: int,
    ) -> None:
        super().__init__()
        widths = [channels * m for m in reversed(channel_mult)]
        layers: list[nn.Module] = [nn.Conv2d(code_dim, widths[0], 3, padding=1), ResBlock(widths[0], widths[0])]
        for level, width in enumerate(widths):
            layers += [ResBlock(width, width) for _ in range(num_res_blocks)]
            if level < len(widths) - 1:
                layers.append(Upsample(width, widths[level + 1]))
        width = widths[-1]
        layers += [_norm(width), nn.SiLU(), nn.Conv2d(width, out_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z)


class VQOutput(NamedTuple):
    """What `VQAutoencoder.forward` returns.

    Attributes:
        recon: (b,c,H,W) reconstruction, not clamped (the loss sees the raw output).
        indices: long (b,h,w) token grid.
        commit_loss: commitment loss, already scaled by the quantizer's beta.
        codebook_loss: codebook loss (0 for the EMA quantizer).
        perplexity: exp(entropy) of the batch's code histogram.
        usage: long (v,) code counts in this batch.
    """

    recon: Tensor
    indices: Tensor
    commit_loss: Tensor
    codebook_loss: Tensor
    perplexity: Tensor
    usage: Tensor


class VQAutoencoder(nn.Module):
    """Image tokenizer: images in [-1, 1] <-> grids of codebook indices.

    Args:
        in_channels: image channels.
        channels: base width; level i has channels * channel_mult[i].
        channel_mult: width multiplier per level; the downsampling factor is 2 ** (len - 1).
        num_res_blocks: residual blocks per level.
        codebook_size: vocabulary size v of the token grid.
        code_dim: code dimension d (low, e.g. 8-32, keeps the l2 lookup well spread).
        quantizer: "l2" (cosine codebook) or "ema" (EMA codebook), see `models.quantizer`.
        beta: commitment loss weight.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        codebook_size: int = 512,
        code_dim: int = 16,
        quantizer: str = "l2",
        beta: float = 0.25,
    ) -> None:
        super().__init__()
        # A YAML list and a tuple must rebuild the same net, so the spec keeps plain ints in a list.
        record_init(self, {**locals(), "channel_mult": [int(m) for m in channel_mult]})
        channel_mult = tuple(int(m) for m in channel_mult)
        self.encoder = Encoder(in_channels, channels, channel_mult, num_res_blocks, code_dim)
        self.quantizer = VectorQuantizer(codebook_size, code_dim, kind=quantizer, beta=beta)
        self.decoder = Decoder(in_channels, channels, channel_mult, num_res_blocks, code_dim)
        self._downsample = 2 ** (len(channel_mult) - 1)

    @property
    def vocab_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def downsample(self) -> int:
        return self._downsample

    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) for a square side or an (H, W) pair."""
        return token_grid(image_size, self.downsample)

    def encode(self, images: Tensor) -> Tensor:
        """Token grid long (b,h,w) for images (b,c,H,W) in [-1, 1]; never updates the codebook."""
        return self.quantizer.nearest(self.encoder(images))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Images (b,c,H,W) clamped to [-1, 1] for a token grid (b,h,w)."""
        return self.decoder(self.quantizer.lookup(indices)).clamp(-1, 1)

    def forward(self, images: Tensor) -> VQOutput:
        """Encode, quantize (straight-through) and decode; in training the quantizer updates its codes."""
        q = self.quantizer(self.encoder(images))
        recon = self.decoder(q.quantized)
        return VQOutput(recon, q.indices, q.commit_loss, q.codebook_loss, q.perplexity, q.usage)
