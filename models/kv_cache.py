# Shapes: b batch, m candidates, c cache slots (capacity), hd head dim.
"""The KV cache of the ordered transformer and the two memories its attention layers read keys from.

A decoding *step* writes one cell. It takes one cache slot (the input token, which also predicts the next
cell) or two with position-instruction tokens (the input token, then the instruction token that predicts);
`KVCache.steps` counts steps, `KVCache.length` slots.
"""

from dataclasses import dataclass

from torch import Tensor


@dataclass
class KVCache:
    """Keys and values of the positions processed so far, preallocated for all of them.

    Slots [length, capacity) are free: `score_candidates` writes its candidates' keys/values there, and
    `append_candidate` keeps the chosen one by moving it into place.

    Attributes:
        kv: keys and values (2, depth, b, heads, c, head_dim); slots [0, length) are valid.
        cond: class labels (b,) read by the class token.
        slots_per_step: cache slots one written cell takes (1, or 2 with instruction tokens).
        length: slots filled; all rows advance together.
        version: bumped whenever the free slots are written (tells stale candidates apart).
    """

    kv: Tensor
    cond: Tensor
    slots_per_step: int = 1
    length: int = 0
    version: int = 0

    @property
    def k(self) -> Tensor:
        return self.kv[0]

    @property
    def v(self) -> Tensor:
        return self.kv[1]

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def steps(self) -> int:
        """Cells written so far (the step the next `score_candidates` scores)."""
        return self.length // self.slots_per_step


@dataclass
class CandidateKV:
    """Keys and values (2, depth, b, heads, m, head_dim) of m candidates scored when the cache held `position`
    slots: a view of the cache's free slots, valid until the next `score_candidates` or `extend` on that cache.

    `append_candidate` moves the chosen one to slot `slot` in layers `first_layer`.. (the layers before hold a
    shared input in that slot already) and advances the cache by `advance` slots (a step's slots)."""

    kv: Tensor
    position: int
    version: int
    slot: int
    advance: int = 1
    first_layer: int = 0


class Causal:
    """Training: every position attends to itself and the positions before it."""

    mask, is_causal = None, True

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k, v


class Write:
    """Writes new positions into the cache's slots [start, start + new); they attend to every slot before
    `start` and to the new slots `mask` (new, start + new) allows (None: all of them)."""

    is_causal = False

    def __init__(self, cache: KVCache, start: int, new: int, mask: Tensor | None):
        self.cache, self.start, self.stop, self.mask = cache, start, start + new, mask

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kv = self.cache.kv[:, layer]  # (2, b, heads, c, head_dim)
        kv[0, :, :, self.start : self.stop] = k
        kv[1, :, :, self.start : self.stop] = v
        return kv[0, :, :, : self.stop], kv[1, :, :, : self.stop]


Memory = Causal | Write  # where a layer's keys and values come from
