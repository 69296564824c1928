# Shapes: b batch, n tokens = h*w, v vocab, m candidates, k cells placed per step.
"""Order extraction for training images (OAR stage 2): teacher-forced greedy placement.

At each step the context holds the true tokens already placed; every remaining cell is scored in one
`score_candidates` pass against the KV cache by the model's log-probability of its true token
("true_prob", the paper's choice) or its largest log-probability ("max_prob"); the best cell is placed.
With `gumbel_temperature > 0`, Gumbel noise times the temperature is added to the log-scores first
(sampling orders instead of taking the greedy one). With `positions_per_step = k` the top k cells are
placed at once (best first): the first via its candidate keys/values, the rest via `extend`.

Modified from: https://github.com/idiap/sigma-gpt (scoring all remaining positions against a cache).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from models.orders import unwritten_cells
from models.positions import CLASS_CELL


def true_prob(logits: Tensor, true_tokens: Tensor) -> Tensor:
    """log p(true token) (b, m) from logits (b, m, v) and true tokens (b, m)."""
    logits = logits.float()
    return logits.gather(-1, true_tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)


def max_prob(logits: Tensor, true_tokens: Tensor) -> Tensor:
    """log of the largest probability (b, m); the true tokens are not used."""
    logits = logits.float()
    return logits.amax(dim=-1) - logits.logsumexp(dim=-1)


SCORES = {"true_prob": true_prob, "max_prob": max_prob}


def _select(
    logits: Tensor, true_tokens: Tensor, score: str, k: int, gumbel_temperature: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Indices (b, k) of the k best candidates, best first."""
    scores = SCORES[score](logits, true_tokens)
    if gumbel_temperature > 0:
        uniform = torch.rand(scores.shape, generator=generator, device=scores.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        scores = scores + gumbel_temperature * gumbel
    return scores.topk(k, dim=1).indices


def _check(score: str, positions_per_step: int) -> None:
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {sorted(SCORES)}")
    if positions_per_step < 1:
        raise ValueError(f"positions_per_step must be >= 1, got {positions_per_step}")


@torch.no_grad()
def extract_orders(
    net, tokens: Tensor, cond: Tensor, score: str = "true_prob", positions_per_step: int = 1,
    gumbel_temperature: float = 0.0, generator: torch.Generator | None = None,
) -> Tensor:
    """The teacher-forced greedy order of each image.

    Args:
        net: an `OrderedTransformer`.
        tokens: (b, n) true tokens per raster cell.
        cond: (b,) class labels.
        score: "true_prob" or "max_prob".
        positions_per_step: cells placed per scoring pass.
        gumbel_temperature: 0 for the greedy order; > 0 adds that much Gumbel noise to the log-scores.
        generator: for the Gumbel noise.

    Returns:
        order (b, n).
    """
    _check(score, positions_per_step)
    b, n = tokens.shape
    cache = net.new_cache(cond)
    order = tokens.new_empty(b, n)
    written = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
    prev_token, prev_cell = tokens.new_zeros(b), tokens.new_full((b,), CLASS_CELL)
    t = 0
    while t < n:
        k = min(positions_per_step, n - t)
        cells = unwritten_cells(written, n - t)
        logits, kv = net.score_candidates(cache, prev_token, prev_cell, cells)
        picks = _select(logits, tokens.gather(1, cells), score, k, gumbel_temperature, generator)
        placed = cells.gather(1, picks)  # (b, k), best first
        net.append_candidate(cache, kv, picks[:, 0])
        if k > 1:  # chain the others: each holds the previous placed token and predicts the next cell
            net.extend(cache, tokens.gather(1, placed[:, :-1]), placed[:, :-1], placed[:, 1:])
        order[:, t : t + k] = placed
        written.scatter_(1, placed, True)
        prev_cell = placed[:, -1]
        prev_token = tokens.gather(1, prev_cell[:, None]).squeeze(1)
        t += k
    return order


@torch.no_grad()
def naive_extract_orders(
    net, tokens: Tensor, cond: Tensor, score: str = "true_prob", positions_per_step: int = 1,
    gumbel_temperature: float = 0.0, generator: torch.Generator | None = None,
) -> Tensor:
    """Reference for `extract_orders` without a cache: a full forward per candidate per step.

    Consumes `generator` exactly as `extract_orders`, so both agree under one seed.
    """
    _check(score, positions_per_step)
    b, n = tokens.shape
    order = tokens.new_empty(b, n)
    written = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
    t = 0
    while t < n:
        k = min(positions_per_step, n - t)
        cells = unwritten_cells(written, n - t)
        trials = [torch.cat([order[:, :t], cells[:, j : j + 1]], dim=1) for j in range(n - t)]
        logits = torch.stack([net(tokens, trial, cond)[:, -1] for trial in trials], dim=1)  # (b, m, v)
        picks = _select(logits, tokens.gather(1, cells), score, k, gumbel_temperature, generator)
        placed = cells.gather(1, picks)
        order[:, t : t + k] = placed
        written.scatter_(1, placed, True)
        t += k
    return order


def nll_under_order(net, tokens: Tensor, order: Tensor, cond: Tensor) -> Tensor:
    """Negative log-likelihood (b,) of each image written in `order`, in bits per token (one forward).

    Gradients flow; wrap in `torch.no_grad()` for evaluation.
    """
    logits = net(tokens, order, cond)  # (b, n, v)
    nats = F.cross_entropy(logits.transpose(1, 2).float(), tokens.gather(1, order), reduction="none")
    return nats.mean(dim=1) / math.log(2)
