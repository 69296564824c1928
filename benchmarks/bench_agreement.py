# Shapes: b batch, n tokens, m candidates, v vocab.
"""What the fast settings change (issue 12): bf16 against fp32, a shortlist against exact confidence order,
k cells per extraction step against exact greedy. Quality, not speed (speed: bench_ar.py, bench_extraction.py).

For a network (a checkpoint, or a random one with --preset), on token grids (a token cache, or random):
- NLL (bits per token) under random orders in fp32 and bf16, and their relative difference;
- greedy extraction choices: teacher-forced along the fp32 greedy order, the share of steps at which
  bf16 picks the same cell (and the fp32 score its other picks give up: ~0 when they are near-ties),
  and the share of whole orders that come out identical;
- positions_per_step k: the share of order entries equal to exact greedy's, the rank correlation of the
  orders (Spearman of the step maps, per image), and the NLL under each order;
- shortlist confidence sampling: the share of steps at which it writes the cell the exact confidence
  policy would write from the same prefix, and the NLL of each sampler's own samples.

    python -m benchmarks.bench_agreement --ckpt runs/any_order/checkpoints/last.ckpt --tokens cache/tokens-<key>.pt
    python -m benchmarks.bench_agreement --preset tiny     # random weights, random tokens
"""

import argparse
import json
import math
from pathlib import Path

import torch

from models.checkpoint import load_net
from models.extraction import ExtractionSettings, extract_orders, nll_under_order
from models.logits import SCORES, candidate_scores
from models.orders import drop_cells, order_to_step_map, random_order
from models.positions import CLASS_CELL
from models.precision import cast_for_inference
from models.sampling import (
    NoGuidance,
    OrderPolicy,
    SamplerSettings,
    ShortlistConfidencePolicy,
    TokenSampler,
    decode,
    sample,
)
from models.transformer import OrderedTransformer

PRESETS = {"tiny": dict(width=32, depth=1, heads=2), "small": dict(width=256, depth=4, heads=4)}


@torch.no_grad()
def greedy_agreement(net, tokens, cond, order, dtype, score: str = "true_prob") -> tuple[float, float]:
    """Teacher-forced along `order` (the fp32 greedy order): the share of steps at which the network in
    `dtype` picks the cell fp32 picks, and the mean fp32 score (nats) its picks give up (0 for ties)."""
    b, n = tokens.shape
    nets = (net, cast_for_inference(net, dtype))
    caches = [x.new_cache(cond) for x in nets]
    cells = torch.arange(n, device=tokens.device).expand(b, n)
    prev_token, prev_cell = tokens.new_zeros(b), tokens.new_full((b,), CLASS_CELL)
    same, regret = 0.0, 0.0
    for t in range(n):
        scores = []
        for x, cache in zip(nets, caches, strict=True):
            logits, kv = x.score_candidates(cache, prev_token, prev_cell, cells)
            scores.append(candidate_scores(score, logits, tokens.gather(1, cells)))
            given = (cells == order[:, t : t + 1]).long().argmax(dim=1)  # the reference's cell, as an index
            x.append_candidate(cache, kv, given)
        pick = scores[1].argmax(dim=1)
        same += float((pick == scores[0].argmax(dim=1)).float().mean()) / n
        regret += float((scores[0].amax(dim=1) - scores[0].gather(1, pick[:, None]).squeeze(1)).mean()) / n
        cells = drop_cells(cells, given[:, None])
        prev_cell = order[:, t]
        prev_token = tokens.gather(1, prev_cell[:, None]).squeeze(1)
    return same, regret


class ShortlistProbe(OrderPolicy):
    """Scores every unwritten cell, writes what a `ShortlistConfidencePolicy` writes, and records whether the
    exact confidence policy would have written the same cell from the same prefix."""

    def __init__(self, inner: ShortlistConfidencePolicy):
        self.inner, self.same = inner, []

    def start(self, written):
        self.inner.start(written)

    def candidates(self, t, written):
        self.inner.candidates(t, written)  # sets inner.listed (None on full-ranking steps)
        return self.inner.unwritten

    def choose(self, logits):
        exact = SCORES[self.inner.score](logits).argmax(dim=-1)
        listed = self.inner.listed
        sub = logits if listed is None else logits.gather(1, listed[..., None].expand(-1, -1, logits.shape[2]))
        self.sub_choice = self.inner.choose(sub)
        column = self.sub_choice if listed is None else listed.gather(1, self.sub_choice[:, None]).squeeze(1)
        self.same.append((column == exact).float().mean().item())
        return column

    def advance(self, choice):
        self.inner.advance(self.sub_choice)


def rank_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the Spearman correlation of two orders' step maps (1 = the same order)."""
    n = a.shape[1]
    d2 = (order_to_step_map(a, 1, n) - order_to_step_map(b, 1, n)).double().pow(2).sum(dim=(1, 2))
    return float((1 - 6 * d2 / (n * (n * n - 1))).mean())


def sample_nll(out) -> float:
    """Mean bits per token the model gave its own samples (tokens drawn at temperature 1)."""
    log_p = out.logits.log_softmax(-1).gather(2, out.tokens.gather(1, out.order)[..., None])
    return float(-log_p.mean() / math.log(2))


def agreement(net, tokens, cond, shortlist: int = 8, refresh: int = 8, k: int = 2, seed: int = 0) -> dict:
    """Every figure of the module docstring, for one batch."""
    gen = torch.Generator().manual_seed(seed)
    b, n = tokens.shape
    order = random_order(b, n, generator=gen)
    with torch.no_grad():
        nll32, nll16 = (float(nll_under_order(net, tokens, order, cond, dtype=d).mean())
                        for d in (None, torch.bfloat16))
    greedy = extract_orders(net, tokens, cond)
    greedy16 = extract_orders(net, tokens, cond, dtype=torch.bfloat16)
    several = extract_orders(net, tokens, cond, ExtractionSettings(positions_per_step=k))
    same_step, regret = greedy_agreement(net, tokens, cond, greedy, torch.bfloat16)
    with torch.no_grad():
        nll_greedy, nll_several = (float(nll_under_order(net, tokens, o, cond).mean()) for o in (greedy, several))
    probe = ShortlistProbe(ShortlistConfidencePolicy(shortlist, refresh))
    exact = sample(net, cond, "confidence", generator=torch.Generator().manual_seed(seed), return_logits=True)
    fast = decode(net, cond, probe, NoGuidance(), TokenSampler(), torch.Generator().manual_seed(seed),
                  return_logits=True)
    rand = sample(net, cond, "random", generator=torch.Generator().manual_seed(seed), return_logits=True)
    short = sample(net, cond, SamplerSettings(shortlist=shortlist, refresh=refresh),
                   generator=torch.Generator().manual_seed(seed), return_logits=True)
    return {
        "nll_random_order_fp32": nll32, "nll_random_order_bf16": nll16, "nll_rel_diff": abs(nll16 - nll32) / nll32,
        "bf16_same_greedy_step": same_step, "bf16_greedy_regret_nats": regret,
        "bf16_same_greedy_order": float((greedy16 == greedy).all(dim=1).float().mean()),
        "bf16_order_rank_corr": rank_corr(greedy16, greedy),
        f"k{k}_same_order_entry": float((several == greedy).float().mean()),
        f"k{k}_order_rank_corr": rank_corr(several, greedy),
        "nll_greedy_order": nll_greedy, f"nll_k{k}_order": nll_several,
        "shortlist_same_step": sum(probe.same) / len(probe.same), "shortlist": shortlist, "refresh": refresh,
        "sample_nll_confidence": sample_nll(exact), "sample_nll_shortlist": sample_nll(short),
        "shortlist_probe_same_path": bool(torch.equal(fast.order, short.order)),
        "sample_nll_random": sample_nll(rand),
    }


def _data(args, net) -> tuple[torch.Tensor, torch.Tensor]:
    n, gen = net.num_tokens, torch.Generator().manual_seed(args.seed)
    if args.tokens is None:
        return torch.randint(net.vocab_size, (args.batch, n), generator=gen), torch.randint(
            max(net.num_classes, 1), (args.batch,), generator=gen)
    cache = torch.load(args.tokens, map_location="cpu", weights_only=True)
    tokens = cache["tokens"][:, 0].flatten(1)  # (N, F, h, w): the unflipped view
    pick = torch.randperm(len(tokens), generator=gen)[: args.batch]
    return tokens[pick], cache["labels"][pick]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="a stage-1/2 Lightning checkpoint (else a random --preset net)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--tokens", type=Path, help="a token cache (tokens-<key>.pt); else random tokens")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shortlist", type=int, default=8)
    parser.add_argument("--refresh", type=int, default=8)
    parser.add_argument("--positions-per-step", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    net = load_net(args.ckpt) if args.ckpt else OrderedTransformer(512, (8, 8), 8, **PRESETS[args.preset]).eval()
    tokens, cond = _data(args, net)
    figures = agreement(net, tokens, cond, args.shortlist, args.refresh, args.positions_per_step, args.seed)
    print("\n".join(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}"
                    for key, value in figures.items()))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=2))
    return figures


if __name__ == "__main__":
    main()
