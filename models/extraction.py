# Shapes: b batch, n tokens = h*w, v vocab, m candidates, k cells placed per step.
"""Order extraction for training images (OAR stage 2): teacher-forced greedy placement.

At each step the context holds the true tokens already placed; every remaining cell is scored in one
`score_candidates` pass against the KV cache (`ExtractionSettings.score`, `models.logits.SCORES`: the model's
log-probability of its true token, "true_prob", the paper's choice, or a score of the logits alone such as the
sampler's "max_prob"); the best cell is placed. The order-choice noise is the sampler's (`models.choice.ChoiceNoise`:
`choice_temperature`, `choice_schedule`, `random_first`), counted over the n steps of the extraction.
Given `row_seeds`, the noise of a row is a hash of (row seed, step, cell): it depends on nothing else
in the batch, so an image gets the same order in any batch, batch split, process count or resumed run
(counter-based noise, as in Philox / JAX's PRNG).
With `positions_per_step = k` the top k cells are placed at once (best first): the first via its
candidate keys/values, the rest via `extend`.

Modified from: https://github.com/idiap/sigma-gpt (scoring all remaining positions against a cache).
"""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.choice import SCHEDULES, ChoiceNoise, gumbel_from_uniform
from models.logits import EXTRACTION_SCORES, candidate_scores
from models.orders import drop_cells, unwritten_cells
from models.positions import CLASS_CELL
from models.precision import PRECISIONS, autocast, cast_for_inference

WHERE = "model.init_args.extraction"
# Keys of an earlier release, read for one more release: old name -> new name
DEPRECATED = {"gumbel_temperature": "choice_temperature", "gumbel_schedule": "choice_schedule"}


@dataclass
class ExtractionSettings:
    """How the orders of training images are extracted (configs/extract_orders.yaml, `model.init_args.extraction`).

    Attributes:
        score: the candidates' score (`models.logits.SCORES`): true_prob (the paper's, default) | max_prob (the
            sampler's confidence: no peeking at the answer) | neg_entropy | margin | least_confident.
        positions_per_step: cells placed per step (1 = exact greedy; k > 1 trades exactness for speed).
        choice_temperature: T of the order-choice noise on the scores (0 = greedy; `models.choice.ChoiceNoise`).
        choice_schedule: constant | linear (the noise falls to 0 over the steps).
        random_first: the first this many cells of each image are placed uniformly at random.
        seed: seed of the noise; each image's noise depends only on (seed, dataset index, flip view, k), so a
            resumed, re-sharded or multi-process extraction gives the same orders.
        precision: fp32 | bf16 | auto (bf16 where the device has native bf16 matmuls); see
            `models.sampling.SamplerSettings.precision`.
        orders_per_image: K, the orders extracted per image view, each with its own noise (k = 0 has the
            noise of one order per view); distillation trains each step on one of them, drawn at random.
            Without noise (choice_temperature 0, random_first 0) the K orders are copies.
        gumbel_temperature, gumbel_schedule: the earlier names of choice_temperature and choice_schedule, read
            for one release with a warning.
    """

    score: str = "true_prob"
    positions_per_step: int = 1
    choice_temperature: float = 0.0
    choice_schedule: str = "constant"
    random_first: int = 0
    seed: int = 0
    precision: str = "fp32"
    orders_per_image: int = 1
    gumbel_temperature: float | None = None
    gumbel_schedule: str | None = None

    def __post_init__(self) -> None:
        for old, new in DEPRECATED.items():
            if getattr(self, old) is not None:
                warnings.warn(f"{WHERE}.{old} is deprecated: write {WHERE}.{new} (the sampler's name for the same "
                              "noise); the old key goes in the next release", FutureWarning, stacklevel=3)
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        checks = [
            ("score", self.score in EXTRACTION_SCORES, f"one of {', '.join(EXTRACTION_SCORES)}"),
            ("positions_per_step", self.positions_per_step >= 1, "an integer >= 1 (1 = exact greedy)"),
            ("choice_temperature", math.isfinite(self.choice_temperature) and self.choice_temperature >= 0,
             "a number >= 0 (0 = greedy)"),
            ("choice_schedule", self.choice_schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
            ("random_first", self.random_first >= 0, ">= 0"),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("orders_per_image", self.orders_per_image >= 1, "an integer >= 1 (1 = one order per image view)"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ValueError(f"{WHERE}.{key} = {getattr(self, key)!r} is impossible: set it to {expected}")

    @property
    def noise(self) -> ChoiceNoise:
        return ChoiceNoise(self.choice_temperature, self.choice_schedule, self.random_first)

    def record(self) -> dict:
        """The settings as an orders manifest records them (the deprecated keys left out)."""
        return {k: v for k, v in vars(self).items() if k not in DEPRECATED}


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


def _select(logits: Tensor, true_tokens: Tensor, settings: ExtractionSettings, k: int, t: int, n: int,
            uniform: Tensor | None) -> Tensor:
    """Indices (b, k) of the k best candidates at step t of n, best first (`uniform`: the noise, or None)."""
    scores = candidate_scores(settings.score, logits, true_tokens)
    if uniform is not None:
        scores = settings.noise.apply(scores, t, n, gumbel_from_uniform(uniform))
    return scores.topk(k, dim=1).indices


@torch.no_grad()
def extract_orders(
    net, tokens: Tensor, cond: Tensor, settings: ExtractionSettings | None = None,
    generator: torch.Generator | None = None, row_seeds: Tensor | None = None, dtype: torch.dtype | None = None,
) -> Tensor:
    """The teacher-forced greedy (or noisy) order of each image.

    Args:
        net: an `OrderedTransformer`.
        tokens: (b, n) true tokens per raster cell.
        cond: (b,) class labels.
        settings: score, cells per step and order-choice noise (`precision` is the caller's: see `dtype`);
            default `ExtractionSettings()`, the paper's greedy true-token order.
        generator: for the noise when `row_seeds` is not given (the noise then depends on the batch).
        row_seeds: (b,) int64 in [0, 2**32), one per image (`noise_seeds`): each row's noise depends
            only on its seed, so an image's order does not depend on its batch.
        dtype: run a copy of the network in `dtype`, e.g. torch.bfloat16, with fp32 logits and scores (see
            `models.precision`); None = the network as it is (or as an enclosing autocast runs it).

    Returns:
        order (b, n).
    """
    settings = settings or ExtractionSettings()
    net.check_order_policy("confidence")
    net = cast_for_inference(net, dtype)
    b, n = tokens.shape
    cache = net.new_cache(cond)
    order = tokens.new_empty(b, n)
    cells = torch.arange(n, device=tokens.device).expand(b, n)  # the unwritten cells, ascending
    prev_token, prev_cell = tokens.new_zeros(b), tokens.new_full((b,), CLASS_CELL)
    t = 0
    while t < n:
        k = min(settings.positions_per_step, n - t)
        logits, kv = net.score_candidates(cache, prev_token, prev_cell, cells)
        uniform = _uniform(cells, t, generator, row_seeds) if settings.noise.active(t) else None
        picks = _select(logits, tokens.gather(1, cells), settings, k, t, n, uniform)
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
    net, tokens: Tensor, cond: Tensor, settings: ExtractionSettings | None = None,
    generator: torch.Generator | None = None, row_seeds: Tensor | None = None,
) -> Tensor:
    """Reference for `extract_orders` without a cache: a full forward per candidate per step.

    Draws its noise exactly as `extract_orders` (same `generator` calls, or the same `row_seeds` hash),
    so both agree.
    """
    settings = settings or ExtractionSettings()
    b, n = tokens.shape
    order = tokens.new_empty(b, n)
    written = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
    t = 0
    while t < n:
        k = min(settings.positions_per_step, n - t)
        cells = unwritten_cells(written, n - t)
        trials = [torch.cat([order[:, :t], cells[:, j : j + 1]], dim=1) for j in range(n - t)]
        logits = torch.stack([net(tokens, trial, cond)[:, -1] for trial in trials], dim=1)  # (b, m, v)
        uniform = _uniform(cells, t, generator, row_seeds) if settings.noise.active(t) else None
        picks = _select(logits, tokens.gather(1, cells), settings, k, t, n, uniform)
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
