# Shapes: b batch, k positions in a call, d width, hd head dim; a cell is a raster index r*w + c.
"""Positional encodings of the ordered transformer, one small class per variant.

Every input position carries two positions (sigma-GPT's double positional encoding):
- its *own* cell, the cell of the token it holds (`own_pos`: "learned" or "rope");
- the *next* cell, the cell whose token its output predicts (`next_pos`: "absolute" or "relative").

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
    """Rotates queries or keys (b, heads, k, hd) by per-position angles (cos, sin: (b, 1, k, hd/2))."""

    def __init__(self, cos: Tensor, sin: Tensor):
        self.cos, self.sin = cos, sin

    def __call__(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)  # dim i pairs with dim i + hd/2 ("rotate half" convention)
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


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
    """own_pos="rope": 2-D rotary embedding of the token's own cell, applied to queries and keys.

    Half of the head dim rotates with the row, half with the column. Cells sit at (row + 1, col + 1)
    and the class token at (0, 0), i.e. the identity rotation; so the class token has a position of
    its own, one step before the grid's top-left corner in both axes, and no cell shares it.
    """

    def __init__(self, grid_size: tuple[int, int], width: int, head_dim: int):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D rope needs a head dim divisible by 4, got {head_dim}")
        h, w = grid_size
        inv_freq = ROPE_BASE ** (-torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 4))
        cells = torch.arange(h * w)
        rows = torch.cat([torch.zeros(1), cells // w + 1.0]).double()  # index 0 = class token
        cols = torch.cat([torch.zeros(1), cells % w + 1.0]).double()
        angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)  # (n+1, hd/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def add_to(self, x: Tensor, cells: Tensor) -> Tensor:
        return x

    def rotation(self, cells: Tensor) -> Rotation:
        """The rotation of positions whose own cells are `cells` (b,k), shared by all layers."""
        index = cells + 1  # class token (-1) -> row 0 of the tables
        return Rotation(self.cos[index].unsqueeze(1), self.sin[index].unsqueeze(1))


class AbsoluteNextPos(nn.Module):
    """next_pos="absolute": a learned row + column embedding of the target cell."""

    def __init__(self, grid_size: tuple[int, int], width: int):
        super().__init__()
        self.grid = GridEmbedding(grid_size, width)

    def forward(self, own_cells: Tensor, next_cells: Tensor) -> Tensor:
        """Embed the targets next_cells (b,k) -> (b,k,d); own_cells is not needed."""
        return self.grid(next_cells)


class RelativeNextPos(nn.Module):
    """next_pos="relative" (the paper's v1): a learned embedding of the 2-D offset (dy, dx) from the
    token's own cell to the target cell; the class token, which has no cell, looks its target up in a
    separate start table with one row per cell.
    """

    def __init__(self, grid_size: tuple[int, int], width: int):
        super().__init__()
        self.h, self.w = grid_size
        self.offset = nn.Embedding((2 * self.h - 1) * (2 * self.w - 1), width)
        self.start = nn.Embedding(self.h * self.w, width)

    def forward(self, own_cells: Tensor, next_cells: Tensor) -> Tensor:
        """Embed the move own_cells (b,k) -> next_cells (b,k) as (b,k,d)."""
        own = own_cells.clamp(min=0)
        dy = next_cells // self.w - own // self.w + self.h - 1
        dx = next_cells % self.w - own % self.w + self.w - 1
        moved = self.offset(dy * (2 * self.w - 1) + dx)
        started = self.start(next_cells)
        return torch.where((own_cells == CLASS_CELL).unsqueeze(-1), started, moved)


OWN_POS = {"learned": LearnedOwnPos, "rope": RotaryOwnPos}
NEXT_POS = {"absolute": AbsoluteNextPos, "relative": RelativeNextPos}
