"""A stop signal to the experiment runner stops every running stage and every process a stage started, the
runner exits with 128 + the signal, and the same command resumes (issue 31, item 3).

The runner runs in a subprocess (its signal handlers need a main thread of their own); every wait has a
timeout, so a hang fails the test instead of blocking the suite.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

# A stage: starts a child that sleeps, records both pids, then sleeps itself. IGNORE=1 makes both deaf to
# SIGTERM (a hung stage: only SIGKILL ends it); EXIT=<n> makes the stage exit with n at once (stopped by itself).
STAGE = """
import os, signal, subprocess, sys, time
from pathlib import Path
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
if os.environ.get("EXIT"):
    sys.exit(int(os.environ["EXIT"]))
if os.environ.get("IGNORE"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the child below
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
(folder / "pids").write_text(f"{os.getpid()} {child.pid}")
time.sleep(600)
"""
# The runner: two such stages side by side, then an exit code the test reads.
RUNNER = """
import sys
from pathlib import Path
from experiments.jobs import Job
from experiments.scheduler import run_jobs
tmp, stage = Path(sys.argv[1]), sys.argv[2]
jobs = [Job(n, tmp / n, [str(tmp / n)], tmp / n / "product", program=(stage,)) for n in ("a", "b")]
run_jobs(jobs, max_parallel=2, grace=float(sys.argv[3]))
"""


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def start_runner(tmp_path: Path, grace: float, **env) -> subprocess.Popen:
    stage = tmp_path / "stage.py"
    stage.write_text(STAGE)
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path), str(stage), str(grace)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def stage_pids(tmp_path: Path) -> list[int]:
    files = [tmp_path / n / "pids" for n in ("a", "b")]
    wait_for(lambda: all(f.is_file() and f.read_text() for f in files), 120, "both stages to start their child")
    return [int(p) for f in files for p in f.read_text().split()]


@pytest.mark.parametrize(("signum", "deaf"), [(signal.SIGTERM, False), (signal.SIGINT, False),
                                              (signal.SIGTERM, True)], ids=["SIGTERM", "SIGINT", "SIGTERM-ignored"])
def test_a_stop_signal_ends_every_stage_and_its_children_and_exits_128_plus_the_signal(signum, deaf, tmp_path):
    # A grace period a busy machine keeps: a stage that heeds the signal must never be killed for being slow.
    runner = start_runner(tmp_path, grace=10.0, **({"IGNORE": "1"} if deaf else {}))
    pids = stage_pids(tmp_path)
    runner.send_signal(signum)
    out, _ = runner.communicate(timeout=120)
    assert runner.returncode == 128 + signum, out
    wait_for(lambda: not any(alive(p) for p in pids), 30, f"the stages' processes {pids} to end")
    assert f"stopped by {signal.Signals(signum).name}: rerun the same command to resume" in out
    assert ("killed (SIGKILL)" in out) == deaf  # a stage deaf to the signal is killed after the grace period
    for name in ("a", "b"):  # neither is finished: a rerun starts (or resumes) them
        state = json.loads((tmp_path / name / "done.json").read_text())
        assert state["finished"] is False and state["processors"]


def test_a_stage_stopped_by_a_signal_is_stopped_not_failed(tmp_path):
    """A stage that exits 143 (SIGTERM reached it, not the runner) stops the runner the same way."""
    runner = start_runner(tmp_path, grace=2.0, EXIT="143")
    out, _ = runner.communicate(timeout=120)
    assert runner.returncode == 143, out
    assert "stopped by SIGTERM (exit 143): rerun the same command to resume" in out and "failed" not in out


def test_a_failed_stage_stops_the_others_and_names_its_log(tmp_path):
    runner = start_runner(tmp_path, grace=2.0, EXIT="3")
    out, _ = runner.communicate(timeout=120)
    assert runner.returncode == 1 and "failed (exit 3); see" in out and "a.log" in out, out


def smoke_runner(out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "experiments", "experiments/smoke.yaml", "--out", str(out), "--stop-grace", "60",
               "--set", "budget.train_processes=2", "budget.keep_every=0", *extra]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def processes_under(folder: Path) -> list[int]:
    """Live processes whose command line names `folder` (every stage's does: its run folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(folder) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return [p for p in found if p != os.getpid() and alive(p)]


@pytest.mark.slow
def test_the_smoke_experiment_stopped_during_a_ddp_fit_leaves_no_process_and_resumes(tmp_path):
    out = tmp_path / "runs"
    runner = smoke_runner(out)
    lines = []
    for line in runner.stdout:  # until the raster fit (DDP over two processes) has both ranks running
        lines.append(line)
        if "raster (seed 0)" in line and "running" in line:
            break
    wait_for(lambda: len(processes_under(out / "smoke" / "seed0" / "raster")) >= 2, 300, "both DDP ranks")
    runner.send_signal(signal.SIGTERM)
    rest, _ = runner.communicate(timeout=300)
    assert runner.returncode == 143, "".join(lines) + rest
    wait_for(lambda: not processes_under(out), 60, "every stage process to end")
    again = smoke_runner(out)
    printed, _ = again.communicate(timeout=1500)
    assert again.returncode == 0, printed
    assert "tokenizer" in printed and "reused" in printed and (out / "smoke" / "report.md").is_file()
