"""A stop signal stops every process of a run within seconds, with a fresh `last.ckpt` (callbacks/preemption.py).

Every run is `python run.py ...` in a process group of its own (`tests/stopping.py`), signalled at a phase that a
beacon callback reports: SIGTERM to the whole group, to rank 0 or to rank 1, during training, during validation
or from inside a checkpoint save. Checked: every process is gone within the issue's 20 s
(`tests.stopping.EXIT_BOUND_S`), rank 0 exits with 128 + the signal number and names the resume command, and
that command resumes to the step count of an uninterrupted run. Then the SLURM requeue path (a stand-in
`scontrol`), a second signal, an extraction, and the pieces of the mechanism on their own.
"""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback

from callbacks.checkpointing import TEMP_NAME
from callbacks.finite import NonFiniteError
from callbacks.preemption import StopOnSignal, _requeue_slurm_job, _resume_command
from tests.conftest import (
    ORDERS,
    QUIET,
    REPO,
    SMALL_DATA,
    STAGE1_CKPT,
    config,
    copy_run,
    fit,
    predict,
    run_cli,
    stage_configs,
    tiny_preset,
)
from tests.ddp import free_port, run_cli_subprocess
from tests.stopping import (
    EXIT_BOUND_S,
    beacon_args,
    kill_groups,
    live_pids,
    signal_run,
    stage1_fit_args,
    stop_line,
    tokenizer_folder,
    wait_for,
    wait_gone,
)
from tests.test_checkpointing import HUGE_LR, MID_EPOCH
from tests.test_pipeline import adam_step, load_ckpt

LAST = Path("runs/any_order/checkpoints/last.ckpt")
MAX_STEPS = 12  # stage1_fit_args: 3 steps an epoch, a validation after each; the signals come at steps 2-4


@pytest.fixture(scope="module")
def tokenizer_base(tmp_path_factory) -> Path:
    """A folder holding a tiny tokenizer checkpoint (stage 1's input) and nothing else."""
    return tokenizer_folder(tmp_path_factory.mktemp("stopping_base"))


@pytest.fixture(scope="module")
def uninterrupted(tokenizer_base, tmp_path_factory) -> dict:
    """last.ckpt of the 2-process fit the signalled ones are, run to its end without a signal."""
    folder = copy_run(tokenizer_base, tmp_path_factory.mktemp("uninterrupted"))
    run_cli_subprocess(stage1_fit_args(sleep_s=0.0), folder, REPO)
    return load_ckpt(folder / LAST)


def fresh(base: Path, tmp_path: Path) -> Path:
    return copy_run(base, tmp_path / "run")


def check_stopped(result, signum: int, folder: Path) -> int:
    """Every process gone within the bound, rank 0's status 128 + signum, one stop line naming the resume command,
    and last.ckpt of the step it names; returns that step."""
    assert result.seconds is not None, f"still running {EXIT_BOUND_S} s after the signal:\n{result.output[-4000:]}"
    assert result.returncode == 128 + signum, result.output[-4000:]
    assert result.line("stopped by").count("\n") == 0, result.output[-4000:]  # one line, by rank 0 only
    found = stop_line(result.output)
    assert found and found.group(1) == signal.Signals(signum).name, result.output[-4000:]
    assert found.group(4) == str(LAST) and load_ckpt(folder / LAST)["global_step"] == int(found.group(2))
    assert "exited with status" not in result.output  # rank 0 saw every launched rank exit with the same status
    assert not (folder / LAST).with_name(TEMP_NAME).exists()
    return int(found.group(2))


def resume(result, folder: Path, ddp: bool = True, monkeypatch=None) -> dict:
    """Run the command the stop line names (one process: in this one); returns the last.ckpt it leaves."""
    command = shlex.split(stop_line(result.output).group(3))
    assert command[:2] == ["python", str(REPO / "run.py")] and command[2] == "fit"
    if ddp:
        run_cli_subprocess(command[2:], folder, REPO)
    else:
        monkeypatch.chdir(folder)
        run_cli(*command[2:])
    return load_ckpt(folder / LAST)


def same_count(resumed: dict, reference: dict) -> None:
    """The step count (global step, optimizer steps, epoch) of the uninterrupted run."""
    assert resumed["global_step"] == reference["global_step"] == MAX_STEPS
    assert adam_step(resumed) == adam_step(reference) == MAX_STEPS  # no step lost or taken twice
    assert resumed["epoch"] == reference["epoch"]


# ---- 2-process CPU DDP: SIGTERM to the group / rank 0 / rank 1, in training / validation / a checkpoint save -------
@pytest.mark.slow
@pytest.mark.parametrize("phase", ["train", "val", "save"])
@pytest.mark.parametrize("target", ["group", "rank0", "rank1"])
def test_ddp_fit_stops_on_sigterm_and_resumes(target, phase, tokenizer_base, uninterrupted, tmp_path):
    folder = fresh(tokenizer_base, tmp_path)
    beacon = {"save_signal": int(signal.SIGTERM), "save_target": target} if phase == "save" else {}
    result = signal_run(stage1_fit_args(**beacon), folder, phase, target)
    step = check_stopped(result, signal.SIGTERM, folder)
    assert 2 <= step < MAX_STEPS
    saved = load_ckpt(folder / LAST)
    assert adam_step(saved) == step
    same_count(resume(result, folder), uninterrupted)


# ---- one process --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_single_process_fit_stops_and_resumes(signum, tokenizer_base, tmp_path, monkeypatch):
    folder = fresh(tokenizer_base, tmp_path)
    result = signal_run(stage1_fit_args(ddp=False), folder, "train", "rank0", signum, ranks=1)
    step = check_stopped(result, signum, folder)
    resumed = resume(result, folder, ddp=False, monkeypatch=monkeypatch)
    assert resumed["global_step"] == MAX_STEPS and adam_step(resumed) == MAX_STEPS and step < MAX_STEPS


@pytest.mark.slow
def test_a_stop_in_the_sanity_check_saves_nothing_and_names_the_same_command(tokenizer_base, tmp_path):
    folder = fresh(tokenizer_base, tmp_path)
    result = signal_run(stage1_fit_args(ddp=False, sleep_s=1.0), folder, "sanity", "rank0", ranks=1)
    assert result.seconds is not None and result.returncode == 128 + signal.SIGTERM, result.output[-4000:]
    line = result.line("stopped by")
    assert line.startswith("stopped by SIGTERM in the sanity check, before step 1; rerun the same command: python ")
    assert "--ckpt_path" not in line and not (folder / LAST).exists()


@pytest.mark.slow
def test_a_group_signal_leaves_the_dataloader_workers_to_the_main_process(tmp_path):
    """Image-mode loaders (the tokenizer stage) may have worker processes, which a group SIGTERM reaches too."""
    args = ["fit", "--config", config("tokenizer"), "--config", config("model/tokenizer/tiny"), *SMALL_DATA, *QUIET,
            "--data.init_args.num_workers", "2", "--trainer.max_steps", "40", "--trainer.max_time", "null",
            *beacon_args()]
    result = signal_run(args, tmp_path, "train", "group", ranks=1)
    assert result.seconds is not None and result.returncode == 128 + signal.SIGTERM, result.output[-4000:]
    assert "DataLoader worker" not in result.output
    found = stop_line(result.output)
    assert found and load_ckpt(tmp_path / found.group(4))["global_step"] == int(found.group(2))


@pytest.mark.slow
def test_second_signal_exits_at_once_without_touching_the_checkpoint(tokenizer_base, tmp_path):
    """The first SIGTERM comes inside the save of the best checkpoint after the validation of step 3, the second
    inside the stop's save of last.ckpt at step 4: the process exits there, leaving last.ckpt of step 3."""
    folder = fresh(tokenizer_base, tmp_path)
    args = stage1_fit_args(ddp=False, from_step=3, save_signal=int(signal.SIGTERM), save_signals=2)
    result = signal_run(args, folder, "save", "rank0", ranks=1)
    assert result.seconds is not None and result.returncode == 128 + signal.SIGTERM, result.output[-4000:]
    assert "second stop signal (SIGTERM): exiting at once" in result.output
    assert "stopped by" not in result.output
    assert not (folder / LAST).exists()  # the stop's save was cut off before it wrote anything; nothing else wrote
    assert not list((folder / LAST).parent.glob("*.tmp"))
    [best] = (folder / LAST).parent.glob("best-*.ckpt")  # the save the first signal came in finished, whole
    assert load_ckpt(best)["global_step"] == 3


# ---- SLURM: the requeue signal, with a stand-in scontrol ----------------------------------------------------------
def fake_scontrol(folder: Path) -> tuple[Path, Path]:
    """A `scontrol` on a folder for PATH that records its arguments and the job id it saw; returns (bin, record)."""
    bin_dir, record = folder / "bin", folder / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@ (SLURM_JOB_ID=$SLURM_JOB_ID)" >> {record}\n')
    (bin_dir / "scontrol").chmod(0o755)
    return bin_dir, record


def slurm_env(rank: int, bin_dir: Path, port: int) -> dict:
    """What `srun` gives each task of `sbatch --nodes 1 --ntasks-per-node 2` (job 4242)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "oar-test", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
            "SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def srun(args: list[str], folder: Path, bin_dir: Path) -> list[subprocess.Popen]:
    """Both tasks of the job, as srun starts them (each its own process, in one new process group)."""
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **slurm_env(rank, bin_dir, port)}
        log = open(folder / f"task{rank}.log", "w")  # the process keeps its own copy of the descriptor
        procs.append(subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=folder, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, process_group=procs[0].pid if procs else 0))
        log.close()
    return procs


@pytest.mark.slow
def test_slurm_requeue_signal_saves_requeues_and_the_requeued_job_resumes(tokenizer_base, uninterrupted, tmp_path):
    folder = fresh(tokenizer_base, tmp_path)
    bin_dir, record = fake_scontrol(tmp_path)
    args = [*stage1_fit_args(), "--ckpt_path", "last"]  # the sbatch recipe's (docs/clusters.md)
    procs = srun(args, folder, bin_dir)
    pgid = procs[0].pid
    try:
        wait_for([folder / "beacon" / f"train.rank{r}" for r in range(2)], procs, folder / "task0.log")
        t0 = time.monotonic()
        os.killpg(pgid, signal.SIGUSR1)  # sbatch --signal=SIGUSR1@90: every task gets it
        seconds = wait_gone(procs, [pgid], EXIT_BOUND_S, t0)
    finally:
        kill_groups([pgid])
        for proc in procs:
            proc.wait()
    output = (folder / "task0.log").read_text()
    assert seconds is not None, output[-4000:]
    assert [p.returncode for p in procs] == [128 + signal.SIGUSR1] * 2, output[-4000:]
    assert record.read_text() == "requeue 4242 (SLURM_JOB_ID=4242)\n"  # once, by rank 0
    line = next(x for x in output.splitlines() if x.startswith("stopped by"))
    assert line.startswith("stopped by SIGUSR1 at step ") and "requeued SLURM job 4242" in line, line
    step = int(line.split()[5].rstrip(";"))
    assert load_ckpt(folder / LAST)["global_step"] == step and step < MAX_STEPS

    # The requeued job runs the same command: --ckpt_path last picks up last.ckpt.
    procs = srun(args, folder, bin_dir)
    try:
        for proc in procs:
            proc.wait(timeout=600)
    finally:
        kill_groups([procs[0].pid])
    output = (folder / "task0.log").read_text()
    assert [p.returncode for p in procs] == [0, 0], output[-4000:]
    assert "Restoring states from the checkpoint path at" in output and f"{LAST}\n" in output, output[-4000:]
    same_count(load_ckpt(folder / LAST), uninterrupted)


# ---- an extraction ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_extraction_stops_at_a_shard_and_the_rerun_gives_the_uninterrupted_orders(stage1_run, tmp_path, monkeypatch):
    whole, stopped = copy_run(stage1_run, tmp_path / "whole"), copy_run(stage1_run, tmp_path / "stopped")
    extract = ("--data.init_args.batch_size", "2")  # 30 shards
    monkeypatch.chdir(whole)
    predict("extract_orders", STAGE1_CKPT, *extract)  # the uninterrupted run

    args = ["predict", "--config", config("extract_orders"), *SMALL_DATA, *QUIET, "--ckpt_path", STAGE1_CKPT,
            *extract, *beacon_args(sleep_s=0.2)]
    result = signal_run(args, stopped, "predict", "rank0", ranks=1)
    assert result.seconds is not None and result.returncode == 128 + signal.SIGTERM, result.output[-4000:]
    line = result.line("stopped by")
    assert line.startswith("stopped by SIGTERM after ") and "rerun the same command" in line, result.output[-4000:]
    shards = list((stopped / ORDERS).glob("shard-*.pt"))
    assert shards and not (stopped / ORDERS / "orders.pt").exists()
    assert not list((stopped / ORDERS).glob("*.tmp"))

    monkeypatch.chdir(stopped)
    predict("extract_orders", STAGE1_CKPT, *extract, *beacon_args(sleep_s=0.0))  # the same command
    resumed = torch.load(stopped / ORDERS / "orders.pt", weights_only=True)
    reference = torch.load(whole / ORDERS / "orders.pt", weights_only=True)
    assert torch.equal(resumed["done"], reference["done"]) and torch.equal(resumed["orders"], reference["orders"])


@pytest.mark.slow
def test_sampling_stops_at_a_batch_and_the_rerun_gives_the_uninterrupted_samples(stage1_run, tmp_path, monkeypatch):
    whole, stopped = copy_run(stage1_run, tmp_path / "whole"), copy_run(stage1_run, tmp_path / "stopped")
    sample = ("--data.init_args.batch_size", "2", "--data.init_args.num_samples", "24")  # 12 batches
    monkeypatch.chdir(whole)
    predict("sample", STAGE1_CKPT, *sample)  # the uninterrupted run

    args = ["predict", "--config", config("sample"), *SMALL_DATA, *QUIET, "--ckpt_path", STAGE1_CKPT, *sample,
            *beacon_args(sleep_s=0.2)]
    result = signal_run(args, stopped, "predict", "group", ranks=1)
    assert result.seconds is not None and result.returncode == 128 + signal.SIGTERM, result.output[-4000:]
    line = result.line("stopped by")
    assert line.startswith("stopped by SIGTERM after ") and "rerun the same command" in line, result.output[-4000:]
    out = stopped / "runs" / "sample"
    assert not list(out.rglob("samples*.npz"))  # written once, at the end
    assert list((out / "samples.parts").rglob("batch-*.pt"))  # the finished batches

    monkeypatch.chdir(stopped)
    predict("sample", STAGE1_CKPT, *sample, *beacon_args(sleep_s=0.0))  # the same command
    resumed, reference = np.load(out / "samples.npz"), np.load(whole / "runs" / "sample" / "samples.npz")
    for key in ("images", "tokens", "orders", "labels"):
        assert np.array_equal(resumed[key], reference[key]), key
    assert not (out / "samples.parts").exists()


# ---- the pieces ---------------------------------------------------------------------------------------------------
def test_every_stage_stops_on_signals_and_an_in_process_run_restores_the_handlers(tokenizer_run, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.chdir(copy_run(tokenizer_run, tmp_path))
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    cli = fit("any_order")
    callbacks = cli.trainer.callbacks
    [at] = [i for i, cb in enumerate(callbacks) if isinstance(cb, StopOnSignal)]
    # After every other callback (its step-boundary check sees the batch written), except those that write files
    # at the same hooks: the checkpoint callbacks and the config writer.
    assert all(isinstance(cb, (ModelCheckpoint, SaveConfigCallback)) for cb in callbacks[at + 1:]), callbacks
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("plugins", [[], [SLURMEnvironment(auto_requeue=True)], [SLURMEnvironment(auto_requeue=False)]])
def test_the_handled_signals_and_the_requeue_follow_lightnings_slurm_environment(plugins):
    """SIGTERM and SIGINT always; SLURM's requeue signal under SLURMEnvironment, requeueing with auto_requeue only."""
    trainer = Trainer(accelerator="cpu", plugins=plugins, logger=False, enable_checkpointing=False)
    signums = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    before, callback = {s: signal.getsignal(s) for s in signums}, StopOnSignal()
    callback.setup(trainer, None, "fit")
    try:
        handled = {s for s in signums if signal.getsignal(s) == callback._handle}
        assert handled == {signal.SIGTERM, signal.SIGINT, *([signal.SIGUSR1] if plugins else [])}
        assert callback._requeue_signal == (signal.SIGUSR1 if plugins and plugins[0].auto_requeue else None)
    finally:
        callback.teardown(trainer, None, "fit")
    assert {s: signal.getsignal(s) for s in signums} == before


def test_after_a_crashed_in_process_run_the_signals_do_what_they_did_before(tmp_path, monkeypatch):
    """Lightning's teardown of a crashed run sets the handlers it found at its start (ours) again: they defer."""
    monkeypatch.chdir(tmp_path)
    outer = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    # Python's own SIGINT handler, whatever the test runner inherited (a shell's background job ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(NonFiniteError):
            run_cli("fit", *stage_configs("tokenizer"), *tiny_preset("tokenizer"), *SMALL_DATA, *QUIET, *MID_EPOCH,
                    "--trainer.max_steps", "6", *HUGE_LR)
        for signum, handler in before.items():
            now = signal.getsignal(signum)
            if now != handler:  # ours, left by Lightning: inactive, it does what the handler before it did
                assert isinstance(now.__self__, StopOnSignal) and now.__self__._originals[signum] == handler
        with pytest.raises(KeyboardInterrupt):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # Python's own handler, or ours deferring to it
    finally:
        for signum, handler in outer.items():
            signal.signal(signum, handler)


def test_resume_command_replaces_the_ckpt_path(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["run.py", "fit", "--config", "a b.yaml", "--ckpt_path", "old.ckpt",
                                      "--ckpt_path=older.ckpt", "--trainer.max_steps", "5"])
    assert _resume_command("runs/x/checkpoints/last.ckpt") == (
        "python run.py fit --config 'a b.yaml' --trainer.max_steps 5 --ckpt_path runs/x/checkpoints/last.ckpt")
    monkeypatch.setattr(sys, "argv", ["pytest", "-q"])  # not started as run.py: the generic form
    assert _resume_command("last.ckpt") == "python run.py fit ... --ckpt_path last.ckpt"


def test_requeue_names_the_array_task_and_a_failure_names_the_command(tmp_path, monkeypatch):
    bin_dir, record = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert _requeue_slurm_job() == "requeued SLURM job 70_3"
    assert record.read_text() == "requeue 70_3 (SLURM_JOB_ID=77)\n"
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'Requested operation is presently disabled' >&2\nexit 1\n")
    assert _requeue_slurm_job() == ("requeueing failed (Requested operation is presently disabled): requeue it "
                                    "yourself with `scontrol requeue 70_3`")


def test_live_pids_sees_a_running_group_and_not_an_ended_one():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert live_pids(proc.pid) == [proc.pid]
    finally:
        kill_groups([proc.pid])
        proc.wait()
    assert live_pids(proc.pid) == []
