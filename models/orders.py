# Shapes: b batch, n tokens = h*w, m candidates; an order (b, n) lists raster cell indices by step.
"""Orders as explicit tensors: order[:, t] is the raster index of the cell written at step t."""

import torch
from torch import Tensor


def raster_order(b: int, n: int, device: torch.device | str | None = None) -> Tensor:
    """The raster scan (b, n): 0, 1, ..., n-1 for every row."""
    return torch.arange(n, device=device).repeat(b, 1)


def random_order(
    b: int, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """An independent uniformly random permutation per row (b, n): argsort of uniform noise."""
    return torch.rand(b, n, generator=generator, device=device).argsort(dim=1)


def mixed_order(
    b: int, n: int, random_share: float, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Each row (b, n) a random permutation with probability `random_share`, else the raster scan."""
    use_random = torch.rand(b, 1, generator=generator, device=device) < random_share
    return torch.where(use_random, random_order(b, n, generator=generator, device=device),
                       raster_order(b, n, device=device))


def order_to_step_map(order: Tensor, h: int, w: int) -> Tensor:
    """The step at which each cell was written (b, h, w): the inverse permutation, as a heatmap."""
    steps = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, steps).view(-1, h, w)


def is_permutation(order: Tensor) -> bool:
    """Whether every row of order (b, n) is a permutation of 0..n-1."""
    expected = torch.arange(order.shape[1], device=order.device)
    return bool((order.sort(dim=1).values == expected).all())


def unwritten_cells(written: Tensor, m: int) -> Tensor:
    """The m cells not yet written (b, m), ascending; every row must have exactly m of them.

    Args:
        written: (b, n) bool, True where a cell already holds a token.
        m: how many cells are unwritten in each row (known to the caller, so no device sync).
    """
    return written.to(torch.uint8).argsort(dim=1, stable=True)[:, :m]


def drop_cells(cells: Tensor, index: Tensor) -> Tensor:
    """cells (b, m) without the columns index (b, k) of each row (b, m - k); the rest keep their order."""
    b, m = cells.shape
    if index.shape[1] == 1:  # the common case, without a sort: shift the columns after the dropped one
        keep = torch.arange(m - 1, device=cells.device).expand(b, m - 1)
        keep = keep + (keep >= index)
    else:
        dropped = torch.zeros(b, m, dtype=torch.uint8, device=cells.device).scatter_(1, index, 1)
        keep = dropped.argsort(dim=1, stable=True)[:, : m - index.shape[1]]
    return cells.gather(1, keep)


def known_first(order: Tensor, known: Tensor) -> Tensor:
    """Reorder so the known cells come first (raster order), then the others in `order`'s sequence.

    Args:
        order: (b, n) a permutation per row.
        known: (b, n) bool per raster cell; rows may know different numbers of cells.

    Returns:
        (b, n) the order a decoder uses when the known cells are given as context.
    """
    b, n = order.shape
    steps = torch.arange(n, device=order.device).expand(b, n)
    position = torch.empty_like(order).scatter_(1, order, steps)  # (b, n): the step of each cell in `order`
    key = torch.where(known, steps, n + position)  # known cells by raster index, then the others by step
    return key.argsort(dim=1)  # the keys of a row are distinct
