"""An experiment runner: the stages of an order study declared as data, run through the CLI, resumable.

    python benchmarks/experiment.py benchmarks/experiments/standard.yaml [--seeds 0 1 2] [--jobs 2]
        [--set budget.steps=3000 ...] [--only train|eval|report]

An experiment file names the data overlay, the size preset, a budget, the trained *models* and the
evaluated *arms* (a model plus sampler settings); `tokenizer: <checkpoint>` uses a tokenizer trained
elsewhere instead of training one (`budget.tokenizer_steps`):

    models:
      raster:    {stage: raster}
      any_order: {stage: any_order, overrides: {model.init_args.curriculum_steps: 1000}}
      distill:   {stage: distill, init_from: any_order, extract: {score: true_prob}}
    arms:
      - {name: raster AR, model: raster, sampler: {policy: raster}}

Budget keys: `tokenizer_steps`, `steps` (stage 1; a model's own `steps:` wins), `finetune_steps`
(distillation), `val_every`, `limit_val_batches`, `train_images` / `val_images` (split sizes),
`keep_every` (keep weights every k steps) with `curve_samples` (learning curves), `extract_processes`
(order extraction as DDP over that many CPU processes; they count against `--jobs`), `train_processes`
(each AR fit as DDP over that many CPU processes, each taking batch / processes, so the global batch and
the recipe stay the single-process ones; a model's own `processes:` wins; they count against `--jobs`), and for the
evaluation `samples` (per arm, and per held-out real half), `nll_images`, `sample_batch`, `sample_seed`,
`sample_precision` (fp32 | bf16 | auto; an arm's own `precision` wins), `feature_epochs`, `feature_images`.
`auto` (as `sample_precision`, an arm's `precision` or a model's `trainer.precision` override) is resolved when
the experiment is loaded: bf16 (`bf16-mixed` for training) where this machine's matmuls have native bf16 (AMX,
AVX512-BF16, bf16 tensor cores), else fp32, where emulated bf16 is many times slower. The resolved value is what
`experiment.json`, the job keys and the report record.

Every stage is `python run.py ...` in a subprocess (one torch thread, its own log file), in its own
folder under `runs/experiments/<name>/`; up to `--jobs` independent stages run at once (raster and
any-order training side by side on two cores). A stage is finished when its `done.json` records the
settings it ran with (its command line, which names every upstream checkpoint, and the content of the
config files it reads) and its product exists;
a rerun reuses finished stages, resumes an interrupted fit from its `last.ckpt` and an interrupted
extraction from its shards, and starts a stage with other settings from scratch, after renaming the old
run's folder to `<folder>.replaced-<old key>` (nothing is deleted; keys use resolved paths, so the same
folder reached through a symlink keeps its stages).

Modified from nothing in particular; the stage DAG is the paper's pipeline (tokenizer -> AR -> orders ->
distillation), one level per `models:` entry.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks.stage_jobs import RUN_PY, GivenFile, Job, run_jobs  # noqa: E402
from fileio import save_json  # noqa: E402

CONFIGS = ROOT / "configs"
STAGE_KIND = {"tokenizer": "tokenizer", "any_order": "ar", "raster": "ar", "distill": "ar", "extract_orders": "ar"}
# A stage is its config plus overlays (configs/<name>.yaml each): the raster baseline overlays any_order.yaml.
STAGE_CONFIGS = {"raster": ("any_order", "experiment/raster")}


def stage_config_files(stage: str) -> list[Path]:
    """The config files of a stage, in order: its stage config, then its overlays."""
    return [CONFIGS / f"{name}.yaml" for name in STAGE_CONFIGS.get(stage, (stage,))]



# -------------------------------------------------------------------------------- the experiment
def load_experiment(path: Path, overrides: list[str]) -> dict:
    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    exp = OmegaConf.to_container(cfg, resolve=True)
    exp.setdefault("name", path.stem)
    exp.setdefault("seeds", [0])
    return resolve_precisions(exp)


def resolve_precisions(exp: dict, device: str = "cpu") -> dict:
    """`exp` with every `auto` precision made concrete for `device`: bf16 where it pays (`bf16_pays`), else fp32."""
    from models.precision import bf16_pays

    sampling, training = ("bf16", "bf16-mixed") if bf16_pays(device) else ("fp32", "32-true")
    settings = [(exp.get("budget", {}), "sample_precision", sampling),
                *((arm.get("sampler", {}), "precision", sampling) for arm in exp.get("arms", [])),
                *((spec.get("overrides", {}), "trainer.precision", training)
                  for spec in exp.get("models", {}).values())]
    for where, key, concrete in settings:
        if where.get(key) == "auto":
            where[key] = concrete
    return exp


def cli_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def stage_files(exp: dict, stage: str) -> list[Path]:
    """The config files a stage of `exp` reads, in order: stage config and overlays, data overlay, size preset."""
    preset = CONFIGS / "model" / STAGE_KIND[stage] / f"{exp['preset']}.yaml"
    data = CONFIGS / "data" / f"{exp['data']}.yaml"
    return [*stage_config_files(stage), data, *([preset] if preset.is_file() else [])]


def stage_argv(exp: dict, subcommand: str, stage: str, overrides: dict) -> list[str]:
    """Stage config, data overlay and size preset, then dotted overrides, as CLI arguments."""
    files = stage_files(exp, stage)
    argv = [subcommand, *(a for f in files for a in ("--config", str(f.relative_to(ROOT))))]  # run from ROOT
    for key, value in overrides.items():  # "key+" appends to a list (jsonargparse's `--key+=value`)
        argv += [f"--{key}={cli_value(value)}"] if key.endswith("+") else [f"--{key}", cli_value(value)]
    return argv


def data_overrides(exp: dict, out: Path) -> dict:
    """Shared by every stage: the token cache folder (shared by all experiments) and the data settings.

    `budget.train_images` / `budget.val_images` size the splits: the synthetic sources are rendered at
    exactly train + val images; other sources keep the first `train_images` of a deterministic split
    (`val_fraction`) and cap validation at `val_images` (`max_val_images`).
    """
    out_overrides = {"data.init_args.cache_dir": str(out / "cache")}
    budget = exp["budget"]
    n_train, n_val = budget.get("train_images"), budget.get("val_images")
    if n_train and n_val:
        if exp["data"].startswith("synthetic"):
            out_overrides["data.init_args.source.init_args.num_images"] = n_train + n_val
            out_overrides["data.init_args.val_fraction"] = n_val / (n_train + n_val)
        else:
            total = source_size(exp["data"])
            out_overrides["data.init_args.val_fraction"] = max(1 - n_train / total, n_val / total)
            out_overrides["data.init_args.max_val_images"] = n_val
    return {**out_overrides, **exp.get("data_overrides", {})}


def source_size(data: str) -> int:
    """Number of images of the source a data overlay configures (built once, from its init_args)."""
    import importlib

    source = OmegaConf.to_container(OmegaConf.load(CONFIGS / "data" / f"{data}.yaml"))["data"]["init_args"]["source"]
    module, _, name = source["class_path"].rpartition(".")
    return len(getattr(importlib.import_module(module), name)(**source.get("init_args", {})))


def fit_overrides(exp: dict, steps: int, folder: Path, seed: int) -> dict:
    budget = exp["budget"]
    out = {"trainer.max_steps": steps, "trainer.max_time": None, "trainer.max_epochs": -1,
           "trainer.check_val_every_n_epoch": None, "trainer.val_check_interval": budget.get("val_every", 500),
           "trainer.enable_progress_bar": False, "trainer.logger.init_args.save_dir": str(folder),
           "seed_everything": seed}
    if budget.get("limit_val_batches") is not None:
        out["trainer.limit_val_batches"] = budget["limit_val_batches"]
    return out


def keep_every(steps: int) -> dict:
    """A second ModelCheckpoint keeping the weights every `steps` steps (checkpoints/step=<k>.ckpt: learning curves)."""
    callback = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"every_n_train_steps": steps, "save_top_k": -1, "monitor": None,
                              "filename": "{step}", "save_last": False}}
    return {"trainer.callbacks+": callback}


def plan(exp: dict, root: Path, seeds: list[int]) -> tuple[list[Job], dict]:
    """The jobs of every seed and, per seed, the checkpoint of every model.

    The tokenizer is shared by every experiment with the same data, preset and tokenizer budget: it
    lives in `<out>/tokenizers/<data>-<key of its command>/`.
    """
    budget, data = exp["budget"], data_overrides(exp, root.parent)
    if exp.get("tokenizer"):  # a tokenizer checkpoint given by the experiment file
        given = ROOT / exp["tokenizer"]  # relative to the repository (absolute paths stay as they are)
        tok = GivenFile("tokenizer", given.parent, [], given)
    else:
        argv = stage_argv(exp, "fit", "tokenizer",
                          {**data, **fit_overrides(exp, budget["tokenizer_steps"], Path("."), 0)})
        tok_folder = root.parent / "tokenizers" / f"{exp['data']}-{Job('', Path('.'), argv, Path('.')).key()}"
        argv = [a if a != "." else str(tok_folder) for a in argv]  # the run folder, once its name is known
        tok = Job("tokenizer", tok_folder, argv, tok_folder / "checkpoints" / "last.ckpt", resumable_fit=True)
    jobs, ckpts = [tok], {}
    exp["tokenizer_ckpt"] = str(tok.product)
    token_data = {**data, "data.init_args.tokenizer_ckpt": str(tok.product)}
    for seed in seeds:
        seed_ckpts, folder = {}, root / f"seed{seed}"
        for name, spec in exp["models"].items():
            planned = {j.name for j in jobs}
            jobs += [j for j in model_jobs(exp, name, spec, folder, seed, token_data, seed_ckpts, tok)
                     if j.name not in planned]  # an extraction two distilled models share runs once
        ckpts[seed] = seed_ckpts
    rows, *evals = eval_jobs(exp, root, seeds, ckpts, tok)
    # The real-image rows (and the feature network) need only the tokenizer: next in line after it, so the
    # evaluations do not wait for them at the end.
    return [jobs[0], rows, *jobs[1:], *evals], ckpts


def eval_jobs(exp: dict, root: Path, seeds: list[int], ckpts: dict, tokenizer: Job) -> list[Job]:
    """The real-image rows, then per seed and model with arms: its final weights and its kept steps."""
    script, budget = ROOT / "benchmarks" / "experiment_eval.py", exp["budget"]
    rows = Job("rows", root / "rows", [str(root), "rows"], root / "rows.json", deps=[tokenizer],
               script=script)
    jobs = [rows]
    models = [m for m in exp["models"] if any(a["model"] == m for a in exp.get("arms", []))]
    for seed in seeds:
        for model in models:
            stage, _ = ckpts[seed][model]
            steps = [None]
            if budget.get("keep_every") and budget.get("curve_samples"):
                steps += list(range(budget["keep_every"], model_steps(exp, model) + 1, budget["keep_every"]))
            for step in steps:
                name = f"{model}@{step}" if step else model
                argv = [str(root), "model", str(seed), model, *(["--step", str(step)] if step else [])]
                jobs.append(Job(f"eval {name} (seed {seed})", root / f"seed{seed}" / "eval" / name, argv,
                                root / f"seed{seed}" / "eval" / f"{name}.json", deps=[stage, rows], script=script))
    return jobs


def cpu_ddp(processes: int) -> dict:
    """Trainer overrides for DDP over `processes` CPU processes (gloo), one torch thread each."""
    return {"trainer.strategy": "ddp", "trainer.accelerator": "cpu", "trainer.devices": processes}


def per_process_batch(exp: dict, stage: str, overrides: dict, processes: int) -> int:
    """The batch each of `processes` DDP processes takes so that the global batch is the single-process one:
    the model's `data.init_args.batch_size` override, else the last config file of the stage that sets it."""
    key = "data.init_args.batch_size"
    batch = overrides.get(key)
    if batch is None:
        found = [OmegaConf.select(OmegaConf.load(f), key) for f in stage_files(exp, stage)]
        batch = next((b for b in reversed(found) if b is not None), None)
    if batch is None or batch % processes:
        raise SystemExit(f"error: the batch size {batch} of stage {stage} does not split over {processes} "
                         f"processes: set budget.train_processes (or the model's processes:) to a divisor of it")
    return batch // processes


def model_steps(exp: dict, model: str) -> int:
    spec, budget = exp["models"][model], exp["budget"]
    return spec.get("steps", budget["finetune_steps"] if spec["stage"] == "distill" else budget["steps"])


def model_jobs(exp: dict, name: str, spec: dict, folder: Path, seed: int, data: dict, ckpts: dict,
               tokenizer: Job) -> list[Job]:
    """The jobs of one model: a fit, preceded by an order extraction when it is distilled from another.

    `ckpts` maps the models planned so far to (their fit job, its checkpoint) and receives this one.
    """
    stage, budget, jobs, deps = spec["stage"], exp["budget"], [], [tokenizer]
    steps = model_steps(exp, name)
    overrides = {**data, **fit_overrides(exp, steps, folder / name, seed)}
    if stage == "distill":  # models distilled from one parent with the same extraction share its orders
        parent_job, parent_ckpt = ckpts[spec["init_from"]]
        settings = spec.get("extract", {})
        tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8] if settings else "greedy"
        orders = folder / f"orders_{spec['init_from']}_{tag}"
        extract = {**data, "data.init_args.orders_path": str(orders / "orders"), "seed_everything": seed,
                   "trainer.logger.init_args.save_dir": str(orders), "trainer.enable_progress_bar": False,
                   **{f"model.init_args.extraction.{k}": v for k, v in settings.items()},
                   "ckpt_path": str(parent_ckpt)}
        processes = budget.get("extract_processes", 1)
        if processes > 1:  # DDP on CPU processes: each writes its own shards, every order exactly once
            extract.update(cpu_ddp(processes))
        jobs.append(Job(f"orders {spec['init_from']} {tag} (seed {seed})", orders,
                        stage_argv(exp, "predict", "extract_orders", extract), orders / "orders" / "orders.pt",
                        deps=[tokenizer, parent_job], slots=processes))
        deps = [tokenizer, jobs[-1]]
        overrides.update({"data.init_args.orders_path": str(orders / "orders"),
                          "model.init_args.init_from": str(parent_ckpt)})
    overrides.update(spec.get("overrides", {}))
    if budget.get("keep_every"):
        overrides.update(keep_every(budget["keep_every"]))
    processes = spec.get("processes", budget.get("train_processes", 1))
    if processes > 1:  # DDP on CPU processes, the global batch (and so the recipe) unchanged
        overrides.update({**cpu_ddp(processes),
                          "data.init_args.batch_size": per_process_batch(exp, stage, overrides, processes)})
    job = Job(f"{name} (seed {seed})", folder / name, stage_argv(exp, "fit", stage, overrides),
              folder / name / "checkpoints" / "last.ckpt", deps=deps, resumable_fit=True, slots=processes)
    ckpts[name] = (job, job.product)
    return [*jobs, job]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the experiment's seeds")
    p.add_argument("--jobs", type=int, default=2, help="stages run at once (one torch thread each)")
    p.add_argument("--set", nargs="*", default=[], help="dotted overrides of the experiment file")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "experiments")
    p.add_argument("--only", choices=["train", "eval", "report"], default=None)
    p.add_argument("--publish", type=Path, default=None, help="also write the report into this folder (results/...)")
    args = p.parse_args(argv)
    exp = load_experiment(args.experiment, args.set)
    if args.seeds is not None:
        exp["seeds"] = args.seeds
    seeds = exp["seeds"]
    root = args.out / exp["name"]
    root.mkdir(parents=True, exist_ok=True)
    jobs, ckpts = plan(exp, root, seeds)
    save_json(exp, root / "experiment.json", indent=1)
    # One queue: an evaluation starts as soon as its model (and the rows) are done, beside the other seeds' stages.
    selected = {None: jobs, "train": [j for j in jobs if j.script == RUN_PY],
                "eval": [j for j in jobs if j.script != RUN_PY], "report": []}[args.only]
    run_jobs(selected, args.jobs)
    if args.only in (None, "report"):
        from benchmarks.experiment_report import write_report

        command = "python benchmarks/experiment.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_report(root, command, args.publish)
        print(f"[report] {(args.publish or root) / 'report.md'}", flush=True)


if __name__ == "__main__":
    main()
