# Shapes: b batch, n tokens = h*w, v vocab, m candidates.
"""Order policies: which cell the decoding loop writes next (raster, random, given, confidence).

A policy names candidate cells each step (`candidates`), picks one per row from their logits (`choose`)
and hears the choice (`advance`). Fixed-order policies offer one candidate; the confidence policy
offers every unwritten cell and takes the one whose prediction is most confident (OAR order inference).

Order-choice noise (MaskGIT's "choice temperature"): Gumbel noise times T_k is added to the scores
before the arg-max, with T_k constant or annealed linearly to 0 over the generated steps; it is drawn
from its own generator (`choice_generator`), so the token draws are those of the greedy choice. T = 0
is the greedy choice; a very large T writes cells in uniformly random order. The confidence policy
keeps the unwritten cells as a list it updates (`advance`), not a sort per step; the shortlist variant
rescores only the best-ranked cells between full rankings (approximate, faster).
"""

import torch
from torch import Tensor

from models.logits import SCORES, TokenSampler, gumbel
from models.orders import drop_cells, known_first, random_order, raster_order, unwritten_cells

POLICIES = ("raster", "random", "given", "confidence")
SCHEDULES = ("constant", "linear")


# -------------------------------------------------------------------------------------- policies
class OrderPolicy:
    """Chooses the cell written at each step: `candidates` names cells, `choose` picks one per row, then
    `advance` hears the choice."""

    def start(self, written: Tensor) -> None:
        """Called once before the loop; written (b, n) bool marks the known (prefilled) cells."""

    def candidates(self, t: int, written: Tensor) -> Tensor:
        """Candidate cells (b, m) for step t (t cells are written in every row)."""
        raise NotImplementedError

    def choose(self, logits: Tensor) -> Tensor:
        """Index (b,) into the candidates, given their (guided) logits (b, m, v)."""
        raise NotImplementedError

    def drawn_token(self, choice: Tensor) -> Tensor | None:
        """The token (b,) the policy already drew for the chosen cells while choosing, else None."""
        return None

    def advance(self, choice: Tensor) -> None:
        """Called after each step with the choice (b,); policies that keep state between steps update it."""


class FixedOrderPolicy(OrderPolicy):
    """An order fixed before decoding; known cells go first, the rest keep the order's sequence."""

    def full_order(self, b: int, n: int, device: torch.device) -> Tensor:
        raise NotImplementedError

    def start(self, written: Tensor) -> None:
        self.order = known_first(self.full_order(*written.shape, written.device), written)

    def candidates(self, t: int, written: Tensor) -> Tensor:
        return self.order[:, t : t + 1]

    def choose(self, logits: Tensor) -> Tensor:
        return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)


class RasterPolicy(FixedOrderPolicy):
    def full_order(self, b: int, n: int, device: torch.device) -> Tensor:
        return raster_order(b, n, device=device)


class RandomPolicy(FixedOrderPolicy):
    """A fresh random order per image, drawn from `generator` when decoding starts."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def full_order(self, b: int, n: int, device: torch.device) -> Tensor:
        return random_order(b, n, generator=self.generator, device=device)


class GivenPolicy(FixedOrderPolicy):
    """A given order (b, n), e.g. one extracted from a training image."""

    def __init__(self, order: Tensor):
        self.given = order

    def full_order(self, b: int, n: int, device: torch.device) -> Tensor:
        if self.given.shape != (b, n):
            raise ValueError(f"given order has shape {tuple(self.given.shape)}, expected {(b, n)}")
        return self.given.to(device)


class ConfidencePolicy(OrderPolicy):
    """Every unwritten cell is a candidate; write the one with the best (optionally noisy) confidence.

    Args:
        score: a key of `SCORES`.
        choice_temperature: T of the Gumbel noise on the scores (0 = greedy).
        choice_schedule: "constant" or "linear" (T * (1 - k / n_gen) at the k-th generated cell).
        random_first: the first this many generated cells are chosen uniformly at random.
        choice_generator: draws the noise and the random first cells (not the tokens).
        token_sampler, generator: draw one token per candidate for score "sampled" (the chosen
            cell keeps its drawn token, so the loop does not draw again).
    """

    def __init__(self, score: str = "max_prob", choice_temperature: float = 0.0, choice_schedule: str = "linear",
                 random_first: int = 0, choice_generator: torch.Generator | None = None,
                 token_sampler: "TokenSampler | None" = None, generator: torch.Generator | None = None):
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; choose one of {sorted(SCORES)}")
        if choice_schedule not in SCHEDULES:
            raise ValueError(f"unknown choice_schedule {choice_schedule!r}; choose one of {list(SCHEDULES)}")
        self.score, self.confidence = score, SCORES[score]
        self.choice_temperature, self.choice_schedule = choice_temperature, choice_schedule
        self.random_first, self.choice_generator = random_first, choice_generator
        self.token_sampler, self.generator = token_sampler or TokenSampler(), generator
        self.t = self.known = self.total = 0
        self.drawn: Tensor | None = None

    def start(self, written: Tensor) -> None:
        self.known = int(written[0].sum()) if written.shape[0] else 0
        self.total = written.shape[1] - self.known  # cells to generate
        self.unwritten = unwritten_cells(written, self.total)  # (b, m) ascending; `advance` keeps it current

    def candidates(self, t: int, written: Tensor) -> Tensor:
        self.t = t
        return self.unwritten

    def advance(self, choice: Tensor) -> None:
        self.unwritten = drop_cells(self.unwritten, choice[:, None])  # no sort of the written mask per step

    def temperature_at(self, k: int) -> float:
        """T at the k-th generated cell (k = 0 first)."""
        if self.choice_schedule == "linear":
            return self.choice_temperature * (1.0 - k / max(self.total, 1))
        return self.choice_temperature

    def scores(self, logits: Tensor) -> Tensor:
        """The noise-free scores (b, m) of the candidates' logits (b, m, v)."""
        if self.score != "sampled":
            return self.confidence(logits)
        b, m, v = logits.shape
        self.drawn = self.token_sampler(logits.reshape(b * m, v), self.generator).view(b, m)
        return logits.float().log_softmax(dim=-1).gather(-1, self.drawn[..., None]).squeeze(-1)

    def choose(self, logits: Tensor) -> Tensor:
        scores, k = self.scores(logits), self.t - self.known
        if k < self.random_first:  # a uniformly random cell: every score replaced by noise
            return torch.rand(scores.shape, generator=self.choice_generator, device=scores.device).argmax(dim=-1)
        temperature = self.temperature_at(k)
        if temperature > 0:
            scores = scores + temperature * gumbel(scores.shape, self.choice_generator, scores.device)
        return scores.argmax(dim=-1)

    def drawn_token(self, choice: Tensor) -> Tensor | None:
        if self.drawn is None:
            return None
        return self.drawn.gather(1, choice[:, None]).squeeze(1)


class ShortlistConfidencePolicy(ConfidencePolicy):
    """Approximate confidence order: most steps rescore only a shortlist of cells.

    Every `refresh` steps (and the first) every unwritten cell is scored, as `ConfidencePolicy` does. The
    steps between rescore only the `shortlist` cells ranked highest by their latest scores (stale for
    cells not rescored since) and write the best of those. The cost per step falls from all m unwritten
    cells to `shortlist` of them; refresh=1, or a shortlist as long as the grid, is the exact policy.

    Args:
        shortlist: cells rescored on the steps between full rankings.
        refresh: a full ranking every `refresh` steps.
        **kwargs: `ConfidencePolicy`'s (score, choice noise, ...); choice noise applies within the
            shortlist, and the `random_first` cells are drawn from all unwritten cells.
    """

    def __init__(self, shortlist: int = 8, refresh: int = 8, **kwargs):
        super().__init__(**kwargs)
        if shortlist < 1 or refresh < 1:
            raise ValueError(f"shortlist and refresh must be >= 1, got {shortlist} and {refresh}")
        self.shortlist, self.refresh = shortlist, refresh

    def start(self, written: Tensor) -> None:
        super().start(written)
        self.steps, self.stale, self.listed = 0, None, None  # stale (b, m): latest score of each unwritten cell

    def candidates(self, t: int, written: Tensor) -> Tensor:
        unwritten = super().candidates(t, written)
        random_cell = t - self.known < self.random_first  # uniformly random among all cells, not the list
        full = random_cell or self.steps % self.refresh == 0 or unwritten.shape[1] <= self.shortlist
        self.listed = None if full else self.stale.topk(self.shortlist, dim=1).indices  # (b, shortlist)
        return unwritten if full else unwritten.gather(1, self.listed)

    def scores(self, logits: Tensor) -> Tensor:
        self.latest = super().scores(logits)  # noise-free; (b, m) or (b, shortlist)
        return self.latest

    def advance(self, choice: Tensor) -> None:
        listed = self.listed
        stale = self.latest if listed is None else self.stale.scatter(1, listed, self.latest)
        column = choice[:, None] if listed is None else listed.gather(1, choice[:, None])  # into unwritten
        super().advance(column[:, 0])
        self.stale = drop_cells(stale, column)
        self.steps += 1
