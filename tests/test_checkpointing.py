"""`last.ckpt` is the final state of every stage (also after a mid-epoch stop and under DDP), and a diverging
run stops with a one-line error naming the step, leaving every checkpoint it found as it was.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.checkpointing import LastCheckpoint
from callbacks.finite import NonFiniteError
from tests.conftest import (
    QUIET,
    REPO,
    SMALL_DATA,
    config,
    copy_run,
    fit,
    run_cli,
    stage_configs,
    tiny_preset,
    typed_in,
)
from tests.ddp import ATTEMPTS, TIMEOUT_S, free_port, is_infrastructure_failure, run_cli_subprocess
from tests.test_pipeline import RECORD, adam_step, load_ckpt, one_line, recorder

STAGES = ("tokenizer", "any_order", "raster", "distill")
NEEDS = {"tokenizer": None, "any_order": "tokenizer_run", "raster": "tokenizer_run", "distill": "orders_run"}
# Three training batches per epoch and a validation at each epoch's end: max_steps 4 stops one batch into
# the second epoch, after the validation of step 3.
MID_EPOCH = ("--trainer.max_epochs", "10", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
             "--trainer.max_time", "null")
DDP_CPU = ("--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2")
HUGE_LR = ("--model.init_args.optimizer.init_args.lr", "1e30")


def ckpt_dir(stage: str) -> Path:
    return Path("runs") / stage / "checkpoints"


def work_folder(stage: str, request, tmp_path: Path) -> Path:
    """The fixture run a stage needs (tokenizer, stage 1, extracted orders), copied into tmp_path, without
    checkpoints of `stage` itself."""
    if NEEDS[stage] is not None:
        copy_run(request.getfixturevalue(NEEDS[stage]), tmp_path)
    shutil.rmtree(tmp_path / ckpt_dir(stage), ignore_errors=True)
    return tmp_path


def stage_fit(stage: str, *extra) -> object:
    return run_cli("fit", *stage_configs(stage), *tiny_preset(stage), *SMALL_DATA, *QUIET, *extra)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def all_finite(ckpt: dict) -> bool:
    return all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if torch.is_floating_point(v))


def run_subprocess(args: list, cwd: Path, expect: str = "") -> subprocess.CompletedProcess:
    """`python run.py *args` in a fresh process on a fresh port, without an exit-status check.

    A run that fails without `expect` in its output and of a process-group start-up failure
    (`tests.ddp.is_infrastructure_failure`) is retried.
    """
    for attempt in range(1, ATTEMPTS + 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
        result = subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, args)], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=TIMEOUT_S)
        done = result.returncode == 0 or (expect and expect in result.stderr)
        if done or attempt == ATTEMPTS or not is_infrastructure_failure(result.stderr, result.returncode):
            return result
    raise AssertionError("unreachable")


# ---- the stage configs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_stage_config_writes_last_ckpt_with_one_callback_and_stops_on_nan(stage):
    callbacks = typed_in(stage, "trainer")["trainer"]["callbacks"]
    paths = [c["class_path"] for c in callbacks]
    assert paths.count("callbacks.checkpointing.LastCheckpoint") == 1
    assert "callbacks.finite.StopOnNonFinite" in paths
    best = [c for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    assert best and not any(c.get("init_args", {}).get("save_last") for c in best)  # the best one never writes last


# ---- (1) last.ckpt after a max_steps stop mid-epoch ---------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_last_ckpt_holds_the_final_step_after_a_mid_epoch_stop(stage, request, tmp_path, monkeypatch):
    monkeypatch.chdir(work_folder(stage, request, tmp_path))
    cli = stage_fit(stage, *MID_EPOCH, "--trainer.max_steps", "4")
    assert cli.trainer.global_step == 4
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.current.completed == 1  # one batch into epoch 1
    folder = ckpt_dir(stage)
    [best] = folder.glob("best-*.ckpt")
    assert load_ckpt(best)["global_step"] == 3  # the validation at the end of epoch 0 came before the stop
    last = load_ckpt(folder / "last.ckpt")
    assert last["global_step"] == cli.trainer.global_step and adam_step(last) == 4
    assert {p.name for p in folder.iterdir()} == {"last.ckpt", best.name}  # no last-v1.ckpt, no temp file
    writers = [cb for cb in cli.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]
    assert len(writers) == 1 and isinstance(writers[0], LastCheckpoint)


@pytest.mark.parametrize("stage", ["tokenizer", pytest.param("distill", marks=pytest.mark.slow)])
def test_resume_after_a_mid_epoch_stop_continues_at_the_next_step(stage, request, tmp_path, monkeypatch):
    monkeypatch.chdir(work_folder(stage, request, tmp_path))
    stage_fit(stage, *MID_EPOCH, "--trainer.max_steps", "4")
    saved = load_ckpt(ckpt_dir(stage) / "last.ckpt")
    cli = stage_fit(stage, *MID_EPOCH, "--trainer.max_steps", "6", "--ckpt_path", ckpt_dir(stage) / "last.ckpt",
                    *RECORD)
    start = recorder(cli)
    assert start.global_step == 4 and start.optimizer_state["step"] == adam_step(saved)
    assert cli.trainer.global_step == 6
    resumed = load_ckpt(ckpt_dir(stage) / "last.ckpt")
    assert resumed["global_step"] == 6 and adam_step(resumed) == 6


def test_ckpt_path_last_starts_afresh_in_a_new_folder_and_resumes_after(request, tmp_path, monkeypatch, caplog):
    # The requeue recipe (docs/clusters.md) runs one command every time: the first run has no last.ckpt yet.
    monkeypatch.chdir(work_folder("tokenizer", request, tmp_path))
    cli = stage_fit("tokenizer", *MID_EPOCH, "--trainer.max_steps", "4", "--ckpt_path", "last", *RECORD)
    assert recorder(cli).global_step == 0 and cli.trainer.global_step == 4
    assert "training starts afresh" in caplog.text
    cli = stage_fit("tokenizer", *MID_EPOCH, "--trainer.max_steps", "6", "--ckpt_path", "last", *RECORD)
    assert recorder(cli).global_step == 4 and cli.trainer.global_step == 6


class TrainOrders(Callback):
    """The training orders of every global step (it wraps the module's `orders_for`)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.orders, inner = {}, pl_module.orders_for

        def recording(batch, stage, generator=None):
            order = inner(batch, stage, generator)
            if stage == "train":
                self.orders[trainer.global_step] = order.clone()
            return order

        pl_module.orders_for = recording


def test_a_resumed_fit_trains_on_the_orders_an_uninterrupted_one_would(request, tmp_path, monkeypatch):
    """The training orders are drawn per step, not from the global generator (which a resume restarts from the
    seed): stopped mid-epoch at step 4 and resumed, the fit draws at steps 4-5 what one run of 6 steps drew."""
    monkeypatch.chdir(work_folder("any_order", request, tmp_path))
    record = ("--trainer.callbacks+=tests.test_checkpointing.TrainOrders",)

    def orders(cli) -> dict:
        return next(c for c in cli.trainer.callbacks if isinstance(c, TrainOrders)).orders

    whole = orders(stage_fit("any_order", *MID_EPOCH, "--trainer.max_steps", "6", *record))
    shutil.rmtree(ckpt_dir("any_order"))
    stage_fit("any_order", *MID_EPOCH, "--trainer.max_steps", "4")
    resumed = orders(stage_fit("any_order", *MID_EPOCH, "--trainer.max_steps", "6",
                               "--ckpt_path", ckpt_dir("any_order") / "last.ckpt", *record))
    assert sorted(whole) == list(range(6)) and sorted(resumed) == [4, 5]
    assert all(torch.equal(resumed[s], whole[s]) for s in (4, 5))
    assert not any(torch.equal(resumed[4], whole[s]) for s in range(4))  # nothing replayed from the start


def test_last_ckpt_is_written_every_n_steps(tmp_path, monkeypatch):
    """Periodic saves (one in the middle of an epoch), then the final one; a second run replaces the file."""
    monkeypatch.chdir(tmp_path)
    every_2 = json.dumps([{"class_path": "callbacks.checkpointing.LastCheckpoint",
                           "init_args": {"every_n_train_steps": 2}}])
    seen = "--trainer.callbacks+=tests.test_checkpointing.LastStepSeen"
    cli = stage_fit("tokenizer", *MID_EPOCH, "--trainer.max_steps", "5", "--trainer.callbacks", every_2, seen)
    assert next(c for c in cli.trainer.callbacks if isinstance(c, LastStepSeen)).steps == [None, None, 2, 2, 4]
    assert load_ckpt(ckpt_dir("tokenizer") / "last.ckpt")["global_step"] == 5
    stage_fit("tokenizer", *MID_EPOCH, "--trainer.max_steps", "3", "--trainer.callbacks", every_2)
    assert load_ckpt(ckpt_dir("tokenizer") / "last.ckpt")["global_step"] == 3
    assert sorted(p.name for p in ckpt_dir("tokenizer").iterdir()) == ["last.ckpt"]


class LastStepSeen(Callback):
    """The global step stored in last.ckpt at the start of each training batch."""

    def __init__(self) -> None:
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        path = ckpt_dir("tokenizer") / "last.ckpt"
        self.steps.append(torch.load(path, weights_only=False)["global_step"] if path.exists() else None)


@pytest.mark.slow
def test_last_ckpt_holds_the_final_step_under_ddp(tmp_path):
    run_cli_subprocess(["fit", "--config", config("tokenizer"), *tiny_preset("tokenizer"), *SMALL_DATA, *QUIET,
                        *MID_EPOCH, *DDP_CPU, "--data.init_args.batch_size", "8", "--trainer.max_steps", "4"],
                       tmp_path, REPO)
    folder = tmp_path / ckpt_dir("tokenizer")
    [best] = folder.glob("best-*.ckpt")
    assert load_ckpt(best)["global_step"] == 3  # 29 training images per process: 3 batches of 8 an epoch
    assert load_ckpt(folder / "last.ckpt")["global_step"] == 4


# ---- (3) a non-finite loss or weight stops training ------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_diverging_run_stops_with_the_step_and_keeps_every_checkpoint(stage, request, tmp_path, monkeypatch):
    monkeypatch.chdir(work_folder(stage, request, tmp_path))
    fit(stage)  # a good two-step run: last.ckpt and the best checkpoint
    before = snapshot(ckpt_dir(stage))
    assert "last.ckpt" in before
    with pytest.raises(NonFiniteError) as err:
        stage_fit(stage, *MID_EPOCH, "--trainer.max_steps", "6", *HUGE_LR)
    message = one_line(err)
    assert re.search(r"diverged at step \d+:", message), message
    assert "model.init_args.optimizer.init_args.lr" in message and f"--ckpt_path {ckpt_dir(stage)}" in message
    clips_already = stage != "tokenizer"  # the AR configs set it; the tiny tokenizer (no GAN) is clipped by Lightning
    assert ("trainer.gradient_clip_val" in message) != clips_already
    assert snapshot(ckpt_dir(stage)) == before  # byte for byte; no new file


@pytest.mark.parametrize("stage", ["tokenizer", "any_order"])
def test_the_divergence_fix_works_a_lower_lr_wins_on_resume(stage, request, tmp_path, monkeypatch):
    """What the divergence message says works: the lr given on resume replaces the checkpoint's (so a huge one
    diverges from a good checkpoint, and a low one then resumes it to the end)."""
    monkeypatch.chdir(work_folder(stage, request, tmp_path))
    fit(stage)  # a good run: last.ckpt
    last = str(ckpt_dir(stage) / "last.ckpt")
    with pytest.raises(NonFiniteError):
        stage_fit(stage, *MID_EPOCH, "--trainer.max_steps", "6", *HUGE_LR, "--ckpt_path", last)
    cli = stage_fit(stage, *MID_EPOCH, "--trainer.max_steps", "6", "--model.init_args.optimizer.init_args.lr",
                    "1e-5", "--ckpt_path", last)
    assert cli.trainer.global_step == 6
    lrs = {g.get("initial_lr", g["lr"]) for opt in cli.trainer.optimizers for g in opt.param_groups}
    assert lrs == {1e-5}


class PoisonAt(Callback):
    """Makes the weights nan before step 3's forward pass (a nan loss) or after its optimizer step."""

    def __init__(self, where: str = "loss") -> None:
        self.where = where

    def _poison(self, trainer, pl_module, hook: str) -> None:
        if hook == self.where:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(math.nan)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            self._poison(trainer, pl_module, "loss")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 3:
            self._poison(trainer, pl_module, "weights")


@pytest.mark.parametrize("where", ["loss", "weights"])
def test_nan_at_step_3_keeps_last_ckpt_at_step_2(where, tmp_path, monkeypatch):
    """last.ckpt is saved at every step; the on-exception save of a ModelCheckpoint is refused too."""
    monkeypatch.chdir(tmp_path)
    callbacks = json.dumps([
        {"class_path": "tests.test_checkpointing.PoisonAt", "init_args": {"where": where}},
        {"class_path": "callbacks.finite.StopOnNonFinite"},
        {"class_path": "callbacks.checkpointing.LastCheckpoint", "init_args": {"every_n_train_steps": 1}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_on_exception": True, "monitor": "val/psnr", "mode": "max"}}])
    with pytest.raises(NonFiniteError) as err:
        stage_fit("tokenizer", *MID_EPOCH, "--trainer.max_steps", "6", "--trainer.callbacks", callbacks)
    message = one_line(err)  # the same text, although the on-exception save raised it again
    assert "at step 3: the " + where in message and "model.init_args.optimizer.init_args.lr" in message
    assert sorted(p.name for p in ckpt_dir("tokenizer").iterdir()) == ["last.ckpt"]
    last = load_ckpt(ckpt_dir("tokenizer") / "last.ckpt")
    assert last["global_step"] == 2 and all_finite(last)


def test_diverging_run_exits_non_zero_with_one_error_line(tokenizer_run, tmp_path):
    """Through `python run.py`: exit status 1 and an `error:` line naming the step and the fix."""
    copy_run(tokenizer_run, tmp_path)
    before = snapshot(tmp_path / ckpt_dir("tokenizer"))
    result = run_subprocess(["fit", "--config", config("tokenizer"), *tiny_preset("tokenizer"), *SMALL_DATA, *QUIET,
                             *MID_EPOCH, "--trainer.max_steps", "6", *HUGE_LR], tmp_path,
                            expect="training diverged at step")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(r"diverged at step \d+:", errors[0]), result.stderr[-4000:]
    assert snapshot(tmp_path / ckpt_dir("tokenizer")) == before


@pytest.mark.slow
def test_diverging_ddp_run_stops_every_process(tokenizer_run, tmp_path):
    copy_run(tokenizer_run, tmp_path)
    before = snapshot(tmp_path / ckpt_dir("tokenizer"))
    result = run_subprocess(["fit", "--config", config("tokenizer"), *tiny_preset("tokenizer"), *SMALL_DATA, *QUIET,
                             *MID_EPOCH, *DDP_CPU, "--data.init_args.batch_size", "8", "--trainer.max_steps", "6",
                             *HUGE_LR], tmp_path, expect="training diverged at step")
    # Both processes have exited (the output pipe they share is closed). Each raises at the same step; the first
    # to exit may end the other (Lightning's child-process observer), so one or two error lines are printed.
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors, result.stderr[-4000:]
    assert len({re.search(r"diverged at step (\d+):", e).group(1) for e in errors}) == 1
    assert snapshot(tmp_path / ckpt_dir("tokenizer")) == before
