"""The arrows of docs/DESIGN.md: `models/`, `evaluation/` and `fileio` import no Lightning, and `models/`
imports nothing of `evaluation/` (networks and decoding only)."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PURE = ["models", "evaluation", "fileio"]


def imported_after(modules: list[str]) -> set[str]:
    """Top-level module names loaded by importing `modules` in a fresh interpreter."""
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def modules_of(package: str) -> list[str]:
    root = Path(REPO) / package
    return [f"{package}.{p.stem}" for p in sorted(root.glob("*.py")) if p.stem != "__init__"] or [package]


def test_pure_packages_import_no_lightning():
    loaded = imported_after([m for package in PURE for m in modules_of(package)])
    assert "lightning" not in loaded and "pytorch_lightning" not in loaded


def test_models_import_no_evaluation_code():
    loaded = imported_after(modules_of("models"))
    assert not {"evaluation", "callbacks", "lightning_modules", "benchmarks", "experiments"} & loaded
