# Shapes: b batch, m candidate cells.
"""Noise in the choice of the next cell, one definition for the sampler's confidence order and for order extraction.

MaskGIT's "choice temperature": Gumbel noise times T_k is added to the candidates' log-scores before the arg-max,
T_k = T (schedule "constant") or T * (1 - k / total) (schedule "linear": random early, greedy late) at the k-th
cell a row chooses of the `total` it chooses; the first `random_first` cells of a row are uniformly random (only
the noise counts). T = 0 is the greedy choice; a very large T writes cells in uniformly random order.

Where the noise comes from is the caller's: the sampler draws it from its own generator (`choice_generator`),
extraction hashes it per image (`models.extraction.hashed_uniform`) so an image's order does not depend on its batch.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

SCHEDULES = ("constant", "linear")


def gumbel_from_uniform(uniform: Tensor) -> Tensor:
    """Standard Gumbel noise from uniform noise in (0, 1) of any shape."""
    return -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))


def gumbel(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard Gumbel noise of `shape`, drawn from `generator`."""
    return gumbel_from_uniform(torch.rand(shape, generator=generator, device=device))


@dataclass(frozen=True)
class ChoiceNoise:
    """The order-choice noise (see the module docstring); built from validated settings (`SamplerSettings`,
    `ExtractionSettings`), which name the keys in their errors.

    Attributes:
        temperature: T, the scale of the Gumbel noise (0 = greedy).
        schedule: "constant" or "linear".
        random_first: the first this many cells of each row are chosen uniformly at random.
    """

    temperature: float = 0.0
    schedule: str = "linear"
    random_first: int = 0

    def active(self, k: int) -> bool:
        """Whether some row draws noise when the fewest cells any row has chosen so far is k."""
        return self.temperature > 0 or k < self.random_first

    def temperature_at(self, k: int | Tensor, total: int | Tensor) -> float | Tensor:
        """T at the k-th chosen cell of `total` (ints, or (b,) tensors: one per row)."""
        if self.schedule != "linear":
            return self.temperature
        if isinstance(k, Tensor) or isinstance(total, Tensor):
            return self.temperature * (1.0 - k / torch.as_tensor(total).clamp(min=1))
        return self.temperature * (1.0 - k / total)

    def apply(self, scores: Tensor, k: int | Tensor, total: int | Tensor, noise: Tensor) -> Tensor:
        """Noisy scores (b, m) from `scores` (b, m) and standard Gumbel `noise` (b, m), at the k-th chosen cell of
        `total` (ints, or (b,) per row; a row with k < random_first takes the noise alone: a uniformly random cell)."""
        temperature = self.temperature_at(k, total)
        if isinstance(temperature, Tensor):
            temperature = temperature.to(scores.device)[:, None]
        noisy = scores + temperature * noise
        if isinstance(k, Tensor):
            return torch.where((k < self.random_first).to(scores.device)[:, None], noise, noisy)
        return noise if k < self.random_first else noisy
