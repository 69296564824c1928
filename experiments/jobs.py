"""The stages of an experiment as jobs: one `python run.py <argv>` (or `python -m <module> <argv>`) each, keyed by
what it was made from, finished when its product exists (`experiments/scheduler.py` runs them).

A stage is finished when its `done.json` records the key it ran with and its product exists; an unfinished
fit with the same key resumes from its `last.ckpt`; a stage with other settings starts from scratch after
its old folder is renamed `<folder>.replaced-<old key>` (nothing is deleted). `done.json` also records the
processor kinds the stage ran on (`experiments.machine.processor_kind`), one entry per kind it was started on.
"""

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from experiments.machine import cpu_model, processor_kind
from fileio import file_sha256, json_sha256, save_json

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "run.py"
MANIFEST = "artefacts.json"  # beside published artefacts: their sha256 and the processor kinds that made them


def config_files(names: list[str | Path]) -> list[Path]:
    """The config files `names` (relative to the repository, or absolute) and, after them, the files they include
    through a nested `config:` key (relative to the including file, as jsonargparse reads them), each once."""
    files, queue = [], [ROOT / n for n in names]
    while queue:
        path = queue.pop(0).resolve()
        if path in files or not path.is_file():
            continue
        files.append(path)
        included = (yaml.safe_load(path.read_text()) or {}).get("config") or []
        queue += [path.parent / n for n in ([included] if isinstance(included, str) else included)]
    return files


@dataclass
class Job:
    """One invocation `python <program> <argv>`, in `folder`, finished when `product` exists; the program is
    `run.py` (a CLI stage) or `-m <module>` (the evaluation)."""

    name: str
    folder: Path
    argv: list[str]
    product: Path
    deps: list["Job"] = field(default_factory=list)
    resumable_fit: bool = False
    program: tuple[str, ...] = (str(RUN_PY),)
    slots: int = 1  # processes it runs (a DDP extraction on two CPU processes takes two of `--jobs`)
    # What the program reads from `experiment.json` rather than its command line (an evaluation's arms and
    # budget): part of the key, so a changed arm or budget evaluates again instead of reusing a stale result.
    reads: dict = field(default_factory=dict)

    @property
    def is_cli(self) -> bool:
        return self.program == (str(RUN_PY),)

    def key(self) -> str:
        """Hash of the command line, the content of every config file it names (and of those they include), the
        keys of its inputs and what it reads from `experiment.json` (`reads`).

        Absolute paths enter it resolved, so one folder reached through a symlink or `..` keeps its key."""
        configs = [f.read_text() for f in config_files([a for a in self.argv if a.startswith("configs/")])]
        argv = [os.path.realpath(a) if a.startswith("/") else a for a in self.argv]
        upstream = [d.key() for d in self.deps]
        parts = [argv, configs, upstream] + ([self.reads] if self.reads else [])
        return json_sha256(parts)[:16]

    def state(self) -> dict:
        """What `done.json` holds ({} when there is none)."""
        marker = self.folder / "done.json"
        return json.loads(marker.read_text()) if marker.is_file() else {}

    def finished(self) -> bool:
        if not self.product.is_file():
            return False
        state = self.state()
        return state.get("key") == self.key() and state.get("finished", False)

    def command(self) -> list[str]:
        """The command to run now: a fit with this key's `last.ckpt` resumes from it. Records the start."""
        state = self.state()
        same = state.get("key") == self.key()
        last = self.folder / "checkpoints" / "last.ckpt"
        if not same and self.folder.exists():
            self.set_aside(state)  # other settings: start from scratch, keeping the old run
        self.folder.mkdir(parents=True, exist_ok=True)
        kinds = sorted({*(state.get("processors", []) if same else []), self.processor()})
        save_json({"key": self.key(), "argv": self.argv, "finished": False, "processors": kinds},
                  self.folder / "done.json", indent=1)
        resume = ["--ckpt_path", str(last)] if self.resumable_fit and same and last.is_file() else []
        return [sys.executable, *self.program, *self.argv, *resume]

    def set_aside(self, state: dict) -> None:
        """Rename the folder of a run made with other settings to `<folder>.replaced-<its key>` (never delete it)."""
        old = state.get("key", "unknown")
        target, n = self.folder.with_name(f"{self.folder.name}.replaced-{old}"), 1
        while target.exists():
            target, n = self.folder.with_name(f"{self.folder.name}.replaced-{old}-{n}"), n + 1
        self.folder.rename(target)
        print(f"[stage] {self.name:<28} settings changed: the previous run is kept in {target} "
              "(delete it when no longer needed)", flush=True)

    def mark_finished(self, seconds: float) -> None:
        state = self.state()
        save_json({"key": self.key(), "argv": self.argv, "finished": True, "wall_s": seconds,
                   "processors": state.get("processors", [self.processor()])}, self.folder / "done.json", indent=1)

    def processor(self) -> str:
        """The processor this stage computes on here: the CPU where its command line says so (CPU DDP), else
        the machine's kind (the GPU where there is one)."""
        forced = dict(zip(self.argv, self.argv[1:], strict=False)).get("--trainer.accelerator") == "cpu"
        return cpu_model() if forced else processor_kind()

    def processors(self) -> list[str]:
        """The processor kinds this stage ran on, as its done.json records them ([] when unknown)."""
        return self.state().get("processors", [])


class GivenFile(Job):
    """A product given by the experiment file (a pinned tokenizer): never run; its key is the file's content
    hash, so the stages after it are keyed by what it holds. The file was checked when the file was loaded."""

    def key(self) -> str:
        return file_sha256(self.product)[:16]

    def finished(self) -> bool:
        return True

    def processors(self) -> list[str]:
        """Where the file was made, as the manifest published beside it says ([] without one)."""
        manifest = self.product.parent / MANIFEST
        entries = json.loads(manifest.read_text()).values() if manifest.is_file() else []
        return next((e.get("processors", []) for e in entries if Path(e["path"]).name == self.product.name), [])
