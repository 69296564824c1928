# Shapes: b batch, c channels, H/W image size, h/w token grid (H / downsample), d code dim (8), v codebook size,
# z latent channels (z_channels), n = b*h*w latent vectors.
"""LlamaGen's VQ tokenizer (VQ-16, `vq_ds16_c2i.pt`), re-implemented so its released weights load unchanged.

It is not the project's own `models.tokenizer.VQAutoencoder`: another layout (a base width `ch` with per-level
multipliers, two residual blocks per encoder level and three per decoder level, attention on the lowest-resolution
level and in the middle, `quant_conv` / `post_quant_conv` around a low-dimensional codebook), and its quirks, each
of which changes the outputs (numbers in ../shared/fixtures/pretrained/fixtures.json, `quirk_evidence`):
- GroupNorm(32 groups, eps 1e-6); swish; residual blocks with a 1x1 `nin_shortcut` when the width changes;
- the stride-2 downsample pads one row and column at the right and bottom only (torch convs pad symmetrically);
- the codebook rows are stored unnormalised: the lookup l2-normalises the latents and the rows, and decoding
  starts from the normalised rows;
- `quantize.codebook_used` (a usage counter of training) is not a weight: the importer drops it.

Module names follow the release (`encoder.conv_blocks.0.res.0.norm1`, `quantize.embedding`, ...), so the
converted state dict is the released one minus `codebook_used` (`tools.pretrained`). Inference only: the
project's tokenizer stage trains `VQAutoencoder`; this class tokenizes and decodes (the tokenizer interface:
`encode`, `decode_indices`, `vocab_size`, `downsample`, `grid_size`).

Modified from: https://github.com/FoundationVision/LlamaGen/blob/main/tokenizer/tokenizer_image/vq_model.py
(itself from taming-transformers): the same architecture, written from its description.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoint import record_init
from models.tokenizer import token_grid

GROUPS, EPS = 32, 1e-6  # LlamaGen's Normalize: GroupNorm(32, eps=1e-6, affine)
LOOKUP_CHUNK = 4096  # latent vectors per distance matrix (4096 x 16384 floats = 256 MB)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=EPS)


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm1, swish, conv1, norm2, swish, conv2, plus the input (a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w cells: 1x1 convs q, k, v, proj_out; residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (f(y).flatten(2).transpose(1, 2) for f in (self.q, self.k, self.v))  # (b, h*w, c)
        out = F.scaled_dot_product_attention(q, k, v)  # scale c^-0.5, as the release
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv without padding (the release's asymmetry)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: residual blocks (`res`), attention after each of them (`attn`, lowest resolution only),
    then a `downsample` (encoder) or an `upsample` (decoder) unless it is the last level of its path."""

    def __init__(self, widths: list[int], attention: bool, resample: type[nn.Module] | None):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.attn = nn.ModuleList(AttnBlock(b) for b in widths[1:]) if attention else nn.ModuleList()
        self.resample = {Downsample: "downsample", Upsample: "upsample"}.get(resample)  # the release's name
        if self.resample:
            setattr(self, self.resample, resample(widths[-1]))

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self.resample)(x) if self.resample else x


def _middle(width: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(width, width), AttnBlock(width), ResnetBlock(width, width)])


class Encoder(nn.Module):
    """Images (b,3,H,W) -> latents (b,z,h,w): conv_in, levels (ch * mult each), middle, norm, swish, conv_out."""

    def __init__(self, ch: int, ch_mult: list[int], z_channels: int, num_res_blocks: int = 2, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        widths, last = [ch * m for m in ch_mult], len(ch_mult) - 1
        self.conv_blocks = nn.ModuleList()
        for i, width in enumerate(widths):
            prev = ch if i == 0 else widths[i - 1]
            resample = None if i == last else Downsample
            self.conv_blocks.append(Level([prev] + [width] * num_res_blocks, i == last, resample))
        self.mid = _middle(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in (*self.conv_blocks, *self.mid):
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (b,z,h,w) -> images (b,3,H,W): conv_in, middle, levels from the lowest resolution up (num_res_blocks
    + 1 residual blocks each; attention on the lowest), norm, swish, conv_out. Raw output, not clamped."""

    def __init__(self, ch: int, ch_mult: list[int], z_channels: int, num_res_blocks: int = 2, out_channels: int = 3):
        super().__init__()
        widths = [ch * m for m in reversed(ch_mult)]  # module order: lowest resolution first
        self.conv_in = nn.Conv2d(z_channels, widths[0], 3, padding=1)
        self.mid = _middle(widths[0])
        self.conv_blocks = nn.ModuleList()
        for i, width in enumerate(widths):
            prev = widths[0] if i == 0 else widths[i - 1]
            last = i == len(widths) - 1
            self.conv_blocks.append(Level([prev] + [width] * (num_res_blocks + 1), i == 0, None if last else Upsample))
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in (*self.mid, *self.conv_blocks):
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class L2Quantizer(nn.Module):
    """The codebook (`embedding`, rows stored unnormalised) and its cosine lookup: latents and rows are
    l2-normalised, the nearest row by squared distance wins, and a code's vector is its normalised row."""

    def __init__(self, codebook_size: int, code_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, code_dim)

    def codes(self) -> Tensor:
        """The normalised codebook (v, d)."""
        return F.normalize(self.embedding.weight, dim=-1)

    def nearest(self, z: Tensor) -> Tensor:
        """Indices long (b,h,w) of latents z (b,d,h,w) before normalisation."""
        b, d, h, w = z.shape
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=-1)  # (n, d)
        codes = self.codes()
        code_sq = codes.pow(2).sum(1)  # |e|^2 (v,): the release's distance, term for term
        out = [(x.pow(2).sum(1, keepdim=True) + code_sq - 2 * x @ codes.t()).argmin(1)
               for x in flat.split(LOOKUP_CHUNK)]
        return torch.cat(out).view(b, h, w)

    def lookup(self, indices: Tensor) -> Tensor:
        """Code vectors (b,d,h,w) of indices (b,h,w): the normalised rows."""
        return self.codes()[indices].permute(0, 3, 1, 2)


class LlamaGenVQ(nn.Module):
    """LlamaGen's VQ tokenizer: images in [-1, 1] <-> grids of codebook indices (inference).

    Args:
        ch: base width of encoder and decoder (128 in every release; the release's VQModel does not pass it).
        ch_mult: width multiplier per level, encoder and decoder alike; downsample = 2 ** (len - 1)
            ([1, 1, 2, 2, 4]: VQ-16; [1, 2, 2, 4]: VQ-8).
        z_channels: latent channels around quant_conv / post_quant_conv.
        codebook_size: vocabulary size v.
        code_dim: codebook dimension d.
        num_res_blocks: residual blocks per encoder level (the decoder has one more).
    """

    def __init__(self, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), z_channels: int = 256,
                 codebook_size: int = 16384, code_dim: int = 8, num_res_blocks: int = 2):
        super().__init__()
        ch_mult = [int(m) for m in ch_mult]  # a YAML list and a tuple rebuild the same net
        record_init(self, {**locals(), "ch_mult": ch_mult})
        self.encoder = Encoder(ch, ch_mult, z_channels, num_res_blocks)
        self.decoder = Decoder(ch, ch_mult, z_channels, num_res_blocks)
        self.quantize = L2Quantizer(codebook_size, code_dim)
        self.quant_conv = nn.Conv2d(z_channels, code_dim, 1)
        self.post_quant_conv = nn.Conv2d(code_dim, z_channels, 1)
        self._downsample = 2 ** (len(ch_mult) - 1)

    @property
    def vocab_size(self) -> int:
        return self.quantize.embedding.num_embeddings

    @property
    def downsample(self) -> int:
        return self._downsample

    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) for a square side or an (H, W) pair."""
        return token_grid(image_size, self.downsample)

    def latents(self, images: Tensor) -> Tensor:
        """quant_conv(encoder(images)) (b,d,h,w): what the quantizer sees, before normalisation."""
        return self.quant_conv(self.encoder(images))

    def encode(self, images: Tensor) -> Tensor:
        """Token grid long (b,h,w) for images (b,3,H,W) in [-1, 1]."""
        return self.quantize.nearest(self.latents(images))

    def decode_raw(self, indices: Tensor) -> Tensor:
        """Images (b,3,H,W) for a token grid (b,h,w), as the decoder gives them (not clamped)."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(indices)))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Images (b,3,H,W) clamped to [-1, 1] for a token grid (b,h,w) (the project's tokenizer interface)."""
        return self.decode_raw(indices).clamp(-1, 1)
