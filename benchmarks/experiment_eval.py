"""Evaluation jobs of the experiment runner (`benchmarks/experiment.py`): one process per model and seed.

    python benchmarks/experiment_eval.py RUN_FOLDER rows              (feature network, reference rows)
    python benchmarks/experiment_eval.py RUN_FOLDER model SEED MODEL [--step K]
    python benchmarks/experiment_eval.py RUN_FOLDER nll SEED MODEL [--step K]  (NLL only, no sampling)

RUN_FOLDER is `runs/experiments/<name>` (it holds `experiment.json`). `rows` trains the domain feature
network once per data (cached in `<out>/features/`) and measures the two real-image rows (reference:
held-out half A against half B; ceiling: A through the tokenizer against B). `model` samples every arm
of one trained model (`budget.samples` images, labels cycling over the classes, one seeded generator
per arm) and measures it against B, plus the model's NLL under raster, random, inferred and own orders
on held-out token grids. `--step K` evaluates the kept checkpoint `step=K.ckpt` instead (learning curves,
`budget.curve_samples` images). Results are JSON files under `RUN_FOLDER/seed<k>/eval/`. `nll` measures
the NLL columns again without sampling (`<model>.nll.json`, merged into the model's arms by the report):
it brings a run evaluated by an older version up to the current columns.
"""

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks import quality_report as report  # noqa: E402
from benchmarks.experiment import data_overrides  # noqa: E402
from evaluation.feature_cache import feature_net_for  # noqa: E402
from evaluation.fid import FeatureDistances  # noqa: E402
from evaluation.image_metrics import ImageMetrics  # noqa: E402
from evaluation.nll import mean_nll_bits  # noqa: E402
from evaluation.real import held_out_halves, images_of, reconstruct, val_tokens  # noqa: E402
from evaluation.sampling import sample_set  # noqa: E402
from evaluation.scene import content_steps  # noqa: E402
from fileio import save_json, save_torch  # noqa: E402
from lightning_modules.predict import SampleModule  # noqa: E402
from models.checkpoint import load_net  # noqa: E402
from models.sampling import AUTO, SamplerSettings  # noqa: E402

log = logging.getLogger("oar.experiment")
CONFIGS = ROOT / "configs"


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


def datamodule(exp: dict, out: Path, tokenizer_ckpt: Path):
    """The experiment's data, exactly as its stages read it (stage-1 config, data overlay, overrides)."""
    files = [str(CONFIGS / "any_order.yaml"), str(CONFIGS / "data" / f"{exp['data']}.yaml")]
    overrides = {**data_overrides(exp, out), "data.init_args.tokenizer_ckpt": str(tokenizer_ckpt)}
    return build_datamodule(files, overrides)


def load_arm(ckpt: str | Path, tokenizer_ckpt: str | Path, settings: SamplerSettings) -> SampleModule:
    """The sampling job around a trained checkpoint, ready to `generate` with `settings`."""
    return SampleModule(checkpoint=str(ckpt), sampler=settings, tokenizer_ckpt=str(tokenizer_ckpt)).eval()


def context(exp: dict, out: Path, tokenizer_ckpt: Path, device: str) -> dict:
    """What every evaluation shares: the held-out halves, the feature network, the image metrics against B, tokens."""
    budget = exp["budget"]
    dm = datamodule(exp, out, tokenizer_ckpt)
    idx_a, idx_b = held_out_halves(dm, budget["samples"])
    key = hashlib.sha256(json.dumps([exp["data"], exp.get("data_overrides", {}), budget.get("feature_epochs", 10),
                                     budget.get("feature_images", 4000)], sort_keys=True).encode()).hexdigest()[:16]
    net, info = feature_net_for(dm, out / "features" / f"{exp['data']}-{key}.pt", budget.get("feature_epochs", 10),
                                budget.get("feature_images", 4000), check=idx_a)
    net = net.to(device)
    real_b, _ = images_of(dm.source, idx_b)
    synthetic = exp["data"].startswith("synthetic")
    metrics = ImageMetrics(FeatureDistances(real_b, net, exp.get("inception_weights"), device=device), net,
                           info["label_head"], dm.source.num_hues if synthetic else 0)
    return {"dm": dm, "metrics": metrics, "feature_info": info, "idx_a": idx_a,
            "val_tokens": val_tokens(dm, budget.get("nll_images", 500)),
            "feature_name": report.feature_name(info, bool(exp.get("inception_weights")))}


def real_rows(ctx: dict, tokenizer_ckpt: Path, device: str) -> dict:
    """The reference (A vs B) and ceiling (A through the tokenizer vs B) rows."""
    real_a, labels_a = images_of(ctx["dm"].source, ctx["idx_a"])
    tokenizer = load_net(tokenizer_ckpt).to(device)
    return {report.REFERENCE: ctx["metrics"](real_a, labels_a),
            report.CEILING: ctx["metrics"](reconstruct(tokenizer, real_a), labels_a)}


def arm_settings(exp: dict, arm: dict) -> SamplerSettings:
    """An arm's sampler settings: its own, over the budget's sampling precision (an explicit order-choice T)."""
    if arm.get("sampler", {}).get("choice_temperature") == AUTO:
        raise SystemExit(f"error: arm {arm['name']!r}: choice_temperature auto is for `run.py predict`; an arm names "
                         "its T (0 = greedy): fix the arm's sampler in the experiment file")
    return SamplerSettings(**{"precision": exp["budget"].get("sample_precision", "fp32"), **arm.get("sampler", {})})


def model_ckpt(run_folder: Path, seed: int, model: str, step: int | None = None) -> Path:
    """A trained model's final weights (`last.ckpt`), or those kept at `step`."""
    return run_folder / f"seed{seed}" / model / "checkpoints" / (f"step={step}.ckpt" if step else "last.ckpt")


def evaluate_model(exp: dict, ctx: dict, ckpt: Path, tokenizer_ckpt: Path, model: str, samples: int,
                   device: str) -> tuple[dict, dict]:
    """Metrics of every arm of `model` ({arm: metrics}) and their samples (first images, all step maps)."""
    budget, metrics, shown = exp["budget"], {}, {}
    nll = None
    for arm in (a for a in exp["arms"] if a["model"] == model):
        start = time.perf_counter()
        module = load_arm(ckpt, tokenizer_ckpt, arm_settings(exp, arm)).to(device)
        s = sample_set(module, samples, budget.get("sample_batch", 100), budget.get("sample_seed", 0))
        if nll is None:
            tokens, labels = ctx["val_tokens"]
            nll = mean_nll_bits(module.net, tokens.to(device), labels.to(device), seed=1234)
        m = {**ctx["metrics"](s["images"], s["labels"]), **nll, "samples_per_s": samples / s["seconds"]}
        if exp["data"].startswith("synthetic"):  # when the order writes the sun and the clouds
            m.update(content_steps(s["images"], s["step_maps"]))
        metrics[arm["name"]] = m
        shown[arm["name"]] = {"images": s["images"][:16], "step_maps": s["step_maps"], "labels": s["labels"]}
        log.info("%s: %s (%.0f s)", arm["name"], ", ".join(f"{k} {v:.3g}" for k, v in m.items()),
                 time.perf_counter() - start)
    return metrics, shown


def save_nll(exp: dict, run_folder: Path, ckpt: Path, model: str, step: int | None, out: Path, device: str) -> None:
    """The NLL columns of one model's arms on the held-out tokens, into `out` (`<model>[@step].nll.json`)."""
    dm = datamodule(exp, run_folder.parent, Path(exp["tokenizer_ckpt"]))
    tokens, labels = val_tokens(dm, exp["budget"].get("nll_images", 500))
    nll = mean_nll_bits(load_net(ckpt).to(device), tokens.to(device), labels.to(device), seed=1234)
    log.info("%s: %s", model, nll)
    save_json({"adds": {a["name"]: nll for a in exp["arms"] if a["model"] == model}, "ckpt": str(ckpt), "step": step},
              out, indent=1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_folder", type=Path)
    p.add_argument("what", choices=["rows", "model", "nll"])
    p.add_argument("seed", type=int, nargs="?")
    p.add_argument("model", nargs="?")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    exp = json.loads((args.run_folder / "experiment.json").read_text())
    out, tokenizer_ckpt = args.run_folder.parent, Path(exp["tokenizer_ckpt"])
    if args.what != "rows":
        ckpt = model_ckpt(args.run_folder, args.seed, args.model, args.step)
        name = f"{args.model}@{args.step}" if args.step else args.model
        folder = args.run_folder / f"seed{args.seed}" / "eval"
    if args.what == "nll":
        save_nll(exp, args.run_folder, ckpt, args.model, args.step, folder / f"{name}.nll.json", args.device)
        return
    ctx = context(exp, out, tokenizer_ckpt, args.device)
    if args.what == "rows":
        save_json({"rows": real_rows(ctx, tokenizer_ckpt, args.device), "feature_name": ctx["feature_name"],
                   "feature_info": ctx["feature_info"]}, args.run_folder / "rows.json", indent=1, default=str)
        return
    samples = exp["budget"]["curve_samples"] if args.step else exp["budget"]["samples"]
    metrics, shown = evaluate_model(exp, ctx, ckpt, tokenizer_ckpt, args.model, samples, args.device)
    if not args.step:  # the figure's samples and order maps
        save_torch(shown, folder / f"{name}.samples.pt")
    save_json({"metrics": metrics, "ckpt": str(ckpt), "samples": samples, "step": args.step}, folder / f"{name}.json",
              indent=1, default=str)


if __name__ == "__main__":
    main()
