"""Kill -9 in the middle of each stage, then resume with the README command.

Each run is `python run.py ...` in a subprocess, killed (SIGKILL) once its first checkpoint (a fit) or
shard (an extraction) exists; the fits run without a step limit so the kill always lands mid-run, saving
`last.ckpt` at every step so it may land in a save. The resumed run is the same command plus
`--ckpt_path <run>/checkpoints/last.ckpt` (fits, in-process here, with a step limit a few steps past the
restored one) or the same command (extraction). Checked: training continues from the checkpoint (global
step and optimizer state restored, then max_steps reached), the extraction equals an uninterrupted
run's, and no half-written file remains (no temp files; every .pt and .ckpt loads).
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from callbacks.checkpointing import TEMP_NAME
from tests.conftest import (
    ORDERS,
    QUIET,
    REPO,
    SMALL_DATA,
    STAGE1_CKPT,
    config,
    copy_run,
    predict,
    run_cli,
    stage_configs,
    tiny_preset,
)
from tests.test_pipeline import RECORD, adam_step, load_ckpt, recorder

NEEDS = {"tokenizer": None, "any_order": "stage1_run", "distill": "orders_run"}
ENDLESS = ("--trainer.max_epochs", "100000", "--trainer.max_time", "null", "--trainer.limit_val_batches", "1")
EXTRACT = ("--data.init_args.batch_size", "2")  # 30 shards: the kill lands long before the end
TIMEOUT_S = 900  # a loaded 2-core machine; never a bound on speed, only on a hang


def callbacks(stage: str) -> str:
    """last.ckpt at every step (the stage configs save every 200), the NaN stop and the best checkpoint."""
    monitor, mode = ("val/psnr", "max") if stage == "tokenizer" else ("val/loss", "min")
    return json.dumps([
        {"class_path": "callbacks.checkpointing.LastCheckpoint", "init_args": {"every_n_train_steps": 1}},
        {"class_path": "callbacks.finite.StopOnNonFinite"},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"monitor": monitor, "mode": mode, "filename": "best-{epoch}"}}])


def fit_args(stage: str) -> tuple[str, ...]:
    return ("fit", *stage_configs(stage), *tiny_preset(stage), *SMALL_DATA, *QUIET, *ENDLESS,
            "--trainer.callbacks", callbacks(stage))


def run_and_kill(args: tuple, cwd: Path, ready: Callable[[], bool]) -> None:
    """Start `python run.py *args` in `cwd`, SIGKILL it as soon as `ready()` holds."""
    log, systmp = cwd / "killed_run.log", cwd / "systmp"
    systmp.mkdir(exist_ok=True)  # Lightning's own temp files of a killed save land here, not in /tmp
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(systmp)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *map(str, args)], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (status {proc.returncode}) before it could be killed:\n"
                            f"{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"nothing to kill for after {TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "killed, not finished"


def assert_no_half_written_file(folder: Path) -> None:
    """No temp file under `folder`, and every .pt / .ckpt file loads."""
    leftovers = [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert not leftovers, leftovers
    for file in [*folder.rglob("*.pt"), *folder.rglob("*.ckpt")]:
        torch.load(file, map_location="cpu", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["tokenizer", "any_order", "distill"])
def test_killed_fit_resumes_from_last_ckpt(stage, request, tmp_path, monkeypatch):
    if NEEDS[stage] is not None:
        copy_run(request.getfixturevalue(NEEDS[stage]), tmp_path)
    run = Path("runs") / stage
    last = run / "checkpoints" / "last.ckpt"
    if (tmp_path / last).exists():
        (tmp_path / last).unlink()  # the fixture's own stage-1 checkpoint: wait for this run's
    run_and_kill(fit_args(stage), tmp_path, ready=(tmp_path / last).exists)

    saved = load_ckpt(tmp_path / last)  # whole, wherever the kill landed
    step = saved["global_step"]
    assert step >= 1
    # What a kill in the middle of a save leaves (LastCheckpoint writes TEMP_NAME, then renames it).
    (tmp_path / last).with_name(TEMP_NAME).write_bytes(b"half a checkpoint")
    monkeypatch.chdir(tmp_path)
    cli = run_cli(*fit_args(stage), "--trainer.max_steps", step + 3, "--ckpt_path", last, *RECORD)
    start = recorder(cli)
    assert start.global_step == step and start.optimizer_state["step"] == adam_step(saved)
    assert cli.trainer.global_step == step + 3
    resumed = load_ckpt(last)
    assert resumed["global_step"] == step + 3 and adam_step(resumed) == adam_step(saved) + 3
    for folder in (run, Path("cache")):
        if folder.exists():
            assert_no_half_written_file(tmp_path / folder)


@pytest.mark.slow
def test_killed_extraction_resumes_to_the_uninterrupted_orders(stage1_run, tmp_path, monkeypatch):
    whole, killed = copy_run(stage1_run, tmp_path / "whole"), copy_run(stage1_run, tmp_path / "killed")
    monkeypatch.chdir(whole)
    predict("extract_orders", STAGE1_CKPT, *EXTRACT)  # the uninterrupted run

    args = ("predict", "--config", config("extract_orders"), *SMALL_DATA, *QUIET, "--ckpt_path", STAGE1_CKPT, *EXTRACT)
    run_and_kill(args, killed, ready=lambda: any((killed / ORDERS).glob("shard-*.pt")))
    assert not (killed / ORDERS / "orders.pt").exists()
    # A shard write the kill cut short (its temp file) is what a kill in the middle of `torch.save` leaves.
    (killed / ORDERS / ".shard-r0-cut-d0-b0000099.pt.x1y2z3.tmp").write_bytes(b"half a shard")

    monkeypatch.chdir(killed)
    predict("extract_orders", STAGE1_CKPT, *EXTRACT)  # the same command
    resumed = torch.load(killed / ORDERS / "orders.pt", weights_only=True)
    reference = torch.load(whole / ORDERS / "orders.pt", weights_only=True)
    assert torch.equal(resumed["done"], reference["done"]) and torch.equal(resumed["orders"], reference["orders"])
    assert resumed["manifest"] == reference["manifest"]
    assert_no_half_written_file(killed / ORDERS)
