"""The paper's four-arm comparison from ONE tokenizer at an equal training budget, on any data overlay:

  1. raster AR (raster order in training and sampling);
  2. any-order AR sampled in random order;
  3. the same any-order model sampled in confidence order (OAR before distillation);
  4. OAR after order distillation (orders extracted by the any-order model, fine-tuned, confidence order).

    python -m experiments.compare_orders --quick                      (the 15-minute pipeline check)
    python -m experiments.compare_orders --data fashion_mnist --seeds 3
    python -m experiments.compare_orders --data synthetic_untinted --set budget.steps=2000

A shorthand for `python -m experiments` with one of the experiment files in `experiments/`
(`--quick`: quick.yaml, `--smoke`: smoke.yaml, default: standard.yaml): `--data`, `--preset` and
`--seeds` replace the file's values, `--set key=value` anything else (budget, arms, sampler settings of
an arm). The runs and the report live in `runs/experiments/<mode>_<data>/` (ignored by git);
`--publish results/<folder>` also writes the report there (the committed reference results).
"""

import argparse
from pathlib import Path

from experiments import runner
from experiments.spec import ROOT

EXPERIMENTS = ROOT / "experiments"


def runner_argv(argv: list[str] | None = None) -> list[str]:
    """The `python -m experiments` command line this shorthand stands for."""
    p = argparse.ArgumentParser(prog="python -m experiments.compare_orders", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the 15-minute pipeline check (quick.yaml)")
    mode.add_argument("--smoke", action="store_true", help="tiny presets, a few steps (tests; smoke.yaml)")
    p.add_argument("--data", default="synthetic", help="a configs/data/<name>.yaml overlay")
    p.add_argument("--preset", default=None, help="configs/model/{tokenizer,ar}/<preset>.yaml (default: the file's)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the file's)")
    p.add_argument("--set", nargs="*", default=[], help="dotted overrides of the experiment file")
    p.add_argument("--jobs", type=int, default=2, help="stages run at once (one torch thread each)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "experiments")
    p.add_argument("--publish", type=Path, default=None, help="also write the report into this folder")
    args = p.parse_args(argv)
    name = "quick" if args.quick else "smoke" if args.smoke else "standard"
    sets = [f"name={name}_{args.data}", f"data={args.data}"]
    sets += [f"preset={args.preset}"] if args.preset else []
    sets += [f"seeds=[{','.join(map(str, range(args.seeds)))}]"] if args.seeds else []
    out = [str(EXPERIMENTS / f"{name}.yaml"), "--jobs", str(args.jobs), "--out", str(args.out),
           "--set", *sets, *args.set]
    return out + (["--publish", str(args.publish)] if args.publish else [])


def main(argv: list[str] | None = None) -> None:
    runner.main(runner_argv(argv))


if __name__ == "__main__":
    main()
