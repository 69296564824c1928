"""Evaluation helpers of `benchmarks/compare_orders.py`: data, feature network, sampling, metrics, figure.

Shapes: b batch, n tokens = h*w, h/w token grid, d feature width, M samples, C classes.
"""

import hashlib
import logging
import os
import platform
import statistics
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from callbacks.heatmaps import labelled_maps_image, samples_with_heatmaps_grid
from evaluation import SmallConvNetFeatures, head_scores, label_accuracy, targets_for, train_feature_net
from evaluation.diversity import diversity
from evaluation.lpips import build_lpips
from evaluation.nll import mean_nll_bits
from evaluation.order_stats import mean_step_map
from evaluation.sampling import sample_set
from evaluation.scene import scene_rates
from fileio import save_torch
from lightning_modules.any_order import AnyOrderModule, SamplerSettings
from models.checkpoint import build_net, load_net, net_spec

log = logging.getLogger("oar.compare")


# ------------------------------------------------------------------------------------------- data
def build_datamodule(config_files: list[str], overrides: dict) -> LightningDataModule:
    """The `data:` section of the merged stage + overlay configs, with dotted overrides, instantiated.

    The same configs the stages run with, so the evaluation reads exactly the data they trained on.
    """
    cfg = OmegaConf.merge(*(OmegaConf.load(path) for path in config_files))
    for key, value in overrides.items():
        if key.startswith("data."):
            OmegaConf.update(cfg, key, value, merge=True)
    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    parsed = parser.parse_object({"data": OmegaConf.to_container(cfg.data)})
    return parser.instantiate(parsed).data


def images_of(source, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N,3,H,W) and labels (N,) of items `indices` of a source."""
    items = [source[int(i)] for i in indices]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def held_out_halves(dm, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation indices of two disjoint real sets A and B of `m` images each (no network trains on them).

    Samples are compared with B; the reference row compares A with B (the metric's floor at this size).
    """
    val_idx = dm.split_indices()[1]
    if len(val_idx) < 2 * m:
        raise ValueError(f"the validation split holds {len(val_idx)} images, the comparison needs 2 x {m} "
                         f"(two held-out halves): raise --val-images or max_val_images, or lower --samples")
    return val_idx[:m], val_idx[m:2 * m]


def val_tokens(dm, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out token sequences (N, n) (unflipped view) and labels (N,) from the token cache."""
    cache = dm.token_cache()
    indices = dm.split_indices()[1][:limit]
    return cache["tokens"][indices, 0].flatten(1).long(), cache["labels"][indices].long()


# -------------------------------------------------------------------------------- feature network
FEATURE_SEED = 1_000_003  # seed of the fresh synthetic images the feature network learns from (no split uses it)


def feature_net_for(dm, path: Path, epochs: int, feature_images: int, check: torch.Tensor) -> tuple:
    """The domain feature network of this dataset, trained once and cached under `path`.

    On a source with scene factors (the synthetic sunsets) it learns them from `feature_images` fresh
    renders of another seed; on other data it learns the class from the first `feature_images`
    training images. It never sees the validation images the comparison uses as real references.
    The cache is keyed by the data, the split and the network's settings; anything else retrains.

    Args:
        check: held-out (validation) indices its per-head scores are measured on.

    Returns:
        (net in eval mode, info dict: train images, epochs, seconds, label_head, held-out scores per head).
    """
    source = dm.source
    structured = hasattr(source, "scene_heads")
    if structured:  # the scene parameters are known for any number of fresh images
        source = source.with_seed(FEATURE_SEED + source.seed, feature_images)
        train_idx = torch.arange(feature_images)
    else:
        train_idx = dm.split_indices()[0][:feature_images]
    heads, _, label_head = targets_for(dm.source, check[:1], torch.zeros(1))
    # width 16 learns the scene factors as well as 32 at a third of the time (measured); classes keep 32
    net = SmallConvNetFeatures(heads, width=16 if structured else 32)
    split = hashlib.sha256(torch.cat(dm.split_indices()).numpy().tobytes()).hexdigest()[:16]
    key = {"fingerprint": source.fingerprint(), "split": split, "net_spec": net_spec(net), "epochs": epochs,
           "feature_images": feature_images, "check": check.tolist()}
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved["key"] == key:
            net = build_net(saved["key"]["net_spec"])
            net.load_state_dict(saved["state_dict"])
            log.info("feature net: reusing %s", path)
            return net.eval(), saved["info"]
    train_x, train_y = images_of(source, train_idx)
    _, targets, _ = targets_for(source, train_idx, train_y)
    trained_on = f"{len(train_x)} {'fresh synthetic' if structured else 'real train'} images"
    log.info("feature net: training on %s for %d epochs", trained_on, epochs)
    info = train_feature_net(net, train_x, targets, max_epochs=epochs, flip=not structured)
    check_x, check_y = images_of(dm.source, check)
    info.update(trained_on=trained_on, label_head=label_head, heads=heads,
                scores=head_scores(net, check_x, targets_for(dm.source, check, check_y)[1]), check_images=len(check))
    save_torch({"key": key, "state_dict": net.state_dict(), "info": info}, path)
    log.info("feature net: %s after %.1f epochs (%.0f s)", scores_text(info["scores"]), info["epochs"], info["seconds"])
    return net, info


def scores_text(scores: dict) -> str:
    """Held-out head scores in one line: accuracy of classifiers, R² of regressions."""
    return ", ".join(f"{name} {'acc' if 'accuracy' in s else 'R²'} {s.get('accuracy', s.get('r2')):.3f}"
                     for name, s in scores.items())


def feature_name(info: dict, inception: bool) -> str:
    """How the table's FID space was made, for the report header."""
    if inception:
        return "Inception-v3 pool3 (2048-d, torch-fidelity weights)"
    return (f"SmallConvNetFeatures (128-d penultimate layer of a small CNN trained for {info['epochs']:.0f} epochs "
            f"on {info['trained_on']} to predict {', '.join(info['heads'])}; held-out scores on "
            f"{info['check_images']} validation images: {scores_text(info['scores'])})")


# ------------------------------------------------------------------------------------------ rows
@torch.no_grad()
def reconstruct(tokenizer, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 images (N,3,H,W) passed through the tokenizer (encode, decode): what no AR model can beat."""
    device = next(tokenizer.parameters()).device
    out = []
    for x in images.split(batch_size):
        y = tokenizer.decode_indices(tokenizer.encode(x.to(device).float().div(127.5).sub(1.0)))
        out.append(y.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


def image_metrics(ctx: dict, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Every image-level column of one row: FID/KID against the real set B, class accuracy (conditional
    data), consistency and sun/cloud shares (synthetic), diversity."""
    m = {**ctx["distances"](images), "diversity": diversity(images, labels, ctx["feature_net"], ctx["lpips"])}
    if ctx["label_head"] is not None:
        m["class_accuracy"] = label_accuracy(ctx["feature_net"], ctx["label_head"], images, labels)
    if ctx["num_hues"]:
        m.update(scene_rates(images, ctx["num_hues"]))
    return m


# --------------------------------------------------------------------------------------- sampling
def load_arm(ckpt: str | Path, tokenizer_ckpt: str | Path, settings: SamplerSettings) -> AnyOrderModule:
    """An AR LightningModule around a trained network, ready to `generate` with `settings`."""
    with warnings.catch_warnings():  # save_hyperparameters outside the CLI: "net is already saved"
        warnings.filterwarnings("ignore", message="Attribute 'net' is an instance")
        module = AnyOrderModule(load_net(ckpt), sampler=settings)
    module.tokenizer = load_net(tokenizer_ckpt).requires_grad_(False)
    return module.eval()


def sample_arm(module: AnyOrderModule, m: int, batch_size: int, seed: int) -> dict:
    """M samples with labels cycling over the classes (`evaluation.sampling.sample_set`), timed."""
    return sample_set(module, m, batch_size, seed)


# ---------------------------------------------------------------------------------------- metrics
def nll_bits(net, tokens: torch.Tensor, labels: torch.Tensor, seed: int, batch_size: int = 64) -> dict:
    """Mean NLL (bits/token) of held-out sequences under raster, random and the model's inferred order."""
    return mean_nll_bits(net, tokens, labels, seed, batch_size)


def make_lpips(weights_path: str | None):
    """torchmetrics LPIPS (AlexNet backbone from a local file), or None to fall back to features."""
    return build_lpips("alex", weights_path) if weights_path else None


def sampler_record(settings: SamplerSettings, seed: int, m: int, batch_size: int) -> dict:
    return {**asdict(settings), "seed": seed, "num_samples": m, "batch_size": batch_size}


# ----------------------------------------------------------------------------------------- figure
def samples_figure(arms: dict[str, dict], n_steps: int, path: Path, per_arm: int = 8) -> None:
    """Per arm a row of samples beside their order heatmaps, then the arms' mean order maps.

    Args:
        arms: arm name -> sample dict of `sample_arm` (images, step_maps).
        n_steps: generation steps n (fixes the colour scale, shared by every panel).
        path: the PNG to write.
        per_arm: samples shown per arm (the first ones: labels 0, 1, 2, ...).
    """
    panels = [(name, samples_with_heatmaps_grid(s["images"][:per_arm], s["step_maps"][:per_arm], n_steps,
                                                nrow=per_arm)) for name, s in arms.items()]
    means = torch.stack([mean_step_map(s["step_maps"]) for s in arms.values()])
    titles = [f"{name}\n(mean over {len(s['step_maps'])})" for name, s in arms.items()]
    panels.append(("mean order map per arm (step at which each cell is written)",
                   labelled_maps_image(means, n_steps, titles, ncols=len(arms), tile_px=160)))
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
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))


# ----------------------------------------------------------------------------------------- report
COLUMNS = [("FID ↓", "fid", ".4g"), ("KID ↓", "kid", ".3g"), ("class acc. ↑", "class_accuracy", ".3f"),
           ("NLL raster", "nll_raster", ".3f"), ("NLL random", "nll_random", ".3f"),
           ("NLL inferred", "nll_inferred", ".3f"), ("consistency ↑", "consistency", ".3f"),
           ("sun found", "sun_share", ".3f"), ("clouds found", "cloud_share", ".3f"),
           ("diversity", "diversity", ".3f"), ("samples/s", "samples_per_s", ".1f")]
CEILING, REFERENCE = "tokenizer reconstruction (ceiling)", "real images (reference)"


def summarise(per_seed: list[dict]) -> dict:
    """metric -> [mean, std over seeds] (std 0 for one seed)."""
    return {k: [statistics.fmean(d[k] for d in per_seed),
                statistics.stdev(d[k] for d in per_seed) if len(per_seed) > 1 else 0.0] for k in per_seed[0]}


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
Rows 2 and 3 are the same network (so the same NLLs); they differ only in the sampling order. Row 4
starts from that network and is fine-tuned on the orders it extracted from the training images.
FID and KID compare {samples} samples with a set B of {samples} real validation images in the space of
{space}; with so few samples they rank arms within this table only and are not comparable with
published FIDs. The validation images are split into two disjoint halves A and B that no
network trained on: the reference row is A against B, the floor of the metric at this sample size; the
ceiling row is A passed through the tokenizer (encode, decode) against B: no AR model over these tokens can
beat it. Class accuracy (class-conditional data) is the share of images the feature network assigns to the
label they were sampled for (a model that ignores the class scores near 1 / classes).
NLL is in bits per token on {nll_images} held-out images, under the raster order, one random order per
image, and the order the model itself infers (teacher-forced greedy, chosen knowing the true tokens, so it
is a lower bound rather than a proper likelihood): a raster model is expected to be poor under random
orders; an order-aware model should be best in its own order.
Synthetic data only: consistency is the share of images whose cloud tint is the one their sun's hue causes;
sun found and clouds found are the shares of images in which the analyser finds a sun and clouds at all
(`datamodules.sources.synthetic.scene_rates`); an image without a sun or clouds is not consistent.
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
