"""When does each arm's sampling order write the content? For every arm of a finished synthetic experiment,
draw samples again and report the mean writing step (0 first, 1 last) of the cells holding the sun, of those
holding clouds, and of the rest (`evaluation.scene.content_steps`), mean ± std over seeds.

    python benchmarks/order_content.py runs/experiments/standard_seeds --seeds 1 2 3 --samples 300

Evaluations since 2026-12-02 record these columns themselves (sun step, cloud step in report.md); this script
reads them off experiments evaluated before, from their checkpoints, with the arms' own sampler settings.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks.experiment_eval import arm_settings, load_arm, model_ckpt  # noqa: E402
from evaluation.sampling import sample_set  # noqa: E402
from evaluation.scene import content_steps  # noqa: E402

KEYS = ("sun_step", "cloud_step", "rest_step")


def arm_steps(exp: dict, folder: Path, arm: dict, seed: int, samples: int) -> dict[str, float]:
    budget = exp["budget"]
    module = load_arm(model_ckpt(folder, seed, arm["model"]), exp["tokenizer_ckpt"], arm_settings(exp, arm))
    s = sample_set(module, samples, budget.get("sample_batch", 100), budget.get("sample_seed", 0))
    return content_steps(s["images"], s["step_maps"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", type=Path, help="a run folder of benchmarks/experiment.py (synthetic data)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the experiment's")
    p.add_argument("--samples", type=int, default=300, help="per arm and seed")
    args = p.parse_args(argv)
    exp = json.loads((args.experiment / "experiment.json").read_text())
    if not exp["data"].startswith("synthetic"):
        raise SystemExit(f"error: {args.experiment} is on {exp['data']}: sun and clouds exist on synthetic data only")
    torch.set_num_threads(1)
    print(f"| arm | {' | '.join(KEYS)} |\n|---|---|---|---|")
    for arm in exp["arms"]:
        per_seed = [arm_steps(exp, args.experiment, arm, seed, args.samples) for seed in args.seeds or exp["seeds"]]
        cells = []
        for key in KEYS:
            values = [d[key] for d in per_seed]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.2f}{spread}")
        print(f"| {arm['name']} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
