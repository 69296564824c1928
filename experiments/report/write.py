"""The report of an experiment run (`python -m experiments FILE [--only report]`): tables, curves, figures.

Reads `RUN_FOLDER/experiment.json`, `rows.json`, every `seed<k>/eval/*.json` and the stages' `done.json`
and TensorBoard logs, and writes into RUN_FOLDER (or `--publish DIR`):
- `report.md`: the experiment's own prose (`notes:` in its YAML), the settings, the table of arms
  (mean ± std over seeds) with the real-image rows, the sampler settings of every arm, and how to read it;
  a warning when the table's stages ran on more than one processor kind;
- `report.json`: every number;
- `evals/seed<k>/*.json` (with `--publish`): each seed's metric files, so that a later session on another
  machine, whose `runs/` no longer holds the earlier seeds, still reports them beside its own (the report
  covers the run's seeds and every seed published before; a run's own files take precedence);
- `samples.png`: per arm the samples of the first seed evaluated in RUN_FOLDER, beside their order heatmaps,
  and the mean order maps;
- `curves.png` (when checkpoints were kept): metrics of every arm against training steps, and the
  validation NLL the training logged.
"""

import dataclasses
import datetime
import json
import shutil
from pathlib import Path

import torch

from experiments.machine import machine
from experiments.report import figures, tables
from experiments.report.evals import load_evals, paired_differences, published_seeds, stage_times
from experiments.spec import Experiment, from_dict
from fileio import save_json, save_text


def write_report(root: Path, command: str, publish: Path | None = None) -> dict:
    """Write report.md / report.json / samples.png / curves.png for the run in `root`; returns the numbers."""
    exp = from_dict(json.loads((root / "experiment.json").read_text()))
    exp.seeds = sorted(set(exp.seeds) | set(published_seeds(publish)))
    by_seed = {}
    final, steps = load_evals(root, exp.seeds, by_seed, publish)
    rows = json.loads((root / "rows.json").read_text())
    before = publish / "report.json" if publish else None
    earlier = json.loads(before.read_text()) if before and before.is_file() else {}
    out = publish or root
    out.mkdir(parents=True, exist_ok=True)
    arms = [a for a in exp.arms if a.name in final]
    if not arms:  # e.g. `--only report --seeds <a seed that never ran>`: keep the report that exists
        raise SystemExit(f"error: no arm of {root} has an evaluation for seeds {exp.seeds}: nothing to report, and "
                         f"{out / 'report.md'} is left as it was; run the experiment for those seeds first")
    result = {"experiment": exp.as_dict(), "summary": {a.name: tables.summarise(final[a.name]) for a in arms},
              "per_seed": final, "paired": paired_differences(by_seed, exp.paired), "rows": rows,
              "curves": {f"{arm}@{step}": ms for (arm, step), ms in steps.items()},
              "stage_times": {**earlier.get("stage_times", {}), **stage_times(root)},
              "stage_processors": {**earlier.get("stage_processors", {}),
                                   **{name: s["processors"] for name, s in exp.stages.items() if s["processors"]}}}
    shown_figures, result["val_curves"] = draw_figures(exp, root, out, arms, steps)
    text = "\n".join([
        f"# {exp.title or exp.name}", "", exp.notes.strip(), "",
        f"- **command**: `{command}`", f"- **date**: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- **machine**: {machine('cpu')}", f"- **data**: {exp.data} {exp.data_overrides}",
        f"- **preset**: {exp.preset}; **budget**: {dataclasses.asdict(exp.budget)}", f"- **seeds**: {exp.seeds}",
        f"- **feature network**: {rows['feature_name']}",
        f"- **processors**: {processors_line(result['stage_processors'])}",
        f"- **stage wall times (s)**: {json.dumps({k: round(v) for k, v in result['stage_times'].items()})}", "",
        *processors_note(result["stage_processors"], None not in (exp.tokenizer, exp.feature_net)),
        *rows_note(rows, earlier),
        tables.markdown_table(result["summary"], rows["rows"], {a.name: describe_steps(exp, a.model) for a in arms},
                              len(exp.seeds)), "",
        *partial_note(by_seed, [a.name for a in arms], exp.seeds),
        *(["## Paired differences (within a seed)", "",
           "a − b per seed (the arms of one seed share its tokenizer, data and stage-1 weights): mean ± std over "
           "seeds, then each seed's value. Negative Δ FID and Δ NLL, positive Δ consistency favour a.", "",
           tables.paired_table(result["paired"]), ""] if result["paired"] else []),
        "## Sampler settings", "", *(f"- {a.name}: {json.dumps(a.sampler)}" for a in arms), "",
        *shown_figures, "",
        tables.how_to_read(exp.budget.samples, exp.budget.nll_images, exp.budget.sample_batch, "cpu",
                           bool(exp.inception_weights), False, False)])
    save_text(text, out / "report.md")
    save_json(result, out / "report.json", indent=1, default=str)
    if publish:
        keep_published(root, out, exp.seeds)
    return result


def draw_figures(exp: Experiment, root: Path, out: Path, arms: list, steps: dict) -> tuple[list[str], dict]:
    """samples.png (the first seed with samples) and curves.png (kept steps): their markdown lines, and the
    validation curves the training logged."""
    lines, val = [], {}
    seed = next((s for s in exp.seeds if any((root / f"seed{s}" / "eval").glob("*.samples.pt"))), exp.seeds[0])
    files = {a.name: root / f"seed{seed}" / "eval" / f"{a.model}.samples.pt" for a in arms}
    shown = {name: torch.load(path)[name] for name, path in files.items() if path.is_file()}
    if shown:
        n_steps = int(next(iter(shown.values()))["step_maps"][0].numel())
        figures.samples_figure(shown, n_steps, out / "samples.png")
        lines.append(f"![samples (seed {seed}) beside their order heatmaps, then the mean order map of each "
                     "arm](samples.png)")
    if steps:
        val = figures.val_curves(root, seed, sorted({a.model for a in exp.arms}))
        figures.curves_figure(steps, val, out / "curves.png")
        lines.append(f"![learning curves: every arm against training steps ({exp.budget.curve_samples} samples "
                     "a point), and the validation NLL logged in training](curves.png)")
    return lines, val


def keep_published(root: Path, out: Path, seeds: list[int]) -> None:
    """Copy experiment.json and each seed's metric files into the published folder (a later session on another
    machine reports them beside its own seeds)."""
    if (root / "experiment.json").is_file():
        shutil.copy(root / "experiment.json", out / "experiment.json")
    for seed in seeds:
        kept = out / "evals" / f"seed{seed}"
        for path in (root / f"seed{seed}" / "eval").glob("*.json"):
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, kept / path.name)


def by_kind(stage_processors: dict[str, list[str]]) -> dict[str, list[str]]:
    """{processor kind: the stages that ran on it}."""
    kinds = {}
    for stage, processors in stage_processors.items():
        for kind in processors:
            kinds.setdefault(kind, []).append(stage)
    return kinds


def processors_line(stage_processors: dict[str, list[str]]) -> str:
    kinds = by_kind(stage_processors)
    return "; ".join(f"{kind} ({len(stages)} stages)" for kind, stages in kinds.items()) or "not recorded"


def processors_note(stage_processors: dict[str, list[str]], pinned: bool) -> list[str]:
    """A warning when the stages of the table ran on more than one processor kind.

    The same command trains a different network on another kind (other SIMD kernels: a tokenizer trained on
    AVX2 and on AVX-512 reached ceiling FIDs 7.64 and 5.00, docs/study.md 2d). With the tokenizer and the
    feature network pinned, every seed shares them and only the per-seed networks differ by kind."""
    kinds = by_kind(stage_processors)
    if len(kinds) < 2:
        return []
    said = "; ".join(f"{kind}: {', '.join(stages[:4])}{', ...' if len(stages) > 4 else ''}"
                     for kind, stages in kinds.items())
    fix = ("The tokenizer and the feature network are pinned, so every seed shares its token grids and FID space; "
           "the networks of seeds trained on different kinds differ as seeds do." if pinned else
           "Seeds compare fairly only when they share the tokenizer and the feature network: pin them "
           "(`tokenizer:`, `feature_net:` in the experiment file, published with `--publish DIR --artefacts`).")
    return [f"**The stages of this table ran on more than one processor kind** ({said}). {fix}", ""]


def partial_note(by_seed: dict, arms: list[str], seeds: list[int]) -> list[str]:
    """A line naming the arms evaluated in fewer seeds than the report's (a report written mid-run)."""
    short = [f"{a} (seeds {', '.join(map(str, sorted(by_seed[a])))})"
             for a in arms if len(by_seed.get(a, {})) < len(seeds)]
    if not short:
        return []
    return [f"**Not every seed evaluated yet**; mean ± std over fewer seeds for: {'; '.join(short)}.", ""]


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


def describe_steps(exp: Experiment, model: str) -> str:
    """Training steps of a model, with those of the models it was distilled from."""
    spec, own = exp.models[model], exp.model_steps(model)
    return f"{describe_steps(exp, spec.init_from)} + {own}" if spec.init_from else str(own)
