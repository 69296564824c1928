"""Run the jobs of an experiment in dependency order, a few at once, and stop them all on a stop signal.

Every stage starts in its own session (so its own process group): the CLI and every process it starts (DDP
ranks, data workers) share that group, and a stop reaches all of them with one `killpg`. On SIGTERM or
SIGINT the runner sends the same signal to every running stage's group, waits up to `grace` seconds for the
groups to empty (a fit saves `last.ckpt` and exits), SIGKILLs what is left, and exits with 128 + the signal
number; a second signal skips the wait. A stage that exits with 128 + SIGTERM/SIGINT by itself (someone
stopped it) is "stopped", not "failed": the runner stops the others the same way. Rerunning the same command
resumes: finished stages are reused, an interrupted fit resumes from its `last.ckpt`, an extraction from its
shards.
"""

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from experiments.jobs import ROOT, Job

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_GRACE_S = 30.0  # a fit writes its last.ckpt in a second or two; a hung DDP rank never exits by itself
POLL_S = 1.0


class Stopped(SystemExit):
    """The runner was stopped by a signal (or a stage was): exit status 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


@dataclass
class StopRequest:
    """The stop signals received: set by the handlers, read by the loops (never raises inside a handler)."""

    event: threading.Event
    signum: int | None = None
    count: int = 0

    def handle(self, signum: int, _frame) -> None:
        self.signum, self.count = self.signum or signum, self.count + 1
        self.event.set()


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """SIGTERM and SIGINT recorded in a `StopRequest` while the block runs (the old handlers restored after)."""
    stop = StopRequest(threading.Event())
    old = {s: signal.signal(s, stop.handle) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def stopped_status(returncode: int) -> int | None:
    """The signal a stage's exit status says it was stopped by (143 / -15: SIGTERM, 130 / -2: SIGINT), else None."""
    for s in STOP_SIGNALS:
        if returncode in (128 + s, -s):
            return s
    return None


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal: still alive
        return True
    return True


def stop_groups(procs: dict[str, subprocess.Popen], signum: int, stop: StopRequest, grace: float) -> None:
    """Send `signum` to every stage's process group, wait up to `grace` s for them to empty, then SIGKILL.

    A second stop signal during the wait skips the rest of it."""
    count = stop.count
    for name, proc in procs.items():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        print(f"[stage] {name:<28} stopping ({signal.Signals(signum).name})", flush=True)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and stop.count == count:
        for proc in procs.values():
            proc.poll()  # reap the leader: a zombie would keep its group alive
        if not any(group_alive(p.pid) for p in procs.values()):
            return
        stop.event.clear()
        stop.event.wait(min(POLL_S, max(deadline - time.monotonic(), 0)))
    for name, proc in procs.items():
        if group_alive(proc.pid):
            print(f"[stage] {name:<28} still running after the stop signal: killed (SIGKILL)", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def log_path(job: Job) -> Path:
    return job.folder.parent / f"{job.folder.name}.log"


def start(job: Job, env: dict) -> subprocess.Popen:
    command = job.command()
    with open(log_path(job), "a") as log:  # the child keeps its own copy of the descriptor
        print(f"[stage] {job.name:<28} running (log {log.name})", flush=True)
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)


def run_jobs(jobs: list[Job], max_parallel: int, grace: float = STOP_GRACE_S) -> None:
    """Run unfinished jobs in dependency order, up to `max_parallel` at once.

    Raises:
        Stopped: on a stop signal (every stage stopped), or when a stage was stopped by one.
        SystemExit: at the first failed stage (the others are stopped first), naming its log.
    """
    pending = {j.name: j for j in jobs if not j.finished()}
    by_name = {j.name: j for j in jobs}
    for job in jobs:
        if job.name not in pending:
            print(f"[stage] {job.name:<28} reused ({job.folder})", flush=True)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with stop_signals() as stop:
        while pending or running:
            if stop.signum is None:
                start_ready(pending, running, by_name, max_parallel, env)
            if stop.signum is None:
                stop.event.wait(POLL_S)
            if stop.signum is not None:
                stop_groups({n: p for n, (p, _) in running.items()}, stop.signum, stop, grace)
                print(f"[runner] stopped by {signal.Signals(stop.signum).name}: rerun the same command to resume",
                      flush=True)
                raise Stopped(stop.signum)
            collect_finished(running, by_name, stop, grace)


def start_ready(pending: dict, running: dict, by_name: dict, max_parallel: int, env: dict) -> None:
    """Start every pending job whose inputs are done, while slots are free."""
    for name, job in list(pending.items()):
        blocked = any(d.name in pending or d.name in running for d in job.deps)
        busy = sum(by_name[r].slots for r in running)
        if busy + min(job.slots, max_parallel) <= max_parallel and not blocked:
            del pending[name]
            if job.finished():  # by another invocation in the meantime
                print(f"[stage] {name:<28} reused ({job.folder})", flush=True)
                continue
            running[name] = (start(job, env), time.perf_counter())


def collect_finished(running: dict, by_name: dict, stop: StopRequest, grace: float) -> None:
    """Mark the jobs that exited 0 finished; on a stopped or failed one, stop the others and raise."""
    for name, (proc, began) in list(running.items()):
        if proc.poll() is None:
            continue
        del running[name]
        job, code = by_name[name], proc.returncode
        if code == 0:
            job.mark_finished(time.perf_counter() - began)
            print(f"[stage] {name:<28} done in {time.perf_counter() - began:.0f} s", flush=True)
            continue
        signum = stopped_status(code)
        stop_groups({n: p for n, (p, _) in running.items()}, signum or signal.SIGTERM, stop, grace)
        if signum is not None:
            print(f"[stage] {name:<28} stopped by {signal.Signals(signum).name} (exit {code}): rerun the same "
                  "command to resume", flush=True)
            raise Stopped(signum)
        raise SystemExit(f"error: stage {name} failed (exit {code}); see {log_path(job)}")
