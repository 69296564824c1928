# Shapes: b batch, k positions in a call, d width, hd head dim; a cell is a raster index r*w + c.
"""Positional encodings of the ordered transformer, one small class per variant.

Every input position carries two positions (sigma-GPT's double positional encoding):
- its *own* cell, the cell of the token it holds (`own_pos`: "learned" or "rope", here);
- the *next* cell, the cell whose token its output predicts (`next_pos`, in `models.next_cell`).

The class token in front holds no cell; it is written with cell index -1 everywhere.

Modified from: https://github.com/idiap/sigma-gpt (double positional encoding) and
https://github.com/FoundationVision/LlamaGen (2-D rotary embedding of a token grid).
"""

import torch
from torch import Tensor, nn

CLASS_CELL = -1  # the cell index of the class token (it has no cell)
ROPE_BASE = 10000.0


class GridEmbedding(nn.Module):
    """A learned 2-D embedding of a cell: row embedding + column embedding."""

    def __init__(self, grid_size: tuple[int, int], width: int):
        super().__init__()
        self.w = grid_size[1]
        self.row = nn.Embedding(grid_size[0], width)
        self.col = nn.Embedding(grid_size[1], width)

    def forward(self, cells: Tensor) -> Tensor:
        """Embed cells (any shape, valid indices) -> (..., d)."""
        return self.row(cells // self.w) + self.col(cells % self.w)


class Identity:
    """The rotation of own_pos="learned": nothing rotates."""

    def __call__(self, x: Tensor) -> Tensor:
        return x


class Rotation:
    """Rotates queries or keys (b, heads, k, hd) by per-position angles (cos, sin: (b, 1, k, hd/2)).

    LlamaGen's layout: element pairs (2p, 2p + 1) rotate together, (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).
    """

    def __init__(self, cos: Tensor, sin: Tensor):
        self.cos, self.sin = cos, sin

    def __call__(self, x: Tensor) -> Tensor:
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (b, heads, k, hd/2) each
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)


class LearnedOwnPos(nn.Module):
    """own_pos="learned": a row + column embedding of the token's own cell, added at the input.

    The class token gets no positional embedding (it has its own content embedding).
    """

    def __init__(self, grid_size: tuple[int, int], width: int, head_dim: int):
        super().__init__()
        self.grid = GridEmbedding(grid_size, width)

    def add_to(self, x: Tensor, cells: Tensor) -> Tensor:
        """x (b,k,d) + embedding of cells (b,k); cells == -1 (class token) add nothing."""
        has_cell = (cells != CLASS_CELL).unsqueeze(-1)
        return x + self.grid(cells.clamp(min=0)) * has_cell

    def rotation(self, cells: Tensor) -> Identity:
        return Identity()


class RotaryOwnPos(nn.Module):
    """own_pos="rope": 2-D rotary embedding of the token's own cell, applied to queries and keys (LlamaGen's).

    Of the hd/2 element pairs of a head, pair p < hd/4 turns by row * theta_p and pair p >= hd/4 by
    col * theta_(p - hd/4), theta_j = 10000^(-4j/hd); cells sit at (row, col) from 0. The class token's
    rotation is all zeros (LlamaGen's and RandAR's): its query and key are zero in every layer, so every
    position gives it the attention score 0, a learned attention sink that carries the class.
    """

    def __init__(self, grid_size: tuple[int, int], width: int, head_dim: int):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D rope needs a head dim divisible by 4, got {head_dim}")
        h, w = grid_size
        half = head_dim // 2  # LlamaGen's float32 recipe, so converted models reproduce its tables
        theta = 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (hd/4,)
        cells = torch.arange(h * w)
        angles = torch.cat([torch.outer((cells // w).float(), theta), torch.outer((cells % w).float(), theta)], 1)
        cos = torch.cat([torch.zeros(1, half), angles.cos()])  # row 0: the class token
        sin = torch.cat([torch.zeros(1, half), angles.sin()])
        self.register_buffer("cos", cos, persistent=False)  # (n + 1, hd/2)
        self.register_buffer("sin", sin, persistent=False)

    def add_to(self, x: Tensor, cells: Tensor) -> Tensor:
        return x

    def rotation(self, cells: Tensor) -> Rotation:
        """The rotation of positions whose cells are `cells` (b,k) (-1: the class token), shared by all layers."""
        index = cells + 1  # class token (-1) -> row 0 of the tables
        return Rotation(self.cos[index].unsqueeze(1), self.sin[index].unsqueeze(1))


OWN_POS = {"learned": LearnedOwnPos, "rope": RotaryOwnPos}
