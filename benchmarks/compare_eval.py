"""Evaluation helpers of `benchmarks/compare_orders.py`: data, feature network, sampling, metrics, figure.

Shapes: b batch, n tokens = h*w, h/w token grid, d feature width, M samples, C classes.
"""

import hashlib
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from callbacks.heatmaps import labelled_maps_image, mean_step_map, samples_with_heatmaps_grid
from callbacks.lpips import MIN_LPIPS_PX
from callbacks.order_dump import cycle_labels
from lightning_modules.any_order import AnyOrderModule, SamplerSettings
from models.checkpoint import build_net, load_net, net_spec
from models.extraction import extract_orders, nll_under_order
from models.feature_net import SmallConvNetFeatures, accuracy, features, train_classifier
from models.orders import random_order, raster_order
from models.sampling import choice_generator
from models.weights import build_lpips


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


def split_images(dm, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N,3,H,W) and labels (N,) of a split, the first `limit` of them."""
    train_idx, val_idx = dm.split_indices()
    indices = (val_idx if split == "val" else train_idx)[:limit]
    items = [dm.source[int(i)] for i in indices]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def val_tokens(dm, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out token sequences (N, n) (unflipped view) and labels (N,) from the token cache."""
    cache = dm.token_cache()
    indices = dm.split_indices()[1][:limit]
    return cache["tokens"][indices, 0].flatten(1).long(), cache["labels"][indices].long()


# -------------------------------------------------------------------------------- feature network
def feature_net_for(dm, path: Path, epochs: int, max_train_images: int = 20000) -> tuple:
    """The domain feature network of this dataset, trained once and cached under `path`.

    The cache is keyed by the dataset fingerprint and the network's settings; anything else retrains.

    Returns:
        (net in eval mode, info dict with val_accuracy, train images, epochs, seconds).
    """
    net = SmallConvNetFeatures(num_classes=dm.num_classes)
    split = hashlib.sha256(torch.cat(dm.split_indices()).numpy().tobytes()).hexdigest()[:16]
    key = {"fingerprint": dm.source.fingerprint(), "split": split, "net_spec": net_spec(net),
           "epochs": epochs, "max_train_images": max_train_images}
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved["key"] == key:
            net = build_net(saved["key"]["net_spec"])
            net.load_state_dict(saved["state_dict"])
            print(f"  feature net: reusing {path} (val accuracy {saved['info']['val_accuracy']:.3f})", flush=True)
            return net.eval(), saved["info"]
    train_x, train_y = split_images(dm, "train", max_train_images)
    val_x, val_y = split_images(dm, "val", 2000)
    print(f"  feature net: training on {len(train_x)} real train images for {epochs} epochs", flush=True)
    info = train_classifier(net, train_x, train_y, max_epochs=epochs)
    info.update(val_accuracy=accuracy(net, val_x, val_y), train_images=len(train_x), val_images=len(val_x))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "state_dict": net.state_dict(), "info": info}, path)
    print(f"  feature net: val accuracy {info['val_accuracy']:.3f} after {info['epochs']:.1f} epochs "
          f"({info['seconds']:.0f} s)", flush=True)
    return net, info


def build_fid_kid(feature_net, inception_weights: str | None, m: int) -> tuple:
    """torchmetrics FID and KID on one shared feature network (uint8 inputs, normalize=False)."""
    if inception_weights:
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=inception_weights)
    else:
        fid = FrechetInceptionDistance(feature=feature_net)
    kid = KernelInceptionDistance(feature=fid.inception, subset_size=min(1000, m), subsets=50)
    return fid.eval(), kid.eval()  # eval: a custom network's BatchNorm must use its running statistics


@torch.no_grad()
def fid_kid(metrics: tuple, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 256) -> dict:
    """FID and KID (mean over subsets) of `fake` against `real`, both uint8 (M,3,H,W)."""
    for metric in metrics:
        metric.reset()
        for x in real.split(batch_size):
            metric.update(x.to(metric.device), real=True)
        for x in fake.split(batch_size):
            metric.update(x.to(metric.device), real=False)
    fid, kid = metrics
    return {"fid": float(fid.compute()), "kid": float(kid.compute()[0])}


# --------------------------------------------------------------------------------------- sampling
def load_arm(ckpt: str | Path, tokenizer_ckpt: str | Path, settings: SamplerSettings) -> AnyOrderModule:
    """An AR LightningModule around a trained network, ready to `generate` with `settings`."""
    with warnings.catch_warnings():  # save_hyperparameters outside the CLI: "net is already saved"
        warnings.filterwarnings("ignore", message="Attribute 'net' is an instance")
        module = AnyOrderModule(load_net(ckpt), sampler=settings)
    module.tokenizer = load_net(tokenizer_ckpt).requires_grad_(False)
    return module.eval()


@torch.no_grad()
def sample_arm(module: AnyOrderModule, m: int, batch_size: int, seed: int) -> dict:
    """M samples with labels cycling over the classes and one generator seeded `seed`, timed.

    Returns:
        {"images": uint8 (M,3,H,W), "step_maps": (M,h,w), "labels": (M,), "seconds": float}.
    """
    labels = cycle_labels(m, module.num_classes)
    generator = torch.Generator(device=module.device).manual_seed(seed)
    choices = choice_generator(seed, module.device)
    outs, start = [], time.perf_counter()
    for chunk in labels.split(batch_size):
        outs.append(module.generate(chunk, generator=generator, choice_generator=choices))
    seconds = time.perf_counter() - start
    return {"images": torch.cat([o["images"] for o in outs]), "step_maps": torch.cat([o["step_map"] for o in outs]),
            "labels": labels, "seconds": seconds}


# ---------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def nll_bits(net, tokens: torch.Tensor, labels: torch.Tensor, seed: int, batch_size: int = 64) -> dict:
    """Mean NLL (bits/token) of held-out sequences under raster, random and the model's inferred order."""
    net.eval()
    generator = torch.Generator().manual_seed(seed)
    sums = {"raster": 0.0, "random": 0.0, "inferred": 0.0}
    for x, y in zip(tokens.split(batch_size), labels.split(batch_size), strict=True):
        b, n = x.shape
        orders = {"raster": raster_order(b, n, device=x.device),
                  "random": random_order(b, n, generator=generator).to(x.device),
                  "inferred": extract_orders(net, x, y)}
        for name, order in orders.items():
            sums[name] += float(nll_under_order(net, x, order, y).sum())
    return {f"nll_{k}": v / len(tokens) for k, v in sums.items()}


def _pairwise_mean(x: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs i < j of rows of x (k, d)."""
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    return float((x[i] - x[j]).norm(dim=1).mean())


@torch.no_grad()
def diversity(images: torch.Tensor, labels: torch.Tensor, feature_net, lpips=None, per_class: int = 16) -> float:
    """Mean pairwise distance among samples of one class, averaged over classes.

    With `lpips`: LPIPS over the first `per_class` samples of each class (upsampled to MIN_LPIPS_PX);
    else: Euclidean distance of L2-normalised feature-network features over all samples of each class.
    """
    values = []
    for c in labels.unique():
        group = images[labels == c]
        if len(group) < 2:
            continue
        if lpips is None:
            feats = features(feature_net, group.to(next(feature_net.parameters()).device))
            values.append(_pairwise_mean(torch.nn.functional.normalize(feats, dim=1)))
            continue
        x = group[:per_class].float() / 255
        if min(x.shape[-2:]) < MIN_LPIPS_PX:
            x = torch.nn.functional.interpolate(x, size=MIN_LPIPS_PX, mode="bilinear").clamp(0, 1)
        i, j = torch.triu_indices(len(x), len(x), offset=1)
        lpips.reset()
        lpips.update(x[i], x[j])
        values.append(float(lpips.compute()))
    return sum(values) / max(len(values), 1)


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
COLUMNS = [("FID ↓", "fid", ".4g"), ("KID ↓", "kid", ".3g"), ("NLL raster", "nll_raster", ".3f"),
           ("NLL random", "nll_random", ".3f"), ("NLL inferred", "nll_inferred", ".3f"),
           ("consistency ↑", "consistency", ".3f"), ("diversity", "diversity", ".3f"),
           ("samples/s", "samples_per_s", ".1f")]


def summarise(per_seed: list[dict]) -> dict:
    """metric -> [mean, std over seeds] (std 0 for one seed)."""
    return {k: [statistics.fmean(d[k] for d in per_seed),
                statistics.stdev(d[k] for d in per_seed) if len(per_seed) > 1 else 0.0] for k in per_seed[0]}


def _cell(stat: list[float] | None, spec: str, seeds: int) -> str:
    if stat is None:
        return "–"
    return f"{stat[0]:{spec}}" + (f" ± {stat[1]:{spec}}" if seeds > 1 else "")


def markdown_table(summary: dict, reference: dict, steps: dict, seeds: int, consistency: bool) -> str:
    """Rows = arms (mean ± std over seeds) and the real-image reference; columns = COLUMNS + train steps."""
    cols = [c for c in COLUMNS if c[1] != "consistency" or consistency]
    lines = ["| arm | " + " | ".join(c[0] for c in cols) + " | train steps |", "|---|" + "---|" * (len(cols) + 1)]
    for arm, stats in summary.items():
        lines.append(f"| {arm} | " + " | ".join(_cell(stats.get(k), spec, seeds) for _, k, spec in cols)
                     + f" | {steps[arm]} |")
    ref = [f"{reference[k]:{spec}}" if k in reference else "–" for _, k, spec in cols]
    return "\n".join(lines + ["| real images (reference) | " + " | ".join(ref) + " | – |"])


def how_to_read(samples: int, nll_images: int, batch: int, device: str, feature_name: str, lpips: bool,
                quick: bool) -> str:
    div = "mean pairwise LPIPS (AlexNet)" if lpips else (
        "mean pairwise Euclidean distance of L2-normalised feature-network features")
    caveat = "" if lpips else (
        " The feature network was trained to map every real image of a class to one label, so real images of "
        "a class sit close together: sample diversity above the reference row partly measures off-class "
        "variation, not variety.")
    quick_note = ("\nAt the --quick budget the networks are far from converged (see the NLL columns): the table "
                  "checks the pipeline; compare arms on full runs.") if quick else ""
    return f"""## How to read this
Rows 2 and 3 are the same network (so the same NLLs); they differ only in the sampling order. Row 4
starts from that network and is fine-tuned on the orders it extracted from the training images.
FID and KID compare {samples} samples with {samples} real validation images in the space of
{feature_name}; with so few samples and a domain network they rank arms within this table only and are not
comparable with published FIDs (the reference row is FID between as many real train and val images: the
floor at this sample size). NLL is in bits per token on {nll_images} held-out images, under the raster
order, one random order per image, and the order the model itself infers (teacher-forced greedy, chosen
knowing the true tokens, so it is a lower bound rather than a proper likelihood): a raster model is expected
to be poor under random orders; an order-aware model should be best in its own order.
Consistency (synthetic only) is the share of images whose cloud tint is the one their sun's hue causes
(`datamodules.sources.synthetic.consistency_rate`; the reference row is real images). Diversity is the
{div} among samples of one class (higher = more varied; compare with the reference row).{caveat}
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
