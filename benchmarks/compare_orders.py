"""The paper's four-row comparison from ONE tokenizer at an equal stage-1 training budget:

  1. raster AR (raster order in training and sampling);
  2. any-order AR sampled in random order;
  3. the same any-order model sampled in confidence order (OAR before distillation);
  4. OAR after order distillation (orders extracted by the any-order model, fine-tuned, confidence order).

and two rows of real held-out images: the tokenizer's reconstructions (the ceiling of any AR model over
its tokens) and the reference (half A of the validation images against half B, the metric's floor).

    python benchmarks/compare_orders.py --data synthetic --preset small --seeds 1 --quick   (the quickstart)
    python benchmarks/compare_orders.py --data fashion_mnist --preset small --seeds 3
    python benchmarks/compare_orders.py --data synthetic_untinted --quick   (untinted sky, unconditional)

Every stage runs in-process through `run.main` with the repository's stage configs, the data overlay
`configs/data/<data>.yaml` and the size presets, in its own folder under `results/<data>/<preset>/`
(the tokenizer and token cache are shared by all seeds). A stage counts as finished when its product
(checkpoints/last.ckpt, the weights after the last step; orders.pt) exists and its `done.json`
matches this run's settings; finished stages are reused on a rerun, others run again from scratch.
Writes `results/<data>.md` (table), `<data>.json` (raw numbers) and `<data>_samples.png` (samples
beside their order heatmaps, mean order maps).
"""

import argparse
import datetime
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from unittest.mock import patch

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import run  # noqa: E402
from benchmarks import compare_eval as ev  # noqa: E402
from evaluation import FeatureDistances  # noqa: E402
from lightning_modules.any_order import SamplerSettings  # noqa: E402
from models.checkpoint import load_net  # noqa: E402

CONFIGS = ROOT / "configs"
# Budgets per mode: training steps per stage and evaluation sizes (measured on a 2-core CPU, see README).
MODES = {
    "full": dict(tokenizer_steps=2000, steps=2000, finetune_steps=500, samples=1000, nll_images=500,
                 feature_epochs=6, feature_images=10000, train_images=10000, val_images=1000, limit_val_batches=None),
    "quick": dict(tokenizer_steps=300, steps=160, finetune_steps=40, samples=256, nll_images=64,
                  feature_epochs=10, feature_images=4000, train_images=800, val_images=500, limit_val_batches=4),
    "smoke": dict(tokenizer_steps=3, steps=3, finetune_steps=2, samples=16, nll_images=16, feature_epochs=1,
                  feature_images=64, train_images=48, val_images=16, limit_val_batches=1),
}
# (arm, stage whose checkpoint it samples, sampling policy, short name for figure panels)
ARMS = [("raster AR", "raster", "raster", "1 raster"),
        ("any-order AR, random order", "any_order", "random", "2 any-order, random"),
        ("any-order AR, confidence order (OAR w/o distillation)", "any_order", "confidence", "3 any-order, confidence"),
        ("OAR (distilled), confidence order", "distill", "confidence", "4 OAR distilled")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="synthetic", help="a configs/data/<name>.yaml overlay")
    p.add_argument("--preset", default="small", help="configs/model/{tokenizer,ar}/<preset>.yaml (smoke: tiny)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (one tokenizer for all)")
    p.add_argument("--quick", action="store_true", help="fewer steps, images and samples (the 20-minute quickstart)")
    p.add_argument("--smoke", action="store_true", help="tiny presets, 64 images, a few steps (tests)")
    for name in ("tokenizer-steps", "steps", "finetune-steps", "samples", "nll-images", "train-images", "val-images"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the mode's default (train-images 0: all)")
    p.add_argument("--feature-epochs", type=int, default=None, help="training epochs of the domain feature network")
    p.add_argument("--feature-images", type=int, default=None,
                   help="its training images (synthetic: fresh renders of another seed; else the first train images)")
    p.add_argument("--fair-budget", action="store_true",
                   help="the raster arm trains stage-1 + fine-tune steps (OAR's total); any-order rows stay at stage 1")
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--sample-seed", type=int, default=0, help="generator seed of every arm's sampling")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--score", default="max_prob", choices=["max_prob", "neg_entropy"])
    p.add_argument("--inception-weights", default=None, help="torch-fidelity pt_inception file: FID on Inception")
    p.add_argument("--lpips-weights", default=None, help="torchvision alexnet file: diversity as LPIPS")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="evaluation device")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores the load average leaves free, at least 1:\n"
                        "small ops with more threads than free cores run several times slower)")
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.preset = "tiny" if args.smoke else args.preset
    for key, value in MODES[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


# ------------------------------------------------------------------------------------------ stages
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def cli_value(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def config_files(stage_config: str, args: argparse.Namespace, kind: str | None) -> list[str]:
    """Stage config, data overlay and (when it exists) the size preset, as absolute paths."""
    files = [CONFIGS / f"{stage_config}.yaml", CONFIGS / "data" / f"{args.data}.yaml"]
    if not files[1].is_file():
        raise SystemExit(f"no data overlay {files[1]}")
    if kind is not None:
        preset = CONFIGS / "model" / kind / f"{args.preset}.yaml"
        if preset.is_file():
            files.append(preset)
        else:
            print(f"WARNING: no preset {preset}; the stage config's own sizes are used", flush=True)
    return [str(f) for f in files]


def data_overrides(args: argparse.Namespace, folder: Path) -> dict:
    """Dotted `data.` overrides shared by every stage and the evaluation (one split everywhere).

    `train_images` shrinks the training split (order extraction costs ~n^2/2 position queries per
    training image) and `val_images` caps validation (at least what the evaluation needs: two held-out
    halves of `samples` images); the synthetic source is rendered at exactly that size, others are
    split with `val_fraction`.
    """
    overrides = {"data.init_args.cache_dir": str(folder / "cache")}
    if args.smoke:  # drop_last would leave no training batch of 64
        overrides["data.init_args.batch_size"] = 16
    n_train, n_val = args.train_images, max(2 * args.samples, args.nll_images, args.val_images)
    if not n_train:
        return overrides
    if is_synthetic(args):
        overrides["data.init_args.source.init_args.num_images"] = n_train + n_val
        overrides["data.init_args.val_fraction"] = n_val / (n_train + n_val)
        return overrides
    total = len(ev.build_datamodule(config_files("tokenizer", args, None), overrides).source)
    if n_train < total:
        overrides["data.init_args.val_fraction"] = 1 - n_train / total
        overrides["data.init_args.max_val_images"] = n_val
    return overrides


def is_synthetic(args: argparse.Namespace) -> bool:
    """Every `synthetic*` data overlay renders sunsets: the analyser's columns apply."""
    return args.data.startswith("synthetic")


def config_value(stage_config: str, key: str):
    return OmegaConf.select(OmegaConf.load(CONFIGS / f"{stage_config}.yaml"), key)


class Stages:
    """Runs (or reuses) the stages of one data/preset folder and records their wall and CPU times."""

    def __init__(self, args: argparse.Namespace, folder: Path):
        self.args, self.folder, self.times = args, folder, {}
        self.data = data_overrides(args, folder)
        self.trainer = {} if args.limit_val_batches is None else {"trainer.limit_val_batches": args.limit_val_batches}

    def run(self, name: str, stage_config: str, kind: str | None, out: Path, product: Path, settings: dict,
            overrides: dict, subcommand: str = "fit", ckpt_path: Path | None = None) -> Path:
        """Run one stage unless its `done.json` says it finished with these settings; returns `product`.

        A stage with other settings, or an interrupted fit, starts again from an empty folder; an
        interrupted order extraction with the same settings resumes (its shards are kept).
        """
        overrides = {**self.data, "trainer.logger.init_args.save_dir": str(out), **overrides}
        argv = [subcommand, *(a for f in config_files(stage_config, self.args, kind) for a in ("--config", f))]
        argv += [a for k, v in overrides.items() for a in (f"--{k}", cli_value(v))]
        argv += ["--ckpt_path", str(ckpt_path)] if ckpt_path is not None else []
        record = {"stage": name, "data": self.args.data, "preset": self.args.preset, **settings, "argv": argv,
                  "product": product.name}  # runs that wrote final.ckpt (a stale last.ckpt beside it) are redone
        marker = out / "done.json"
        state = json.loads(marker.read_text()) if marker.is_file() else {}
        if state.get("settings") == record and state.get("finished") and product.is_file():
            self.times.setdefault(name, {"wall_s": state["wall_s"], "cpu_s": state["cpu_s"], "reused": True})
            print(f"[stage] {name:<22} reused ({out}; it took {state['wall_s']:.0f} s)", flush=True)
            return product
        if out.exists() and (state.get("settings") != record or subcommand == "fit"):
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"settings": record, "finished": False}, indent=1))
        print(f"[stage] {name:<22} running ...", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        with patch.object(sys, "argv", sys.argv[:1]):  # the CLI parses `argv` only, not this script's flags
            run.main(args=argv)
        if not product.is_file():
            raise RuntimeError(f"stage {name} finished without writing {product}")
        took = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        marker.write_text(json.dumps({"settings": record, "finished": True, **took}, indent=1))
        self.times[name] = {**took, "reused": False}
        print(f"[stage] {name:<22} done in {took['wall_s']:.0f} s (CPU {took['cpu_s']:.0f} s)", flush=True)
        return product

    def train(self, name: str, stage_config: str, kind: str, out: Path, steps: int, seed: int, upstream: dict,
              extra: dict | None = None) -> Path:
        """A fit stage for `steps` optimiser steps (max_time dropped); short runs get a shorter warm-up.

        Validation runs a few times (every `steps / k` steps, across epochs), the last time on the final
        step, whatever the epoch length; checkpoints/last.ckpt holds the weights after the last step.
        """
        every = next(steps // k for k in (5, 4, 3, 2, 1) if steps % k == 0)
        overrides = {"trainer.max_steps": steps, "trainer.max_time": None, "trainer.check_val_every_n_epoch": None,
                     "trainer.val_check_interval": every, "seed_everything": seed, **self.trainer}
        warmup = config_value(stage_config, "model.init_args.warmup_steps")
        if warmup is not None and warmup > steps // 10:
            overrides["model.init_args.warmup_steps"] = max(1, steps // 10)
        return self.run(name, stage_config, kind, out, out / "checkpoints" / "last.ckpt",
                        {"steps": steps, "seed": seed, **upstream}, {**overrides, **(extra or {})})


def run_stages(args: argparse.Namespace, folder: Path, stages: Stages, seed: int) -> dict[str, Path]:
    """Tokenizer (shared), raster, any-order, order extraction and distillation for one seed."""
    tok = stages.train("tokenizer", "tokenizer", "tokenizer", folder / "tokenizer", args.tokenizer_steps, 0, {})
    tok_up = {"tokenizer_sha": sha256(tok)}
    data = {"data.init_args.tokenizer_ckpt": str(tok)}
    no_inferred = {"model.init_args.inferred_nll_every_n_epochs": 0}  # measured once, after training
    run_dir = folder / f"seed{seed}"
    raster_steps = args.steps + args.finetune_steps if args.fair_budget else args.steps
    ckpts = {"tokenizer": tok}
    ckpts["raster"] = stages.train(f"raster (seed {seed})", "raster", "ar", run_dir / "raster", raster_steps, seed,
                                   tok_up, data)
    ckpts["any_order"] = stages.train(f"any_order (seed {seed})", "any_order", "ar", run_dir / "any_order",
                                      args.steps, seed, tok_up, {**data, **no_inferred})
    orders = run_dir / "extract" / "orders"
    up = {**tok_up, "any_order_sha": sha256(ckpts["any_order"])}
    stages.run(f"extract (seed {seed})", "extract_orders", "ar", run_dir / "extract", orders / "orders.pt",
               {"seed": seed, **up}, {**data, "data.init_args.orders_path": str(orders), "seed_everything": seed},
               subcommand="predict", ckpt_path=ckpts["any_order"])
    ckpts["distill"] = stages.train(
        f"distill (seed {seed})", "distill", "ar", run_dir / "distill", args.finetune_steps, seed,
        {**up, "orders_sha": sha256(orders / "orders.pt")},
        {**data, **no_inferred, "data.init_args.orders_path": str(orders),
         "model.init_args.init_from": str(ckpts["any_order"])})
    return ckpts


# ------------------------------------------------------------------------------------- evaluation
def evaluate_seed(args, ckpts: dict, ctx: dict, seed: int) -> tuple[dict, dict]:
    """Metrics of the four arms for one seed (cached in seed<k>/eval.pt) and their samples."""
    key = {"ckpts": {k: sha256(v) for k, v in ckpts.items()}, "samples": args.samples, "nll": args.nll_images,
           "sampler": ctx["sampler"], "sample_seed": args.sample_seed, "sample_batch": args.sample_batch,
           "features": [ctx["feature_name"], ctx["feature_info"]], "real": ctx["real_key"],
           "lpips": args.lpips_weights, "device": args.device}
    cache = ctx["folder"] / f"seed{seed}" / "eval.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if saved["key"] == key:
            print(f"[eval]  seed {seed}: reused {cache}", flush=True)
            return saved["metrics"], saved["samples"]
    metrics, samples, nll = {}, {}, {}
    for arm, stage, policy, _ in ARMS:
        start = time.perf_counter()
        settings = SamplerSettings(policy=policy, **ctx["sampler"])
        module = ev.load_arm(ckpts[stage], ckpts["tokenizer"], settings).to(args.device)
        s = ev.sample_arm(module, args.samples, args.sample_batch, args.sample_seed)
        s = {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()}
        if stage not in nll:  # rows 2 and 3 share the model
            tokens, labels = ctx["val_tokens"]
            nll[stage] = ev.nll_bits(module.net, tokens.to(args.device), labels.to(args.device), seed=1234)
        m = {**ev.image_metrics(ctx, s["images"], s["labels"]), **nll[stage],
             "samples_per_s": len(s["images"]) / s["seconds"]}
        metrics[arm], samples[arm] = m, {"images": s["images"][:8], "step_maps": s["step_maps"]}
        print(f"[eval]  seed {seed} {arm}: " + ", ".join(f"{k} {v:.3g}" for k, v in m.items())
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"key": key, "metrics": metrics, "samples": samples}, tmp)
    tmp.replace(cache)
    return metrics, samples


def eval_context(args, folder: Path, dm, tokenizer_ckpt: Path) -> dict:
    """What every seed's evaluation shares: held-out real sets, feature network, metrics, held-out tokens,
    and the two real-image rows (reference: A vs B; ceiling: A through the tokenizer vs B)."""
    idx_a, idx_b = ev.held_out_halves(dm, args.samples)
    net, info = ev.feature_net_for(dm, args.out / args.data / "feature_net.pt", args.feature_epochs,
                                   args.feature_images, check=idx_a)
    net = net.to(args.device)
    (real_a, labels_a), (real_b, _) = ev.images_of(dm.source, idx_a), ev.images_of(dm.source, idx_b)
    ctx = {"folder": folder, "feature_net": net, "feature_info": info, "label_head": info["label_head"],
           "num_hues": dm.source.num_hues if is_synthetic(args) else 0,
           "distances": FeatureDistances(real_b, net, args.inception_weights, device=args.device),
           "real_key": hashlib.sha256(torch.cat([idx_a, idx_b]).numpy().tobytes()).hexdigest()[:16],
           "lpips": ev.make_lpips(args.lpips_weights), "val_tokens": ev.val_tokens(dm, args.nll_images),
           "sampler": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                       "cfg_scale": args.cfg_scale, "score": args.score},
           "feature_name": ev.feature_name(info, bool(args.inception_weights))}
    tokenizer = load_net(tokenizer_ckpt).to(args.device)
    ctx["rows"] = {ev.CEILING: ev.image_metrics(ctx, ev.reconstruct(tokenizer, real_a), labels_a),
                   ev.REFERENCE: ev.image_metrics(ctx, real_a, labels_a)}
    for name, row in ctx["rows"].items():
        print(f"[eval]  {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
    return ctx


def pick_threads(requested: int | None) -> int:
    if requested:
        return requested
    cores, load = os.cpu_count() or 1, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = max(1, cores - round(load))  # leave the cores other jobs already use
    print(f"torch threads: {threads} (load average {load:.1f} on {cores} cores; --threads to choose)", flush=True)
    return threads


def write_report(args, dm, ctx: dict, per_seed: dict, samples: dict, stages: "Stages", clock: dict) -> dict:
    """results/<data>.md (table, settings, how to read it), <data>.json (raw numbers), <data>_samples.png."""
    n_steps = int(samples[ARMS[0][0]]["step_maps"][0].numel())
    figure = args.out / f"{args.data}_samples.png"
    ev.samples_figure({short: samples[arm] for arm, _, _, short in ARMS}, n_steps, figure)
    s1, ft = args.steps, args.finetune_steps
    steps = dict(zip([a for a, *_ in ARMS], [s1 + ft if args.fair_budget else s1, s1, s1, f"{s1} + {ft}"],
                     strict=True))
    n_train, n_val = (len(i) for i in dm.split_indices())
    times = ", ".join(f"{k}: {t['wall_s']:.0f} / {t['cpu_s']:.0f}{' (reused)' if t['reused'] else ''}"
                      for k, t in stages.times.items())
    header = {"command": "`python benchmarks/compare_orders.py " + " ".join(args.argv) + "`",
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": clock["machine"],
              "data": f"{args.data}: {n_train} train / {n_val} val images, {dm.num_classes} classes, "
                      f"{dm.image_size}px, token grid {tuple(dm.grid_size)}, vocabulary {dm.vocab_size}",
              "steps per stage": f"tokenizer {args.tokenizer_steps}; raster {steps[ARMS[0][0]]}; any-order {s1}; "
                                 f"distillation fine-tune {ft} (batch size from the stage configs; max_time dropped)",
              "feature network": ctx["feature_name"],
              "seeds": f"{args.seeds} (training seeds 0..{args.seeds - 1}; sampling seed {args.sample_seed} "
                       "for every arm)",
              "stage times (wall / CPU s, when the stage ran)": times,
              "this invocation": f"{time.perf_counter() - clock['wall']:.0f} s wall, "
                                 f"{time.process_time() - clock['cpu']:.0f} s CPU, {torch.get_num_threads()} torch "
                                 f"threads; at the end: {ev.machine(args.device)}"}
    sampler = {arm: ev.sampler_record(SamplerSettings(policy=p, **ctx["sampler"]), args.sample_seed, args.samples,
                                      args.sample_batch) for arm, _, p, _ in ARMS}
    summary = {arm: ev.summarise(v) for arm, v in per_seed.items()}
    text = "\n".join([
        f"# Order comparison: {args.data}, {args.preset} preset", "",
        *(f"- **{k}**: {v}" for k, v in header.items()), "",
        ev.markdown_table(summary, ctx["rows"], steps, args.seeds), "",
        "## Sampler settings", "", *(f"- {arm}: {json.dumps(rec)}" for arm, rec in sampler.items()), "",
        f"![samples and order heatmaps]({args.data}_samples.png) (rows top to bottom: "
        + "; ".join(f"{short} = {arm}" for arm, _, _, short in ARMS) + "; then the mean order map per arm)", "",
        ev.how_to_read(args.samples, args.nll_images, args.sample_batch, args.device,
                       inception=bool(args.inception_weights), lpips=bool(args.lpips_weights), quick=args.quick)])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.data}.md").write_text(text)
    result = {"header": header, "summary": summary, "per_seed": per_seed, "rows": ctx["rows"],
              "steps": steps, "feature_net": ctx["feature_info"], "stage_times": stages.times, "sampler": sampler}
    (args.out / f"{args.data}.json").write_text(json.dumps(result, indent=1, default=str))
    print(text, flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    clock = {"wall": time.perf_counter(), "cpu": time.process_time(), "machine": ev.machine(args.device)}
    torch.set_num_threads(pick_threads(args.threads))
    folder = args.out / args.data / args.preset
    stages = Stages(args, folder)
    all_ckpts = [run_stages(args, folder, stages, seed) for seed in range(args.seeds)]
    tok = all_ckpts[0]["tokenizer"]
    dm = ev.build_datamodule(config_files("any_order", args, None),
                             {**stages.data, "data.init_args.tokenizer_ckpt": str(tok)})
    print("[eval]  preparing real images, feature network and held-out tokens", flush=True)
    ctx = eval_context(args, folder, dm, tok)
    per_seed, samples = {arm: [] for arm, *_ in ARMS}, None
    for seed, ckpts in enumerate(all_ckpts):
        metrics, seed_samples = evaluate_seed(args, ckpts, ctx, seed)
        samples = samples or seed_samples  # the figure shows the first seed
        for arm in per_seed:
            per_seed[arm].append(metrics[arm])
    return write_report(args, dm, ctx, per_seed, samples, stages, clock)


if __name__ == "__main__":
    main()
