"""Evaluation jobs of the experiment runner (`python -m experiments`): one process per model and seed.

    python -m experiments.evaluate RUN_FOLDER rows              (feature network, reference rows)
    python -m experiments.evaluate RUN_FOLDER model SEED MODEL [--step K]
    python -m experiments.evaluate RUN_FOLDER nll SEED MODEL [--step K]  (NLL only, no sampling)

RUN_FOLDER is `runs/experiments/<name>` (it holds `experiment.json`). `rows` trains the domain feature
network once per data (cached in `<out>/features/`, or the one the experiment pins with `feature_net:`) and
measures the two real-image rows (reference: held-out half A against half B; ceiling: A through the tokenizer
against B). `model` samples every arm of one trained model (`budget.samples` images, labels cycling over the
classes, one seeded generator per arm) and measures it against B, plus the model's NLL under raster, random,
inferred and own orders on held-out token grids. `--step K` evaluates the kept checkpoint `step=K.ckpt`
instead (learning curves, `budget.curve_samples` images). Results are JSON files under `RUN_FOLDER/seed<k>/eval/`.
`nll` measures the NLL columns again without sampling (`<model>.nll.json`, merged into the model's arms by the
report): it brings a run evaluated by an older version up to the current columns.
"""

import argparse
import logging
import time
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule
from omegaconf import OmegaConf

from evaluation.feature_cache import feature_net_for
from evaluation.fid import FeatureDistances
from evaluation.image_metrics import ImageMetrics
from evaluation.nll import mean_nll_bits
from evaluation.real import held_out_halves, images_of, reconstruct, val_tokens
from evaluation.sampling import sample_set
from evaluation.scene import content_steps
from experiments.plan import data_overrides, feature_net_path
from experiments.report import tables
from experiments.spec import CONFIGS, Experiment, ExperimentError, load_run
from fileio import save_json, save_torch
from lightning_modules.predict import SampleModule
from models.checkpoint import load_net
from models.sampling import SamplerSettings

log = logging.getLogger("oar.experiment")


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


def datamodule(exp: Experiment, out: Path, tokenizer_ckpt: Path):
    """The experiment's data, exactly as its stages read it (stage-1 config, data overlay, overrides)."""
    files = [str(CONFIGS / "any_order.yaml"), str(CONFIGS / "data" / f"{exp.data}.yaml")]
    overrides = {**data_overrides(exp, out), "data.init_args.tokenizer_ckpt": str(tokenizer_ckpt)}
    return build_datamodule(files, overrides)


def load_arm(ckpt: str | Path, tokenizer_ckpt: str | Path, settings: SamplerSettings) -> SampleModule:
    """The sampling job around a trained checkpoint, ready to `generate` with `settings`."""
    return SampleModule(checkpoint=str(ckpt), sampler=settings, tokenizer_ckpt=str(tokenizer_ckpt)).eval()


def context(exp: Experiment, out: Path, device: str) -> dict:
    """What every evaluation shares: the held-out halves, the feature network, the image metrics against B, tokens."""
    budget = exp.budget
    dm = datamodule(exp, out, Path(exp.tokenizer_ckpt))
    idx_a, idx_b = held_out_halves(dm, budget.samples)
    net, info = feature_net_for(dm, feature_net_path(exp, out), budget.feature_epochs, budget.feature_images,
                                check=idx_a, pinned=exp.feature_net is not None)
    net = net.to(device)
    real_b, _ = images_of(dm.source, idx_b)
    metrics = ImageMetrics(FeatureDistances(real_b, net, exp.inception_weights, device=device), net,
                           info["label_head"], dm.source.scene_hues)
    return {"dm": dm, "metrics": metrics, "feature_info": info, "idx_a": idx_a,
            "val_tokens": val_tokens(dm, budget.nll_images),
            "feature_name": tables.feature_name(info, bool(exp.inception_weights))}


def real_rows(ctx: dict, tokenizer_ckpt: Path, device: str) -> dict:
    """The reference (A vs B) and ceiling (A through the tokenizer vs B) rows."""
    real_a, labels_a = images_of(ctx["dm"].source, ctx["idx_a"])
    tokenizer = load_net(tokenizer_ckpt).to(device)
    return {tables.REFERENCE: ctx["metrics"](real_a, labels_a),
            tables.CEILING: ctx["metrics"](reconstruct(tokenizer, real_a), labels_a)}


def model_ckpt(run_folder: Path, seed: int, model: str, step: int | None = None) -> Path:
    """A trained model's final weights (`last.ckpt`), or those kept at `step`."""
    return run_folder / f"seed{seed}" / model / "checkpoints" / (f"step={step}.ckpt" if step else "last.ckpt")


def evaluate_model(exp: Experiment, ctx: dict, ckpt: Path, model: str, samples: int,
                   device: str) -> tuple[dict, dict]:
    """Metrics of every arm of `model` ({arm: metrics}) and their samples (first images, all step maps)."""
    budget, metrics, shown = exp.budget, {}, {}
    nll = None
    for arm in exp.arms_of(model):
        start = time.perf_counter()
        module = load_arm(ckpt, exp.tokenizer_ckpt, exp.arm_settings(arm)).to(device)
        s = sample_set(module, samples, budget.sample_batch, budget.sample_seed)
        if nll is None:
            tokens, labels = ctx["val_tokens"]
            nll = mean_nll_bits(module.net, tokens.to(device), labels.to(device), seed=1234)
        m = {**ctx["metrics"](s["images"], s["labels"]), **nll, "samples_per_s": samples / s["seconds"]}
        if ctx["dm"].source.scene_hues:  # when the order writes the sun and the clouds
            m.update(content_steps(s["images"], s["step_maps"]))
        metrics[arm.name] = m
        shown[arm.name] = {"images": s["images"][:16], "step_maps": s["step_maps"], "labels": s["labels"]}
        log.info("%s: %s (%.0f s)", arm.name, ", ".join(f"{k} {v:.3g}" for k, v in m.items()),
                 time.perf_counter() - start)
    return metrics, shown


def save_nll(exp: Experiment, run_folder: Path, ckpt: Path, model: str, step: int | None, out: Path,
             device: str) -> None:
    """The NLL columns of one model's arms on the held-out tokens, into `out` (`<model>[@step].nll.json`)."""
    dm = datamodule(exp, run_folder.parent, Path(exp.tokenizer_ckpt))
    tokens, labels = val_tokens(dm, exp.budget.nll_images)
    nll = mean_nll_bits(load_net(ckpt).to(device), tokens.to(device), labels.to(device), seed=1234)
    log.info("%s: %s", model, nll)
    save_json({"adds": {a.name: nll for a in exp.arms_of(model)}, "ckpt": str(ckpt), "step": step}, out, indent=1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_folder", type=Path)
    p.add_argument("what", choices=["rows", "model", "nll"])
    p.add_argument("seed", type=int, nargs="?")
    p.add_argument("model", nargs="?")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        exp = load_run(args.run_folder)
    except ExperimentError as err:
        raise SystemExit(f"error: {err}") from None
    if args.what != "rows":
        ckpt = model_ckpt(args.run_folder, args.seed, args.model, args.step)
        name = f"{args.model}@{args.step}" if args.step else args.model
        folder = args.run_folder / f"seed{args.seed}" / "eval"
    if args.what == "nll":
        save_nll(exp, args.run_folder, ckpt, args.model, args.step, folder / f"{name}.nll.json", args.device)
        return
    ctx = context(exp, args.run_folder.parent, args.device)
    if args.what == "rows":
        save_json({"rows": real_rows(ctx, Path(exp.tokenizer_ckpt), args.device), "feature_name": ctx["feature_name"],
                   "feature_info": ctx["feature_info"]}, args.run_folder / "rows.json", indent=1, default=str)
        return
    samples = exp.budget.curve_samples if args.step else exp.budget.samples
    metrics, shown = evaluate_model(exp, ctx, ckpt, args.model, samples, args.device)
    if not args.step:  # the figure's samples and order maps
        save_torch(shown, folder / f"{name}.samples.pt")
    save_json({"metrics": metrics, "ckpt": str(ckpt), "samples": samples, "step": args.step}, folder / f"{name}.json",
              indent=1, default=str)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:  # a pinned file that does not fit, a missing checkpoint
        raise SystemExit(f"error: {err}") from None
