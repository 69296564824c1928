# Shapes: b batch, n tokens = h*w, d width, v vocab, m candidates, k cache length (or new positions).
"""The ordered (any-order) autoregressive transformer: a decoder-only causal GPT over an explicit order.

Sequence position t = 0..n-1 predicts the token of cell order[t]. Its input is
- t = 0: the class token (class embedding; the null class for CFG / no conditioning);
- t >= 1: the token written at step t - 1, i.e. the content of tokens[order[t-1]] and its own cell;
- every t: the embedding of the next cell to predict, order[t] (double positional encoding), added at
  the input (`next_pos_layer` 0, sigma-GPT) or before block `next_pos_layer` (blocks before it see only
  the written tokens and their cells, so scoring m candidate cells runs them once, not m times).
So position t sees the class and tokens[order[:t]], and knows which cell it predicts.

One method per purpose (decoding loops live outside, in `models/sampling.py`, `models/extraction.py`):
- `forward(tokens, order, cond)`: training and teacher-forced scoring, all positions at once.
- `new_cache(cond)`: an empty `KVCache` with room for all n positions; nothing is processed yet,
  not even the class token.
- `extend(cache, prev_tokens, prev_cells, next_cells)`: append k known positions (prefill,
  inpainting context, several cells per step), causal among themselves; returns their logits.
- `score_candidates(cache, prev_token, prev_cell, next_cells)`: m candidate next cells for the
  *same* input token in one pass; each candidate attends to the cache and to itself only. Returns the
  logits and the candidates' keys/values (kept in the cache's free slots; the cache's length is
  unchanged, so nothing is written to it).
- `append_candidate(cache, candidate_kv, choice)`: write the chosen candidate of every row.

Logits are always fp32. Under `torch.autocast` (Lightning's "bf16-mixed") the matmuls run in the autocast
dtype and the cache is kept in it (see `models.precision`); the residual stream stays fp32.

A cell index of -1 (`CLASS_CELL`) means "the class token": pass prev_cell = -1 at step 0 (the token
value is then ignored; the class comes from the cache's `cond`).

Modified from: https://github.com/karpathy/nanoGPT/blob/master/model.py (GPT blocks, init) and
https://github.com/idiap/sigma-gpt (double positional encoding, candidate scoring against a cache).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from models.checkpoint import record_init
from models.positions import CLASS_CELL, NEXT_POS, OWN_POS


@dataclass
class KVCache:
    """Keys and values of the positions processed so far, preallocated for all n positions.

    Slots [length, capacity) are free: `score_candidates` writes its candidates' keys/values there, and
    `append_candidate` keeps the chosen one by moving it to slot `length`.

    Attributes:
        kv: keys and values (2, depth, b, heads, n, head_dim); positions [0, length) are valid.
        cond: class labels (b,) read by the class token.
        length: positions processed; all rows advance together.
        version: bumped whenever the free slots are written (tells stale candidates apart).
    """

    kv: Tensor
    cond: Tensor
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


@dataclass
class CandidateKV:
    """Keys and values (2, depth, b, heads, m, head_dim) of m candidates scored at cache position `position`:
    a view of the cache's free slots, valid until the next `score_candidates` or `extend` on that cache.
    Layers before `first_layer` (the net's `next_pos_layer`) hold the input token once, in slot `position`,
    shared by every candidate."""

    kv: Tensor
    position: int
    version: int
    first_layer: int = 0


class _Causal:
    """Training: every position attends to itself and the positions before it."""

    mask, is_causal = None, True

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k, v


class _Write:
    """Writes new positions into the cache's slots [length, length + new); they attend to the cache and
    to the new positions `mask` (new, length + new) allows (None: all of them)."""

    is_causal = False

    def __init__(self, cache: KVCache, new: int, mask: Tensor | None):
        self.cache, self.start, self.stop, self.mask = cache, cache.length, cache.length + new, mask

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kv = self.cache.kv[:, layer]  # (2, b, heads, n, head_dim)
        kv[0, :, :, self.start : self.stop] = k
        kv[1, :, :, self.start : self.stop] = v
        return kv[0, :, :, : self.stop], kv[1, :, :, : self.stop]


Memory = _Causal | _Write  # where a layer's keys and values come from
Rotate = Callable[[Tensor], Tensor]  # own-position rotation of queries and keys (identity unless rope)


class SelfAttention(nn.Module):
    """Multi-head self-attention; where the keys come from is decided by the `memory` it is given.

    The cache is written inside `memory(layer, k, v)`: `_Causal` (training) writes nothing and returns the
    new keys; `_Write` (`extend`, `score_candidates`) stores the new keys and values in the cache's slots
    [length, length + k) of this layer and returns every slot up to them.
    """

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, rotate: Rotate, memory: Memory, layer: int) -> Tensor:
        """x (b, k, d) -> (b, k, d); k new positions attend to what `memory` returns (cache + themselves)."""
        b, length, width = x.shape  # view/permute rather than einops: cheaper, and decoding runs it every step
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (b, heads, k, hd)
        q, k = rotate(q), rotate(k)
        keys, values = memory(layer, k, v)  # (b, heads, s, hd): s = k in training, cache length + k decoding
        y = F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=memory.mask, is_causal=memory.is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (b, heads, k, hd)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, length, width)))  # (b, k, d)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), drop=dropout)

    def forward(self, x: Tensor, rotate: Rotate, memory: Memory, layer: int) -> Tensor:
        x = x + self.attn(self.norm1(x), rotate, memory, layer)
        return x + self.mlp(self.norm2(x))


def _pick(table: dict, key: str, what: str):
    if key not in table:
        raise ValueError(f"unknown {what} {key!r}; choose one of {sorted(table)}")
    return table[key]


class OrderedTransformer(nn.Module):
    """Decoder-only causal transformer over tokens written in an explicit, per-image order.

    Args:
        vocab_size: tokenizer codebook size.
        grid_size: token grid (h, w); n = h * w.
        num_classes: class labels in [0, num_classes); 0 means unconditional (the class token is then
            just a start token). Row `num_classes` of the class table is the null class.
        width: model width d.
        depth: number of blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width / d.
        dropout: dropout on embeddings, attention and MLP.
        next_pos: "relative" (offset from the own cell to the target, paper v1) or "absolute".
        own_pos: "learned" (row + col embedding added at the input) or "rope" (2-D rotary).
        next_pos_layer: the block before which the next-cell embedding is added, 0..depth-1: 0 at the input
            (the paper); k > 0 lets candidate scoring (confidence sampling, extraction) run blocks 0..k-1 once
            per step instead of once per candidate.
    """

    def __init__(
        self,
        vocab_size: int,
        grid_size: tuple[int, int] = (8, 8),
        num_classes: int = 0,
        width: int = 256,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        next_pos: str = "relative",
        own_pos: str = "learned",
        next_pos_layer: int = 0,
    ):
        super().__init__()
        record_init(self, locals())
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if not 0 <= next_pos_layer < depth:
            raise ValueError(f"next_pos_layer {next_pos_layer} must be a block index in [0, {depth - 1}] "
                             "(model.init_args.net.init_args.next_pos_layer)")
        self.next_pos_layer = next_pos_layer
        self.vocab_size, self.num_classes, self.null_class = vocab_size, num_classes, num_classes
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.depth, self.heads, self.head_dim = depth, heads, width // heads
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.cls_emb = nn.Embedding(num_classes + 1, width)
        self.own_pos = _pick(OWN_POS, own_pos, "own_pos")(self.grid_size, width, self.head_dim)
        self.next_pos = _pick(NEXT_POS, next_pos, "next_pos")(self.grid_size, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        n = self.num_tokens  # attention masks of the cache methods are slices of these (not saved)
        self.register_buffer("causal_mask", torch.ones(n, n, dtype=torch.bool).tril(), persistent=False)
        band = torch.cat([torch.ones(n, n, dtype=torch.bool), torch.eye(n, dtype=torch.bool)], dim=1)
        self.register_buffer("candidate_band", band, persistent=False)  # (n, 2n): past, then self only
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    # ----------------------------------------------------------------------------------- training
    def forward(self, tokens: Tensor, order: Tensor, cond: Tensor) -> Tensor:
        """Logits of every step of an order, all positions at once.

        Args:
            tokens: (b, n) long, token of each raster cell (only cells order[:, :-1] are read).
            order: (b, s) long, s <= n: the cells in writing order (a permutation or a prefix of one).
            cond: (b,) long class labels (`null_class` for none).

        Returns:
            logits (b, s, v): logits[:, t] predict tokens[order[:, t]] from the class and
            tokens[order[:, :t]].
        """
        class_cell = order.new_full((order.shape[0], 1), CLASS_CELL)
        prev_cells = torch.cat([class_cell, order[:, :-1]], dim=1)
        prev_tokens = tokens.gather(1, prev_cells.clamp(min=0))
        x, nxt = self._embed(cond, prev_tokens, prev_cells, order)
        return self._head(self._run(x, nxt, self.own_pos.rotation(prev_cells), _Causal()))

    def drop_labels(self, cond: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
        """Replace each label by the null class with probability p (classifier-free guidance training)."""
        drop = torch.rand(cond.shape, generator=generator, device=cond.device) < p
        return cond.masked_fill(drop, self.null_class)

    # ------------------------------------------------------------------------------- KV-cached decoding
    def new_cache(self, cond: Tensor, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for len(cond) rows with room for all n positions (the class token included).

        Args:
            cond: (b,) class labels, read when the class token (cell -1) is processed.
            dtype: cache dtype; default the autocast dtype inside `torch.autocast` on cond's device,
                else the parameters' dtype.
        """
        if dtype is None:
            device = cond.device.type
            on = torch.is_autocast_enabled(device)
            dtype = torch.get_autocast_dtype(device) if on else self.head.weight.dtype
        shape = (2, self.depth, cond.shape[0], self.heads, self.num_tokens, self.head_dim)
        return KVCache(torch.empty(shape, dtype=dtype, device=cond.device), cond)

    def extend(self, cache: KVCache, prev_tokens: Tensor, prev_cells: Tensor, next_cells: Tensor) -> Tensor:
        """Append k positions to the cache, causal among themselves, and return their logits.

        Args:
            cache: advanced in place by k.
            prev_tokens: (b, k) tokens the positions hold (ignored where prev_cells == -1).
            prev_cells: (b, k) their cells; -1 for the class token (only at cache position 0).
            next_cells: (b, k) the cells the positions predict.

        Returns:
            logits (b, k, v) for next_cells, fp32.
        """
        new, start = prev_tokens.shape[1], cache.length
        if start + new > cache.capacity:
            raise ValueError(f"cache holds {cache.capacity} positions; {start} + {new} do not fit")
        x, nxt = self._embed(cache.cond, prev_tokens, prev_cells, next_cells)
        mask = self.causal_mask[start : start + new, : start + new]  # (new, length + new)
        logits = self._head(self._run(x, nxt, self.own_pos.rotation(prev_cells), _Write(cache, new, mask)))
        cache.length += new
        cache.version += 1  # the slots candidates were scored in now hold these positions
        return logits

    def score_candidates(
        self, cache: KVCache, prev_token: Tensor, prev_cell: Tensor, next_cells: Tensor
    ) -> tuple[Tensor, CandidateKV]:
        """Score m candidate next cells for the same input token in one pass; the cache is not changed.

        Every candidate holds prev_token at prev_cell (the class token when prev_cell == -1) and differs
        only in its next-cell embedding; it attends to the cache and to itself, not to other candidates.
        The candidates' keys/values go to the cache's free slots, so m <= capacity - length (there are
        never more candidates than unwritten cells).

        Args:
            cache: positions [0, length) are the context; the candidates sit at position `length`.
            prev_token: (b,) the last written token (ignored where prev_cell == -1).
            prev_cell: (b,) its cell, or -1 at step 0.
            next_cells: (b, m) candidate cells.

        Returns:
            logits (b, m, v), fp32, and the candidates' keys/values for `append_candidate`.
        """
        length, m = cache.length, next_cells.shape[1]
        if length >= cache.capacity:
            raise ValueError("the cache is full: every cell has been written")
        if length + m > cache.capacity:
            raise ValueError(f"{m} candidates do not fit the {cache.capacity - length} free cache slots; "
                             "score at most the unwritten cells")
        prev_token, prev_cell = prev_token.unsqueeze(1), prev_cell.unsqueeze(1)
        x, nxt = self._embed(cache.cond, prev_token, prev_cell, next_cells)  # (b, 1, d), (b, m, d)
        rotate, first = self.own_pos.rotation(prev_cell), self.next_pos_layer
        if first:  # blocks before the next cell enters: the input token once, in slot `length`
            x = self._run(x, nxt, rotate, _Write(cache, 1, None), stop=first)
        n = self.num_tokens  # the band's column n is the candidates' first slot
        mask = None if m == 1 else self.candidate_band[:m, n - length : n + m]  # (m, length + m)
        logits = self._head(self._run(x, nxt, rotate, _Write(cache, m, mask), start=first))
        cache.version += 1
        return logits, CandidateKV(cache.kv[..., length : length + m, :], length, cache.version, first)

    def append_candidate(self, cache: KVCache, candidate_kv: CandidateKV, choice: Tensor) -> None:
        """Write candidate choice[i] (an index into the m candidates) of every row i at position `length`."""
        if candidate_kv.position != cache.length or candidate_kv.version != cache.version:
            raise ValueError("candidates were scored at another cache position; append right after scoring")
        first = candidate_kv.first_layer  # layers before it hold the shared input token in slot `length`
        kv = candidate_kv.kv[:, first:]
        _, depth, b, heads, m, head_dim = kv.shape
        if m > 1:  # with one candidate it already sits in slot `length`
            index = choice.view(1, 1, b, 1, 1, 1).expand(2, depth, b, heads, 1, head_dim)
            cache.kv[:, first:, ..., cache.length : cache.length + 1, :] = kv.gather(4, index)
        cache.length += 1

    # ------------------------------------------------------------------------------------- internals
    def _embed(self, cond: Tensor, prev_tokens: Tensor, prev_cells: Tensor,
               next_cells: Tensor) -> tuple[Tensor, Tensor]:
        """Input embeddings: content + own position (b, k, d), and the next position (b, k or m, d), which
        `_run` adds before block `next_pos_layer` (at the input when 0, the two summed before dropout).

        cond (b,); prev_tokens, prev_cells (b, k) or (b, 1) (candidates share the input token);
        next_cells (b, k) or (b, m).
        """
        is_class = (prev_cells == CLASS_CELL).unsqueeze(-1)  # (b, k, 1)
        content = torch.where(
            is_class, self.cls_emb(cond)[:, None], self.tok_emb(prev_tokens.masked_fill(is_class[..., 0], 0))
        )  # (b, k, d)
        x = self.own_pos.add_to(content, prev_cells)  # + own cell (learned); rope rotates q, k instead
        nxt = self.next_pos(prev_cells.expand_as(next_cells), next_cells)  # next cell: (b, k or m, d)
        if self.next_pos_layer == 0:
            return self.drop(x + nxt), nxt  # `_run` adds nothing more
        return self.drop(x), self.drop(nxt)

    def _run(self, x: Tensor, nxt: Tensor, rotate: Rotate, memory: Memory, start: int = 0,
             stop: int | None = None) -> Tensor:
        """Hidden states x (b, k, d) through blocks start..stop-1 (each reads/writes its layer of `memory`);
        the next-cell embedding nxt joins before block `next_pos_layer` (> 0; at 0 `_embed` added it)."""
        for layer in range(start, self.depth if stop is None else stop):
            if layer == self.next_pos_layer and layer > 0:
                x = x + nxt  # (b, k or m, d)
            x = self.blocks[layer](x, rotate, memory, layer)
        return x

    def _head(self, x: Tensor) -> Tensor:
        """Final hidden states (b, k, d) -> fp32 logits (b, k, v)."""
        return self.head(self.norm(x)).float()
