# Shapes: b batch, n tokens = h*w, v vocab, m candidates, k cells placed per step.
"""Order extraction for training images (OAR stage 2): teacher-forced greedy placement.

At each step the context holds the true tokens already placed; every remaining cell is scored in one
`score_candidates` pass against the KV cache by the model's log-probability of its true token
("true_prob", the paper's choice) or its largest log-probability ("max_prob"); the best cell is placed.
With `gumbel_temperature > 0`, Gumbel noise times the temperature is added to the log-scores first
(sampling orders instead of taking the greedy one), constant or annealed linearly to 0 over the steps
(`gumbel_schedule`); `random_first` places the first cells uniformly at random (the sampler's options).
Given `row_seeds`, the noise of a row is a hash of (row seed, step, cell): it depends on nothing else
in the batch, so an image gets the same order in any batch, batch split, process count or resumed run
(counter-based noise, as in Philox / JAX's PRNG).
With `positions_per_step = k` the top k cells are placed at once (best first): the first via its
candidate keys/values, the rest via `extend`.

Modified from: https://github.com/idiap/sigma-gpt (scoring all remaining positions against a cache).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.logits import log_max_prob
from models.orders import drop_cells, unwritten_cells
from models.positions import CLASS_CELL
from models.precision import autocast, cast_for_inference


def log_true_prob(logits: Tensor, true_tokens: Tensor) -> Tensor:
    """log p(true token) (b, m) from logits (b, m, v) and true tokens (b, m)."""
    logits = logits.float()
    return logits.gather(-1, true_tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)


def log_max_prob_of_candidates(logits: Tensor, true_tokens: Tensor) -> Tensor:
    """The sampler's confidence `log_max_prob` (b, m) of logits (b, m, v); the true tokens are not used."""
    return log_max_prob(logits)


# Log-scores of candidate cells, by the name the settings use (`ExtractionSettings.score`).
SCORES = {"true_prob": log_true_prob, "max_prob": log_max_prob_of_candidates}


MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without leaving int64 (the high half is split off first)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def hash32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer mixer ("lowbias32", C. Wellons) on int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def noise_seeds(seed: int, index: Tensor, flip: Tensor, k: Tensor | None = None) -> Tensor:
    """One noise seed per (dataset index, flip view, k-th order of the view) under `seed`: long (b,) in [0, 2**32).

    k = 0 (or None) gives the seeds of one order per view, so orders extracted before K orders per view
    existed stay valid; each k > 0 hashes once more.
    """
    key = index.long() * 2 + flip.long()  # (b,)
    h = hash32(torch.full_like(key, seed & MASK32))
    h = hash32(h ^ ((seed >> 32) & MASK32))
    h = hash32(h ^ (key & MASK32))
    h = hash32(h ^ ((key >> 32) & MASK32))
    if k is None:
        return h
    k = k.long()
    return torch.where(k == 0, h, hash32(h ^ (k & MASK32)))


def hashed_uniform(row_seeds: Tensor, step: int, cells: Tensor) -> Tensor:
    """Uniform noise in (0, 1), (b, m): a function of (row seed, step, cell) only."""
    h = hash32(hash32(row_seeds[:, None] ^ step) ^ cells)  # (b, m)
    return ((h >> 8).float() + 0.5) / 2**24  # 24 bits: exact in float32, never 0 or 1


def _uniform(cells: Tensor, step: int, generator: torch.Generator | None, row_seeds: Tensor | None) -> Tensor:
    """Uniform noise (b, m) for the candidate `cells` (b, m) at `step`: hashed from `row_seeds`, else drawn."""
    if row_seeds is not None:
        return hashed_uniform(row_seeds, step, cells)
    return torch.rand(cells.shape, generator=generator, device=cells.device)


@dataclass(frozen=True)
class OrderNoise:
    """Noise in the choice of the next cell, as in the sampler's order choice.

    Attributes:
        temperature: T, the scale of the Gumbel noise on the log-scores (0 = greedy).
        schedule: "constant" or "linear" (T * (1 - t / n) at step t: random early, greedy late).
        random_first: the first this many cells are placed uniformly at random.
    """

    temperature: float = 0.0
    schedule: str = "constant"
    random_first: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"unknown noise schedule {self.schedule!r}; choose constant or linear")

    def active(self, t: int) -> bool:
        """Whether step t draws noise (so the cached and naive loops draw at the same steps)."""
        return t < self.random_first or self.temperature > 0

    def apply(self, scores: Tensor, t: int, n: int, uniform: Tensor | None) -> Tensor:
        """Scores (b, m) at step t of n with noise from `uniform` (b, m) (None when not `active`)."""
        if uniform is None:
            return scores
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        if t < self.random_first:
            return gumbel  # the scores no longer matter: a uniformly random cell
        temperature = self.temperature * (1.0 - t / n) if self.schedule == "linear" else self.temperature
        return scores + temperature * gumbel


def _select(logits: Tensor, true_tokens: Tensor, score: str, k: int, noise: OrderNoise, t: int, n: int,
            uniform: Tensor | None) -> Tensor:
    """Indices (b, k) of the k best candidates at step t of n, best first (`uniform`: the noise, or None)."""
    scores = noise.apply(SCORES[score](logits, true_tokens), t, n, uniform)
    return scores.topk(k, dim=1).indices


def _check(score: str, positions_per_step: int) -> None:
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {sorted(SCORES)}")
    if positions_per_step < 1:
        raise ValueError(f"positions_per_step must be >= 1, got {positions_per_step}")


@torch.no_grad()
def extract_orders(
    net, tokens: Tensor, cond: Tensor, score: str = "true_prob", positions_per_step: int = 1,
    gumbel_temperature: float = 0.0, generator: torch.Generator | None = None, row_seeds: Tensor | None = None,
    dtype: torch.dtype | None = None, gumbel_schedule: str = "constant", random_first: int = 0,
) -> Tensor:
    """The teacher-forced greedy order of each image.

    Args:
        net: an `OrderedTransformer`.
        tokens: (b, n) true tokens per raster cell.
        cond: (b,) class labels.
        score: "true_prob" or "max_prob".
        positions_per_step: cells placed per scoring pass.
        gumbel_temperature: 0 for the greedy order; > 0 adds that much Gumbel noise to the log-scores.
        generator: for the Gumbel noise when `row_seeds` is not given (the noise then depends on the batch).
        row_seeds: (b,) int64 in [0, 2**32), one per image (`noise_seeds`): each row's noise depends
            only on its seed, so an image's order does not depend on its batch.
        dtype: run a copy of the network in `dtype`, e.g. torch.bfloat16, with fp32 logits and scores (see
            `models.precision`); None = the network as it is (or as an enclosing autocast runs it).
        gumbel_schedule: "constant" or "linear" (the Gumbel scale falls to 0 over the steps).
        random_first: the first this many cells are placed uniformly at random (same noise source).

    Returns:
        order (b, n).
    """
    _check(score, positions_per_step)
    net.check_order_policy("confidence")
    noise = OrderNoise(gumbel_temperature, gumbel_schedule, random_first)
    net = cast_for_inference(net, dtype)
    b, n = tokens.shape
    cache = net.new_cache(cond)
    order = tokens.new_empty(b, n)
    cells = torch.arange(n, device=tokens.device).expand(b, n)  # the unwritten cells, ascending
    prev_token, prev_cell = tokens.new_zeros(b), tokens.new_full((b,), CLASS_CELL)
    t = 0
    while t < n:
        k = min(positions_per_step, n - t)
        logits, kv = net.score_candidates(cache, prev_token, prev_cell, cells)
        uniform = _uniform(cells, t, generator, row_seeds) if noise.active(t) else None
        picks = _select(logits, tokens.gather(1, cells), score, k, noise, t, n, uniform)
        placed = cells.gather(1, picks)  # (b, k), best first
        net.append_candidate(cache, kv, picks[:, 0])
        if k > 1:  # chain the others: each holds the previous placed token and predicts the next cell
            net.extend(cache, tokens.gather(1, placed[:, :-1]), placed[:, :-1], placed[:, 1:])
        order[:, t : t + k] = placed
        cells = drop_cells(cells, picks)
        prev_cell = placed[:, -1]
        prev_token = tokens.gather(1, prev_cell[:, None]).squeeze(1)
        t += k
    return order


@torch.no_grad()
def naive_extract_orders(
    net, tokens: Tensor, cond: Tensor, score: str = "true_prob", positions_per_step: int = 1,
    gumbel_temperature: float = 0.0, generator: torch.Generator | None = None, row_seeds: Tensor | None = None,
    gumbel_schedule: str = "constant", random_first: int = 0,
) -> Tensor:
    """Reference for `extract_orders` without a cache: a full forward per candidate per step.

    Draws its noise exactly as `extract_orders` (same `generator` calls, or the same `row_seeds` hash),
    so both agree.
    """
    _check(score, positions_per_step)
    noise = OrderNoise(gumbel_temperature, gumbel_schedule, random_first)
    b, n = tokens.shape
    order = tokens.new_empty(b, n)
    written = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
    t = 0
    while t < n:
        k = min(positions_per_step, n - t)
        cells = unwritten_cells(written, n - t)
        trials = [torch.cat([order[:, :t], cells[:, j : j + 1]], dim=1) for j in range(n - t)]
        logits = torch.stack([net(tokens, trial, cond)[:, -1] for trial in trials], dim=1)  # (b, m, v)
        uniform = _uniform(cells, t, generator, row_seeds) if noise.active(t) else None
        picks = _select(logits, tokens.gather(1, cells), score, k, noise, t, n, uniform)
        placed = cells.gather(1, picks)
        order[:, t : t + k] = placed
        written.scatter_(1, placed, True)
        t += k
    return order


def nll_under_order(net, tokens: Tensor, order: Tensor, cond: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Negative log-likelihood (b,) of each image written in `order`, in bits per token (one forward).

    Gradients flow; wrap in `torch.no_grad()` for evaluation. `dtype`: run the forward under
    `torch.autocast(dtype)` (e.g. torch.bfloat16; see `models.precision`); the NLL is computed in fp32.
    """
    with autocast(tokens.device, dtype):
        logits = net(tokens, order, cond)  # (b, n, v), fp32
    nats = F.cross_entropy(logits.transpose(1, 2).float(), tokens.gather(1, order), reduction="none")
    return nats.mean(dim=1) / math.log(2)
