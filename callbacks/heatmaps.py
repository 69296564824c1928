"""Order heatmaps: pictures of the step at which each token cell was written.

Pure functions (torch, torchvision, matplotlib; no Lightning), shared by the order-dump callback, the
benchmark scripts and the prediction writers; the mean maps they draw are computed by
`evaluation.order_stats`. Colours always use a FIXED scale: step 0 is the first colour of the colormap
and step n_steps-1 the last, whatever the data's own min/max, so maps from different epochs, models
and classes compare directly.

Shapes: b batch, h/w token-grid height/width, H/W image size, C classes.
Inputs may be torch tensors or numpy arrays (as read back from an `orders/epoch_<N>.npz` dump).
"""

import math

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from evaluation.order_stats import mean_step_map, per_class_mean_maps

ArrayLike = torch.Tensor | np.ndarray

# Small images are scaled up (by a whole factor, nearest) to at least this many pixels a side, so
# 16x16 token cells of a 32 px image stay visible in TensorBoard, which shows images at native size.
MIN_TILE_PX = 96
# Light grey for cells without data (a class with no sample gives a nan map).
NAN_RGB = (0.85, 0.85, 0.85)
_DPI = 100


def _colormap(cmap: str) -> Colormap:
    return matplotlib.colormaps[cmap].with_extremes(bad=NAN_RGB)


def _norm(n_steps: int) -> Normalize:
    return Normalize(vmin=0, vmax=max(n_steps - 1, 1), clip=True)


def _figure_to_image(fig: Figure) -> torch.Tensor:
    """Render a matplotlib figure with the Agg canvas (no pyplot state) -> uint8 (3,H,W)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1)


def step_map_to_rgb(
    step_maps: ArrayLike, n_steps: int, cmap: str = "viridis", out_size: int | tuple[int, int] | None = None
) -> torch.Tensor:
    """Colour step maps on the fixed scale 0..n_steps-1.

    Args:
        step_maps: (b,h,w) or (h,w) steps, integer or float (mean maps); nan cells come out light grey.
        n_steps: number of generation steps (n = h*w); fixes the colour scale.
        cmap: matplotlib colormap name.
        out_size: output (H, W), or H for a width that keeps the grid's aspect ratio; cells are
            upsampled nearest so each token stays a sharp block. None keeps one pixel per cell.

    Returns:
        uint8 (b,3,H,W).
    """
    maps = torch.as_tensor(step_maps).detach().cpu().double()
    if maps.dim() == 2:
        maps = maps[None]
    rgba = _colormap(cmap)(_norm(n_steps)(maps.numpy()))  # (b,h,w,4) floats in [0,1]
    rgb = torch.from_numpy(np.round(rgba[..., :3] * 255).astype(np.uint8)).permute(0, 3, 1, 2)
    if out_size is None:
        return rgb.contiguous()
    if isinstance(out_size, int):
        out_size = (out_size, round(out_size * maps.shape[2] / maps.shape[1]))
    return F.interpolate(rgb, size=tuple(out_size), mode="nearest-exact")


def colorbar_image(n_steps: int, height: int, cmap: str = "viridis", width: int = 64) -> torch.Tensor:
    """A vertical colour legend: step 0 ("first") at the top, step n_steps-1 ("last") at the bottom.

    Args:
        n_steps: number of generation steps (the scale of `step_map_to_rgb`).
        height: pixel height, usually that of the grid it stands beside.
        cmap: matplotlib colormap name.
        width: pixel width, room for the bar and its labels.

    Returns:
        uint8 (3,height,width), white background.
    """
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    cax = fig.add_axes((0.06, 0.02, 0.22, 0.96))
    bar = fig.colorbar(ScalarMappable(norm=_norm(n_steps), cmap=_colormap(cmap)), cax=cax)
    cax.invert_yaxis()  # reading order: the first step on top
    last = max(n_steps - 1, 1)
    bar.set_ticks([0, last // 2, last], labels=[f"first\n{0}", f"{last // 2}", f"last\n{last}"])
    cax.tick_params(labelsize=8, length=2, pad=2)
    # The end labels hang inside the bar's extent instead of being clipped at the figure edge.
    for label, va in zip(cax.get_yticklabels(), ("top", "center", "bottom"), strict=True):
        label.set_verticalalignment(va)
    return _figure_to_image(fig)


def _upscale(images: torch.Tensor) -> torch.Tensor:
    factor = math.ceil(MIN_TILE_PX / images.shape[-2])
    return images if factor <= 1 else F.interpolate(images, scale_factor=factor, mode="nearest-exact")


def samples_with_heatmaps_grid(
    images: ArrayLike, step_maps: ArrayLike, n_steps: int, nrow: int = 4, cmap: str = "viridis"
) -> torch.Tensor:
    """Each sample beside its order heatmap, pairs in a grid, with the colour legend on the right.

    Args:
        images: uint8 (b,3,H,W) generated images.
        step_maps: (b,h,w) step at which each token cell was written.
        n_steps: number of generation steps (fixes the colour scale).
        nrow: number of (image, heatmap) pairs per row.
        cmap: matplotlib colormap name.

    Returns:
        uint8 (3,H',W').
    """
    images = _upscale(torch.as_tensor(images).detach().cpu())
    heat = step_map_to_rgb(step_maps, n_steps, cmap, out_size=tuple(images.shape[-2:]))
    gap = torch.full((*images.shape[:3], 2), 255, dtype=torch.uint8)  # a hairline inside a pair
    pairs = torch.cat([images, gap, heat], dim=-1)
    # The wide white padding between pairs keeps "which heatmap belongs to which image" obvious.
    grid = make_grid(pairs, nrow=nrow, padding=8, pad_value=255)
    return torch.cat([grid, colorbar_image(n_steps, grid.shape[1], cmap)], dim=-1)


def labelled_maps_image(
    maps: ArrayLike,
    n_steps: int,
    titles: list[str] | None = None,
    ncols: int | None = None,
    cmap: str = "viridis",
    tile_px: int = 128,
) -> torch.Tensor:
    """Several (mean) step maps as titled panels sharing one fixed colour scale and legend.

    Args:
        maps: (k,h,w) or (h,w) step maps, e.g. mean maps of `evaluation.order_stats`; nan is grey.
        n_steps: number of generation steps (fixes the colour scale).
        titles: one title per map (e.g. "class 3 (n=4)").
        ncols: panels per row; default ceil(sqrt(k)).
        cmap: matplotlib colormap name.
        tile_px: approximate pixel size of one panel.

    Returns:
        uint8 (3,H,W).
    """
    maps = torch.as_tensor(maps).detach().cpu().double()
    if maps.dim() == 2:
        maps = maps[None]
    ncols = ncols or math.ceil(math.sqrt(len(maps)))
    nrows = math.ceil(len(maps) / ncols)
    inch = tile_px / _DPI
    # The constrained layout keeps titles and the legend inside the canvas, whatever the panel count.
    fig = Figure(
        figsize=(ncols * inch + 1.0, nrows * (inch + 0.3)), dpi=_DPI, facecolor="white", layout="constrained"
    )
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colormap, norm = _colormap(cmap), _norm(n_steps)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < len(maps):
            ax.imshow(maps[i].numpy(), cmap=colormap, norm=norm, interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=9, pad=3)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=axes, shrink=0.9, aspect=25)
    bar.ax.invert_yaxis()
    last = max(n_steps - 1, 1)
    bar.set_ticks([0, last], labels=[f"first ({0})", f"last ({last})"])
    bar.ax.tick_params(labelsize=8)
    return _figure_to_image(fig)


def order_map_images(step_maps: ArrayLike, labels: ArrayLike, num_classes: int, n_steps: int,
                     cmap: str = "viridis") -> dict[str, torch.Tensor]:
    """The TensorBoard images of a set of orders: "orders/mean_map", and "orders/class_mean_maps" (C > 1).

    The one way both are drawn (order dumps during training, extracted orders): titled panels on the
    fixed colour scale with its legend; one panel per class that occurs, titled with its count.

    Args:
        step_maps: (b,h,w) step maps.
        labels: (b,) class labels.
        num_classes: C (0 = unconditional: no class panels).
        n_steps: number of generation steps (fixes the colour scale).
        cmap: matplotlib colormap name.

    Returns:
        tag -> uint8 (3,H,W).
    """
    step_maps, labels = torch.as_tensor(step_maps).cpu(), torch.as_tensor(labels).cpu().long()
    title = [f"mean over {len(step_maps)} orders"]
    images = {"orders/mean_map": labelled_maps_image(mean_step_map(step_maps), n_steps, title, cmap=cmap,
                                                     tile_px=192)}
    if num_classes > 1:
        present = torch.unique(labels).tolist()  # only classes that occur: ImageNet has 1000
        maps = per_class_mean_maps(step_maps, labels, num_classes)[present]
        titles = [f"class {k} (n={int((labels == k).sum())})" for k in present]
        images["orders/class_mean_maps"] = labelled_maps_image(maps, n_steps, titles, cmap=cmap)
    return images
