"""When does each arm's sampling order write the content? For every arm of a finished synthetic experiment,
draw samples again and report the mean writing step (0 first, 1 last) of the cells holding the sun, of those
holding clouds, and of the rest (`evaluation.scene.content_steps`), mean ± std over seeds.

    python -m experiments.order_content runs/experiments/standard_seeds --seeds 1 2 3 --samples 300

Evaluations since 2026-12-02 record these columns themselves (sun step, cloud step in report.md); this script
reads them off experiments evaluated before, from their checkpoints, with the arms' own sampler settings.
"""

import argparse
import statistics
from pathlib import Path

import torch

from evaluation.sampling import sample_set
from evaluation.scene import content_steps
from experiments.evaluate import load_arm, model_ckpt
from experiments.plan import data_source_class
from experiments.spec import Arm, Experiment, ExperimentError, load_run

KEYS = ("sun_step", "cloud_step", "rest_step")


def arm_steps(exp: Experiment, folder: Path, arm: Arm, seed: int, samples: int) -> dict[str, float]:
    module = load_arm(model_ckpt(folder, seed, arm.model), exp.tokenizer_ckpt, exp.arm_settings(arm))
    s = sample_set(module, samples, exp.budget.sample_batch, exp.budget.sample_seed)
    return content_steps(s["images"], s["step_maps"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.order_content", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", type=Path, help="a run folder of `python -m experiments` (sunsets)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the experiment's")
    p.add_argument("--samples", type=int, default=300, help="per arm and seed")
    args = p.parse_args(argv)
    try:
        exp = load_run(args.experiment)
    except ExperimentError as err:
        raise SystemExit(f"error: {err}") from None
    if not data_source_class(exp.data)[0].has_scenes():
        raise SystemExit(f"error: {args.experiment} is on {exp.data}: sun and clouds exist on synthetic data only")
    torch.set_num_threads(1)
    print(f"| arm | {' | '.join(KEYS)} |\n|---|---|---|---|")
    for arm in exp.arms:
        per_seed = [arm_steps(exp, args.experiment, arm, seed, args.samples) for seed in args.seeds or exp.seeds]
        cells = []
        for key in KEYS:
            values = [d[key] for d in per_seed]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.2f}{spread}")
        print(f"| {arm.name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
