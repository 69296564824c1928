"""A stop signal ends a run on every rank within seconds, at a step boundary, with `last.ckpt` written.

SIGTERM (a scheduler's job end or preemption, `kill`, a process supervisor) or SIGINT (Ctrl-C) may reach every
process, rank 0 only or another rank only, at any moment. The handler only records the signal. At the next step
boundary (the end of a training step, or of a validation, test or predict batch) every rank all-reduces what
it received, so all ranks reach the same verdict at the same point and leave together: a fit writes
`last.ckpt` of that step (atomically, through `callbacks.checkpointing.LastCheckpoint`), rank 0 prints one line
naming the command that resumes, and every process exits with status 128 + the signal number (143 for SIGTERM,
130 for SIGINT). A second signal while stopping exits at once, without touching the checkpoint.

On SLURM, Lightning's `SLURMEnvironment` decides whether a job is requeued (`auto_requeue`, on by default) and on
which signal (`requeue_signal`, SIGUSR1, which `#SBATCH --signal=SIGUSR1@90` sends 90 s before the time
limit): that signal stops the run the same way, then rank 0 requeues the job with `scontrol requeue` (with
`auto_requeue: false` it only stops), and the requeued job resumes from `last.ckpt` through `--ckpt_path last`
(docs/clusters.md).

Why not Lightning's own handling: in Lightning 2.6.6 (since 2.5.2, pull request 20825) the SIGTERM handler,
`_SignalConnector._sigterm_notifier_fn`, runs `torch.distributed.broadcast` inside the handler on every rank the
signal reaches, and rank 0 forwards SIGTERM to the ranks it launched. Under a SIGTERM to the whole process group,
a rank that has already handled the group's signal when rank 0's forwarded one arrives handles SIGTERM twice
(two broadcasts, rank 0 one): the ranks no longer issue the same collectives and wait for each other for good
(3 hangs in 5 tries of the README's CPU DDP setting here). When it does not hang it exits with status 0, or
dies of a gloo error on the other rank when one rank alone is signalled; its SLURM requeue handler likewise
saves a checkpoint (collectives) inside the signal handler. This callback takes SIGTERM, SIGINT and the requeue
signal over for the whole run. The workarounds of Lightning's own code: `_silence_lightning_notifier` (the hang)
and `_detach_children` (its child-process observer would SIGKILL rank 0 when a launched rank exits non-zero).
"""

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from callbacks.checkpointing import LastCheckpoint

log = logging.getLogger("oar.stop")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
CHILDREN_WAIT_S = 10.0  # rank 0 waits this long for the ranks it launched to exit, then kills what is left
REQUEUE_TIMEOUT_S = 30.0


class StopRequested(SystemExit):
    """Every rank leaves the run with this (a SystemExit: no traceback; the status is 128 + the signal number)."""


class StopOnSignal(Callback):
    """Stops every rank at the next step boundary after a stop signal reaches any of them (module docstring).

    run.py adds it to every stage's Trainer; nothing to configure. Signals are handled from the Trainer's setup
    until its teardown; before that (argument parsing, the token cache build) a signal has its usual effect.
    """

    def __init__(self) -> None:
        self._signum = 0  # the first stop signal this process received (0: none)
        self._requeue = False  # whether it was the SLURM requeue signal
        self._step_checked = -1  # the global step of the last training-step check
        self._saved: dict = {}  # the handlers this callback replaced, restored at teardown
        self._originals: dict = {}  # the same, kept: a handler of ours set again after teardown defers to them
        self._requeue_signal: int | None = None
        self._trainer: Trainer | None = None
        self._children: list = []  # rank 0 of a local DDP run, once stopping: the ranks it launched
        self._batches = 0  # validation, test or predict batches done (the stop line of a run that is not a fit)

    # ---- the handler: it only records the signal (a collective here would be Lightning's hang) ----------------
    def _handle(self, signum: int, frame) -> None:
        if self._trainer is None:  # the run is over (Lightning's teardown of a crashed run may set ours again)
            return _defer(self._originals.get(signum), signum, frame)
        if self._signum:  # a second signal: leave now, whatever is being written
            name = signal.Signals(signum).name
            os.write(2, f"second stop signal ({name}): exiting at once; the checkpoint is left as it was\n".encode())
            self._kill_children()
            os._exit(128 + signum)
        self._signum, self._requeue = signum, signum == self._requeue_signal
        if self._trainer.is_global_zero:
            # os.write: the buffered sys.stderr may be in the middle of a write that this handler interrupted.
            os.write(2, f"{signal.Signals(signum).name} received: stopping at the end of this step or batch (send it "
                        "again to stop at once, without a checkpoint)\n".encode())

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (a Trainer run from a thread keeps Lightning's)
        self._trainer, self._signum, self._requeue = trainer, 0, False
        signums = list(STOP_SIGNALS)
        env = trainer._accelerator_connector.cluster_environment  # where Lightning's signal connector looks too
        slurm_signal = env.requeue_signal if isinstance(env, SLURMEnvironment) else None
        if slurm_signal is not None:  # Lightning then leaves it to us (it only sets a handler where none is)
            signums.append(int(slurm_signal))
        self._requeue_signal = int(slurm_signal) if slurm_signal is not None and env.auto_requeue else None
        for signum in signums:
            self._saved[signum] = signal.signal(signum, self._handle)
        self._originals = dict(self._saved)
        _silence_lightning_notifier(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, StopRequested):  # a stopping process keeps them: a second signal exits at once
            self._restore()

    def _restore(self) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._saved, self._trainer = {}, None

    # ---- the step boundaries ------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step != self._step_checked:  # an optimizer step was taken (not an accumulation batch)
            self._step_checked = trainer.global_step
            self._check(trainer)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._batches = batch_idx + 1
        self._check(trainer)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._batches = batch_idx + 1
        self._check(trainer)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        self._batches = batch_idx + 1  # after the writers' hooks (run.py adds this callback last): the batch is written
        self._check(trainer)

    def _check(self, trainer: Trainer) -> None:
        """Every rank takes part; all stop together if any received a stop signal."""
        if self._trainer is None:
            return
        mine = torch.tensor([float(self._signum), float(self._requeue)], device=trainer.strategy.root_device)
        agreed = trainer.strategy.reduce(mine, reduce_op="max")
        signum, requeue = int(agreed[0]), bool(agreed[1])
        if signum:
            self._stop(trainer, signum, requeue)

    # ---- stopping -----------------------------------------------------------------------------------------------
    def _stop(self, trainer: Trainer, signum: int, requeue: bool) -> None:
        self._signum = self._signum or signum  # a rank that received nothing treats a later signal as the second
        self._children = _detach_children(trainer)
        saved, what = self._save(trainer)
        trainer.strategy.barrier("StopOnSignal.stop")
        if trainer.is_global_zero:
            name = signal.Signals(signum).name
            line = f"stopped by {name} {what}"
            if requeue:
                line += f"; {_requeue_slurm_job()}; the requeued job resumes from {saved or 'the start'}"
                line += " (its command has --ckpt_path last, docs/clusters.md)"
            elif saved:
                line += f"; resume with: {_resume_command(saved)}"
            elif trainer.state.fn == TrainerFn.PREDICTING:
                line += ("; rerun the same command (it goes on from the batches it finished): "
                         f"{_same_command(trainer)}")
            else:
                line += f"; rerun the same command: {_same_command(trainer)}"
            print(line, file=sys.stderr, flush=True)
        _wait_for(self._children, 128 + signum)  # a node's local rank 0 for the ranks it launched (none elsewhere)
        raise StopRequested(128 + signum)

    def _save(self, trainer: Trainer) -> tuple[str, str]:
        """Write last.ckpt of this step (a fit past its sanity check); returns its path ('' if none) and what the
        stop line says of where the run stopped."""
        fn, step = trainer.state.fn, trainer.global_step
        if fn != TrainerFn.FITTING:
            return "", f"after {self._batches} {fn.value} batches"
        if trainer.sanity_checking:
            return "", f"in the sanity check, before step {step + 1}"
        if trainer.fast_dev_run:
            return "", f"at step {step} (fast_dev_run saves no checkpoint)"
        last = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, LastCheckpoint)), None)
        if last is None:
            return "", (f"at step {step} without a checkpoint: trainer.callbacks has no "
                        "callbacks.checkpointing.LastCheckpoint (the stage configs have one); add it")
        return last.save_now(trainer), f"at step {step}"

    def _kill_children(self) -> None:
        """Rank 0 of a local DDP run: SIGKILL the ranks it launched (a second signal leaves no rank behind)."""
        launcher = getattr(getattr(self._trainer, "strategy", None), "launcher", None)
        for proc in [*(getattr(launcher, "procs", None) or []), *self._children]:
            if proc.poll() is None:
                proc.kill()


def _silence_lightning_notifier(trainer: Trainer) -> None:
    """Lightning 2.6.6's SIGTERM handler broadcasts inside the handler and forwards SIGTERM to the launched ranks
    (module docstring): the Trainer registers it after the setup hooks, composed with the handler found then
    (ours), so ours is made its only effect. Its per-step `_broadcast_sigterm_tensor` stays harmless: with
    `trainer.received_sigterm` never set, it broadcasts 0 on every rank at the same point of every step."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None:
        connector._sigterm_notifier_fn = _ignore


def _ignore(signum, frame) -> None:
    return None


def _defer(handler, signum: int, frame) -> None:
    """Do what `handler`, a handler `signal.signal` returned, would have done with the signal."""
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:  # the default action (SIG_DFL, or None: a handler set outside Python)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _detach_children(trainer: Trainer) -> list:
    """Rank 0 of a local DDP run: take the launched ranks away from Lightning's child-process observer.

    The observer (Lightning 2.6.6 `_ChildProcessObserver`, every 5 s) SIGKILLs rank 0 as soon as a launched rank
    has exited with a non-zero status, as every rank does here (128 + the signal number); it reads the launcher's
    list of processes, so emptying that list stops it, and rank 0 waits for them itself (`_wait_for`).
    """
    procs = getattr(getattr(trainer.strategy, "launcher", None), "procs", None)
    if not procs:
        return []
    children = list(procs)
    procs.clear()
    return children


def _wait_for(children: list, status: int) -> None:
    """Wait for the launched ranks to exit (with `status`, as this one will), killing any left after a while."""
    deadline = time.monotonic() + CHILDREN_WAIT_S
    for proc in children:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("rank process %d did not exit within %.0f s of the stop: killing it", proc.pid,
                        CHILDREN_WAIT_S)
            proc.kill()
            proc.wait()
        if proc.returncode != status:
            log.warning("rank process %d exited with status %s, not %d", proc.pid, proc.returncode, status)


def _requeue_slurm_job() -> str:
    """`scontrol requeue <job>`, the job id as Lightning 2.6.6 forms it (array jobs: <array job>_<task>); returns
    what the stop line says about it."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID", "")
    if not job:
        return "not requeued: SLURM_JOB_ID is not set (submit the job with sbatch)"
    cmd = ["scontrol", "requeue", job]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=REQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"requeueing failed ({err}): requeue it yourself with `{shlex.join(cmd)}`"
    if result.returncode != 0:
        why = (result.stderr or result.stdout).strip().splitlines()[-1:] or [f"status {result.returncode}"]
        return f"requeueing failed ({why[0]}): requeue it yourself with `{shlex.join(cmd)}`"
    return f"requeued SLURM job {job}"


def _argv() -> list[str] | None:
    """This process's `run.py` arguments, when it was started as `python run.py ...` (else None)."""
    return sys.argv[1:] if sys.argv and Path(sys.argv[0]).name == "run.py" else None


def _same_command(trainer: Trainer) -> str:
    argv = _argv()
    return shlex.join(["python", sys.argv[0], *argv]) if argv else f"python run.py {trainer.state.fn.value} ..."


def _resume_command(ckpt: str) -> str:
    """This run's command with `--ckpt_path <ckpt>` (in place of the one it had)."""
    argv = _argv()
    if argv is None:
        return f"python run.py fit ... --ckpt_path {shlex.quote(ckpt)}"
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join(["python", sys.argv[0], *kept, "--ckpt_path", ckpt])
