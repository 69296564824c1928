"""The stages of an experiment as jobs (`benchmarks/experiment.py`): one `python <script> <argv>` each, keyed by
what it was made from, finished when its product exists, run in dependency order a few at once.

A stage is finished when its `done.json` records the key it ran with and its product exists; an unfinished
fit with the same key resumes from its `last.ckpt`; a stage with other settings starts from scratch after
its old folder is renamed `<folder>.replaced-<old key>` (nothing is deleted).
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fileio import file_sha256, save_json

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "run.py"


@dataclass
class Job:
    """One invocation `python <script> <argv>` (the CLI by default), in `folder`, finished when `product` exists."""

    name: str
    folder: Path
    argv: list[str]
    product: Path
    deps: list["Job"] = field(default_factory=list)
    resumable_fit: bool = False
    script: Path = RUN_PY
    slots: int = 1  # processes it runs (a DDP extraction on two CPU processes takes two of `--jobs`)

    def key(self) -> str:
        """Hash of the command line, the content of every config file it names and the keys of its inputs.

        Absolute paths enter it resolved, so one folder reached through a symlink or `..` keeps its key."""
        configs = [(ROOT / a).read_text() for a in self.argv if a.startswith("configs/") and (ROOT / a).is_file()]
        argv = [os.path.realpath(a) if a.startswith("/") else a for a in self.argv]
        upstream = [d.key() for d in self.deps]
        return hashlib.sha256(json.dumps([argv, configs, upstream]).encode()).hexdigest()[:16]

    def finished(self) -> bool:
        marker = self.folder / "done.json"
        if not (marker.is_file() and self.product.is_file()):
            return False
        state = json.loads(marker.read_text())
        return state.get("key") == self.key() and state.get("finished", False)

    def command(self) -> list[str]:
        """The command to run now: a fit with this key's `last.ckpt` resumes from it."""
        marker = self.folder / "done.json"
        same = marker.is_file() and json.loads(marker.read_text()).get("key") == self.key()
        last = self.folder / "checkpoints" / "last.ckpt"
        if not same and self.folder.exists():
            self.set_aside(marker)  # other settings: start from scratch, keeping the old run
        self.folder.mkdir(parents=True, exist_ok=True)
        save_json({"key": self.key(), "argv": self.argv, "finished": False}, marker, indent=1)
        resume = ["--ckpt_path", str(last)] if self.resumable_fit and same and last.is_file() else []
        return [sys.executable, str(self.script), *self.argv, *resume]

    def set_aside(self, marker: Path) -> None:
        """Rename the folder of a run made with other settings to `<folder>.replaced-<its key>` (never delete it)."""
        old = json.loads(marker.read_text()).get("key", "unknown") if marker.is_file() else "unknown"
        target, n = self.folder.with_name(f"{self.folder.name}.replaced-{old}"), 1
        while target.exists():
            target, n = self.folder.with_name(f"{self.folder.name}.replaced-{old}-{n}"), n + 1
        self.folder.rename(target)
        print(f"[stage] {self.name:<28} settings changed: the previous run is kept in {target} "
              "(delete it when no longer needed)", flush=True)

    def mark_finished(self, seconds: float) -> None:
        save_json({"key": self.key(), "argv": self.argv, "finished": True, "wall_s": seconds},
                  self.folder / "done.json", indent=1)


class GivenFile(Job):
    """A product given by the experiment file (e.g. a tokenizer trained elsewhere): never run; its key is
    the file's content hash, so the stages after it are keyed by what it holds."""

    def key(self) -> str:
        return file_sha256(self.product)[:16]

    def finished(self) -> bool:
        if not self.product.is_file():
            raise SystemExit(f"error: {self.name} {self.product} not found: fix `tokenizer:` in the experiment file")
        return True


def run_jobs(jobs: list[Job], max_parallel: int) -> None:
    """Run unfinished jobs in dependency order, up to `max_parallel` at once; stop at the first failure."""
    pending = {j.name: j for j in jobs if not j.finished()}
    for job in jobs:
        if job.name not in pending:
            print(f"[stage] {job.name:<28} reused ({job.folder})", flush=True)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    while pending or running:
        for name, job in list(pending.items()):
            blocked = any(d.name in pending or d.name in running for d in job.deps)
            busy = sum(next(j for j in jobs if j.name == r).slots for r in running)
            if busy + min(job.slots, max_parallel) <= max_parallel and not blocked:
                if job.finished():  # by another invocation in the meantime
                    print(f"[stage] {name:<28} reused ({job.folder})", flush=True)
                    del pending[name]
                    continue
                command = job.command()
                log = open(job.folder.parent / f"{job.folder.name}.log", "a")  # noqa: SIM115 - closed with the process
                print(f"[stage] {name:<28} running (log {log.name})", flush=True)
                running[name] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log),
                                 time.perf_counter())
                del pending[name]
        time.sleep(2)
        for name, (proc, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            job = next(j for j in jobs if j.name == name)
            if proc.returncode != 0:
                for other, _ in running.values():
                    other.terminate()
                raise SystemExit(f"error: stage {name} failed (exit {proc.returncode}); see "
                                 f"{job.folder.parent / (job.folder.name + '.log')}")
            job.mark_finished(time.perf_counter() - start)
            print(f"[stage] {name:<28} done in {time.perf_counter() - start:.0f} s", flush=True)
