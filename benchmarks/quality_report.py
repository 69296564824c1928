"""The quality comparison's report parts: the table, how to read it, the samples figure, the machine line.

Used by `benchmarks/experiment_report.py`; every number in them is measured by `evaluation/`
(`benchmarks/experiment_eval.py` runs it).

Shapes: M samples, h/w token grid.
"""

import os
import platform
import statistics
import textwrap
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from callbacks.heatmaps import labelled_maps_image, samples_with_heatmaps_grid
from evaluation.feature_cache import scores_text
from evaluation.order_stats import mean_step_map
from fileio import atomic_write


def feature_name(info: dict, inception: bool) -> str:
    """How the table's FID space was made, for the report header."""
    if inception:
        return "Inception-v3 pool3 (2048-d, torch-fidelity weights)"
    return (f"SmallConvNetFeatures (128-d penultimate layer of a small CNN trained for {info['epochs']:.0f} epochs "
            f"on {info['trained_on']} to predict {', '.join(info['heads'])}; held-out scores on "
            f"{info['check_images']} validation images: {scores_text(info['scores'])})")


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


# ----------------------------------------------------------------------------------------- report
COLUMNS = [("FID ↓", "fid", ".4g"), ("KID ↓", "kid", ".3g"), ("class acc. ↑", "class_accuracy", ".3f"),
           ("NLL raster", "nll_raster", ".3f"), ("NLL random", "nll_random", ".3f"),
           ("NLL inferred", "nll_inferred", ".3f"), ("NLL own order", "nll_own", ".3f"),
           ("consistency ↑", "consistency", ".3f"),
           ("sun found", "sun_share", ".3f"), ("clouds found", "cloud_share", ".3f"),
           ("sun step", "sun_step", ".2f"), ("cloud step", "cloud_step", ".2f"),
           ("diversity", "diversity", ".3f"), ("samples/s", "samples_per_s", ".1f")]
CEILING, REFERENCE = "tokenizer reconstruction (ceiling)", "real images (reference)"


def summarise(per_seed: list[dict]) -> dict:
    """metric -> [mean, std over seeds] (std 0 for one seed)."""
    keys = [k for k in per_seed[0] if all(k in d for d in per_seed)]  # an older run may lack a newer metric
    return {k: [statistics.fmean(d[k] for d in per_seed),
                statistics.stdev(d[k] for d in per_seed) if len(per_seed) > 1 else 0.0] for k in keys}


def _cell(stat: list[float] | None, spec: str, seeds: int) -> str:
    if stat is None:
        return "–"
    return f"{stat[0]:{spec}}" + (f" ± {stat[1]:{spec}}" if seeds > 1 else "")


def markdown_table(summary: dict, rows: dict, steps: dict, seeds: int) -> str:
    """Arms (mean ± std over seeds), then the real-image rows (`rows`: name -> metrics, one value each).

    Columns = the COLUMNS some row has, + train steps.
    """
    present = {k for stats in [*summary.values(), *rows.values()] for k in stats}
    cols = [c for c in COLUMNS if c[1] in present]
    lines = ["| arm | " + " | ".join(c[0] for c in cols) + " | train steps |", "|---|" + "---|" * (len(cols) + 1)]
    for arm, stats in summary.items():
        lines.append(f"| {arm} | " + " | ".join(_cell(stats.get(k), spec, seeds) for _, k, spec in cols)
                     + f" | {steps[arm]} |")
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[k]:{spec}}" if k in values else "–" for _, k, spec in cols)
                     + " | – |")
    return "\n".join(lines)


def how_to_read(samples: int, nll_images: int, batch: int, device: str, inception: bool, lpips: bool,
                quick: bool) -> str:
    div = "mean pairwise LPIPS (AlexNet)" if lpips else (
        "mean pairwise Euclidean distance of L2-normalised feature-network features")
    quick_note = ("\nAt the --quick budget the networks are far from converged (see the NLL columns): the table "
                  "checks the pipeline; compare arms on full runs.") if quick else ""
    space = "Inception-v3 (pool3)" if inception else "the domain feature network described above"
    return f"""## How to read this
Rows of one model share its network (so the same NLLs) and differ only in the sampling order; an OAR
(distilled) model starts from the any-order network and is fine-tuned on the orders it extracted from the
training images.
FID and KID compare {samples} samples with a set B of {samples} real validation images in the space of
{space}; with so few samples they rank arms within this table only and are not comparable with
published FIDs. The validation images are split into two disjoint halves A and B that no
network trained on: the reference row is A against B, the floor of the metric at this sample size; the
ceiling row is A passed through the tokenizer (encode, decode) against B: no AR model over these tokens can
beat it. Class accuracy (class-conditional data) is the share of images the feature network assigns to the
label they were sampled for (a model that ignores the class scores near 1 / classes).
NLL is in bits per token on {nll_images} held-out images, under the raster order, one random order per
image, the inferred order (the extraction's teacher-forced greedy order: with the paper's score each cell
is chosen knowing its true token, so it is a lower bound, not a likelihood) and the model's own order
(greedy by max-probability given the tokens already placed, the order confidence sampling takes: a proper
likelihood, comparable with raster and random). A raster model is expected to be poor under random orders;
an order-aware model should be best in its own order.
Synthetic data only: consistency is the share of images whose cloud tint is the one their sun's hue causes;
sun found and clouds found are the shares of images in which the analyser finds a sun and clouds at all
(`evaluation.scene.scene_rates`); an image without a sun or clouds is not consistent. Sun step and cloud
step say when the sampling order writes the content: the mean step, as a share of all steps (0 first, 1 last),
of the cells holding sun pixels and of those holding cloud pixels (`evaluation.scene.content_steps`; a random
order gives 0.5, raster gives where the sun sits in the scan).
Diversity is the {div} among samples of one class (higher = more varied; compare with the reference row).
Samples/s is the sampler's throughput at batch {batch} on {device}, tokenizer decoding included (it
depends on the machine's load: see the load averages above).
± is the standard deviation over seeds. Train steps: stage-1 steps, plus the fine-tune for OAR
(order extraction over the training set costs extra time, not optimiser steps; see the stage times).{quick_note}
"""


def machine(device: str) -> str:
    """CPU model, cores, load average, GPU, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    load = ", load average {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return f"{cpu} ({os.cpu_count()} cores{load}){gpu}; torch {torch.__version__}; evaluation on {device}"
