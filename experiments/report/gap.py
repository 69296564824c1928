"""The any-order gap from the validation curves alone (no evaluation stage needed): each model's validation NLL
against training steps, raster models in raster order, any-order models in a random order, and each any-order
model's gap at its last step to the raster model of its block (docs/study.md section 4).

    python -m experiments.report.gap runs/experiments/gap_untinted --out docs/gap_untinted.png
"""

import argparse
import json
from pathlib import Path

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments.report.figures import val_curves
from fileio import atomic_write


def model_facts(root: Path, seed: int) -> dict[str, dict]:
    """{model: {"raster": bool, "block": str}} of every trained model of a seed, from its saved config."""
    facts = {}
    for config in sorted((root / f"seed{seed}").glob("*/config.yaml")):
        cfg = yaml.safe_load(config.read_text())
        model = cfg["model"]["init_args"]
        if "net" not in model:  # a tokenizer or a job, not an AR model
            continue
        net = model["net"].get("init_args", {})
        facts[config.parent.name] = {"raster": model.get("train_order") == "raster", "block": net.get("block", "gpt")}
    return facts


def gap_table(curves: dict[str, dict[str, list[tuple[int, float]]]], facts: dict[str, dict]) -> list[dict]:
    """One row per model: the NLL it is judged by at its last validation, and (any-order) its gap to raster."""
    last = {}
    for model, fact in facts.items():
        points = curves.get(model, {}).get("val/nll_raster" if fact["raster"] else "val/nll_random")
        if points:
            last[model] = max(points)  # the latest step (a resumed run logs the step it resumed at twice)
    rows = []
    for model, fact in facts.items():
        if model not in last:
            continue
        step, nll = last[model]
        raster = [m for m, f in facts.items() if f["raster"] and f["block"] == fact["block"] and m in last]
        gap = None if fact["raster"] or not raster else nll - last[raster[0]][1]
        rows.append({"model": model, "block": fact["block"], "order": "raster" if fact["raster"] else "random",
                     "step": step, "nll": nll, "gap": gap, "raster_model": None if fact["raster"] else
                     (raster[0] if raster else None)})
    return rows


def gap_figure(curves: dict, facts: dict, path: Path) -> None:
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for model, fact in facts.items():
        tag = "val/nll_raster" if fact["raster"] else "val/nll_random"
        points = sorted(dict(curves.get(model, {}).get(tag, [])).items())
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", linestyle="--" if fact["raster"] else "-",
                    label=f"{model} ({'raster' if fact['raster'] else 'random'} order)")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation NLL (bits/token)")
    ax.set_title("The any-order gap: any-order models in a random order, raster models in raster order", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: FigureCanvasAgg(fig).print_png(str(tmp)))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m experiments.report.gap", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an experiment's run folder (runs/experiments/<name>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write (a .json with the rows beside it)")
    args = parser.parse_args(argv)
    if not (args.run / f"seed{args.seed}").is_dir():
        raise SystemExit(f"error: {args.run}/seed{args.seed} does not exist: give the experiment's run folder "
                         "(runs/experiments/<name>) and a seed it trained")
    facts = model_facts(args.run, args.seed)
    curves = val_curves(args.run, args.seed, list(facts))
    rows = gap_table(curves, facts)
    gap_figure(curves, facts, args.out)
    atomic_write(args.out.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(rows, indent=1)))
    for r in rows:
        gap = "" if r["gap"] is None else f"  gap {r['gap']:+.3f} (to {r['raster_model']})"
        print(f"{r['model']:28s} {r['block']:6s} {r['order']:6s} step {r['step']:5d}  NLL {r['nll']:.3f}{gap}")
    return rows


if __name__ == "__main__":
    main()
