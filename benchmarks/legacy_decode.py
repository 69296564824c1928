# Shapes: b batch, n tokens, m candidates, k cache length.
"""The cached decoding loop as it was at commit 461859e, kept to time today's loop against it in one run.

Differences from `models.sampling.decode` (what the new loop removed): every layer of every step
concatenated the whole cache with the candidates' keys/values (`torch.cat`, a copy of the cache),
built its attention mask afresh, kept the cache in the parameters' dtype (fp32 under autocast, so
every step converted it), gathered the chosen candidate from a separate buffer, and the confidence
policy argsorted the written mask every step, and tokens were drawn with `torch.multinomial`. Only what
the benchmarks use: no CFG, no inpainting, temperature 1.
"""

import torch
from torch import Tensor

from models.logits import SCORES
from models.orders import unwritten_cells
from models.policies import FixedOrderPolicy
from models.positions import CLASS_CELL
from models.sampling import SamplerSettings, make_policy


def multinomial_draw(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The token draw of commit 461859e: one `torch.multinomial` sample (b,) per row of logits (b, v)."""
    return torch.multinomial(logits.float().softmax(dim=-1), 1, generator=generator).squeeze(1)


class _LegacyCandidates:
    """The old candidate memory: keys = cat(cache, candidate) in every layer."""

    is_causal = False

    def __init__(self, k: Tensor, v: Tensor, length: int, m: int):
        self.k, self.v, self.length = k, v, length
        past = torch.ones(m, length, dtype=torch.bool, device=k.device)
        self.mask = torch.cat([past, torch.eye(m, dtype=torch.bool, device=k.device)], dim=1)
        depth, b, heads, _, head_dim = k.shape
        self.new_k, self.new_v = k.new_empty(depth, b, heads, m, head_dim), v.new_empty(depth, b, heads, m, head_dim)

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.new_k[layer], self.new_v[layer] = k, v
        keys = torch.cat([self.k[layer, :, :, : self.length], k.to(self.k.dtype)], dim=2)
        values = torch.cat([self.v[layer, :, :, : self.length], v.to(self.v.dtype)], dim=2)
        return keys, values


@torch.no_grad()
def legacy_sample(
    net, cond: Tensor, policy: str, generator: torch.Generator | None = None, draw=multinomial_draw
) -> tuple[Tensor, Tensor]:
    """Tokens (b, n) and order (b, n) sampled by the old loop (policy raster | random | confidence); `draw`
    (logits, generator) -> tokens is the token draw."""
    b, n = cond.shape[0], net.num_tokens
    policy = make_policy(SamplerSettings(policy=policy), generator=generator)
    shape = (net.depth, b, net.heads, n, net.head_dim)
    k, v = torch.empty(shape, dtype=net.head.weight.dtype), torch.empty(shape, dtype=net.head.weight.dtype)
    tokens, order = torch.zeros(b, n, dtype=torch.long), torch.zeros(b, n, dtype=torch.long)
    written = torch.zeros(b, n, dtype=torch.bool)
    prev_token, prev_cell = torch.zeros(b, dtype=torch.long), torch.full((b,), CLASS_CELL)
    policy.start(written)
    for t in range(n):
        fixed = isinstance(policy, FixedOrderPolicy)
        cells = policy.candidates(t, written) if fixed else unwritten_cells(written, n - t)
        x = net._content(cond, prev_token[:, None], prev_cell[:, None])  # the net's next cell enters at its input
        slots = net.next_pos.candidates(x, prev_cell[:, None], cells, net.own_pos, 0).candidates
        memory = _LegacyCandidates(k, v, t, cells.shape[1])
        logits = net._head(net._run(slots, memory))
        choice = policy.choose(logits) if fixed else SCORES["max_prob"](logits).argmax(dim=-1)
        index = choice.view(1, b, 1, 1, 1).expand(net.depth, b, net.heads, 1, net.head_dim)
        k[:, :, :, t : t + 1], v[:, :, :, t : t + 1] = memory.new_k.gather(3, index), memory.new_v.gather(3, index)
        chosen = logits.gather(1, choice.view(b, 1, 1).expand(b, 1, logits.shape[2])).squeeze(1)
        cell, token = cells.gather(1, choice[:, None]).squeeze(1), draw(chosen, generator)
        tokens.scatter_(1, cell[:, None], token[:, None])
        written.scatter_(1, cell[:, None], True)
        order[:, t], prev_token, prev_cell = cell, token, cell
    return tokens, order
