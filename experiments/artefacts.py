"""A study's shared artefacts, published beside its results so that a table can grow on any machine.

Every seed of a table shares the tokenizer (its token grids) and the domain feature network (its FID space).
Trained again on another processor kind they come out different (a tokenizer trained by the same command on
AVX2 and on AVX-512 reached reconstruction-ceiling FIDs 7.64 and 5.00, docs/study.md 2d), so a seed added
elsewhere would not be comparable. `python -m experiments FILE --publish results/<name> --artefacts` copies
both into `results/<name>/artefacts/` with `artefacts.json` (sha256, size, the processor kinds that made them)
and prints the lines that pin them in the experiment file:

    tokenizer: {path: results/<name>/artefacts/tokenizer.ckpt, sha256: "..."}
    feature_net: {path: results/<name>/artefacts/feature_net.pt, sha256: "..."}

A pinned file is checked (present, same sha256) before anything runs, and used instead of training one; the
stages after a pinned tokenizer are keyed by its content.
"""

import shutil
from pathlib import Path

from experiments.jobs import MANIFEST
from experiments.plan import feature_net_path
from experiments.spec import ROOT, Experiment
from fileio import atomic_write, file_sha256, save_json

FILES = {"tokenizer": ("tokenizer.ckpt", "tokenizer"), "feature_net": ("feature_net.pt", "rows")}  # name, made by


def shown_path(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (what an experiment file names), else absolute."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def sources(exp: Experiment, root: Path) -> dict[str, Path]:
    """The files the run in `root` used: its tokenizer checkpoint and its feature network."""
    return {"tokenizer": Path(exp.tokenizer_ckpt), "feature_net": feature_net_path(exp, root.parent)}


def publish_artefacts(exp: Experiment, root: Path, publish: Path) -> dict:
    """Copy the run's tokenizer and feature network into `publish/artefacts/` (atomically), write their
    manifest and print the pinning lines; returns the manifest."""
    folder = publish / "artefacts"
    manifest = {}
    for what, source in sources(exp, root).items():
        if not source.is_file():
            raise SystemExit(f"error: {what} {source} not found: run the experiment (its tokenizer and rows stages) "
                             "before publishing its artefacts")
        name, made_by = FILES[what]
        target = folder / name
        if source.resolve() != target.resolve():
            atomic_write(target, lambda tmp, source=source: shutil.copyfile(source, tmp))
        manifest[what] = {"path": shown_path(target), "sha256": file_sha256(target), "bytes": target.stat().st_size,
                          "processors": exp.stages.get(made_by, {}).get("processors", []),
                          "made_from": shown_path(source)}
    save_json(manifest, folder / MANIFEST, indent=1)
    print(f"[artefacts] {folder}: " + ", ".join(f"{w} {m['bytes'] / 1e6:.1f} MB" for w, m in manifest.items()))
    print("[artefacts] pin them in the experiment file (another machine then reuses them):")
    for what, entry in manifest.items():
        print(f"{what}: {{path: {entry['path']}, sha256: \"{entry['sha256']}\"}}")
    return manifest
