"""The experiment runner: the stages of an order study declared as data, run through the CLI, resumable.

    python -m experiments experiments/standard.yaml [--seeds 0 1 2] [--jobs 2] [--set budget.steps=3000 ...]
        [--only train|eval|report] [--publish results/<name> [--artefacts]]

The file (`experiments/spec.py` says every key) is checked whole before anything runs. Every stage is
`python run.py ...` (or `python -m experiments.evaluate ...`) in a subprocess (one torch thread, its own log
file, its own process group), in its own folder under `runs/experiments/<name>/`; up to `--jobs` independent
stages run at once (raster and any-order training side by side on two cores). A stage is finished when its
`done.json` records the settings it ran with (its command line, which names every upstream checkpoint, and the
content of the config files it reads) and its product exists; a rerun reuses finished stages, resumes an
interrupted fit from its `last.ckpt` and an interrupted extraction from its shards, and starts a stage with
other settings from scratch, after renaming the old run's folder to `<folder>.replaced-<old key>` (nothing is
deleted; keys use resolved paths, so the same folder reached through a symlink keeps its stages).

SIGTERM or SIGINT stops every running stage and the processes it started, and the runner exits with 128 + the
signal (`experiments/scheduler.py`); the same command resumes. `--publish DIR` also writes the report into
DIR (results/...); with `--artefacts` the shared artefacts too (tokenizer, feature network: `artefacts.py`),
so that another machine pins them (`tokenizer: {path, sha256}`) and grows the same table.
"""

import argparse
import sys
from pathlib import Path

from experiments.jobs import Job
from experiments.plan import plan
from experiments.scheduler import STOP_GRACE_S, run_jobs
from experiments.spec import ROOT, Experiment, ExperimentError, load_experiment
from fileio import save_json


def record(exp: Experiment, root: Path, jobs: list[Job]) -> None:
    """`experiment.json`: the experiment as run, with each stage's folder and the processor kinds it ran on."""
    exp.stages = {j.name: {"folder": str(j.folder), "processors": j.processors()} for j in jobs}
    save_json(exp.as_dict(), root / "experiment.json", indent=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", type=Path, help="an experiment file (experiments/*.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the experiment's seeds")
    p.add_argument("--jobs", type=int, default=2, help="stages run at once (one torch thread each)")
    p.add_argument("--set", nargs="*", default=[], help="dotted overrides of the experiment file")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "experiments")
    p.add_argument("--only", choices=["train", "eval", "report"], default=None)
    p.add_argument("--publish", type=Path, default=None, help="also write the report into this folder (results/...)")
    p.add_argument("--artefacts", action="store_true",
                   help="with --publish: also copy the tokenizer and the feature network there, with their sha256")
    p.add_argument("--stop-grace", type=float, default=STOP_GRACE_S,
                   help="seconds a stopped stage may take to exit before it is killed")
    args = p.parse_args(argv)
    if args.artefacts and args.publish is None:
        p.error("--artefacts publishes beside the report: give --publish results/<name> too")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        exp = load_experiment(args.experiment, [*args.set, *([f"seeds={args.seeds}"] if args.seeds else [])])
        root = args.out / exp.name
        jobs, _ = plan(exp, root, exp.seeds)
    except ExperimentError as err:
        raise SystemExit(f"error: {err}") from None
    root.mkdir(parents=True, exist_ok=True)
    record(exp, root, jobs)
    # One queue: an evaluation starts as soon as its model (and the rows) are done, beside the other seeds' stages.
    selected = {None: jobs, "train": [j for j in jobs if j.is_cli], "eval": [j for j in jobs if not j.is_cli],
                "report": []}[args.only]
    try:
        run_jobs(selected, args.jobs, args.stop_grace)
    finally:
        record(exp, root, jobs)  # the processor kinds of the stages that ran, even when one failed or was stopped
    if args.only in (None, "report"):
        from experiments.report import write_report

        command = "python -m experiments " + " ".join(sys.argv[1:] if argv is None else argv)
        write_report(root, command, args.publish)
        print(f"[report] {(args.publish or root) / 'report.md'}", flush=True)
    if args.artefacts:
        from experiments.artefacts import publish_artefacts

        publish_artefacts(exp, root, args.publish)
