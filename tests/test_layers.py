"""The arrows of docs/DESIGN.md, checked for every package: each imports only the packages below it, and
`models/`, `evaluation/` and `fileio` import no Lightning.

    benchmarks (speed scripts) -> experiments (the study runner) -> run.py -> lightning_modules -> callbacks
    -> datamodules -> evaluation -> models -> fileio
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYERS = ["fileio", "models", "evaluation", "datamodules", "callbacks", "lightning_modules", "experiments",
          "benchmarks"]  # bottom first
TOP: list[str] = []  # packages that may import every layer (none: the order above is the rule)
PURE = ["models", "evaluation", "fileio"]


def project_imports(path: Path) -> set[str]:
    """The project packages a file imports (absolute imports, anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        found |= {n.split(".")[0] for n in names} & set(LAYERS + TOP)
    return found


def allowed_imports(package: str) -> set[str]:
    return set(LAYERS) | {package} if package in TOP else set(LAYERS[: LAYERS.index(package) + 1])


@pytest.mark.parametrize("package", LAYERS + TOP)
def test_each_package_imports_only_the_layers_below_it(package):
    allowed = allowed_imports(package)
    wrong = {f"{p.relative_to(REPO)} imports {sorted(project_imports(p) - allowed)}"
             for p in sorted((REPO / package).rglob("*.py")) if project_imports(p) - allowed}
    assert not wrong, sorted(wrong)


def test_the_rule_can_fail(tmp_path):
    """An upward import (evaluation importing datamodules), at module level or inside a function, is seen."""
    upward = tmp_path / "scene.py"
    upward.write_text("import torch\n\ndef f():\n    from datamodules.sources import SunsetSource\n")
    assert project_imports(upward) == {"datamodules"} and not project_imports(upward) <= allowed_imports("evaluation")


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
