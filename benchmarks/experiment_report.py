"""The report of an experiment run (`benchmarks/experiment.py ... --only report`): tables, curves, figures.

Reads `RUN_FOLDER/experiment.json`, `rows.json`, every `seed<k>/eval/*.json` and the stages' `done.json`
and TensorBoard logs, and writes into RUN_FOLDER (or `--publish DIR`):
- `report.md`: the experiment's own prose (`notes:` in its YAML), the settings, the table of arms
  (mean ± std over seeds) with the real-image rows, the sampler settings of every arm, and how to read it;
- `report.json`: every number;
- `evals/seed<k>/*.json` (with `--publish`): each seed's metric files, so that a later session on another
  machine, whose `runs/` no longer holds the earlier seeds, still reports them beside its own (the report
  covers the run's seeds and every seed published before; a run's own files take precedence);
- `samples.png`: per arm the samples of the first seed evaluated in RUN_FOLDER, beside their order heatmaps,
  and the mean order maps;
- `curves.png` (when checkpoints were kept): metrics of every arm against training steps, and the
  validation NLL the training logged.
"""

import datetime
import json
import shutil
import statistics
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks import quality_report as ev
from fileio import atomic_write, save_json, save_text

CURVE_METRICS = [("fid", "FID ↓"), ("consistency", "consistency ↑"), ("class_accuracy", "class accuracy ↑"),
                 ("nll_random", "NLL random order (bits)"), ("nll_inferred", "NLL inferred order (bits)"),
                 ("nll_own", "NLL own order (bits)")]
VAL_SCALARS = ["val/nll_raster", "val/nll_random", "val/nll_inferred", "val/nll_own"]


def eval_files(root: Path, seed: int, published: Path | None = None) -> list[Path]:
    """A seed's metric files: the run's own (`root/seed<k>/eval`), else those published before."""
    own = sorted((root / f"seed{seed}" / "eval").glob("*.json"))
    if own or published is None:
        return own
    return sorted((published / "evals" / f"seed{seed}").glob("*.json"))


def published_seeds(published: Path | None) -> list[int]:
    """Seeds whose metric files an earlier `--publish` into this folder left."""
    if published is None:
        return []
    return sorted(int(p.name[4:]) for p in (published / "evals").glob("seed*") if p.name[4:].isdigit())


def load_evals(root: Path, seeds: list[int], by_seed: dict | None = None,
               published: Path | None = None) -> tuple[dict, dict]:
    """({arm: [metrics per seed]} of the final weights, {(arm, step): [metrics per seed]} of kept steps).

    `by_seed`, when given, receives the final weights' metrics as {arm: {seed: metrics}}. A seed without
    files in `root` is read from `published/evals/seed<k>/` (an earlier session's `--publish`)."""
    final, steps = {}, {}
    for seed in seeds:
        found, adds = {}, {}
        for path in eval_files(root, seed, published):
            data = json.loads(path.read_text())
            for arm, metrics in data.get("metrics", {}).items():
                found[(arm, data.get("step"))] = metrics
            for arm, metrics in data.get("adds", {}).items():  # `<model>.nll.json`: columns measured again
                adds[(arm, data.get("step"))] = metrics
        for (arm, step), metrics in found.items():
            metrics = {**metrics, **adds.get((arm, step), {})}
            if step:
                steps.setdefault((arm, step), []).append(metrics)
            else:
                final.setdefault(arm, []).append(metrics)
                if by_seed is not None:
                    by_seed.setdefault(arm, {})[seed] = metrics
    return final, steps


def partial_note(by_seed: dict, arms: list[str], seeds: list[int]) -> list[str]:
    """A line naming the arms evaluated in fewer seeds than the report's (a report written mid-run)."""
    short = [f"{a} (seeds {', '.join(map(str, sorted(by_seed[a])))})"
             for a in arms if len(by_seed.get(a, {})) < len(seeds)]
    if not short:
        return []
    return [f"**Not every seed evaluated yet**; mean ± std over fewer seeds for: {'; '.join(short)}.", ""]


PAIRED_METRICS = [("fid", "FID", ".2f"), ("consistency", "consistency", ".3f"), ("nll_random", "NLL random", ".3f"),
                  ("nll_own", "NLL own order", ".3f")]


def paired_differences(by_seed: dict, pairs: list) -> list[dict]:
    """Per `[arm a, arm b]` pair: for each metric both have, a - b in every seed both were evaluated in.

    Arms of one seed share its tokenizer, data and stage-1 weights, so the differences within a seed vary
    less than the arms themselves; the mean and std are over those per-seed differences."""
    out = []
    for a, b in pairs:
        seeds = sorted(set(by_seed.get(a, {})) & set(by_seed.get(b, {})))
        if not seeds:
            continue
        diffs = {}
        for key, _, _ in PAIRED_METRICS:
            values = [by_seed[a][s][key] - by_seed[b][s][key] for s in seeds
                      if key in by_seed[a][s] and key in by_seed[b][s]]
            if len(values) == len(seeds):
                diffs[key] = values
        out.append({"a": a, "b": b, "seeds": seeds, "diffs": diffs})
    return out


def paired_table(paired: list[dict]) -> str:
    """Markdown: one row per pair, each cell the mean ± std of a - b over seeds and the per-seed values."""
    head = "| a − b | seeds | " + " | ".join(f"Δ {label}" for _, label, _ in PAIRED_METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(PAIRED_METRICS))]
    for p in paired:
        cells = []
        for key, _, spec in PAIRED_METRICS:
            v = p["diffs"].get(key)
            if v is None:
                cells.append("–")
                continue
            mean = statistics.fmean(v)
            std = f" ± {statistics.stdev(v):{spec}}" if len(v) > 1 else ""
            cells.append(f"{mean:+{spec}}{std} ({', '.join(f'{x:+{spec}}' for x in v)})")
        lines.append(f"| {p['a']} − {p['b']} | {', '.join(map(str, p['seeds']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_times(root: Path) -> dict[str, float]:
    """Wall seconds of every finished stage (from its done.json), by folder."""
    times = {}
    for marker in sorted(root.rglob("done.json")):
        state = json.loads(marker.read_text())
        if state.get("finished") and "wall_s" in state:
            times[str(marker.parent.relative_to(root))] = state["wall_s"]
    return times


def val_curves(root: Path, seed: int, models: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """TensorBoard validation scalars of each model of one seed: {model: {tag: [(step, value)]}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for model in models:
        events = EventAccumulator(str(root / f"seed{seed}" / model), size_guidance={"scalars": 0}).Reload()
        tags = set(events.Tags().get("scalars", []))
        curves[model] = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in VAL_SCALARS if t in tags}
    return curves


def curves_figure(steps: dict, val: dict, path: Path) -> None:
    """One panel per metric (arms against training steps, mean over seeds), then the validation NLLs."""
    metrics = [(k, t) for k, t in CURVE_METRICS if any(k in m for ms in steps.values() for m in ms)]
    panels = len(metrics) + len(VAL_SCALARS)
    fig = Figure(figsize=(4.2 * min(panels, 4), 3.4 * ((panels + 3) // 4)), dpi=100)
    arms = sorted({arm for arm, _ in steps})
    for i, (key, title) in enumerate(metrics):
        ax = fig.add_subplot((panels + 3) // 4, min(panels, 4), i + 1)
        for arm in arms:
            points = sorted((s, sum(m[key] for m in ms) / len(ms)) for (a, s), ms in steps.items()
                            if a == arm and key in ms[0])
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=arm)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
    for j, tag in enumerate(VAL_SCALARS):
        ax = fig.add_subplot((panels + 3) // 4, min(panels, 4), len(metrics) + j + 1)
        for model, tags in val.items():
            if tags.get(tag):
                ax.plot(*zip(*tags[tag], strict=True), label=model)
        ax.set_title(f"{tag} (bits/token)", fontsize=10)
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    if metrics:
        fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: FigureCanvasAgg(fig).print_png(str(tmp)))


def write_report(root: Path, command: str, publish: Path | None = None) -> dict:
    """Write report.md / report.json / samples.png / curves.png for the run in `root`; returns the numbers."""
    exp = json.loads((root / "experiment.json").read_text())
    seeds = sorted(set(exp["seeds"]) | set(published_seeds(publish)))
    exp = {**exp, "seeds": seeds}
    budget = exp["budget"]
    by_seed = {}
    final, steps = load_evals(root, seeds, by_seed, publish)
    paired = paired_differences(by_seed, exp.get("paired", []))
    rows = json.loads((root / "rows.json").read_text())
    before = publish / "report.json" if publish else None
    earlier = json.loads(before.read_text()) if before and before.is_file() else {}
    arms = [a for a in exp["arms"] if a["name"] in final]
    summary = {a["name"]: ev.summarise(final[a["name"]]) for a in arms}
    train_steps = {a["name"]: describe_steps(exp, a["model"]) for a in arms}
    out = publish or root
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    shown_seed = next((s for s in seeds if any((root / f"seed{s}" / "eval").glob("*.samples.pt"))), seeds[0])
    shown = {a["name"]: torch.load(root / f"seed{shown_seed}" / "eval" / f"{a['model']}.samples.pt")[a["name"]]
             for a in arms if (root / f"seed{shown_seed}" / "eval" / f"{a['model']}.samples.pt").is_file()}
    if shown:
        n_steps = int(next(iter(shown.values()))["step_maps"][0].numel())
        ev.samples_figure(shown, n_steps, out / "samples.png")
        figures.append(f"![samples (seed {shown_seed}) beside their order heatmaps, then the mean order map of each "
                       "arm](samples.png)")
    val = {}
    if steps:
        models = sorted({a["model"] for a in exp["arms"]})
        val = val_curves(root, shown_seed, models)
        curves_figure(steps, val, out / "curves.png")
        figures.append(f"![learning curves: every arm against training steps ({budget.get('curve_samples')} samples "
                       "a point), and the validation NLL logged in training](curves.png)")
    times = {**earlier.get("stage_times", {}), **stage_times(root)}
    text = "\n".join([
        f"# {exp.get('title', exp['name'])}", "", exp.get("notes", "").strip(), "",
        f"- **command**: `{command}`", f"- **date**: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- **machine**: {ev.machine('cpu')}", f"- **data**: {exp['data']} {exp.get('data_overrides', {})}",
        f"- **preset**: {exp['preset']}; **budget**: {budget}", f"- **seeds**: {seeds}",
        f"- **feature network**: {rows['feature_name']}",
        f"- **stage wall times (s)**: {json.dumps({k: round(v) for k, v in times.items()})}", "",
        *rows_note(rows, earlier),
        ev.markdown_table(summary, rows["rows"], train_steps, len(seeds)), "",
        *partial_note(by_seed, [a["name"] for a in arms], seeds),
        *(["## Paired differences (within a seed)", "",
           "a − b per seed (the arms of one seed share its tokenizer, data and stage-1 weights): mean ± std over "
           "seeds, then each seed's value. Negative Δ FID and Δ NLL, positive Δ consistency favour a.", "",
           paired_table(paired), ""] if paired else []),
        "## Sampler settings", "", *(f"- {a['name']}: {json.dumps(a.get('sampler', {}))}" for a in arms), "",
        *figures, "",
        ev.how_to_read(budget["samples"], budget.get("nll_images", 500), budget.get("sample_batch", 100), "cpu",
                       bool(exp.get("inception_weights")), False, False)])
    save_text(text, out / "report.md")
    result = {"experiment": exp, "summary": summary, "per_seed": final, "paired": paired, "rows": rows,
              "curves": {f"{arm}@{step}": ms for (arm, step), ms in steps.items()}, "val_curves": val,
              "stage_times": times}
    save_json(result, out / "report.json", indent=1, default=str)
    if publish and (root / "experiment.json").is_file():
        shutil.copy(root / "experiment.json", out / "experiment.json")
        for seed in seeds:
            kept = out / "evals" / f"seed{seed}"
            for path in (root / f"seed{seed}" / "eval").glob("*.json"):
                kept.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, kept / path.name)
    return result


def rows_note(rows: dict, earlier: dict) -> list[str]:
    """A warning when the real-image rows differ from those of the report published before.

    The feature network and the tokenizer are retrained per run folder; on another machine they may come
    out different, and the earlier seeds' FIDs were measured with the earlier network."""
    before = earlier.get("rows", {}).get("rows", {})
    moved = {name: (before[name]["fid"], row["fid"]) for name, row in rows["rows"].items()
             if name in before and abs(before[name]["fid"] - row["fid"]) > 1e-3 * max(1.0, abs(row["fid"]))}
    if not moved:
        return []
    said = "; ".join(f"{name} FID {a:.3f} before, {b:.3f} now" for name, (a, b) in moved.items())
    return [f"**The real-image rows moved since the earlier seeds were published** ({said}): the feature "
            "network or tokenizer was retrained differently, so FIDs of seeds from different sessions are not "
            "strictly comparable.", ""]


def describe_steps(exp: dict, model: str) -> str:
    """Training steps of a model, with those of the models it was distilled from."""
    spec, budget = exp["models"][model], exp["budget"]
    own = spec.get("steps", budget["finetune_steps"] if spec["stage"] == "distill" else budget["steps"])
    return f"{describe_steps(exp, spec['init_from'])} + {own}" if spec.get("init_from") else str(own)
