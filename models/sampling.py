# Shapes: b batch, n tokens = h*w, v vocab, m candidates.
"""One KV-cached decoding loop for every order policy (raster, random, given, confidence).

Each step the policy names candidate cells, the network scores them all in one `score_candidates` pass
against the cache, the policy picks one cell per row, its token is sampled, and the chosen candidate's
keys/values are appended. Fixed-order policies offer one candidate; the confidence policy offers every
unwritten cell and takes the one whose prediction is most confident (OAR order inference).

Choices documented here:
- CFG runs 2b rows (labels, then the null class); guided = uncond + s * (cond - uncond); both halves
  take the same cell and token. cfg_scale == 1 runs b rows only (identical results, half the cost).
- Confidence is computed on the guided logits at temperature 1, before top-k / top-p: the order
  follows the model's (guided) belief, and the sampling knobs shape only the token draw. Every score
  is a log-probability-like number (higher = chosen earlier).
- Order-choice noise (MaskGIT's "choice temperature"): Gumbel noise times T_k is added to the scores
  before the arg-max, with T_k constant or annealed linearly to 0 over the generated steps; it is
  drawn from its own generator (`choice_generator`), so the token draws are those of the greedy
  choice. T = 0 is the greedy choice; a very large T writes cells in uniformly random order.
- Tokens are drawn by the Gumbel-max trick (`TokenSampler`: one uniform per row and token), so two
  samplers that see the same logits consume the generator identically.
- The confidence policy keeps the unwritten cells as a list it updates (`advance`), not a sort per step;
  `shortlist > 0` rescores only the best-ranked cells between full rankings (approximate, faster).
- Known cells (inpainting, outpainting, class editing; any number per row): a known cell always receives
  its known token, whenever the policy writes it. `known_placement="first"` writes every row's known
  cells first (raster order): the steps all rows spend on known cells go in as one `extend` (the
  prefill), and a row that knows more cells than the others gives its extra ones in the loop's first
  steps, teacher-forced, while the others generate. `"in_order"` (fixed orders only) keeps each known
  cell at its step of the order, teacher-forced in place: a raster model's standard way of editing, where
  a generated cell sees only the known cells before it. Every row's sequence is exactly what decoding
  that row alone would give; only the shared random draws differ.

Modified from: https://github.com/FoundationVision/LlamaGen (autoregressive/models/generate.py:
logit processing and CFG) and https://github.com/idiap/sigma-gpt (scoring all cells against a cache).
"""

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from models.choice import SCHEDULES, ChoiceNoise
from models.logits import (
    SAMPLER_SCORES,
    ClassifierFreeGuidance,
    NoGuidance,
    TokenSampler,
    check_setting,
    make_guidance,
)
from models.policies import (
    FIXED_POLICIES,
    POLICIES,
    ConfidencePolicy,
    GivenPolicy,
    OrderPolicy,
    RandomPolicy,
    RasterPolicy,
    ShortlistConfidencePolicy,
)
from models.positions import CLASS_CELL
from models.precision import PRECISIONS, cast_for_inference, resolve_dtype

AUTO = "auto"  # choice_temperature: the one the model samples best with (`SamplerSettings.resolved`)
# The order-choice noise of a model trained on random orders: Gumbel noise of scale 3 on the log-confidence,
# annealed to 0, the best any-order arm of the ablation (docs/study.md section 2; greedy collapses).
NOISY_CHOICE_TEMPERATURE = 3.0


class SampleOutput(NamedTuple):
    """tokens (b, n) per raster cell; order (b, n) actually used; logits (b, n, v) optional: the
    (guided) logits of the cell written at each step, before temperature / top-k / top-p."""

    tokens: Tensor
    order: Tensor
    logits: Tensor | None = None


@dataclass
class SamplerSettings:
    """How images are sampled (recorded beside every sample file and metric).

    Attributes:
        policy: generation order: raster | random | confidence (OAR) | auto (the module resolves it: raster for
            a model trained on raster orders, else confidence).
        temperature: softmax temperature of token sampling (> 0).
        top_k: keep the k most likely tokens (0 = all).
        top_p: nucleus sampling mass in (0, 1] (1.0 = all).
        cfg_scale: classifier-free guidance scale (1.0 = none).
        score: confidence of a cell under `confidence` (`models.logits.SCORES`): max_prob | neg_entropy | sampled
            (log-probability of the token drawn for the cell, MaskGIT's rule) | margin (top-1 minus
            top-2 log-probability) | least_confident (hardest cell first).
        choice_temperature: T, the scale of the Gumbel noise added to the scores (0 = greedy choice;
            `models.choice.ChoiceNoise`, the same noise as order extraction's), or
            "auto": the T the model samples best with, which only the LightningModule knows (`resolved`):
            0 for a model fine-tuned on its own orders, `NOISY_CHOICE_TEMPERATURE` for one trained on
            random orders (docs/study.md).
        choice_schedule: constant | linear (T annealed to 0 over the generated steps).
        random_first: the first this many generated cells are chosen uniformly at random.
        shortlist: `confidence` only: 0 = exact; k > 0 = between full rankings, rescore only the k cells
            ranked highest so far (`ShortlistConfidencePolicy`: approximate, several times faster).
        refresh: with a shortlist, a full ranking every `refresh` steps.
        precision: fp32 | bf16 | auto (bf16 where the device has native bf16 matmuls: AMX or AVX512-BF16
            CPUs, GPUs of compute capability >= 8): the network runs as a bf16 copy, logits and the
            choices stay fp32 (`models.precision`). bf16 changes near-tied choices (README, Benchmarks).
    """

    policy: str = "confidence"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    score: str = "max_prob"
    choice_temperature: float | str = 0.0
    choice_schedule: str = "linear"
    random_first: int = 0
    shortlist: int = 0
    refresh: int = 8
    precision: str = "fp32"

    def __post_init__(self) -> None:
        token_sampler(self)  # checks temperature, top_k and top_p
        checks = [
            ("policy", self.policy in POLICIES or self.policy == AUTO, f"one of {list(POLICIES)} or {AUTO!r}"),
            ("cfg_scale", self.cfg_scale >= 0, ">= 0 (1 = no guidance)"),
            ("score", self.score in SAMPLER_SCORES, f"one of {list(SAMPLER_SCORES)}"),
            ("choice_temperature", self.choice_temperature == AUTO or
             (not isinstance(self.choice_temperature, str) and math.isfinite(self.choice_temperature)
              and self.choice_temperature >= 0), f">= 0 (0 = greedy choice) or {AUTO!r}"),
            ("choice_schedule", self.choice_schedule in SCHEDULES, f"one of {list(SCHEDULES)}"),
            ("random_first", self.random_first >= 0, ">= 0"),
            ("shortlist", self.shortlist >= 0, ">= 0 (0 = exact confidence order)"),
            ("refresh", self.refresh >= 1, ">= 1"),
            ("precision", self.precision in PRECISIONS, f"one of {list(PRECISIONS)} (auto: bf16 where it pays)"),
        ]
        for key, ok, expected in checks:
            check_setting(key, ok, expected, getattr(self, key))

    def resolved(self, auto_temperature: float) -> "SamplerSettings":
        """These settings with choice_temperature "auto" replaced by `auto_temperature` (a copy either way)."""
        return replace(self, choice_temperature=auto_temperature if self.choice_temperature == AUTO
                       else self.choice_temperature)


KNOWN_PLACEMENTS = ("first", "in_order")  # where known cells go in the sequence (see the module docstring)


def make_policy(
    settings: SamplerSettings, order: Tensor | None = None, generator: torch.Generator | None = None,
    choice_generator: torch.Generator | None = None, known_placement: str = "first",
) -> OrderPolicy:
    """Build the policy `settings.policy` names ("given" needs `order`); `known_placement` in KNOWN_PLACEMENTS."""
    policy = settings.policy
    if policy == AUTO:
        raise ValueError("policy 'auto' is resolved by the module that knows how the model was trained (raster for a "
                         "raster model, else confidence): resolve it first, or name the policy")
    if (order is not None) != (policy == "given"):
        raise ValueError("pass `order` exactly when policy == 'given'")
    if known_placement not in KNOWN_PLACEMENTS:
        raise ValueError(f"known_placement must be one of {list(KNOWN_PLACEMENTS)}, got {known_placement!r}")
    in_order = known_placement == "in_order"
    if in_order and policy not in FIXED_POLICIES:
        raise ValueError(f"known cells stay in order only under a fixed order ({', '.join(FIXED_POLICIES)}); "
                         f"the {policy} policy writes them first")
    builders = {
        "raster": lambda: RasterPolicy(in_order),
        "random": lambda: RandomPolicy(generator, in_order),
        "given": lambda: GivenPolicy(order, in_order),
        "confidence": lambda: confidence_policy(settings, choice_generator, generator),
    }
    return builders[policy]()


def confidence_policy(settings: SamplerSettings, choice_generator: torch.Generator | None,
                      generator: torch.Generator | None) -> ConfidencePolicy:
    """The exact confidence policy, or the shortlist one when `settings.shortlist` > 0."""
    if settings.choice_temperature == AUTO:
        raise ValueError("choice_temperature 'auto' is resolved by the LightningModule that knows how the model "
                         "was trained: call settings.resolved(T) first, or pass a number")
    noise = ChoiceNoise(settings.choice_temperature, settings.choice_schedule, settings.random_first)
    kwargs = dict(score=settings.score, noise=noise, choice_generator=choice_generator,
                  token_sampler=token_sampler(settings), generator=generator)
    if settings.shortlist > 0:
        return ShortlistConfidencePolicy(settings.shortlist, settings.refresh, **kwargs)
    return ConfidencePolicy(**kwargs)


def token_sampler(settings: SamplerSettings) -> "TokenSampler":
    return TokenSampler(settings.temperature, settings.top_k, settings.top_p)


# --------------------------------------------------------------------------------- decoding loop
@torch.no_grad()
def sample(
    net, cond: Tensor, settings: SamplerSettings | str | None = None, order: Tensor | None = None,
    generator: torch.Generator | None = None, choice_generator: torch.Generator | None = None,
    known_tokens: Tensor | None = None, known_mask: Tensor | None = None, return_logits: bool = False,
    dtype: torch.dtype | None = None, known_placement: str = "first",
) -> SampleOutput:
    """Generate token grids with a KV cache, choosing cells as `settings` say (put `net` in eval mode first).

    Args:
        net: an `OrderedTransformer`.
        cond: (b,) class labels (`net.null_class` for unconditional rows).
        settings: the sampler settings, or just a policy name (default settings otherwise).
        order: (b, n) the order for policy "given".
        generator: for the token draws (and the random orders).
        choice_generator: for the order-choice noise of the confidence policy (default: torch's global RNG).
        known_tokens: (b, n) or (b, h, w) tokens for inpainting / outpainting / editing, read where known_mask.
        known_mask: (b, n), (b, h, w), (n,) or (h, w) bool; rows may know different numbers of cells. Known
            cells keep their tokens; only the others are generated.
        return_logits: also return the logits of the cell written at every step.
        dtype: overrides `settings.precision`: run a copy of the network in `dtype`, e.g. torch.bfloat16,
            with fp32 logits (see `models.precision`).
        known_placement: "first" (known cells first, raster order: every generated cell sees them all) |
            "in_order" (raster / random / given: each known cell at its step of the order, teacher-forced).

    Returns:
        SampleOutput(tokens (b, n), order (b, n) (known cells first), logits (b, n, v) or None).
    """
    settings = as_settings(settings)
    if settings.policy != AUTO:
        net.check_order_policy(settings.policy)
    net = cast_for_inference(net, dtype or resolve_dtype(settings.precision, cond.device))
    policy = make_policy(settings, order=order, generator=generator, choice_generator=choice_generator,
                         known_placement=known_placement)
    guidance = make_guidance(net, settings.cfg_scale)
    return decode(net, cond, policy, guidance, token_sampler(settings), generator, known_tokens, known_mask,
                  return_logits)


CHOICE_SEED_OFFSET = 7919  # keeps the choice noise of a seed independent of the token draws of that seed


def choice_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The order-choice noise's own generator for sampling seed `seed` (the tokens use `seed` itself)."""
    return torch.Generator(device=device).manual_seed(seed + CHOICE_SEED_OFFSET)


def as_settings(settings: SamplerSettings | str | None) -> SamplerSettings:
    """Settings from settings, a policy name (default settings otherwise) or None (the defaults)."""
    if isinstance(settings, SamplerSettings):
        return settings
    return SamplerSettings() if settings is None else SamplerSettings(policy=settings)


@torch.no_grad()
def decode(
    net, cond: Tensor, policy: OrderPolicy, guidance: NoGuidance | ClassifierFreeGuidance,
    sampler: TokenSampler, generator: torch.Generator | None = None, known_tokens: Tensor | None = None,
    known_mask: Tensor | None = None, return_logits: bool = False,
) -> SampleOutput:
    """The decoding loop behind `sample`, with its parts passed in (see `sample` for the arguments)."""
    b, n = cond.shape[0], net.num_tokens
    cache = net.new_cache(guidance.cond(cond))
    state = _DecodeState.empty(b, n, net.vocab_size if return_logits else 0, cond.device)
    known = known_cells(known_tokens, known_mask, b, n)
    policy.start(known.mask if known else torch.zeros(b, n, dtype=torch.bool, device=cond.device))
    if known:
        _prefill(net, cache, guidance, state, known.tokens, policy.prefix())
    rows = guidance.rows
    for t in range(cache.steps, n):
        cells = policy.candidates(t, state.written)
        logits, kv = net.score_candidates(cache, rows(state.prev_token), rows(state.prev_cell), rows(cells))
        logits = guidance.combine(logits)  # (b, m, v)
        choice = policy.choose(logits)
        net.append_candidate(cache, kv, rows(choice))
        _write_choice(state, t, policy, sampler, generator, cells, logits, choice, known)
    return SampleOutput(state.tokens, state.order, state.logits if return_logits else None)


class KnownCells(NamedTuple):
    """The cells whose tokens are given: tokens (b, n) read where mask (b, n) bool."""

    tokens: Tensor
    mask: Tensor


def known_cells(known_tokens: Tensor | None, known_mask: Tensor | None, b: int, n: int) -> KnownCells | None:
    """`sample`'s known cells as (b, n) tensors (a mask of one row applies to every row); None when no mask."""
    if known_mask is None:
        return None
    if known_tokens is None:
        raise ValueError("known_mask needs known_tokens: the tokens of the known cells")
    shapes = f"known_tokens {tuple(known_tokens.shape)} and known_mask {tuple(known_mask.shape)}"
    if known_mask.numel() not in (n, b * n) or known_tokens.numel() not in (n, b * n):
        raise ValueError(f"{shapes} do not fit {b} rows of {n} cells: give (b, n), (b, h, w), (n,) or (h, w)")
    return KnownCells(known_tokens.reshape(-1, n).expand(b, n).long(), known_mask.reshape(-1, n).expand(b, n).bool())


def _write_choice(state: "_DecodeState", t: int, policy: OrderPolicy, sampler: TokenSampler,
                  generator: torch.Generator | None, cells: Tensor, logits: Tensor, choice: Tensor,
                  known: KnownCells | None = None) -> None:
    """Write step t: the chosen candidate's cell and its token (drawn by the policy, or now; a known cell's own)."""
    b, _, v = logits.shape
    chosen = logits.gather(1, choice.view(b, 1, 1).expand(b, 1, v)).squeeze(1)  # (b, v)
    token = policy.drawn_token(choice)
    if token is None:
        token = sampler(chosen, generator)
    cell = cells.gather(1, choice[:, None])  # (b, 1)
    if known is not None:  # teacher-forced: a known cell keeps its token, whenever it is written
        token = torch.where(known.mask.gather(1, cell)[:, 0], known.tokens.gather(1, cell)[:, 0], token)
    state.write(t, cell[:, 0], token, chosen)
    policy.advance(choice)


@dataclass
class _DecodeState:
    """What the loop has written so far; step t writes one cell per row."""

    tokens: Tensor  # (b, n) per raster cell
    order: Tensor  # (b, n) cell per step
    written: Tensor  # (b, n) bool per raster cell
    logits: Tensor  # (b, n, v) per step (v = 0 when not recorded)
    prev_token: Tensor  # (b,) the last written token
    prev_cell: Tensor  # (b,) its cell; -1 (class token) before the first write

    @classmethod
    def empty(cls, b: int, n: int, v: int, device: torch.device) -> "_DecodeState":
        long = dict(dtype=torch.long, device=device)
        return cls(
            torch.zeros(b, n, **long), torch.full((b, n), CLASS_CELL, **long),
            torch.zeros(b, n, dtype=torch.bool, device=device), torch.zeros(b, n, v, device=device),
            torch.zeros(b, **long), torch.full((b,), CLASS_CELL, **long),
        )

    def write(self, t: int, cell: Tensor, token: Tensor, logits: Tensor) -> None:
        """Record step t: cell (b,) receives token (b,); logits (b, v) are kept if recorded."""
        self.tokens.scatter_(1, cell[:, None], token[:, None])
        self.written.scatter_(1, cell[:, None], True)
        self.order[:, t] = cell
        if self.logits.shape[2]:
            self.logits[:, t] = logits
        self.prev_token, self.prev_cell = token, cell


def _prefill(net, cache, guidance, state: _DecodeState, known_tokens: Tensor, cells: Tensor | None) -> None:
    """Give the known cells (b, p) every row writes first as context with one `extend`; record them as written."""
    if cells is None or cells.shape[1] == 0:
        return
    b, num_known = cells.shape
    prev_cells = torch.cat([cells.new_full((b, 1), CLASS_CELL), cells[:, :-1]], dim=1)
    prev_tokens = known_tokens.gather(1, prev_cells.clamp(min=0))
    rows = guidance.rows
    logits = guidance.combine(net.extend(cache, rows(prev_tokens), rows(prev_cells), rows(cells)))
    tokens = known_tokens.gather(1, cells)
    for t in range(num_known):
        state.write(t, cells[:, t], tokens[:, t], logits[:, t])


@torch.no_grad()
def naive_confidence_sample(
    net, cond: Tensor, settings: SamplerSettings | str | None = None, generator: torch.Generator | None = None,
    choice_generator: torch.Generator | None = None, known_tokens: Tensor | None = None,
    known_mask: Tensor | None = None, known_placement: str = "first",
) -> SampleOutput:
    """Reference sampler without a cache: a full forward per candidate per step (every policy but "given").

    Consumes `generator` and `choice_generator` exactly as `sample` with the same settings and known cells,
    so both agree under one seed; the prefix's known cells are written one step each, their logits
    recomputed in full too.
    """
    settings = as_settings(settings)
    b, n = cond.shape[0], net.num_tokens
    guidance, sampler = make_guidance(net, settings.cfg_scale), token_sampler(settings)
    policy = make_policy(settings, generator=generator, choice_generator=choice_generator,
                         known_placement=known_placement)
    full_cond = guidance.cond(cond)
    state = _DecodeState.empty(b, n, net.vocab_size, cond.device)
    known = known_cells(known_tokens, known_mask, b, n)
    policy.start(known.mask if known else state.written)
    prefix = policy.prefix() if known else None
    p = 0 if prefix is None else prefix.shape[1]
    for t in range(n):
        cells = prefix[:, t : t + 1] if t < p else policy.candidates(t, state.written)
        logits = torch.stack([
            guidance.combine(net(guidance.rows(state.tokens),
                                 guidance.rows(torch.cat([state.order[:, :t], cells[:, j : j + 1]], dim=1)),
                                 full_cond)[:, -1])
            for j in range(cells.shape[1])
        ], dim=1)  # (b, m, v)
        if t < p:
            state.write(t, cells[:, 0], known.tokens.gather(1, cells)[:, 0], logits[:, 0])
        else:
            _write_choice(state, t, policy, sampler, generator, cells, logits, policy.choose(logits), known)
    return SampleOutput(state.tokens, state.order, state.logits)
