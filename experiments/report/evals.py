"""What a report reads: the metric files of every seed (a run's own, else those published before), the
per-seed differences of paired arms, and what each stage's `done.json` recorded (wall time, processor kinds).
"""

import json
from pathlib import Path

from experiments.report.tables import PAIRED_METRICS


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

def stage_times(root: Path) -> dict[str, float]:
    """Wall seconds of every finished stage (from its done.json), by folder."""
    times = {}
    for marker in sorted(root.rglob("done.json")):
        state = json.loads(marker.read_text())
        if state.get("finished") and "wall_s" in state:
            times[str(marker.parent.relative_to(root))] = state["wall_s"]
    return times
