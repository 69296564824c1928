"""Evaluation jobs of the experiment runner (`benchmarks/experiment.py`): one process per model and seed.

    python benchmarks/experiment_eval.py RUN_FOLDER rows              (feature network, reference rows)
    python benchmarks/experiment_eval.py RUN_FOLDER model SEED MODEL [--step K]

RUN_FOLDER is `runs/experiments/<name>` (it holds `experiment.json`). `rows` trains the domain feature
network once per data (cached in `<out>/features/`) and measures the two real-image rows (reference:
held-out half A against half B; ceiling: A through the tokenizer against B). `model` samples every arm
of one trained model (`budget.samples` images, labels cycling over the classes, one seeded generator
per arm) and measures it against B, plus the model's NLL under raster, random and inferred orders on
held-out token grids. `--step K` evaluates the kept checkpoint `step=K.ckpt` instead (learning curves,
`budget.curve_samples` images). Results are JSON files under `RUN_FOLDER/seed<k>/eval/`.
"""

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks import compare_eval as ev  # noqa: E402
from evaluation import FeatureDistances  # noqa: E402
from models.checkpoint import load_net  # noqa: E402
from models.sampling import SamplerSettings  # noqa: E402

log = logging.getLogger("oar.experiment")
CONFIGS = ROOT / "configs"


def datamodule(exp: dict, out: Path, tokenizer_ckpt: Path):
    """The experiment's data, exactly as its stages read it (stage-1 config, data overlay, overrides)."""
    files = [str(CONFIGS / "any_order.yaml"), str(CONFIGS / "data" / f"{exp['data']}.yaml")]
    overrides = {"data.init_args.cache_dir": str(out / "cache"), **exp.get("data_overrides", {}),
                 "data.init_args.tokenizer_ckpt": str(tokenizer_ckpt)}
    return ev.build_datamodule(files, overrides)


def context(exp: dict, out: Path, tokenizer_ckpt: Path, device: str) -> dict:
    """What every evaluation shares: the held-out halves, the feature network, FID/KID against B, tokens."""
    budget = exp["budget"]
    dm = datamodule(exp, out, tokenizer_ckpt)
    idx_a, idx_b = ev.held_out_halves(dm, budget["samples"])
    key = hashlib.sha256(json.dumps([exp["data"], exp.get("data_overrides", {}), budget.get("feature_epochs", 10),
                                     budget.get("feature_images", 4000)], sort_keys=True).encode()).hexdigest()[:16]
    net, info = ev.feature_net_for(dm, out / "features" / f"{exp['data']}-{key}.pt", budget.get("feature_epochs", 10),
                                   budget.get("feature_images", 4000), check=idx_a)
    net = net.to(device)
    real_b, _ = ev.images_of(dm.source, idx_b)
    synthetic = exp["data"].startswith("synthetic")
    return {"dm": dm, "feature_net": net, "feature_info": info, "label_head": info["label_head"],
            "num_hues": dm.source.num_hues if synthetic else 0, "idx_a": idx_a,
            "distances": FeatureDistances(real_b, net, exp.get("inception_weights"), device=device),
            "lpips": None, "val_tokens": ev.val_tokens(dm, budget.get("nll_images", 500)),
            "feature_name": ev.feature_name(info, bool(exp.get("inception_weights")))}


def real_rows(ctx: dict, tokenizer_ckpt: Path, device: str) -> dict:
    """The reference (A vs B) and ceiling (A through the tokenizer vs B) rows."""
    real_a, labels_a = ev.images_of(ctx["dm"].source, ctx["idx_a"])
    tokenizer = load_net(tokenizer_ckpt).to(device)
    return {ev.REFERENCE: ev.image_metrics(ctx, real_a, labels_a),
            ev.CEILING: ev.image_metrics(ctx, ev.reconstruct(tokenizer, real_a), labels_a)}


def evaluate_model(exp: dict, ctx: dict, ckpt: Path, tokenizer_ckpt: Path, model: str, samples: int,
                   device: str) -> tuple[dict, dict]:
    """Metrics of every arm of `model` ({arm: metrics}) and their samples (first images, all step maps)."""
    budget, metrics, shown = exp["budget"], {}, {}
    nll = None
    for arm in (a for a in exp["arms"] if a["model"] == model):
        start = time.perf_counter()
        settings = SamplerSettings(**arm.get("sampler", {}))
        module = ev.load_arm(ckpt, tokenizer_ckpt, settings).to(device)
        s = ev.sample_arm(module, samples, budget.get("sample_batch", 100), budget.get("sample_seed", 0))
        if nll is None:
            tokens, labels = ctx["val_tokens"]
            nll = ev.nll_bits(module.net, tokens.to(device), labels.to(device), seed=1234)
        m = {**ev.image_metrics(ctx, s["images"], s["labels"]), **nll, "samples_per_s": samples / s["seconds"]}
        metrics[arm["name"]] = m
        shown[arm["name"]] = {"images": s["images"][:16], "step_maps": s["step_maps"], "labels": s["labels"]}
        log.info("%s: %s (%.0f s)", arm["name"], ", ".join(f"{k} {v:.3g}" for k, v in m.items()),
                 time.perf_counter() - start)
    return metrics, shown


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_folder", type=Path)
    p.add_argument("what", choices=["rows", "model"])
    p.add_argument("seed", type=int, nargs="?")
    p.add_argument("model", nargs="?")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    exp = json.loads((args.run_folder / "experiment.json").read_text())
    out, tokenizer_ckpt = args.run_folder.parent, Path(exp["tokenizer_ckpt"])
    ctx = context(exp, out, tokenizer_ckpt, args.device)
    if args.what == "rows":
        write_json(args.run_folder / "rows.json", {"rows": real_rows(ctx, tokenizer_ckpt, args.device),
                                                   "feature_name": ctx["feature_name"],
                                                   "feature_info": ctx["feature_info"]})
        return
    folder = args.run_folder / f"seed{args.seed}" / args.model
    ckpt = folder / "checkpoints" / (f"step={args.step}.ckpt" if args.step else "last.ckpt")
    samples = exp["budget"]["curve_samples"] if args.step else exp["budget"]["samples"]
    metrics, shown = evaluate_model(exp, ctx, ckpt, tokenizer_ckpt, args.model, samples, args.device)
    name = f"{args.model}@{args.step}" if args.step else args.model
    folder = args.run_folder / f"seed{args.seed}" / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    if not args.step:  # the figure's samples and order maps
        torch.save(shown, folder / f"{name}.samples.pt")
    write_json(folder / f"{name}.json", {"metrics": metrics, "ckpt": str(ckpt), "samples": samples, "step": args.step})


if __name__ == "__main__":
    main()
