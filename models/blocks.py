# Shapes: b batch, k new positions, s keys (cache + new), d width, hd head dim.
"""Transformer blocks of the ordered transformer, one class per architecture (`block`):
- "gpt": LayerNorm, biased linear layers, a GELU MLP (nanoGPT, sigma-GPT; the project's first network);
- "llama": RMSNorm, no biases, a SwiGLU MLP (LlamaGen, RandAR, ARPG).

Both are pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). Attention is one fused qkv projection (rows
[0, d) are q, [d, 2d) k, [2d, 3d) v; head h uses columns [h*hd, (h+1)*hd) of each), queries and keys rotated
by their own rotations (identity without rope), and keys/values taken from `memory` (the KV cache or the
sequence itself; see `models.kv_cache`).

Modified from: https://github.com/karpathy/nanoGPT/blob/master/model.py (GPT block) and
https://github.com/FoundationVision/LlamaGen/blob/main/autoregressive/models/gpt.py (RMSNorm, SwiGLU).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

Rotate = Callable[[Tensor], Tensor]  # the rotation of queries or keys (b, heads, k, hd) (identity unless rope)
NORM_EPS = 1e-5  # LlamaGen's and RandAR's RMSNorm epsilon (and LayerNorm's default)


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - n % k


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (LlamaGen's RMSNorm)."""

    def __init__(self, width: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) without biases; hidden width 2/3 of mlp_ratio * d, rounded up to `multiple_of`
    (LlamaGen's FeedForward: 4d -> 2/3 -> the next multiple of 256)."""

    def __init__(self, width: int, mlp_ratio: float, dropout: float, multiple_of: int = 256):
        super().__init__()
        hidden = find_multiple(int(2 * int(width * mlp_ratio) / 3), multiple_of)
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention; where the keys come from is decided by the `memory` it is given.

    The cache is written inside `memory(layer, k, v)`: `Causal` (training) writes nothing and returns the
    new keys; `Write` (cached decoding) stores the new keys and values in their cache slots and returns every
    slot up to them.
    """

    def __init__(self, width: int, heads: int, dropout: float, bias: bool = True):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, rotate_q: Rotate, rotate_k: Rotate, memory, layer: int) -> Tensor:
        """x (b, k, d) -> (b, k, d); k new positions attend to what `memory` returns (cache + themselves)."""
        b, length, width = x.shape  # view/permute rather than einops: cheaper, and decoding runs it every step
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (b, heads, k, hd)
        q, k = rotate_q(q), rotate_k(k)
        keys, values = memory(layer, k, v)  # (b, heads, s, hd): s = k in training, cache length + k decoding
        y = F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=memory.mask, is_causal=memory.is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (b, heads, k, hd)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, length, width)))  # (b, k, d)


class GPTBlock(nn.Module):
    """block="gpt": LayerNorm, attention with biases, GELU MLP of width mlp_ratio * d."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), drop=dropout)

    def forward(self, x: Tensor, rotate_q: Rotate, rotate_k: Rotate, memory, layer: int) -> Tensor:
        x = x + self.attn(self.norm1(x), rotate_q, rotate_k, memory, layer)
        return x + self.mlp(self.norm2(x))


class LlamaBlock(GPTBlock):
    """block="llama": RMSNorm (eps 1e-5), attention without biases, SwiGLU MLP (LlamaGen's TransformerBlock)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        nn.Module.__init__(self)
        self.norm1 = RMSNorm(width)
        self.attn = SelfAttention(width, heads, dropout, bias=False)
        self.norm2 = RMSNorm(width)
        self.mlp = SwiGLU(width, mlp_ratio, dropout)


# block name -> (block class, final norm class)
BLOCKS = {"gpt": (GPTBlock, nn.LayerNorm), "llama": (LlamaBlock, RMSNorm)}
# Residual projections, initialised with std 0.02 / sqrt(2 * depth) (GPT-2)
RESIDUAL_PROJECTIONS = ("attn.proj.weight", "mlp.fc2.weight", "mlp.w2.weight")
