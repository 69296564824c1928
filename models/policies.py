# Shapes: b batch, n tokens = h*w, v vocab, m candidates.
"""Order policies: which cell the decoding loop writes next (raster, random, given, confidence).

A policy names candidate cells each step (`candidates`), picks one per row from their logits (`choose`)
and hears the choice (`advance`). Fixed-order policies offer one candidate; the confidence policy
offers every unwritten cell and takes the one whose prediction is most confident (OAR order inference).

Known cells (inpainting, outpainting, editing): `start` hears every row's known cells (rows may know
different numbers), and the policy decides when each is written; the loop gives a known cell its known
token whenever it is written. `prefix` names the steps every row spends on known cells first, which the
loop gives as context in one pass. Known cells go first (raster order), so every generated cell sees all
of them, or, for fixed orders with `known_in_order`, stay where the order puts them (teacher-forced in
place: how a raster model edits, each generated cell seeing only the known cells before it).

Order-choice noise (`models.choice.ChoiceNoise`, shared with order extraction) is drawn from its own generator
(`choice_generator`), so the token draws are those of the greedy choice. The confidence policy
keeps the unwritten cells as a list it updates (`advance`), not a sort per step; the shortlist variant
rescores only the best-ranked cells between full rankings (approximate, faster).
"""

import torch
from torch import Tensor

from models.choice import ChoiceNoise, gumbel
from models.logits import SCORES, TokenSampler
from models.orders import drop_cells, known_first, random_order, raster_order, unwritten_cells

POLICIES = ("raster", "random", "given", "confidence")
GREEDY = ChoiceNoise()  # no order-choice noise
FIXED_POLICIES = ("raster", "random", "given")  # policies whose order is fixed before decoding


# -------------------------------------------------------------------------------------- policies
class OrderPolicy:
    """Chooses the cell written at each step: `candidates` names cells, `choose` picks one per row, then
    `advance` hears the choice."""

    def start(self, known: Tensor) -> None:
        """Called once before the loop with the known cells (b, n) bool (all False: nothing known); rows
        may know different numbers of cells."""

    def prefix(self) -> Tensor | None:
        """The cells (b, p) every row writes first, all known, which the loop gives as context in one pass
        before its first step (None: none)."""
        return None

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
    """An order fixed before decoding. Known cells go first (raster order; the rest keep the order's
    sequence), or with `known_in_order` stay where the order puts them (teacher-forced in place)."""

    def __init__(self, known_in_order: bool = False):
        self.known_in_order = known_in_order

    def full_order(self, b: int, n: int, device: torch.device) -> Tensor:
        raise NotImplementedError

    def start(self, known: Tensor) -> None:
        order = self.full_order(*known.shape, known.device)
        self.order = order if self.known_in_order else known_first(order, known)
        leading = known.gather(1, self.order).long().cumprod(dim=1).sum(dim=1)  # (b,) known steps before an unknown
        self.leading = int(leading.min()) if known.shape[0] else 0

    def prefix(self) -> Tensor:
        return self.order[:, : self.leading]

    def candidates(self, t: int, written: Tensor) -> Tensor:
        return self.order[:, t : t + 1]

    def choose(self, logits: Tensor) -> Tensor:
        return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)


class RasterPolicy(FixedOrderPolicy):
    def full_order(self, b: int, n: int, device: torch.device) -> Tensor:
        return raster_order(b, n, device=device)


class RandomPolicy(FixedOrderPolicy):
    """A fresh random order per image, drawn from `generator` when decoding starts."""

    def __init__(self, generator: torch.Generator | None = None, known_in_order: bool = False):
        super().__init__(known_in_order)
        self.generator = generator

    def full_order(self, b: int, n: int, device: torch.device) -> Tensor:
        return random_order(b, n, generator=self.generator, device=device)


class GivenPolicy(FixedOrderPolicy):
    """A given order (b, n), e.g. one extracted from a training image."""

    def __init__(self, order: Tensor, known_in_order: bool = False):
        super().__init__(known_in_order)
        self.given = order

    def full_order(self, b: int, n: int, device: torch.device) -> Tensor:
        if self.given.shape != (b, n):
            raise ValueError(f"given order has shape {tuple(self.given.shape)}, expected {(b, n)}")
        return self.given.to(device)


class ConfidencePolicy(OrderPolicy):
    """Every unwritten cell is a candidate; write the one with the best (optionally noisy) confidence.

    Known cells go first, in raster order: the fewest any row knows as the prefix, then each row's others
    in the loop's first steps (those rows take their next known cell whatever the scores say). The noise
    schedule and `random_first` count each row's generated cells.

    Args:
        score: a sampler score of `models.logits.SCORES` (validated by `SamplerSettings`).
        noise: the order-choice noise; its schedule and `random_first` count each row's generated cells.
        choice_generator: draws the noise and the random first cells (not the tokens).
        token_sampler, generator: draw one token per candidate for score "sampled" (the chosen
            cell keeps its drawn token, so the loop does not draw again).
    """

    def __init__(self, score: str = "max_prob", noise: ChoiceNoise = GREEDY,
                 choice_generator: torch.Generator | None = None, token_sampler: "TokenSampler | None" = None,
                 generator: torch.Generator | None = None):
        self.score, self.confidence, self.noise = score, SCORES[score], noise
        self.choice_generator = choice_generator
        self.token_sampler, self.generator = token_sampler or TokenSampler(), generator
        self.t = self.fewest = self.most = 0
        self.known = self.total = torch.zeros(1, dtype=torch.long)  # (b,) per row, set by `start`
        self.drawn: Tensor | None = None

    def start(self, known: Tensor) -> None:
        b, n = known.shape
        self.known = known.sum(dim=1)  # (b,) known cells per row
        self.total = n - self.known  # (b,) cells to generate
        self.known_cells = (~known).to(torch.uint8).argsort(dim=1, stable=True)  # (b, n) known first, raster order
        self.fewest, self.most = torch.stack([self.known.min(), self.known.max()]).tolist() if b else (0, 0)
        written = torch.zeros_like(known).scatter_(1, self.prefix(), True)
        self.unwritten = unwritten_cells(written, n - self.fewest)  # (b, m) ascending; `advance` keeps it current

    def prefix(self) -> Tensor:
        return self.known_cells[:, : self.fewest]

    def candidates(self, t: int, written: Tensor) -> Tensor:
        self.t, self.offered = t, self.unwritten
        return self.unwritten

    def advance(self, choice: Tensor) -> None:
        self.unwritten = drop_cells(self.unwritten, choice[:, None])  # no sort of the written mask per step

    def scores(self, logits: Tensor) -> Tensor:
        """The noise-free scores (b, m) of the candidates' logits (b, m, v)."""
        if self.score != "sampled":
            return self.confidence(logits)
        b, m, v = logits.shape
        self.drawn = self.token_sampler(logits.reshape(b * m, v), self.generator).view(b, m)
        return logits.float().log_softmax(dim=-1).gather(-1, self.drawn[..., None]).squeeze(-1)

    def choose(self, logits: Tensor) -> Tensor:
        scores = self.scores(logits)
        if self.noise.active(self.t - self.most):  # some row still takes noise
            k = self.t - self.known  # (b,) cells generated so far in each row (< 0 while known cells go in)
            noise = gumbel(scores.shape, self.choice_generator, scores.device)
            scores = self.noise.apply(scores, k, self.total, noise)
        return self._known_next(scores.argmax(dim=-1))

    def _known_next(self, choice: Tensor) -> Tensor:
        """Rows that still have known cells to give (t < their count) take the next one among the candidates."""
        if self.t >= self.most:
            return choice
        cell = self.known_cells[:, self.t]  # (b,) each row's next known cell (meaningful where t < known)
        column = (self.offered == cell[:, None]).to(torch.uint8).argmax(dim=1)
        return torch.where(self.t < self.known, column, choice)

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

    def start(self, known: Tensor) -> None:
        super().start(known)
        self.steps, self.stale, self.listed = 0, None, None  # stale (b, m): latest score of each unwritten cell

    def candidates(self, t: int, written: Tensor) -> Tensor:
        unwritten = super().candidates(t, written)
        random_cell = t - self.most < self.noise.random_first  # uniformly random among all cells, not the list
        full = random_cell or t < self.most or self.steps % self.refresh == 0 or unwritten.shape[1] <= self.shortlist
        self.listed = None if full else self.stale.topk(self.shortlist, dim=1).indices  # (b, shortlist)
        self.offered = unwritten if full else unwritten.gather(1, self.listed)  # every cell while known ones go in
        return self.offered

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
