# Shapes: b batch, m candidates, v vocab.
"""What turns logits into choices: token sampling (temperature, top-k, top-p), the confidence scores of
candidate cells, and classifier-free guidance.

- Confidence is computed on the guided logits at temperature 1, before top-k / top-p: the order
  follows the model's (guided) belief, and the sampling knobs shape only the token draw. Every score
  is a log-probability-like number (higher = chosen earlier).
- Tokens are drawn by the Gumbel-max trick (`TokenSampler`: one uniform per row and token), so two
  samplers that see the same logits consume the generator identically.
- CFG runs 2b rows (labels, then the null class); guided = uncond + s * (cond - uncond); both halves
  take the same cell and token. cfg_scale == 1 runs b rows only (identical results, half the cost).

Modified from: https://github.com/FoundationVision/LlamaGen (autoregressive/models/generate.py:
logit processing and CFG).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from models.choice import gumbel


def check_setting(key: str, ok: bool, expected: str, value) -> None:
    """Raise the one-line error of an impossible sampler setting `key` (a `model.init_args.sampler` key)."""
    if not ok:
        raise ValueError(f"model.init_args.sampler.{key} must be {expected}, got {value!r}")


# ------------------------------------------------------------------------------- logit processing
def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of the last dim (k <= 0: keep all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (p >= 1: keep all)."""
    if p >= 1.0:
        return logits
    sorted_logits, index = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= p  # the tokens before already reach p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, index, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@dataclass
class TokenSampler:
    """Draws one token per row from logits (b, v): temperature, then top-k, then top-p."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        check_setting("temperature", self.temperature > 0, "> 0 (use top_k: 1 for greedy tokens)", self.temperature)
        check_setting("top_k", self.top_k >= 0, ">= 0 (0 keeps every token)", self.top_k)
        check_setting("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 keeps every token)", self.top_p)

    def __call__(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        logits = top_k_filter(apply_temperature(logits, self.temperature), self.top_k)
        logits = top_p_filter(logits, self.top_p)
        # Gumbel-max: exact in distribution, and ~4x cheaper on CPU than torch.multinomial's exponential
        # draws (0.6 ms a step at b=64, v=512: a sixth of a raster decoding step)
        return (logits.float() + gumbel(logits.shape, generator, logits.device)).argmax(dim=-1)


# ------------------------------------------------------------------------------------ confidence
def log_max_prob(logits: Tensor) -> Tensor:
    """Confidence (...) = the log of the largest softmax probability of logits (..., v)."""
    return logits.float().log_softmax(dim=-1).amax(dim=-1)


def neg_entropy(logits: Tensor) -> Tensor:
    """Confidence (...) = minus the entropy of softmax(logits (..., v))."""
    log_probs = logits.float().log_softmax(dim=-1)
    return (log_probs.exp() * log_probs).sum(dim=-1)


def log_margin(logits: Tensor) -> Tensor:
    """Confidence (...) = top-1 minus top-2 log-probability: how decided the cell is."""
    top2 = logits.float().topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def least_confident(logits: Tensor) -> Tensor:
    """Minus `log_max_prob`: the hardest cell first."""
    return -log_max_prob(logits)


def log_true_prob(logits: Tensor, true_tokens: Tensor) -> Tensor:
    """log p(true token) (b, m) from logits (b, m, v) and the true tokens (b, m): the paper's extraction score."""
    logits = logits.float()
    return logits.gather(-1, true_tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)


# The one registry of a candidate cell's score (higher = written earlier), by the name the settings use. Each
# takes the candidates' logits (b, m, v); "true_prob" also their true tokens (order extraction only: it peeks at
# the answer), "sampled" is the log-probability of the token drawn for the cell (sampling only; `ConfidencePolicy`
# draws it).
SCORES = {"max_prob": log_max_prob, "neg_entropy": neg_entropy, "margin": log_margin,
          "least_confident": least_confident, "sampled": None, "true_prob": log_true_prob}
SAMPLER_SCORES = ("max_prob", "neg_entropy", "sampled", "margin", "least_confident")
EXTRACTION_SCORES = ("true_prob", "max_prob", "neg_entropy", "margin", "least_confident")


def candidate_scores(score: str, logits: Tensor, true_tokens: Tensor | None = None) -> Tensor:
    """Scores (b, m) of candidates by `score` (a key of `SCORES` other than "sampled")."""
    return log_true_prob(logits, true_tokens) if score == "true_prob" else SCORES[score](logits)


# -------------------------------------------------------------------------------------- guidance
class NoGuidance:
    """b rows, logits used as they come."""

    def cond(self, cond: Tensor) -> Tensor:
        return cond

    def rows(self, x: Tensor) -> Tensor:
        return x

    def combine(self, logits: Tensor) -> Tensor:
        return logits


class ClassifierFreeGuidance:
    """2b rows (labels, then the null class); guided = uncond + scale * (cond - uncond)."""

    def __init__(self, null_class: int, scale: float):
        self.null_class, self.scale = null_class, scale

    def cond(self, cond: Tensor) -> Tensor:
        return torch.cat([cond, torch.full_like(cond, self.null_class)])

    def rows(self, x: Tensor) -> Tensor:
        return torch.cat([x, x])

    def combine(self, logits: Tensor) -> Tensor:
        conditional, unconditional = logits.chunk(2)
        return unconditional + self.scale * (conditional - unconditional)


def make_guidance(net, cfg_scale: float) -> NoGuidance | ClassifierFreeGuidance:
    return NoGuidance() if cfg_scale == 1.0 else ClassifierFreeGuidance(net.null_class, cfg_scale)
