# Shapes: b batch, n tokens = h*w, v vocab, N sequences.
"""Negative log-likelihood of token sequences under a generation order, in bits per token.

An any-order model gives each image one likelihood per order. Three orders are reported everywhere
(validation logs `val/nll_<order>`, the comparison's table the `nll_<order>` columns):
- raster: the scan a raster model is trained on;
- random: one uniformly random order per sequence (from a seeded generator: the same every time);
- inferred: the teacher-forced greedy order of the extraction (`models.extraction.extract_orders`, with
  the extraction's score: the paper's `true_prob` places, at each step, the cell whose *true* token is
  most likely). It is chosen knowing the tokens still to come, so it is a lower bound, not a likelihood:
  a worse model can score better by choosing its order from the answer.
- own: the order greedy confidence sampling would take on these tokens (at each step the cell of
  highest max-probability given the tokens already placed: extraction with `max_prob`). Each choice
  depends only on the tokens before it, so this is a proper likelihood of the model with its own order
  policy, the fair number to set against raster and random order.

The per-sequence maths (`models.extraction.nll_under_order`: one forward, cross-entropy of the true
tokens) stays with the network's scoring code: it is the training loss per sequence, in bits.
"""

import torch
from torch import Tensor

from evaluation.sampling import eval_mode
from models.extraction import ExtractionSettings, extract_orders, nll_under_order
from models.orders import random_order, raster_order


@torch.no_grad()
def nll_under_orders(net, tokens: Tensor, cond: Tensor, generator: torch.Generator | None = None,
                     inferred: bool = True, score: str = "true_prob") -> dict[str, Tensor]:
    """Bits per token (b,) of each sequence under the raster, a random and (if `inferred`) its inferred order.

    Args:
        net: an `OrderedTransformer`.
        tokens: (b, n) token sequences in raster cell order.
        cond: (b,) class labels.
        generator: draws the random orders (on its own device); None: the global generator.
        inferred: also the inferred and the own order (about n/2 forward passes' worth of work each).
        score: the extraction score of the inferred order ("true_prob" or "max_prob").

    Returns:
        {"raster": (b,), "random": (b,)[, "inferred": (b,), "own": (b,)]}; raster only for a network not told the
        next cell (next_pos none: a raster model has no other likelihood).
    """
    b, n = tokens.shape
    if not net.knows_next_cell:
        return {"raster": nll_under_order(net, tokens, raster_order(b, n, device=tokens.device), cond)}
    device = generator.device if generator is not None else tokens.device
    orders = {"raster": raster_order(b, n, device=tokens.device),
              "random": random_order(b, n, generator=generator, device=device).to(tokens.device)}
    if inferred:
        orders["inferred"] = extract_orders(net, tokens, cond, ExtractionSettings(score=score))
        orders["own"] = orders["inferred"] if score == "max_prob" else \
            extract_orders(net, tokens, cond, ExtractionSettings(score="max_prob"))
    return {name: nll_under_order(net, tokens, order, cond) for name, order in orders.items()}


def mean_nll_bits(net, tokens: Tensor, labels: Tensor, seed: int, batch_size: int = 64,
                  inferred: bool = True) -> dict[str, float]:
    """Mean bits per token of held-out sequences (N, n) under each order: {"nll_raster": ..., ...}.

    The random orders come from one CPU generator seeded `seed`, drawn batch after batch.
    """
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    with eval_mode(net):
        for x, y in zip(tokens.split(batch_size), labels.split(batch_size), strict=True):
            for name, bits in nll_under_orders(net, x, y, generator, inferred=inferred).items():
                sums[name] = sums.get(name, 0.0) + float(bits.sum())
    return {f"nll_{name}": total / len(tokens) for name, total in sums.items()}
