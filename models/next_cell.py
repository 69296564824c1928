# Shapes: b batch, k steps in a call, m candidates, s slots (k, or 2k with instruction tokens), d width, hd head dim.
"""How the network is told which cell it writes next (`next_pos`), one class per variant.

Step t of an order holds an input token (the class token at t = 0, else the token written at step t - 1, at its
own cell) and predicts the token of cell order[t], the *next* cell. The variants differ in where that cell enters:
- "absolute" / "relative" (sigma-GPT; the paper): a learned embedding of the next cell (absolute) or of the
  offset from the own cell to it (relative), added to the input, or before block `next_pos_layer`.
- "target_rope" (ARPG's target-aware queries): nothing is added; each position's query is rotated by the 2-D RoPE
  of the cell it predicts and every key by its own cell, so each attention score depends on the offset between
  the cell to write and the cell it reads. Needs own_pos "rope".
- "instruction" (RandAR's position-instruction tokens): after every input token comes an instruction token, one
  learned vector rotated by the next cell's RoPE (and rotated by it in every layer); the logits are read at the
  instruction tokens, so the sequence is [class, q(order[0]), x(order[0]), q(order[1]), ...], twice as long.
  Needs own_pos "rope".
- "none" (LlamaGen's raster GPT): no next-cell information; raster order only.

Each variant builds the `Slots` the blocks run over, for a run of steps (`steps`) and for m candidate next cells
sharing one input token (`candidates`, for confidence sampling and extraction); the transformer runs them.

Modified from: https://github.com/idiap/sigma-gpt (double positional encoding),
https://github.com/hp-l33/ARPG (target-aware queries) and https://github.com/ziqipang/RandAR
(randar_gpt.py: position-instruction tokens).
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.blocks import Rotate
from models.positions import CLASS_CELL, GridEmbedding


@dataclass
class Slots:
    """Positions the blocks run over.

    Attributes:
        x: (b, s, d) input of the first block run; None for candidates that continue from the hidden state of
            their shared input token (`CandidateSlots.shared`).
        rotate_q: rotation of the queries (identity without rope).
        rotate_k: rotation of the keys.
        late: (b, s, d) the next-cell embedding added before block `next_pos_layer` (> 0), else None.
    """

    x: Tensor | None
    rotate_q: Rotate
    rotate_k: Rotate
    late: Tensor | None = None


@dataclass
class CandidateSlots:
    """m candidate next cells for one input token: `shared` (the input, or None) runs once into cache slot
    `length` through blocks [0, shared_layers) (None: all); `candidates` run through blocks [first_layer, depth)
    into slots [length + offset, length + offset + m), each attending to the cache, the shared slot and itself."""

    shared: Slots | None
    shared_layers: int | None
    candidates: Slots
    first_layer: int = 0
    offset: int = 0


class AddedNextCell(nn.Module):
    """A learned next-cell embedding added to the input, or before block `layer` (the subclass embeds)."""

    slots_per_step, needs_rope, late_entry, tells_next_cell = 1, False, True, True

    def __init__(self, grid_size: tuple[int, int], width: int, heads: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)

    def embed(self, own_cells: Tensor, next_cells: Tensor) -> Tensor:
        """The embedding (b, k, d) of moving from own_cells (b, k) to next_cells (b, k)."""
        raise NotImplementedError

    def steps(self, x: Tensor, prev_cells: Tensor, next_cells: Tensor, own_pos, layer: int) -> Slots:
        """Slots of k steps: input embeddings x (b, k or 1, d) at prev_cells (b, k or 1), predicting next_cells."""
        rotate = own_pos.rotation(prev_cells)
        nxt = self.embed(prev_cells.expand_as(next_cells), next_cells)  # (b, k or m, d)
        if layer == 0:
            return Slots(self.drop(x + nxt), rotate, rotate)
        return Slots(self.drop(x), rotate, rotate, self.drop(nxt))

    def outputs(self, h: Tensor) -> Tensor:
        """The hidden states (b, k, d) that predict, of the slots' outputs."""
        return h

    def candidates(self, x: Tensor, prev_cell: Tensor, next_cells: Tensor, own_pos, layer: int) -> CandidateSlots:
        """Slots of m candidates next_cells (b, m) after one input x (b, 1, d) at prev_cell (b, 1)."""
        slots = self.steps(x, prev_cell, next_cells, own_pos, layer)
        if layer == 0:  # the input and the next cell are summed at the input: m positions from block 0
            return CandidateSlots(None, 0, slots)
        shared = Slots(slots.x, slots.rotate_q, slots.rotate_k)  # blocks < layer see the input token only
        return CandidateSlots(shared, layer, Slots(None, slots.rotate_q, slots.rotate_k, slots.late), layer)


class AbsoluteNextPos(AddedNextCell):
    """next_pos="absolute": a learned row + column embedding of the target cell."""

    def __init__(self, grid_size: tuple[int, int], width: int, heads: int, dropout: float):
        super().__init__(grid_size, width, heads, dropout)
        self.grid = GridEmbedding(grid_size, width)

    def embed(self, own_cells: Tensor, next_cells: Tensor) -> Tensor:
        return self.grid(next_cells)


class RelativeNextPos(AddedNextCell):
    """next_pos="relative" (the paper's v1): a learned embedding of the 2-D offset (dy, dx) from the
    token's own cell to the target cell; the class token, which has no cell, looks its target up in a
    separate start table with one row per cell.
    """

    def __init__(self, grid_size: tuple[int, int], width: int, heads: int, dropout: float):
        super().__init__(grid_size, width, heads, dropout)
        self.h, self.w = grid_size
        self.offset = nn.Embedding((2 * self.h - 1) * (2 * self.w - 1), width)
        self.start = nn.Embedding(self.h * self.w, width)

    def embed(self, own_cells: Tensor, next_cells: Tensor) -> Tensor:
        own = own_cells.clamp(min=0)
        dy = next_cells // self.w - own // self.w + self.h - 1
        dx = next_cells % self.w - own % self.w + self.w - 1
        moved = self.offset(dy * (2 * self.w - 1) + dx)
        started = self.start(next_cells)
        return torch.where((own_cells == CLASS_CELL).unsqueeze(-1), started, moved)


class NoNextCell(AddedNextCell):
    """next_pos="none" (LlamaGen's raster GPT): the network is not told the next cell; raster order only."""

    late_entry, tells_next_cell = False, False

    def steps(self, x: Tensor, prev_cells: Tensor, next_cells: Tensor, own_pos, layer: int) -> Slots:
        rotate = own_pos.rotation(prev_cells)
        return Slots(self.drop(x).expand(-1, next_cells.shape[1], -1), rotate, rotate)


class TargetRotaryQueries(AddedNextCell):
    """next_pos="target_rope": queries rotated by the next cell's RoPE, keys by their own cell's; nothing added."""

    needs_rope, late_entry = True, False

    def steps(self, x: Tensor, prev_cells: Tensor, next_cells: Tensor, own_pos, layer: int) -> Slots:
        x = self.drop(x).expand(-1, next_cells.shape[1], -1)  # m candidates: one input, m queries
        return Slots(x, own_pos.rotation(next_cells), own_pos.rotation(prev_cells))


class InstructionTokens(AddedNextCell):
    """next_pos="instruction": RandAR's position-instruction tokens, one learned vector (`instruction`, RandAR's
    `pos_instruct_embeddings`) rotated by the next cell's RoPE, placed after every input token."""

    slots_per_step, needs_rope, late_entry = 2, True, False

    def __init__(self, grid_size: tuple[int, int], width: int, heads: int, dropout: float):
        super().__init__(grid_size, width, heads, dropout)
        self.heads = heads
        self.instruction = nn.Parameter(torch.randn(1, width) * 0.02)

    def tokens(self, next_cells: Tensor, own_pos) -> Tensor:
        """Instruction tokens (b, k, d) for next_cells (b, k): the vector's heads rotated like queries of the cell."""
        b, k = next_cells.shape
        heads = self.instruction.view(1, self.heads, 1, -1).expand(b, -1, k, -1)  # (b, heads, k, hd)
        return own_pos.rotation(next_cells)(heads).transpose(1, 2).reshape(b, k, -1)

    def steps(self, x: Tensor, prev_cells: Tensor, next_cells: Tensor, own_pos, layer: int) -> Slots:
        """Slots [x_0, q_0, x_1, q_1, ...] (b, 2k, d): each input token, then the instruction of its step."""
        x = torch.stack([x, self.tokens(next_cells, own_pos)], dim=2).flatten(1, 2)
        rotate = own_pos.rotation(torch.stack([prev_cells, next_cells], dim=2).flatten(1, 2))
        return Slots(self.drop(x), rotate, rotate)

    def outputs(self, h: Tensor) -> Tensor:
        return h[:, 1::2]  # the instruction tokens predict

    def candidates(self, x: Tensor, prev_cell: Tensor, next_cells: Tensor, own_pos, layer: int) -> CandidateSlots:
        own, target = own_pos.rotation(prev_cell), own_pos.rotation(next_cells)
        queries = Slots(self.drop(self.tokens(next_cells, own_pos)), target, target)
        return CandidateSlots(Slots(self.drop(x), own, own), None, queries, offset=1)


NEXT_POS = {"absolute": AbsoluteNextPos, "relative": RelativeNextPos, "target_rope": TargetRotaryQueries,
            "instruction": InstructionTokens, "none": NoNextCell}
