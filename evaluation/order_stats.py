# Shapes: m orders, n tokens = h*w, C classes; an order (m, n) lists raster cell indices by step.
"""Statistics of a set of generation orders: where they start, how much they agree, how local they are.

Every function takes either orders (m, n) (order[:, t] = raster cell written at step t; then the grid
h, w must be given) or their step maps (m, h, w) (the step at which each cell was written;
`models.orders.order_to_step_map`), as torch tensors or numpy arrays (an `orders/*.npz` dump read back).
Numbers mean little alone, so `order_statistics` also reports them for uniformly random orders of the
same grid. The heatmaps of `callbacks.heatmaps` draw the mean maps computed here.
"""

import math

import numpy as np
import torch
from torch import Tensor

from models.orders import order_to_step_map, random_order

OrdersLike = Tensor | np.ndarray


def as_step_maps(orders: OrdersLike, h: int | None = None, w: int | None = None) -> Tensor:
    """Step maps (m, h, w) long from orders (m, n) and the grid, or from step maps (m, h, w)."""
    orders = torch.as_tensor(orders).long()
    if orders.dim() == 3:
        return orders
    if orders.dim() != 2 or h is None or w is None or orders.shape[1] != h * w:
        raise ValueError(f"expected orders (m, h*w) with the grid h, w, or step maps (m, h, w); got "
                         f"{tuple(orders.shape)} with grid {h}x{w}")
    return order_to_step_map(orders, h, w)


def mean_step_map(orders: OrdersLike, h: int | None = None, w: int | None = None) -> Tensor:
    """Mean step at which each cell is written: float (h, w); nan when there are no orders."""
    maps = as_step_maps(orders, h, w).double()
    if len(maps) == 0:
        return torch.full(maps.shape[1:], math.nan)
    return maps.mean(dim=0).float()


def per_class_mean_maps(orders: OrdersLike, labels: OrdersLike, num_classes: int, h: int | None = None,
                        w: int | None = None) -> Tensor:
    """Mean step map of each class: float (C, h, w), nan for classes without orders.

    Args:
        orders: (m, n) orders or (m, h, w) step maps.
        labels: (m,) class labels in [0, C).
        num_classes: C; 0 (unconditional data, label 0) counts as one class.
        h: token-grid height (orders only).
        w: token-grid width (orders only).
    """
    maps = as_step_maps(orders, h, w).double()
    labels = torch.as_tensor(labels, device=maps.device).long()
    num_classes = max(num_classes, 1)
    sums = maps.new_zeros((num_classes, *maps.shape[1:])).index_add_(0, labels, maps)
    counts = torch.bincount(labels, minlength=num_classes).to(maps.dtype)
    return (sums / counts[:, None, None]).float()  # 0/0 = nan marks an empty class


def _pairs(m: int, num_pairs: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """All pairs i < j when there are at most `num_pairs`, else `num_pairs` random pairs with i != j."""
    if m * (m - 1) // 2 <= num_pairs:
        i, j = torch.triu_indices(m, m, offset=1)
        return i, j
    i = torch.randint(m, (num_pairs,), generator=generator)
    j = (i + torch.randint(1, m, (num_pairs,), generator=generator)) % m  # uniform over j != i
    return i, j


def order_agreement(
    orders: Tensor, h: int, w: int, num_pairs: int = 2000, generator: torch.Generator | None = None
) -> float:
    """How much the orders of different images agree: mean pairwise Spearman rank correlation.

    Each image's step map ranks its cells by when they are written; the Spearman correlation of two
    step maps is 1 for identical orders, -1 for one order reversed, and about 0 for unrelated (e.g.
    independent random) orders. A learned order that is "semantic" but image-specific sits between
    0 and 1; a value near 1 means the model fell back to one fixed scan for every image.

    Args:
        orders: (m, n) orders or (m, h, w) step maps, m >= 2.
        h: token-grid height.
        w: token-grid width.
        num_pairs: pairs compared; all pairs are used when there are fewer.
        generator: drives the choice of pairs (reproducible statistics).

    Returns:
        The mean correlation, nan for fewer than two orders or a single cell.
    """
    maps = as_step_maps(orders, h, w).flatten(1).double()
    m, n = maps.shape
    if m < 2 or n < 2:
        return math.nan
    i, j = _pairs(m, num_pairs, generator)
    return float(_spearman(maps[i], maps[j]).mean())


def _spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rho of step maps flattened to (..., n), over the last axis."""
    # Steps of a permutation are ranks without ties, so Spearman's rho is Pearson's r of the steps.
    n = a.shape[-1]
    return 1 - 6 * (a - b).pow(2).sum(dim=-1) / (n * (n * n - 1))


def agreement_within_images(orders: OrdersLike, h: int, w: int) -> float:
    """How much the K orders of the same image agree: mean Spearman rank correlation of their pairs.

    1 when the K orders of each image are the same (extraction without noise), about 0 when they are
    unrelated; read it beside `order_agreement` (orders of different images).

    Args:
        orders: (m, K, n) orders or (m, K, h, w) step maps: K orders of each of m images.
        h: token-grid height.
        w: token-grid width.

    Returns:
        The mean over all pairs of orders of the same image, nan for K < 2, no images or a single cell.
    """
    orders = torch.as_tensor(orders).long()
    m, per = orders.shape[:2]
    if m == 0 or per < 2 or h * w < 2:
        return math.nan
    maps = as_step_maps(orders.flatten(0, 1), h, w).view(m, per, h * w).double()
    i, j = torch.triu_indices(per, per, offset=1)
    return float(_spearman(maps[:, i], maps[:, j]).mean())


def _neighbour_offsets(neighbourhood: int) -> list[tuple[int, int]]:
    if neighbourhood == 4:
        return [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if neighbourhood == 8:
        return [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    raise ValueError(f"neighbourhood must be 4 or 8, got {neighbourhood}")


def adjacency_share(orders: Tensor, h: int, w: int, neighbourhood: int = 8) -> float:
    """Share of steps t >= 1 whose cell touches a cell written before it.

    A cell touches another when they share an edge (`neighbourhood=4`) or an edge or a corner (8, the
    default: a diagonal step still grows the written region). Raster order scores 1.0 (each cell
    after the first has its left or upper neighbour written); an order that grows one region scores
    1.0 too, while scattered orders score low. Step 0 is left out: nothing is written before it.

    Args:
        orders: (m, n) orders or (m, h, w) step maps.
        h: token-grid height.
        w: token-grid width.
        neighbourhood: 4 or 8.

    Returns:
        The share over all orders' steps 1..n-1, nan when there are none.
    """
    steps = as_step_maps(orders, h, w)
    m, n = len(steps), h * w
    if m == 0 or n < 2:
        return math.nan
    # Pad with a step later than any real one so off-grid neighbours never count as written.
    padded = torch.nn.functional.pad(steps, (1, 1, 1, 1), value=n)
    earliest = torch.full_like(steps, n)
    for dy, dx in _neighbour_offsets(neighbourhood):
        earliest = torch.minimum(earliest, padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w])
    touches = earliest < steps  # the first cell (step 0) can never touch an earlier one
    return float(touches.sum()) / (m * (n - 1))


def order_statistics(
    orders: Tensor,
    labels: Tensor,
    num_classes: int,
    h: int,
    w: int,
    num_pairs: int = 2000,
    neighbourhood: int = 8,
    seed: int = 0,
) -> dict:
    """All of the above as plain Python (lists, floats; nan -> None) for a JSON manifest.

    Includes `random`: the same agreement and adjacency share for as many uniformly random orders
    (at most 1000), so a learned order's numbers read against chance.

    Args:
        orders: (m, n) orders or (m, h, w) step maps.
        labels: (m,) class labels.
        num_classes: number of classes (0 = unconditional).
        h: token-grid height.
        w: token-grid width.
        num_pairs: pairs compared by `order_agreement`.
        neighbourhood: 4 or 8, for `adjacency_share`.
        seed: seed of the pairs and of the random reference orders.
    """
    steps = as_step_maps(orders, h, w).cpu()
    labels = torch.as_tensor(labels).long().cpu()
    gen = torch.Generator().manual_seed(seed)
    reference = order_to_step_map(random_order(min(len(steps), 1000), h * w, generator=gen), h, w)
    return {
        "num_orders": len(steps),
        "grid": [h, w],
        "neighbourhood": neighbourhood,
        "agreement": _finite(order_agreement(steps, h, w, num_pairs, gen)),
        "adjacency_share": _finite(adjacency_share(steps, h, w, neighbourhood)),
        "random": {
            "agreement": _finite(order_agreement(reference, h, w, num_pairs, gen)),
            "adjacency_share": _finite(adjacency_share(reference, h, w, neighbourhood)),
        },
        "class_counts": torch.bincount(labels, minlength=max(num_classes, 1)).tolist(),
        "mean_step_map": _nested(mean_step_map(steps, h, w)),
        "per_class_mean_maps": _nested(per_class_mean_maps(steps, labels, num_classes, h, w)),
    }


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def _nested(t: Tensor | list) -> list:
    """Nested lists with nan as None: strict JSON has no NaN."""
    rows = t.tolist() if isinstance(t, Tensor) else t
    return [_nested(r) if isinstance(r, list) else _finite(r) for r in rows]
