# Shapes: N images, h/w token grid, H/W image size.
"""The editing table: each arm (a checkpoint + sampler settings) edits the same held-out images under each mask.

    E=runs/experiments/curve_synthetic/seed0
    python -m experiments.editing --experiment runs/experiments/curve_synthetic \\
        --arm "raster AR" $E/raster/checkpoints/last.ckpt policy=raster \\
        --arm "any-order, random order" $E/any_order/checkpoints/last.ckpt policy=random \\
        --arm "any-order, confidence order" $E/any_order/checkpoints/last.ckpt policy=confidence \\
        --images 500 --out runs/editing

An arm is `NAME CHECKPOINT [key=value ...]` with any `SamplerSettings` key and `known_cells` (auto: a raster
policy edits the standard way, known cells teacher-forced in place; other policies give every known cell
first). The images are the first `--images` of the validation split (half A); FID compares the edited
images with the next `--images` validation images (half B, never edited, never trained on). Masks:
`center` (the centred box of half the side), a half (`top`, `left`, ...), `border` (a one-cell frame:
outpainting) and, on the synthetic sunsets (`--scene`), two scene edits read by the sunset analyser:
`clouds` (regenerate the cells the clouds cover, given the rest: do they take the tint the kept sun
causes?) and `hue` (class-edit: regenerate the sun and the clouds under the next hue: is the new sun that
hue, and do the clouds follow it?). On any class-conditional data, `class` regenerates the centre box
under the next class (label + 1): the share of edits the domain classifier assigns to that class
(Fashion-MNIST: does a shirt's centre become a trouser's?). Two rows frame the arms: the input's own tokens
decoded (what regenerating exactly the original would score: the tokenizer's ceiling) and, for FID, real half A.

Writes `editing.md`, `editing.json` and `editing_<mask>.png` (a few images: original | masked | each arm)
into `--out`. `editing_table(...)` is the function an experiment runner calls.
"""

import argparse
import dataclasses
import json
import logging
import sys
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchvision.io import write_png

from callbacks.edit_writer import masked_inputs
from datamodules.sources.synthetic import analyse_sunset, expected_tint
from evaluation.feature_cache import feature_net_for
from evaluation.feature_net import label_accuracy
from evaluation.fid import FeatureDistances
from evaluation.lpips import build_lpips, lpips_input
from evaluation.real import held_out_halves, images_of
from evaluation.scene import scene_rates
from experiments.evaluate import build_datamodule, load_arm
from experiments.plan import data_overrides
from experiments.spec import CONFIGS, Budget, load_run
from fileio import atomic_write, save_json, save_text
from lightning_modules.editing import KNOWN_CELLS, EditSettings, edit_images, to_uint8
from models.masks import image_mask_cells, token_mask
from models.sampling import SamplerSettings, choice_generator

log = logging.getLogger("oar.editing")
SCENE_MASKS = ("clouds", "hue")
RELABELLED = ("hue", "class")  # edits under another label: their distance to the original means nothing
CEILING, REAL = "input tokens, decoded (ceiling)", "real images, half A (FID floor)"


@dataclass
class Arm:
    """A model and how it edits."""

    name: str
    ckpt: str
    settings: SamplerSettings
    known_cells: str = "auto"


def parse_arm(words: list[str]) -> Arm:
    """`NAME CHECKPOINT [key=value ...]` -> Arm (values read as YAML: numbers, booleans, strings)."""
    if len(words) < 2 or not all("=" in w for w in words[2:]):
        raise ValueError(f"--arm {' '.join(words)!r}: give NAME CHECKPOINT [key=value ...], e.g. --arm 'raster AR' "
                         "runs/raster/checkpoints/last.ckpt policy=raster")
    name, ckpt = words[:2]
    values = {k.strip(): yaml.safe_load(v) for k, v in (w.split("=", 1) for w in words[2:])}
    known = values.pop("known_cells", "auto")
    if known not in KNOWN_CELLS:
        raise ValueError(f"--arm {name}: known_cells must be one of {', '.join(KNOWN_CELLS)}, got {known!r}")
    fields = {f.name for f in dataclasses.fields(SamplerSettings)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"--arm {name}: unknown sampler keys {unknown}; use keys of SamplerSettings "
                         f"({', '.join(sorted(fields))})")
    return Arm(name, ckpt, SamplerSettings(**values), known)


# ------------------------------------------------------------------------------------------ masks
def scene_regions(source, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel masks (N, H, W) of the sun disc and of the clouds of synthetic scenes, from their parameters."""
    sun, clouds = [], []
    for i in indices.tolist():
        params = source.sample_params(i)
        image = source.render(params)
        sun.append((image != source.render(replace(params, sun_radius=0.0))).any(dim=0))
        clouds.append((image != source.render(replace(params, clouds=()))).any(dim=0))
    return torch.stack(sun), torch.stack(clouds)


def edit_masks(kind: str, source, indices: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int],
               num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(regenerated cells (N, h, w), the class of each edit (N,), which images the edit applies to (N,) bool)."""
    n, size = len(indices), source.image_size
    if kind not in SCENE_MASKS:
        cells = token_mask("center" if kind == "class" else kind, grid, size, center_fraction=0.5, border=1)
        targets = (labels + 1) % max(num_classes, 1) if kind == "class" else labels
        return cells.expand(n, *grid).clone(), targets, torch.ones(n, dtype=torch.bool)
    sun, clouds = scene_regions(source, indices)
    cells = image_mask_cells(clouds if kind == "clouds" else sun | clouds, grid)
    usable = cells.flatten(1).any(dim=1)  # a scene whose clouds could not be placed has nothing to regenerate
    if kind == "clouds":
        return cells, labels, usable
    return cells, (labels + 1) % max(num_classes, 1), usable  # the next hue: its clouds take another tint


# ---------------------------------------------------------------------------------------- metrics
def masked_mse(edited: torch.Tensor, original: torch.Tensor, regenerate: torch.Tensor) -> float:
    """Mean squared error over the regenerated pixels of uint8 images (N,3,H,W), in [0, 1] units."""
    pixels = torch.nn.functional.interpolate(regenerate[:, None].float(), size=original.shape[-2:], mode="nearest")
    err = (edited.float() - original.float()).div(255).pow(2).mean(dim=1, keepdim=True)
    return float((err * pixels).sum() / pixels.sum().clamp(min=1))


def hue_edit_rates(edited: torch.Tensor, targets: torch.Tensor, num_hues: int) -> dict[str, float]:
    """Class edit of the sun: the share whose sun reads as the target hue, and whose clouds take its tint."""
    results = analyse_sunset(edited, num_hues)
    n = max(len(results), 1)
    return {"sun_is_target": sum(r.sun_hue == int(t) for r, t in zip(results, targets, strict=True)) / n,
            "clouds_follow": sum(r.cloud_tint == expected_tint(int(t), num_hues)
                                 for r, t in zip(results, targets, strict=True)) / n}


class Judge:
    """Every metric of an edited set: masked MSE/PSNR and LPIPS against the originals, FID against half B,
    the scene rates on sunsets, and after a class edit the share the classifier assigns to the target."""

    def __init__(self, distances: FeatureDistances, num_hues: int, lpips=None, classifier=None):
        self.distances, self.num_hues, self.lpips = distances, num_hues, lpips
        self.classifier = classifier  # (feature network, its head whose class is the label), or None

    def __call__(self, kind: str, edited, original, regenerate, targets) -> dict[str, float | None]:
        m: dict[str, float | None] = {"fid": self.distances(edited)["fid"]}
        if kind == "class" and self.classifier is not None:
            m["target_class"] = label_accuracy(*self.classifier, edited, targets)
        if kind not in RELABELLED:
            mse = masked_mse(edited, original, regenerate)
            m.update(mse=mse, psnr=10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-10))).item())
            if self.lpips is not None:
                self.lpips.reset()
                self.lpips.update(lpips_input(edited), lpips_input(original))
                m["lpips"] = float(self.lpips.compute())
        if self.num_hues:
            m.update(scene_rates(edited, self.num_hues))
            if kind == "hue":
                m.update(hue_edit_rates(edited, targets, self.num_hues))
        return m


# ------------------------------------------------------------------------------------------ edits
def run_edits(module, images, regenerate, cond, arm: Arm, batch: int, seed: int) -> tuple[torch.Tensor, float]:
    """uint8 edits (N,3,H,W) of every image (one sample each, seeded per batch) and the wall seconds."""
    placement = EditSettings(known_cells=arm.known_cells).placement(arm.settings.policy)
    device, out, start = module.device, [], time.perf_counter()
    for i in range(0, len(images), batch):
        part = slice(i, i + batch)
        gen = torch.Generator(device=device).manual_seed(seed + i)
        got = edit_images(module.net, module.tokenizer, images[part].to(device), regenerate[part].to(device),
                          cond[part].to(device), arm.settings, placement, 1, gen, choice_generator(seed + i, device))
        out.append(got["outputs"][:, 0].cpu())
    return torch.cat(out), time.perf_counter() - start


def comparison_figure(original, regenerate, edits: dict[str, torch.Tensor], path: Path, count: int = 6) -> None:
    """A PNG: one row per image: original | masked | each arm's edit, titled by column."""
    columns = {"original": original[:count], "masked": masked_inputs(original[:count], regenerate[:count]),
               **{name: e[:count] for name, e in edits.items()}}
    fig = Figure(figsize=(1.3 * len(columns), 1.3 * count + 0.5), dpi=100, facecolor="white", layout="constrained")
    axes = fig.subplots(count, len(columns), squeeze=False)
    for col, (title, images) in enumerate(columns.items()):
        axes[0, col].set_title("\n".join(textwrap.wrap(title, 16)), fontsize=7)
        for row in range(count):
            axes[row, col].set_axis_off()
            if row < len(images):
                axes[row, col].imshow(images[row].permute(1, 2, 0).numpy(), interpolation="nearest")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    grid = torch.from_numpy(np.asarray(canvas.buffer_rgba())[..., :3].copy()).permute(2, 0, 1)
    atomic_write(path, lambda tmp: write_png(grid, str(tmp)))


def editing_table(arms: list[Arm], dm, tokenizer_ckpt: str, images: int = 500,
                  masks: tuple[str, ...] = ("center", "top", "border", *SCENE_MASKS), batch: int = Budget.sample_batch,
                  seed: int = 0, device: str = "cpu", feature_path: Path | None = None,
                  feature_epochs: int = Budget.feature_epochs, feature_images: int = Budget.feature_images,
                  lpips_weights: str | None = None,
                  inception_weights: str | None = None, figures: Path | None = None) -> dict:
    """The editing table: {"rows": {mask: {arm or reference row: metrics}}, "settings": ...}.

    Args:
        arms: the arms.
        dm: the DataModule of the data the models trained on (`source`, `split_indices()`).
        tokenizer_ckpt: the tokenizer every arm was trained with.
        images: images edited (validation half A) and real images FID compares with (half B).
        masks: center | top | bottom | left | right | border | class (class-conditional data) | clouds | hue
            (the last two: sunsets only).
        batch, seed, device: how the edits run (one generator per batch: seed + its first image).
        feature_path: cache file of the domain feature network (FID space) when no Inception weights.
        feature_epochs, feature_images: its training budget.
        lpips_weights: a local torchvision AlexNet file: LPIPS too.
        inception_weights: a torch-fidelity Inception file: FID in Inception space.
        figures: a folder for `editing_<mask>.png`; None: no figures.
    """
    source = dm.source
    modules = {arm.name: load_arm(arm.ckpt, tokenizer_ckpt, arm.settings).to(device) for arm in arms}  # fail early
    idx_a, idx_b = held_out_halves(dm, images)
    original, labels = images_of(source, idx_a)
    real_b, _ = images_of(source, idx_b)
    net, info = (None, None) if inception_weights else feature_net_for(
        dm, Path(feature_path), feature_epochs, feature_images, check=idx_a)
    distances = FeatureDistances(real_b, None if net is None else net.to(device), inception_weights, device=device)
    num_hues = source.scene_hues  # the sunsets: scene rates
    label_head = None if net is None else info["label_head"]
    judge = Judge(distances, num_hues, build_lpips("alex", lpips_weights).to(device) if lpips_weights else None,
                  None if label_head is None else (net, label_head))
    grid = next(iter(modules.values())).grid if modules else (0, 0)
    tokenizer = next(iter(modules.values())).tokenizer
    with torch.no_grad():
        recon = torch.cat([to_uint8(tokenizer.decode_indices(tokenizer.encode(x.to(device).float() / 127.5 - 1))).cpu()
                           for x in original.split(batch)])
    rows = {}
    for kind in masks:
        if kind in SCENE_MASKS and not num_hues or kind in RELABELLED and source.num_classes == 0:
            log.info("mask %s skipped: it needs %s", kind, "class-conditional data" if kind == "class"
                     else "the (conditional) synthetic sunsets")
            continue
        regenerate, cond, usable = edit_masks(kind, source, idx_a, labels, grid, source.num_classes)
        x, regenerate, cond = original[usable], regenerate[usable], cond[usable]
        rows[kind], edits = {}, {}
        for arm in arms:
            edits[arm.name], seconds = run_edits(modules[arm.name], x, regenerate, cond, arm, batch, seed)
            metrics = judge(kind, edits[arm.name], x, regenerate, cond)
            rows[kind][arm.name] = {**metrics, "edits_per_s": len(x) / seconds}
            log.info("%s / %s: %s", kind, arm.name, rows[kind][arm.name])
        rows[kind][CEILING] = judge(kind, recon[usable], x, regenerate, cond)
        rows[kind][REAL] = {"fid": judge.distances(x)["fid"]}
        if figures is not None:
            comparison_figure(x, regenerate, edits, Path(figures) / f"editing_{kind}.png")
    return {"rows": rows, "images": images, "batch": batch, "seed": seed, "device": device,
            "feature_net": "Inception-v3" if inception_weights else info,
            "arms": [{"name": a.name, "ckpt": str(a.ckpt), "sampler": dataclasses.asdict(a.settings),
                      "known_cells": EditSettings(known_cells=a.known_cells).placement(a.settings.policy)}
                     for a in arms]}


# ----------------------------------------------------------------------------------------- report
COLUMNS = [("mse", "masked MSE ↓", ".4f"), ("psnr", "PSNR dB ↑", ".2f"), ("lpips", "LPIPS ↓", ".3f"),
           ("fid", "FID ↓", ".3g"), ("consistency", "consistency ↑", ".3f"), ("sun_share", "sun found", ".2f"),
           ("cloud_share", "clouds found", ".2f"), ("sun_is_target", "sun = target ↑", ".3f"),
           ("clouds_follow", "clouds follow ↑", ".3f"), ("target_class", "target class ↑", ".3f"),
           ("edits_per_s", "edits/s", ".1f")]
TITLES = {"center": "centre box (half the side) regenerated", "top": "top half regenerated",
          "bottom": "bottom half regenerated", "left": "left half regenerated", "right": "right half regenerated",
          "border": "outpainting: a one-cell border regenerated",
          "class": "class edit: the centre box regenerated under the next class (does the classifier see it?)",
          "clouds": "scene edit: the clouds regenerated, the sun kept (do they take its tint?)",
          "hue": "class edit: sun and clouds regenerated under the next hue (does the new sun take it, do the "
                 "clouds follow?)"}


def markdown(table: dict) -> str:
    """One markdown table per mask: the arms, then the ceiling and real rows (columns that have numbers)."""
    lines = [f"Edits of the first {table['images']} validation images (half A), one per image; FID against the "
             f"next {table['images']} (half B). Masked MSE is over the regenerated pixels (images in [0, 1]).", ""]
    for kind, rows in table["rows"].items():
        columns = [c for c in COLUMNS if any(m.get(c[0]) is not None for m in rows.values())]
        lines += [f"**{kind}**: {TITLES.get(kind, kind)}", "",
                  "| arm | " + " | ".join(title for _, title, _ in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for name, m in rows.items():
            cells = [format(m[key], spec) if m.get(key) is not None else "–" for key, _, spec in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("| arm | checkpoint | known cells | sampler |")
    lines.append("|---|---|---|---|")
    for arm in table["arms"]:
        changed = {"policy": arm["sampler"]["policy"],
                   **{k: v for k, v in arm["sampler"].items() if v != getattr(SamplerSettings(), k)}}
        lines.append(f"| {arm['name']} | `{arm['ckpt']}` | {arm['known_cells']} | {json.dumps(changed)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.editing", description=__doc__.split("\n\n")[0])
    p.add_argument("--arm", action="append", nargs="+", required=True, metavar="NAME CHECKPOINT [KEY=VALUE]",
                   help="an arm: its name, checkpoint and sampler settings (and known_cells)")
    p.add_argument("--experiment", type=Path, help="a run folder of `python -m experiments`: its data and tokenizer")
    p.add_argument("--data", default="synthetic", help="data overlay configs/data/<name>.yaml (without --experiment)")
    p.add_argument("--set", action="append", default=[], help="data.init_args...=VALUE overrides")
    p.add_argument("--tokenizer", help="the tokenizer checkpoint (without --experiment)")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--masks", default="center,top,border,class,clouds,hue")
    p.add_argument("--batch", type=int, default=Budget.sample_batch)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lpips-weights", help="torchvision AlexNet weights file (LPIPS); none: no LPIPS")
    p.add_argument("--inception-weights", help="torch-fidelity Inception file; none: the domain feature network")
    p.add_argument("--feature-epochs", type=int, default=Budget.feature_epochs)
    p.add_argument("--feature-images", type=int, default=Budget.feature_images)
    p.add_argument("--out", type=Path, default=Path("runs/editing"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = dict(item.split("=", 1) for item in args.set)
    data, tokenizer = args.data, args.tokenizer
    if args.experiment is not None:
        exp = load_run(args.experiment)
        data, tokenizer = exp.data, tokenizer or exp.tokenizer_ckpt
        overrides = {**data_overrides(exp, args.experiment.parent), **overrides}  # the data its stages read
    if tokenizer is None:
        raise ValueError("give --tokenizer (the checkpoint the arms were trained with) or --experiment")
    # an experiment's token cache is reused (keyed by data and tokenizer); otherwise one beside the table
    overrides = {"data.init_args.cache_dir": str(args.out / "cache"), **overrides,
                 "data.init_args.tokenizer_ckpt": str(tokenizer)}
    dm = build_datamodule([str(CONFIGS / "any_order.yaml"), str(CONFIGS / "data" / f"{data}.yaml")],
                          {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in overrides.items()})
    table = editing_table([parse_arm(a) for a in args.arm], dm, tokenizer, args.images,
                          tuple(m for m in args.masks.split(",") if m), args.batch, args.seed, args.device,
                          args.out / "features" / f"{data}.pt", args.feature_epochs, args.feature_images,
                          lpips_weights=args.lpips_weights, inception_weights=args.inception_weights,
                          figures=args.out)
    table["command"] = "python -m experiments.editing " + " ".join(sys.argv[1:] if argv is None else argv)
    save_json(table, args.out / "editing.json", indent=1, default=str)
    save_text(markdown(table), args.out / "editing.md")
    print(markdown(table))
    return table


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:  # ExperimentError is a ValueError
        sys.exit(f"error: {err}")
