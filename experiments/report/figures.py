"""The report's figures: samples beside their order heatmaps (and the mean order maps), and learning curves.

Shapes: M samples, h/w token grid.
"""

import textwrap
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from callbacks.heatmaps import labelled_maps_image, samples_with_heatmaps_grid
from evaluation.order_stats import mean_step_map
from fileio import atomic_write

CURVE_METRICS = [("fid", "FID ↓"), ("consistency", "consistency ↑"), ("class_accuracy", "class accuracy ↑"),
                 ("nll_random", "NLL random order (bits)"), ("nll_inferred", "NLL inferred order (bits)"),
                 ("nll_own", "NLL own order (bits)")]

VAL_SCALARS = ["val/nll_raster", "val/nll_random", "val/nll_inferred", "val/nll_own"]

# ----------------------------------------------------------------------------------------- figure
def samples_figure(arms: dict[str, dict], n_steps: int, path: Path, per_arm: int = 8) -> None:
    """Per arm a row of samples beside their order heatmaps, then the arms' mean order maps.

    Args:
        arms: arm name -> samples of `evaluation.sampling.sample_set` (images, step_maps).
        n_steps: generation steps n (fixes the colour scale, shared by every panel).
        path: the PNG to write.
        per_arm: samples shown per arm (the first ones: labels 0, 1, 2, ...).
    """
    panels = [(name, samples_with_heatmaps_grid(s["images"][:per_arm], s["step_maps"][:per_arm], n_steps,
                                                nrow=per_arm)) for name, s in arms.items()]
    means = torch.stack([mean_step_map(s["step_maps"]) for s in arms.values()])
    # long arm names wrap, and at most 6 maps share a row, so titles never run into each other
    titles = [f"{textwrap.fill(name, 24)}\n(mean over {len(s['step_maps'])})" for name, s in arms.items()]
    panels.append(("mean order map per arm (step at which each cell is written)",
                   labelled_maps_image(means, n_steps, titles, ncols=min(len(arms), 6), tile_px=160)))
    width = max(p.shape[2] for _, p in panels)
    heights = [p.shape[1] + 30 for _, p in panels]
    fig = Figure(figsize=(width / 100, sum(heights) / 100), dpi=100, facecolor="white")
    top = 1.0
    for title, image in panels:
        h = (image.shape[1] + 30) / sum(heights)
        ax = fig.add_axes((0, top - h, image.shape[2] / width, h * image.shape[1] / (image.shape[1] + 30)))
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title, fontsize=12, loc="left", pad=4)
        top -= h
    atomic_write(path, lambda tmp: FigureCanvasAgg(fig).print_png(str(tmp)))

def val_curves(root: Path, seed: int, models: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """TensorBoard validation scalars of each model of one seed: {model: {tag: [(step, value)]}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for model in models:
        events = EventAccumulator(str(root / f"seed{seed}" / model), size_guidance={"scalars": 0}).Reload()
        tags = set(events.Tags().get("scalars", []))
        curves[model] = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in VAL_SCALARS if t in tags}
    return curves

def curves_figure(steps: dict, val: dict, path: Path) -> None:
    """One panel per metric (arms against training steps, mean over seeds), then the validation NLLs."""
    metrics = [(k, t) for k, t in CURVE_METRICS if any(k in m for ms in steps.values() for m in ms)]
    panels = len(metrics) + len(VAL_SCALARS)
    fig = Figure(figsize=(4.2 * min(panels, 4), 3.4 * ((panels + 3) // 4)), dpi=100)
    arms = sorted({arm for arm, _ in steps})
    for i, (key, title) in enumerate(metrics):
        ax = fig.add_subplot((panels + 3) // 4, min(panels, 4), i + 1)
        for arm in arms:
            points = sorted((s, sum(m[key] for m in ms) / len(ms)) for (a, s), ms in steps.items()
                            if a == arm and key in ms[0])
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=arm)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
    for j, tag in enumerate(VAL_SCALARS):
        ax = fig.add_subplot((panels + 3) // 4, min(panels, 4), len(metrics) + j + 1)
        for model, tags in val.items():
            if tags.get(tag):
                ax.plot(*zip(*tags[tag], strict=True), label=model)
        ax.set_title(f"{tag} (bits/token)", fontsize=10)
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    if metrics:
        fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: FigureCanvasAgg(fig).print_png(str(tmp)))
