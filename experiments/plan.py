"""The stages of an experiment as jobs: tokenizer -> per seed and model an AR fit (a distilled model's preceded by
its parent's order extraction) -> the real-image rows and one evaluation per model, its final and kept weights.

Every stage is `python run.py <subcommand> --config <stage config> --config <data overlay> --config <preset>`
plus dotted overrides, in its own folder under `runs/experiments/<name>/`; its key (`Job.key`) is the hash of
that command line, the configs' content and its inputs' keys. The tokenizer is shared by every experiment with
the same data, preset and tokenizer budget: it lives in `<out>/tokenizers/<data>-<key of its command>/`.

Modified from nothing in particular; the stage DAG is the paper's pipeline (tokenizer -> AR -> orders ->
distillation), one level per `models:` entry.
"""

import dataclasses
import importlib
import json
from pathlib import Path

from omegaconf import OmegaConf

from experiments.jobs import GivenFile, Job
from experiments.spec import CONFIGS, ROOT, Experiment, ExperimentError, Model
from fileio import json_sha256

STAGE_KIND = {"tokenizer": "tokenizer", "any_order": "ar", "raster": "ar", "distill": "ar", "extract_orders": "ar"}
# A stage is its config plus overlays (configs/<name>.yaml each): the raster baseline overlays any_order.yaml.
STAGE_CONFIGS = {"raster": ("any_order", "experiment/raster")}
EVALUATE = ("-m", "experiments.evaluate")  # the evaluation jobs' program


def stage_config_files(stage: str) -> list[Path]:
    """The config files of a stage, in order: its stage config, then its overlays."""
    return [CONFIGS / f"{name}.yaml" for name in STAGE_CONFIGS.get(stage, (stage,))]


def cli_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def stage_files(exp: Experiment, stage: str) -> list[Path]:
    """The config files a stage of `exp` reads, in order: stage config and overlays, data overlay, size preset."""
    preset = CONFIGS / "model" / STAGE_KIND[stage] / f"{exp.preset}.yaml"
    data = CONFIGS / "data" / f"{exp.data}.yaml"
    return [*stage_config_files(stage), data, *([preset] if preset.is_file() else [])]


def stage_argv(exp: Experiment, subcommand: str, stage: str, overrides: dict) -> list[str]:
    """Stage config, data overlay and size preset, then dotted overrides, as CLI arguments."""
    files = stage_files(exp, stage)
    argv = [subcommand, *(a for f in files for a in ("--config", str(f.relative_to(ROOT))))]  # run from ROOT
    for key, value in overrides.items():  # "key+" appends to a list (jsonargparse's `--key+=value`)
        argv += [f"--{key}={cli_value(value)}"] if key.endswith("+") else [f"--{key}", cli_value(value)]
    return argv


def data_source_class(data: str) -> tuple[type, dict]:
    """The source class a data overlay configures, and its init_args."""
    from datamodules.sources import DataSource

    source = OmegaConf.to_container(OmegaConf.load(CONFIGS / "data" / f"{data}.yaml"))["data"]["init_args"]["source"]
    module, _, name = source["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not issubclass(cls, DataSource):
        raise ExperimentError(f"data: {source['class_path']} of configs/data/{data}.yaml is not a "
                              "datamodules.sources.DataSource: derive it from DataSource")
    return cls, source.get("init_args", {})


def data_overrides(exp: Experiment, out: Path) -> dict:
    """Shared by every stage: the token cache folder (shared by all experiments) and the data settings.

    `budget.train_images` / `budget.val_images` size the splits, as the data source says
    (`DataSource.split_overrides`: the sunsets are rendered at exactly that many images, a fixed set is split).
    """
    out_overrides = {"data.init_args.cache_dir": str(out / "cache")}
    n_train, n_val = exp.budget.train_images, exp.budget.val_images
    if n_train and n_val:
        cls, init_args = data_source_class(exp.data)
        split = cls.split_overrides(init_args, n_train, n_val)
        out_overrides.update({f"data.init_args.{key}": value for key, value in split.items()})
    return {**out_overrides, **exp.data_overrides}


def feature_net_path(exp: Experiment, out: Path) -> Path:
    """The domain feature network of the evaluation: the pinned file, else the cache shared by every experiment
    with the same data and feature budget (`<out>/features/<data>-<key>.pt`)."""
    if exp.feature_net is not None:
        return exp.feature_net.file()
    budget = exp.budget
    key = json_sha256([exp.data, exp.data_overrides, budget.feature_epochs, budget.feature_images])[:16]
    return out / "features" / f"{exp.data}-{key}.pt"


def fit_overrides(exp: Experiment, steps: int, folder: Path, seed: int) -> dict:
    budget = exp.budget
    out = {"trainer.max_steps": steps, "trainer.max_time": None, "trainer.max_epochs": -1,
           "trainer.check_val_every_n_epoch": None, "trainer.val_check_interval": budget.val_every,
           "trainer.enable_progress_bar": False, "trainer.logger.init_args.save_dir": str(folder),
           "seed_everything": seed}
    if budget.limit_val_batches is not None:
        out["trainer.limit_val_batches"] = budget.limit_val_batches
    return out


def keep_every(steps: int) -> dict:
    """A second ModelCheckpoint keeping the weights every `steps` steps (checkpoints/step=<k>.ckpt: learning curves)."""
    callback = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"every_n_train_steps": steps, "save_top_k": -1, "monitor": None,
                              "filename": "{step}", "save_last": False}}
    return {"trainer.callbacks+": callback}


def tokenizer_job(exp: Experiment, out: Path, data: dict) -> Job:
    """The tokenizer stage, or the pinned file standing for it (`tokenizer:` in the experiment file)."""
    if exp.tokenizer is not None:
        given = exp.tokenizer.file()
        return GivenFile("tokenizer", given.parent, [], given)
    argv = stage_argv(exp, "fit", "tokenizer",
                      {**data, **fit_overrides(exp, exp.budget.tokenizer_steps, Path("."), 0)})
    folder = out / "tokenizers" / f"{exp.data}-{Job('', Path('.'), argv, Path('.')).key()}"
    argv = [a if a != "." else str(folder) for a in argv]  # the run folder, once its name is known
    return Job("tokenizer", folder, argv, folder / "checkpoints" / "last.ckpt", resumable_fit=True)


def plan(exp: Experiment, root: Path, seeds: list[int]) -> tuple[list[Job], dict]:
    """The jobs of every seed and, per seed, {model: (its fit job, its checkpoint)}; sets `exp.tokenizer_ckpt`."""
    data = data_overrides(exp, root.parent)
    tok = tokenizer_job(exp, root.parent, data)
    jobs, ckpts = [tok], {}
    exp.tokenizer_ckpt = str(tok.product)
    token_data = {**data, "data.init_args.tokenizer_ckpt": str(tok.product)}
    for seed in seeds:
        seed_ckpts, folder = {}, root / f"seed{seed}"
        for name, spec in exp.models.items():
            planned = {j.name for j in jobs}
            jobs += [j for j in model_jobs(exp, name, spec, folder, seed, token_data, seed_ckpts, tok)
                     if j.name not in planned]  # an extraction two distilled models share runs once
        ckpts[seed] = seed_ckpts
    rows, *evals = eval_jobs(exp, root, seeds, ckpts, tok)
    # The real-image rows (and the feature network) need only the tokenizer: next in line after it, so the
    # evaluations do not wait for them at the end.
    return [jobs[0], rows, *jobs[1:], *evals], ckpts


ROWS_BUDGET = ("samples", "feature_epochs", "feature_images", "nll_images", "train_images", "val_images")


def eval_jobs(exp: Experiment, root: Path, seeds: list[int], ckpts: dict, tokenizer: Job) -> list[Job]:
    """The real-image rows, then per seed and model with arms: its final weights and its kept steps."""
    budget = exp.budget
    spec = exp.as_dict()
    shared = {k: spec[k] for k in ("data", "data_overrides", "feature_net", "inception_weights")}
    # The rows read only the data and the feature network's budget (`evaluate.context`): a change of training
    # budget retrains the models and re-evaluates them, not the feature network. An evaluation keys on the whole.
    rows_budget = {k: spec["budget"][k] for k in ROWS_BUDGET}
    rows = Job("rows", root / "rows", [str(root), "rows"], root / "rows.json", deps=[tokenizer], program=EVALUATE,
               reads={**shared, "budget": rows_budget})
    reads = {**shared, "budget": spec["budget"]}
    jobs = [rows]
    models = [m for m in exp.models if exp.arms_of(m)]
    for seed in seeds:
        for model in models:
            stage, _ = ckpts[seed][model]
            steps = [None]
            if budget.keep_every and budget.curve_samples:
                steps += list(range(budget.keep_every, exp.model_steps(model) + 1, budget.keep_every))
            for step in steps:
                name = f"{model}@{step}" if step else model
                argv = [str(root), "model", str(seed), model, *(["--step", str(step)] if step else [])]
                arms = [dataclasses.asdict(a) for a in exp.arms_of(model)]
                jobs.append(Job(f"eval {name} (seed {seed})", root / f"seed{seed}" / "eval" / name, argv,
                                root / f"seed{seed}" / "eval" / f"{name}.json", deps=[stage, rows], program=EVALUATE,
                                reads={**reads, "arms": arms}))
    return jobs


def cpu_ddp(processes: int) -> dict:
    """Trainer overrides for DDP over `processes` CPU processes (gloo), one torch thread each."""
    return {"trainer.strategy": "ddp", "trainer.accelerator": "cpu", "trainer.devices": processes}


def per_process_batch(exp: Experiment, stage: str, overrides: dict, processes: int) -> int:
    """The batch each of `processes` DDP processes takes so that the global batch is the single-process one:
    the model's `data.init_args.batch_size` override, else the last config file of the stage that sets it."""
    key = "data.init_args.batch_size"
    batch = overrides.get(key)
    if batch is None:
        found = [OmegaConf.select(OmegaConf.load(f), key) for f in stage_files(exp, stage)]
        batch = next((b for b in reversed(found) if b is not None), None)
    if batch is None or batch % processes:
        raise ExperimentError(f"the batch size {batch} of stage {stage} does not split over {processes} processes: "
                              "set budget.train_processes (or the model's processes:) to a divisor of it")
    return batch // processes


def extraction_job(exp: Experiment, spec: Model, folder: Path, seed: int, data: dict, ckpts: dict,
                   tokenizer: Job) -> Job:
    """The order extraction of a distilled model's parent (shared by the models with the same settings)."""
    parent_job, parent_ckpt = ckpts[spec.init_from]
    settings = spec.extract
    tag = json_sha256(settings)[:8] if settings else "greedy"
    orders = folder / f"orders_{spec.init_from}_{tag}"
    extract = {**data, "data.init_args.orders_path": str(orders / "orders"), "seed_everything": seed,
               "trainer.logger.init_args.save_dir": str(orders), "trainer.enable_progress_bar": False,
               **{f"model.init_args.extraction.{k}": v for k, v in settings.items()},
               "ckpt_path": str(parent_ckpt)}
    processes = exp.budget.extract_processes
    if processes > 1:  # DDP on CPU processes: each writes its own shards, every order exactly once
        extract.update(cpu_ddp(processes))
    return Job(f"orders {spec.init_from} {tag} (seed {seed})", orders,
               stage_argv(exp, "predict", "extract_orders", extract), orders / "orders" / "orders.pt",
               deps=[tokenizer, parent_job], slots=processes)


def model_jobs(exp: Experiment, name: str, spec: Model, folder: Path, seed: int, data: dict, ckpts: dict,
               tokenizer: Job) -> list[Job]:
    """The jobs of one model: a fit, preceded by an order extraction when it is distilled from another.

    `ckpts` maps the models planned so far to (their fit job, its checkpoint) and receives this one.
    """
    jobs, deps = [], [tokenizer]
    overrides = {**data, **fit_overrides(exp, exp.model_steps(name), folder / name, seed)}
    if spec.stage == "distill":  # models distilled from one parent with the same extraction share its orders
        jobs.append(extraction_job(exp, spec, folder, seed, data, ckpts, tokenizer))
        deps = [tokenizer, jobs[-1]]
        overrides.update({"data.init_args.orders_path": str(jobs[-1].folder / "orders"),
                          "model.init_args.init_from": str(ckpts[spec.init_from][1])})
    overrides.update(spec.overrides)
    if exp.budget.keep_every:
        overrides.update(keep_every(exp.budget.keep_every))
    processes = spec.processes or exp.budget.train_processes
    if processes > 1:  # DDP on CPU processes, the global batch (and so the recipe) unchanged
        overrides.update({**cpu_ddp(processes),
                          "data.init_args.batch_size": per_process_batch(exp, spec.stage, overrides, processes)})
    job = Job(f"{name} (seed {seed})", folder / name, stage_argv(exp, "fit", spec.stage, overrides),
              folder / name / "checkpoints" / "last.ckpt", deps=deps, resumable_fit=True, slots=processes)
    ckpts[name] = (job, job.product)
    return [*jobs, job]
