# Shapes: b batch, n tokens = h*w, d width, v vocab, m candidates, k steps in a call, c cache slots.
"""The ordered (any-order) autoregressive transformer: a decoder-only causal transformer over an explicit order.

Step t = 0..n-1 predicts the token of cell order[t]. Its input is
- t = 0: the class token (class embedding; the null class for CFG / no conditioning);
- t >= 1: the token written at step t - 1, i.e. the content of tokens[order[t-1]] and its own cell;
- and the next cell to predict, order[t] (double positional encoding), told the way `next_pos` says
  (`models.next_cell`): an embedding added at the input or before block `next_pos_layer` (absolute, relative),
  queries rotated by its RoPE (target_rope), or a position-instruction token of its own (instruction: two
  sequence positions a step).
So step t sees the class and tokens[order[:t]], and knows which cell it predicts. The blocks are GPT's or
Llama's (`block`, `models.blocks`); the own cell is a learned embedding or a 2-D RoPE (`own_pos`).

One method per purpose (decoding loops live outside, in `models/sampling.py`, `models/extraction.py`):
- `forward(tokens, order, cond)`: training and teacher-forced scoring, all steps at once.
- `new_cache(cond)`: an empty `KVCache` with room for all n steps; nothing is processed yet,
  not even the class token.
- `extend(cache, prev_tokens, prev_cells, next_cells)`: append k known steps (prefill,
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
from dataclasses import replace

import torch
from torch import Tensor, nn

from models.blocks import BLOCKS, RESIDUAL_PROJECTIONS
from models.checkpoint import record_init
from models.kv_cache import CandidateKV, Causal, KVCache, Memory, Write
from models.next_cell import NEXT_POS, Slots
from models.positions import CLASS_CELL, OWN_POS


def _pick(table: dict, key: str, what: str):
    if key not in table:
        raise ValueError(f"unknown {what} {key!r}; choose one of {sorted(table)} "
                         f"(model.init_args.net.init_args.{what})")
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
        mlp_ratio: MLP hidden width / d (llama: 2/3 of it, rounded up to a multiple of 256, as LlamaGen).
        dropout: dropout on embeddings, attention and MLP.
        next_pos: how the next cell is told (`models.next_cell`): "relative" (offset from the own cell to the
            target, paper v1), "absolute", "target_rope" (queries rotated by the target cell), "instruction"
            (RandAR's position-instruction tokens) or "none" (raster only, LlamaGen).
        own_pos: "learned" (row + col embedding added at the input) or "rope" (2-D rotary, LlamaGen's layout).
        next_pos_layer: absolute / relative only: the block before which the next-cell embedding is added,
            0..depth-1: 0 at the input (the paper); k > 0 lets candidate scoring (confidence sampling,
            extraction) run blocks 0..k-1 once per step instead of once per candidate.
        block: "gpt" (LayerNorm, GELU MLP, biases) or "llama" (RMSNorm, SwiGLU, no biases).
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
        block: str = "gpt",
    ):
        super().__init__()
        record_init(self, locals())
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        make_block, make_norm = _pick(BLOCKS, block, "block")
        scheme = _pick(NEXT_POS, next_pos, "next_pos")
        if scheme.needs_rope and own_pos != "rope":
            raise ValueError(f"next_pos {next_pos} rotates by the 2-D RoPE: set model.init_args.net.init_args."
                             f"own_pos to rope (got {own_pos})")
        if not 0 <= next_pos_layer < depth or (next_pos_layer and not scheme.late_entry):
            raise ValueError(f"next_pos_layer {next_pos_layer} must be a block index in [0, {depth - 1}], and 0 "
                             f"unless next_pos is absolute or relative (model.init_args.net.init_args.next_pos_layer)")
        self.next_pos_layer = next_pos_layer
        self.vocab_size, self.num_classes, self.null_class = vocab_size, num_classes, num_classes
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.depth, self.heads, self.head_dim = depth, heads, width // heads
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.cls_emb = nn.Embedding(num_classes + 1, width)
        self.own_pos = _pick(OWN_POS, own_pos, "own_pos")(self.grid_size, width, self.head_dim)
        self.next_pos = scheme(self.grid_size, width, heads, dropout)
        self.blocks = nn.ModuleList(make_block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = make_norm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        c = self.num_tokens * scheme.slots_per_step  # cache slots; the masks of the cache methods slice these
        self.register_buffer("causal_mask", torch.ones(c, c, dtype=torch.bool).tril(), persistent=False)
        band = torch.cat([torch.ones(c, c, dtype=torch.bool), torch.eye(c, dtype=torch.bool)], dim=1)
        self.register_buffer("candidate_band", band, persistent=False)  # (c, 2c): past, then self only
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def knows_next_cell(self) -> bool:
        """False for next_pos "none": the network predicts the raster successor of its input, in raster order only."""
        return self.next_pos.tells_next_cell

    def check_order_policy(self, policy: str) -> None:
        """Refuse any order but raster for a network that is not told the next cell (one line naming the fix)."""
        if not self.knows_next_cell and policy != "raster":
            raise ValueError(f"this network has next_pos: none (a raster model, e.g. a converted LlamaGen GPT): it can "
                             f"only write in raster order, not {policy}; set the sampler's policy to raster "
                             "(model.init_args.sampler.policy)")

    @property
    def slots_per_step(self) -> int:
        """Sequence positions (cache slots) one step takes: 2 with instruction tokens, else 1."""
        return self.next_pos.slots_per_step

    # ----------------------------------------------------------------------------------- training
    def forward(self, tokens: Tensor, order: Tensor, cond: Tensor) -> Tensor:
        """Logits of every step of an order, all steps at once.

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
        hidden = self._run(self._steps(cond, prev_tokens, prev_cells, order), Causal())
        return self._head(self.next_pos.outputs(hidden))

    def drop_labels(self, cond: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
        """Replace each label by the null class with probability p (classifier-free guidance training)."""
        drop = torch.rand(cond.shape, generator=generator, device=cond.device) < p
        return cond.masked_fill(drop, self.null_class)

    # ------------------------------------------------------------------------------- KV-cached decoding
    def new_cache(self, cond: Tensor, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for len(cond) rows with room for all n steps (the class token included).

        Args:
            cond: (b,) class labels, read when the class token (cell -1) is processed.
            dtype: cache dtype; default the autocast dtype inside `torch.autocast` on cond's device,
                else the parameters' dtype.
        """
        if dtype is None:
            device = cond.device.type
            on = torch.is_autocast_enabled(device)
            dtype = torch.get_autocast_dtype(device) if on else self.head.weight.dtype
        slots = self.num_tokens * self.slots_per_step
        shape = (2, self.depth, cond.shape[0], self.heads, slots, self.head_dim)
        return KVCache(torch.empty(shape, dtype=dtype, device=cond.device), cond, self.slots_per_step)

    def extend(self, cache: KVCache, prev_tokens: Tensor, prev_cells: Tensor, next_cells: Tensor) -> Tensor:
        """Append k steps to the cache, causal among themselves, and return their logits.

        Args:
            cache: advanced in place by k steps.
            prev_tokens: (b, k) tokens the steps hold (ignored where prev_cells == -1).
            prev_cells: (b, k) their cells; -1 for the class token (only at step 0).
            next_cells: (b, k) the cells the steps predict.

        Returns:
            logits (b, k, v) for next_cells, fp32.
        """
        new, start = prev_tokens.shape[1] * self.slots_per_step, cache.length
        if start + new > cache.capacity:
            raise ValueError(f"cache holds {cache.steps} of {self.num_tokens} steps; {prev_tokens.shape[1]} more "
                             "do not fit")
        slots = self._steps(cache.cond, prev_tokens, prev_cells, next_cells)
        mask = self.causal_mask[start : start + new, : start + new]  # (new, length + new)
        logits = self._head(self.next_pos.outputs(self._run(slots, Write(cache, start, new, mask))))
        cache.length += new
        cache.version += 1  # the slots candidates were scored in now hold these positions
        return logits

    def score_candidates(
        self, cache: KVCache, prev_token: Tensor, prev_cell: Tensor, next_cells: Tensor
    ) -> tuple[Tensor, CandidateKV]:
        """Score m candidate next cells for the same input token in one pass; the cache is not changed.

        Every candidate holds prev_token at prev_cell (the class token when prev_cell == -1) and differs
        only in its next cell; it attends to the cache (and the shared input token) and to itself, not to other
        candidates. The candidates' keys/values go to the cache's free slots, so m is at most the unwritten cells.

        Args:
            cache: steps [0, cache.steps) are the context.
            prev_token: (b,) the last written token (ignored where prev_cell == -1).
            prev_cell: (b,) its cell, or -1 at step 0.
            next_cells: (b, m) candidate cells.

        Returns:
            logits (b, m, v), fp32, and the candidates' keys/values for `append_candidate`.
        """
        length, m = cache.length, next_cells.shape[1]
        if cache.steps >= self.num_tokens:
            raise ValueError("the cache is full: every cell has been written")
        if m > self.num_tokens - cache.steps:
            raise ValueError(f"{m} candidates do not fit the {self.num_tokens - cache.steps} unwritten cells' "
                             "free cache slots; score at most the unwritten cells")
        prev_token, prev_cell = prev_token.unsqueeze(1), prev_cell.unsqueeze(1)
        x = self._content(cache.cond, prev_token, prev_cell)  # (b, 1, d)
        plan = self.next_pos.candidates(x, prev_cell, next_cells, self.own_pos, self.next_pos_layer)
        h = None
        if plan.shared is not None:  # the input token once, in slot `length`, through the blocks it shares
            h = self._run(plan.shared, Write(cache, length, 1, None), stop=plan.shared_layers)
        start, c = length + plan.offset, cache.capacity  # the band's column c is the candidates' first slot
        mask = None if m == 1 else self.candidate_band[:m, c - start : c + m]  # (m, start + m)
        candidates = plan.candidates if plan.candidates.x is not None else replace(plan.candidates, x=h)
        logits = self._head(self._run(candidates, Write(cache, start, m, mask), start=plan.first_layer))
        cache.version += 1
        kv = cache.kv[..., start : start + m, :]
        return logits, CandidateKV(kv, length, cache.version, start, self.slots_per_step, plan.first_layer)

    def append_candidate(self, cache: KVCache, candidate_kv: CandidateKV, choice: Tensor) -> None:
        """Write candidate choice[i] (an index into the m candidates) of every row i as the next step."""
        if candidate_kv.position != cache.length or candidate_kv.version != cache.version:
            raise ValueError("candidates were scored at another cache position; append right after scoring")
        first, slot = candidate_kv.first_layer, candidate_kv.slot  # layers before `first` share slot `slot`
        kv = candidate_kv.kv[:, first:]
        _, depth, b, heads, m, head_dim = kv.shape
        if m > 1:  # with one candidate it already sits in its slot
            index = choice.view(1, 1, b, 1, 1, 1).expand(2, depth, b, heads, 1, head_dim)
            cache.kv[:, first:, ..., slot : slot + 1, :] = kv.gather(4, index)
        cache.length += candidate_kv.advance

    # ------------------------------------------------------------------------------------- internals
    def _content(self, cond: Tensor, prev_tokens: Tensor, prev_cells: Tensor) -> Tensor:
        """Input embeddings (b, k, d) of the tokens at prev_cells (b, k): content + own position (learned; rope
        rotates queries and keys instead)."""
        is_class = (prev_cells == CLASS_CELL).unsqueeze(-1)  # (b, k, 1)
        content = torch.where(
            is_class, self.cls_emb(cond)[:, None], self.tok_emb(prev_tokens.masked_fill(is_class[..., 0], 0))
        )  # (b, k, d)
        return self.own_pos.add_to(content, prev_cells)

    def _steps(self, cond: Tensor, prev_tokens: Tensor, prev_cells: Tensor, next_cells: Tensor) -> Slots:
        """The slots of k steps: inputs (b, k) at prev_cells (b, k), predicting next_cells (b, k)."""
        x = self._content(cond, prev_tokens, prev_cells)
        return self.next_pos.steps(x, prev_cells, next_cells, self.own_pos, self.next_pos_layer)

    def _run(self, slots: Slots, memory: Memory, start: int = 0, stop: int | None = None) -> Tensor:
        """Hidden states of `slots` through blocks start..stop-1 (each reads/writes its layer of `memory`);
        a late next-cell embedding joins before block `next_pos_layer`."""
        x = slots.x
        for layer in range(start, self.depth if stop is None else stop):
            if layer == self.next_pos_layer and slots.late is not None:
                x = x + slots.late  # (b, k or m, d)
            x = self.blocks[layer](x, slots.rotate_q, slots.rotate_k, memory, layer)
        return x

    def _head(self, x: Tensor) -> Tensor:
        """Final hidden states (b, k, d) of the predicting slots -> fp32 logits (b, k, v)."""
        return self.head(self.norm(x)).float()
