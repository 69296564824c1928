# Shapes: b batch, h/w token-grid height/width, n = h*w, H/W image size.
"""Edit masks on the token grid: which cells an edit regenerates (True) and which it keeps (False).

Pure functions of a grid (and, for masks given in pixels, the image size): a box in fractions of the
image or in pixels, the centre box, a half, a border frame of k cells (outpainting), a random share of
cells (the same draw for one seed and image index, whatever the batch), and mask images (white =
regenerate) brought down to the grid. A cell is regenerated when any part of it is covered: a box edge
or a painted pixel inside a cell regenerates the whole cell, so nothing the mask names is kept.

Errors are one line and name the setting (`model.init_args.edit.<key>`) and the fix.
"""

import torch
from torch import Tensor

from models.extraction import hashed_uniform, noise_seeds

MASKS = ("box", "center", "left", "right", "top", "bottom", "border", "random", "image")
HALVES = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0), "top": (0.0, 0.0, 1.0, 0.5),
          "bottom": (0.0, 0.5, 1.0, 1.0)}  # boxes (left, top, right, bottom) in fractions
BOX_UNITS = ("fraction", "pixels")
WHERE = "model.init_args.edit"


def box_cells(grid: tuple[int, int], box: tuple[float, float, float, float]) -> Tensor:
    """The cells (h, w) a box covers, in part or whole.

    Args:
        grid: (h, w) token grid.
        box: (left, top, right, bottom) in fractions of the image's width and height, right/bottom exclusive.
    """
    h, w = grid
    left, right, top, bottom = box[0] * w, box[2] * w, box[1] * h, box[3] * h  # in cells
    rows, cols = torch.arange(h), torch.arange(w)
    inside_rows = (rows + 1 > top) & (rows < bottom)  # a cell [i, i + 1) meets [top, bottom)
    inside_cols = (cols + 1 > left) & (cols < right)
    return inside_rows[:, None] & inside_cols[None, :]


def check_box(box, units: str, image_size: int) -> tuple[float, float, float, float]:
    """The box as four numbers, refused (one line) when it is not inside the image or is empty."""
    if box is None or len(box) != 4:
        raise ValueError(f"{WHERE}.box = {box!r}: give [left, top, right, bottom] for mask: box, e.g. "
                         "[0.25, 0.25, 0.75, 0.75] (fractions) or pixels with box_units: pixels")
    if units not in BOX_UNITS:
        raise ValueError(f"{WHERE}.box_units = {units!r} is unknown: choose one of {', '.join(BOX_UNITS)}")
    left, top, right, bottom = (float(v) for v in box)
    size = 1.0 if units == "fraction" else float(image_size)
    if not (0 <= left < right <= size and 0 <= top < bottom <= size):
        raise ValueError(f"{WHERE}.box = {list(box)} is not a box inside the {image_size}x{image_size} image: "
                         f"give 0 <= left < right <= {size:g} and 0 <= top < bottom <= {size:g} "
                         f"({'fractions of the side' if units == 'fraction' else 'pixels'}, box_units: {units})")
    return left, top, right, bottom


def border_cells(grid: tuple[int, int], k: int) -> Tensor:
    """The frame (h, w) of the outermost k cells on every side (outpainting: the centre is kept)."""
    h, w = grid
    if not 1 <= k or 2 * k >= min(h, w):
        raise ValueError(f"{WHERE}.border = {k} leaves no known centre on the {h}x{w} token grid: set it to 1.."
                         f"{(min(h, w) - 1) // 2}")
    frame = torch.ones(h, w, dtype=torch.bool)
    frame[k : h - k, k : w - k] = False
    return frame


def random_cells(grid: tuple[int, int], share: float, seed: int, index: Tensor) -> Tensor:
    """round(share * n) cells per image (b, h, w), uniformly at random; a function of (seed, image index) only.

    Args:
        grid: (h, w).
        share: the share of cells regenerated, in (0, 1).
        seed: the mask seed.
        index: (b,) each image's dataset index.
    """
    h, w = grid
    count = round(share * h * w)
    if not 0 < count < h * w:
        raise ValueError(f"{WHERE}.random_share = {share} regenerates {count} of the {h * w} cells: set it so that "
                         "at least one cell is regenerated and one kept")
    cells = torch.arange(h * w, device=index.device).expand(len(index), -1)
    rank = hashed_uniform(noise_seeds(seed, index, torch.zeros_like(index)), 0, cells).argsort(dim=1)
    chosen = torch.zeros(len(index), h * w, dtype=torch.bool, device=index.device)
    return chosen.scatter_(1, rank[:, :count], True).view(-1, h, w)


def image_mask_cells(mask: Tensor, grid: tuple[int, int], what: str = "the mask image") -> Tensor:
    """A mask image (H, W) or (b, H, W) brought down to the grid (..., h, w): a cell is regenerated when any of
    its pixels is white (>= half the scale: 128 for uint8, 0.5 for floats, True for bool).

    Raises:
        ValueError: the image is not a whole number of cells in each direction (another size than the images).
    """
    h, w = grid
    height, width = mask.shape[-2:]
    if height % h or width % w or height // h != width // w:
        raise ValueError(f"{what} is {width}x{height} pixels, but the images are edited on a {w}x{h} token grid "
                         f"of square cells: give a mask of the images' size (a multiple of {w}x{h}, e.g. "
                         f"{w * max(1, height // h)}x{h * max(1, height // h)})")
    white = mask >= 128 if mask.dtype == torch.uint8 else mask.float() >= 0.5
    cell = height // h
    white = white.reshape(*mask.shape[:-2], h, cell, w, cell)
    return white.any(dim=-1).any(dim=-2)


def token_mask(kind: str, grid: tuple[int, int], image_size: int, *, box=None, box_units: str = "fraction",
               center_fraction: float = 0.5, border: int = 1) -> Tensor:
    """The cells (h, w) a mask of one kind regenerates, for the kinds that do not depend on the image.

    Args:
        kind: box | center | left | right | top | bottom | border (see `MASKS`; random and image masks are
            per image: `random_cells`, `image_mask_cells`).
        grid: (h, w) token grid.
        image_size: the images' side in pixels (for boxes in pixels).
        box, box_units: the box of kind "box": (left, top, right, bottom) in fractions or pixels.
        center_fraction: the side of the centred box, as a share of the image's side.
        border: the frame width in cells of kind "border".
    """
    h, w = grid
    if kind == "border":
        return border_cells(grid, border)
    if kind == "box":
        scale = image_size if box_units == "pixels" else 1.0
        return box_cells(grid, tuple(v / scale for v in check_box(box, box_units, image_size)))
    if kind == "center":
        if not 0 < center_fraction < 1:
            raise ValueError(f"{WHERE}.center_fraction = {center_fraction} is impossible: set it in (0, 1), the "
                             "side of the centred box as a share of the image's side")
        margin = (1.0 - center_fraction) / 2
        return box_cells(grid, (margin, margin, 1.0 - margin, 1.0 - margin))
    if kind in HALVES:
        return box_cells(grid, HALVES[kind])
    raise ValueError(f"{WHERE}.mask = {kind!r} does not build from settings alone: choose one of "
                     f"{', '.join(m for m in MASKS if m not in ('random', 'image'))} here")


def check_regenerated(mask: Tensor, what: str) -> None:
    """Refuse masks (b, h, w) that regenerate no cell or every cell of an image (one line naming `what`)."""
    counts = mask.flatten(1).sum(dim=1)
    for bad, problem, fix in ((counts == 0, "no cell", "an edit needs a region to regenerate (white in a mask "
                               "image)"), (counts == mask[0].numel(), "every cell", "that keeps nothing and is "
                               "sampling (configs/sample.yaml): keep some cells")):
        if bool(bad.any()):
            which = "" if len(counts) == 1 else f" of image {int(bad.nonzero()[0])}"
            raise ValueError(f"{what} regenerates {problem}{which}: {fix}")


def generated_steps(order: Tensor, regenerate: Tensor) -> Tensor:
    """The rank (b, n) at which each regenerated cell was written among the regenerated cells of its row
    (0 = first); -1 for kept cells. order (b, n): the cell written at each step; regenerate (b, n) bool."""
    in_order = regenerate.gather(1, order)  # (b, n): whether step t wrote a regenerated cell
    rank = (in_order.long().cumsum(dim=1) - 1).masked_fill(~in_order, -1)
    return torch.empty_like(order).scatter_(1, order, rank)
