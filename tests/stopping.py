"""Stopping runs with a signal, in tests: a beacon callback that tells where a run is, and a harness that starts
`python run.py ...` in a process group of its own, signals it there, and times how long its processes live on.

The harness signals only the processes it started: the whole group it created (`kill -- -PGID`, what a
scheduler or a process supervisor sends), the process it started (rank 0) or the rank whose pid the beacon
wrote (rank 1). Whatever happens, it ends by SIGKILLing what is left of that group, so a hang fails the test
instead of blocking the suite.

`python -m tests.stopping` prints the table of signal x target x phase -> exit status and seconds (each
tried twice) of the README's CPU DDP setting; see `main`.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch import Callback

from tests.ddp import ATTEMPTS, free_port, is_infrastructure_failure

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
START_TIMEOUT_S = 600  # until the phase to signal in is reached: a swamped 2-core machine may take minutes
# The bound on how long any process may live after the signal. Measured with `python -m tests.stopping`
# (2-process CPU DDP, tiny preset, a 2-core machine loaded 3-4x by other training runs): 0.6-2.1 s from the signal
# to the last process gone in 36 runs, 3.6-4.8 s with the small preset (the stop waits for the step under way),
# so 20 s leaves 4x headroom over the slowest.
EXIT_BOUND_S = 20.0


class Beacon(Callback):
    """Test only: tells the harness where the run is, by files in `folder`, slows it down, and may signal.

    Writes `rank<r>.pid` at setup, `sanity.rank<r>` in the sanity check, then `train.rank<r>` once training step
    `from_step` is done, `val.rank<r>` when a validation after that step starts, `predict.rank<r>` at the first
    predict batch. Sleeps
    `sleep_s` before every training, validation and predict batch, so each phase lasts long enough to be signalled.

    With `save_signal` (a signal number), it signals from inside the checkpoint saves (`on_save_checkpoint`) from
    step `from_step` on, `save_signals` times in all, writing `save.rank<r>` first: rank 0 signals its process
    group for `save_target` group, the named rank itself for rank0 / rank1.
    """

    def __init__(self, folder: str = "beacon", from_step: int = 2, sleep_s: float = 0.2, save_signal: int = 0,
                 save_target: str = "rank0", save_signals: int = 1) -> None:
        self.folder, self.from_step, self.sleep_s = Path(folder), from_step, sleep_s
        self.save_signal, self.save_target, self.save_signals = save_signal, save_target, save_signals

    def _mark(self, trainer, name: str) -> None:
        path = self.folder / f"{name}.rank{trainer.global_rank}"
        if not path.exists():
            path.write_text(str(os.getpid()))

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.pid").write_text(str(os.getpid()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        time.sleep(self.sleep_s)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.from_step:
            self._mark(trainer, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            self._mark(trainer, "sanity")
        elif trainer.global_step >= self.from_step:
            self._mark(trainer, "val")
        time.sleep(self.sleep_s)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._mark(trainer, "predict")
        time.sleep(self.sleep_s)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if not self.save_signal or self.save_signals < 1 or trainer.global_step < self.from_step or trainer.ckpt_path:
            return  # a resumed run (the stop line's command, run by a test) is left alone
        rank = trainer.global_rank
        if (self.save_target == "group" and rank == 0) or self.save_target == f"rank{rank}":
            self.save_signals -= 1
            self._mark(trainer, "save")
            if self.save_target != "group":
                os.kill(os.getpid(), self.save_signal)
            elif os.getpgrp() == os.getpid():  # only a group the harness made for this run (`start`), never the test's
                os.killpg(os.getpgrp(), self.save_signal)
            else:
                raise RuntimeError("Beacon: rank 0 does not lead its process group; start the run with tests.stopping")


def beacon_args(folder: str = "beacon", **init_args) -> tuple[str, str]:
    """The command-line arguments that add a `Beacon` (of these `init_args`) to a stage config's callbacks."""
    return ("--trainer.callbacks+", json.dumps({"class_path": "tests.stopping.Beacon",
                                                 "init_args": {"folder": folder, **init_args}}))


def live_pids(pgid: int) -> list[int]:
    """The processes of group `pgid` that still run (zombies, which only wait to be reaped, left out)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


@dataclass
class Stopped:
    """What one signalled run did: rank 0's exit status (None: still running at the bound), the seconds from the
    signal until the last process of its group was gone (None: some still ran at the bound), and its output."""

    returncode: int | None
    seconds: float | None
    output: str

    def line(self, prefix: str) -> str:
        """The output lines that start with `prefix`."""
        return "\n".join(x for x in self.output.splitlines() if x.startswith(prefix))


def start(args: list, cwd: Path, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """`python run.py *args` in `cwd`, as the leader of a new process group; output to `cwd/run.log`."""
    log = cwd / "run.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *map(str, args)], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


class EndedEarly(AssertionError):
    """The run ended before the phase to signal it in; `returncode` is its first process's status."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


def wait_for(paths: list[Path], procs: list[subprocess.Popen], log: Path, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until every file of `paths` exists; fail if a process ends first or nothing comes within `timeout`."""
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        ended = [p.returncode for p in procs if p.poll() is not None]
        if ended:
            raise EndedEarly(f"the run ended (status {ended}) before {[p.name for p in paths]}:\n"
                             f"{log.read_text()[-4000:]}", ended[0])
        if time.monotonic() > deadline:
            raise AssertionError(f"the run did not get to {[p.name for p in paths]} in {timeout:.0f} s:\n"
                                 f"{log.read_text()[-4000:]}")
        time.sleep(0.05)


def wait_gone(procs: list[subprocess.Popen], pgids: list[int], bound: float, t0: float) -> float | None:
    """Seconds from `t0` until every process of `procs` has exited and `pgids` hold no running process, or None
    if that took more than `bound`."""
    deadline = t0 + bound
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None
    while any(live_pids(g) for g in pgids):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return time.monotonic() - t0


def kill_groups(pgids: list[int]) -> None:
    """SIGKILL what is left of the process groups this harness created."""
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def signal_run(args: list, cwd: Path, phase: str, target: str, signum: int = signal.SIGTERM, ranks: int = 2,
               bound: float = EXIT_BOUND_S, env: dict | None = None) -> Stopped:
    """Start `python run.py *args` (with a `Beacon` in `args`), signal `target` once `phase` is reached, and wait.

    Args:
        phase: the beacon's mark to wait for on every rank: train, val or predict; or save: the beacon signals
            from inside a checkpoint save (its `save_signal` and `save_target` in `args`), and the harness only waits.
        target: group (every process the run started, DataLoader workers included), rank0, or rank1 (the pid
            the beacon wrote).
        ranks: the run's number of processes (2 for CPU DDP; 1 otherwise).

    A run whose process group fails to start (`tests.ddp.is_infrastructure_failure`) is started again.
    """
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return _signal_run_once(args, cwd, phase, target, signum, ranks, bound, env)
        except EndedEarly as err:
            if attempt == ATTEMPTS or not is_infrastructure_failure(str(err), err.returncode):
                raise
            shutil.rmtree(cwd / "beacon", ignore_errors=True)
    raise AssertionError("unreachable")


def _signal_run_once(args: list, cwd: Path, phase: str, target: str, signum: int, ranks: int, bound: float,
                     env: dict | None) -> Stopped:
    proc, log = start(args, cwd, env)
    pgid = proc.pid
    try:
        if phase == "save":
            wait_for([cwd / "beacon" / f"save.rank{1 if target == 'rank1' else 0}"], [proc], log)
            t0 = time.monotonic()
        else:
            wait_for([cwd / "beacon" / f"{phase}.rank{r}" for r in range(ranks)], [proc], log)
            t0 = time.monotonic()
            if target == "group":
                os.killpg(pgid, signum)
            else:
                os.kill(int((cwd / "beacon" / f"{target}.pid").read_text()), signum)
        seconds = wait_gone([proc], [pgid], bound, t0)
    finally:
        kill_groups([pgid])
        proc.wait()
    return Stopped(proc.returncode if seconds is not None else None, seconds, log.read_text())


def stage1_fit_args(max_steps: int = 12, ddp: bool = True, **beacon) -> list[str]:
    """A stage-1 fit of the tiny preset on 96 images (72 to train on, 24 to validate on): 3 steps an epoch, each epoch
    ending with a validation of 2 batches a process, and a `Beacon` of `beacon` (its init_args)."""
    args = ["fit", "--config", CONFIGS / "any_order.yaml", "--config", CONFIGS / "model/ar/tiny.yaml",
            "--data.init_args.source.init_args.num_images", "96", "--data.init_args.val_fraction", "0.25",
            "--data.init_args.batch_size", "8" if ddp else "16",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.max_epochs", "1000", "--trainer.max_steps", str(max_steps), "--trainer.max_time", "null",
            "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "3", "--fid", "null",
            *beacon_args(**beacon)]
    if ddp:
        args += ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2"]
    return [str(a) for a in args]


def tokenizer_folder(folder: Path) -> Path:
    """`folder` with a tiny tokenizer checkpoint in runs/tokenizer (the stage-1 fit's input), made in-process."""
    from tests.conftest import fit  # the suite's own tiny runs

    folder.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    try:
        os.chdir(folder)
        fit("tokenizer")
    finally:
        os.chdir(cwd)
    return folder


def stop_line(output: str) -> re.Match | None:
    """The `stopped by <SIGNAL> at step N; resume with: <command>` line of a fit's output, parsed."""
    return re.search(r"^stopped by (SIG\w+) at step (\d+); resume with: (.+ --ckpt_path (\S+))$", output, re.M)


def main() -> None:
    """Print the table of signal x target x phase -> exit status and seconds of a 2-process CPU DDP stage-1 fit."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="/tmp/oar_stopping")
    parser.add_argument("--bound", type=float, default=60.0, help="seconds to wait for the exit before SIGKILL")
    parser.add_argument("--signals", default="SIGTERM,SIGINT")
    parser.add_argument("--phases", default="train,val,save")
    parser.add_argument("--targets", default="group,rank0,rank1")
    parser.add_argument("--sleep", type=float, default=0.2, help="the beacon's sleep before each batch")
    parser.add_argument("--extra", default="", help="more run.py arguments (e.g. a size preset's --config)")
    opts = parser.parse_args()
    import torch

    root = Path(opts.out)
    base = tokenizer_folder(root / "base")
    print("| signal | target | phase | exit status | seconds to the last process gone | stop line: step = last.ckpt |")
    print("|---|---|---|---|---|---|")
    for name in opts.signals.split(","):
        signum = signal.Signals[name]
        for target in opts.targets.split(","):
            for phase in opts.phases.split(","):
                codes, secs, lines = [], [], []
                for k in range(opts.repeats):
                    folder = root / f"{name}-{target}-{phase}-{k}"
                    shutil.rmtree(folder, ignore_errors=True)
                    shutil.copytree(base, folder)
                    beacon = {"save_signal": int(signum), "save_target": target} if phase == "save" else {}
                    args = stage1_fit_args(sleep_s=opts.sleep, **beacon) + shlex.split(opts.extra)
                    res = signal_run(args, folder, phase, target, signum, bound=opts.bound)
                    codes.append("hang" if res.returncode is None else str(res.returncode))
                    secs.append(f">{opts.bound:.0f}" if res.seconds is None else f"{res.seconds:.1f}")
                    found, last = stop_line(res.output), folder / "runs/any_order/checkpoints/last.ckpt"
                    saved = torch.load(last, weights_only=True)["global_step"] if last.exists() else None
                    lines.append(f"{found.group(2)} = {saved}" if found else "none")
                print(f"| {name} | {target} | {phase} | {', '.join(codes)} | {', '.join(secs)} | {', '.join(lines)} |",
                      flush=True)


if __name__ == "__main__":
    main()
