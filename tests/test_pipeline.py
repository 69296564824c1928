"""The pipeline through the CLI: the files between stages, resuming, stale inputs refused, DDP on two CPU processes."""

import json
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from datamodules.orders_file import EXTRACT_CMD, finished_keys, load_orders
from datamodules.token_cache import load_token_cache
from models.checkpoint import load_net
from tests.conftest import (
    NUM_IMAGES,
    ORDERS,
    QUIET,
    REPO,
    SHORT_FIT,
    SMALL_DATA,
    STAGE1_CKPT,
    TOKENIZER_CKPT,
    config,
    copy_run,
    fit,
    predict,
    resave_with_one_weight_changed,
    tiny_preset,
)
from tests.ddp import run_cli_subprocess

DISTILL_CKPT = Path("runs/distill/checkpoints/last.ckpt")
RECORD = ("--trainer.callbacks+=tests.test_pipeline.StepRecorder",)
TOKENIZER_CMD = "python run.py fit --config configs/tokenizer.yaml"
DDP_CPU = ("--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2")


class StepRecorder(Callback):
    """What the trainer holds when training starts: after a resume, what the checkpoint restored.

    Add it on the command line with `--trainer.callbacks+=tests.test_pipeline.StepRecorder`.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        self.global_step, self.epoch = trainer.global_step, trainer.current_epoch
        self.optimizer_state = {k: v.clone() if torch.is_tensor(v) else v
                                for k, v in trainer.optimizers[0].state_dict()["state"].get(0, {}).items()}
        self.first_weight = next(pl_module.net.parameters()).detach().clone()


def recorder(cli) -> StepRecorder:
    return next(c for c in cli.trainer.callbacks if isinstance(c, StepRecorder))


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def adam_step(ckpt: dict) -> int:
    """The optimizer's step count of the first parameter."""
    return int(ckpt["optimizer_states"][0]["state"][0]["step"])


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def run_subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python run.py *args` in a fresh process (DDP starts its second process by rerunning the same command)."""
    return run_cli_subprocess(args, cwd, REPO)


# ---- (1) tokenizer -> checkpoint -> token cache ------------------------------------------------------------------
def test_tokenizer_checkpoint_reloads_and_matches_the_cache(stage1_run):
    ckpt = load_ckpt(stage1_run / TOKENIZER_CKPT)
    assert ckpt["global_step"] == 2 and "net_spec" in ckpt
    [cache_file] = (stage1_run / "cache").glob("tokens-*.pt")  # the stage-1 run built it
    cache = torch.load(cache_file, weights_only=True)
    load_token_cache(cache_file, cache["manifest"])
    net = load_net(stage1_run / TOKENIZER_CKPT)
    from datamodules.sources import SunsetSource

    source = SunsetSource(num_images=NUM_IMAGES)
    images = torch.stack([source[i][0] for i in range(NUM_IMAGES)]).float() / 127.5 - 1
    assert torch.equal(net.encode(images), cache["tokens"][:, 0].long())
    assert cache["manifest"]["vocab_size"] == net.vocab_size


# ---- (2) resuming continues the global step ---------------------------------------------------------------------
def test_tokenizer_resume_continues(tokenizer_run, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_run(tokenizer_run, tmp_path))
    saved = load_ckpt(TOKENIZER_CKPT)
    assert saved["global_step"] == 2
    cli = fit("tokenizer", "--trainer.max_epochs", "2", "--ckpt_path", TOKENIZER_CKPT, *RECORD)
    start = recorder(cli)
    assert (start.global_step, start.epoch) == (2, 1)  # one more epoch, not two from scratch
    assert start.optimizer_state["step"] == adam_step(saved)
    assert cli.trainer.global_step == 4
    resumed = load_ckpt(TOKENIZER_CKPT)
    assert resumed["global_step"] == 4 and adam_step(resumed) == 4


# ---- (3) DDP on two CPU processes ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_tokenizer_ddp_two_cpu_processes(tmp_path):
    run_subprocess(["fit", "--config", config("tokenizer"), *tiny_preset("tokenizer"), *SMALL_DATA, *QUIET,
                    *SHORT_FIT, *DDP_CPU, "--data.init_args.batch_size", "8"], cwd=tmp_path)
    ckpt = load_ckpt(tmp_path / TOKENIZER_CKPT)
    assert ckpt["global_step"] == 2  # 29 training images per process: 2 batches of 8 each, in step
    load_net(tmp_path / TOKENIZER_CKPT)


@pytest.mark.slow
def test_any_order_ddp_fit_with_order_dumps_finishes(tokenizer_run, tmp_path):
    """Rank 0 writes the order dumps; the run folder they go to is a collective (trainer.log_dir), so a dump
    that asked for it on rank 0 only deadlocked the fit at its first dump (seen at the end of training)."""
    copy_run(tokenizer_run, tmp_path)
    five_epochs = ("--trainer.max_epochs", "5", "--trainer.limit_val_batches", "1",
                   "--trainer.max_time", "null")  # the config dumps every 5 epochs, and when training ends
    run_subprocess(["fit", "--config", config("any_order"), *tiny_preset("ar"), *SMALL_DATA, *QUIET, *five_epochs,
                    *DDP_CPU, "--data.init_args.batch_size", "8", "--data.init_args.tokenizer_ckpt",
                    str(TOKENIZER_CKPT), "--fid", "null"], cwd=tmp_path)
    folder = (tmp_path / STAGE1_CKPT).parents[1] / "orders"
    assert sorted(p.name for p in folder.glob("*.npz")) == ["epoch_4.npz", "final.npz"]  # validation, then final
    with np.load(folder / "final.npz") as final:
        assert int(final["global_step"]) == load_ckpt(tmp_path / STAGE1_CKPT)["global_step"] > 0


# ---- (4) distillation from extracted orders, and its resumption ------------------------------------------------
def test_distill_fits_and_resumes_with_optimizer_state(orders_run, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    with caplog.at_level(logging.INFO, logger="oar.train"):
        cli = fit("distill", *RECORD)
    assert "loaded the stage-1 weights" in caplog.text and "ignored" not in caplog.text
    caplog.clear()
    assert cli.datamodule.train_set.orders is not None
    stage1 = load_net(STAGE1_CKPT)
    assert torch.equal(recorder(cli).first_weight, next(stage1.parameters()))  # started from init_from
    saved = load_ckpt(DISTILL_CKPT)
    assert saved["global_step"] == 2 and adam_step(saved) == 2
    with caplog.at_level(logging.INFO, logger="oar.train"):
        cli = fit("distill", "--trainer.max_epochs", "2", "--ckpt_path", DISTILL_CKPT, *RECORD)
    assert "init_from" in caplog.text and "ignored" in caplog.text
    start = recorder(cli)
    assert start.global_step == 2
    saved_state = saved["optimizer_states"][0]["state"][0]
    assert start.optimizer_state["step"] == saved_state["step"]
    assert torch.equal(start.optimizer_state["exp_avg"], saved_state["exp_avg"])
    assert torch.equal(start.optimizer_state["exp_avg_sq"], saved_state["exp_avg_sq"])
    first_name = next(name for name, _ in stage1.named_parameters())
    assert torch.equal(start.first_weight, saved["state_dict"][f"net.{first_name}"])
    assert not torch.equal(start.first_weight, next(stage1.parameters()))  # the checkpoint, not init_from
    resumed = load_ckpt(DISTILL_CKPT)
    assert resumed["global_step"] == 4 and adam_step(resumed) == adam_step(saved) + 2


def test_a_distilled_checkpoint_samples_greedily_under_the_sample_config(orders_run, tmp_path, monkeypatch):
    """configs/sample.yaml's choice_temperature `auto` is resolved by the checkpoint's own module: a model
    fine-tuned on its own orders samples with the greedy choice (a stage-1 model: tests/test_configs.py)."""
    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    fit("distill")
    cli = predict("sample", DISTILL_CKPT, "--data.init_args.num_samples", "2")
    assert cli.model.trained.stage == "DistillModule" and cli.model.sampler_settings.choice_temperature == "auto"
    with np.load(tmp_path / "runs" / "sample" / "samples.npz") as data:
        assert json.loads(str(data["sampler"]))["choice_temperature"] == 0.0
    cli = predict("sample", DISTILL_CKPT, "--data.init_args.num_samples", "2",
                  "--model.init_args.sampler.choice_temperature", "1.5")  # a number wins
    assert cli.model.sampler.choice_temperature == 1.5


def test_distill_starts_from_a_stage1_checkpoint_written_before_a_network_argument_existed(orders_run, tmp_path,
                                                                                          monkeypatch, caplog):
    """A checkpoint whose net_spec lacks an argument added later (here next_pos_layer) means its default."""
    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    ckpt = load_ckpt(STAGE1_CKPT)
    del ckpt["net_spec"]["init_args"]["next_pos_layer"]
    torch.save(ckpt, STAGE1_CKPT)
    with caplog.at_level(logging.INFO, logger="oar.train"):  # re-saved: the orders name its old bytes
        cli = fit("distill", *RECORD, "--model.init_args.other_orders", "true")
    assert "loaded the stage-1 weights" in caplog.text
    assert cli.model.net.next_pos_layer == 0
    assert torch.equal(recorder(cli).first_weight, next(load_net(STAGE1_CKPT).parameters()))


# ---- (5) stale or missing orders are refused ---------------------------------------------------------------------
@pytest.mark.parametrize("change", ["dataset", "tokenizer"])
def test_distill_refuses_stale_orders(change, orders_run, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    extra = ("--data.init_args.source.init_args.num_images", "48") if change == "dataset" else ()
    if change == "tokenizer":
        resave_with_one_weight_changed(TOKENIZER_CKPT, TOKENIZER_CKPT)
    with pytest.raises(ValueError, match="stale") as err:
        fit("distill", *extra)
    assert EXTRACT_CMD in one_line(err)


def test_distill_refuses_missing_orders(orders_run, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        fit("distill", "--data.init_args.orders_path", "runs/nowhere")
    assert "runs/nowhere" in one_line(err) and EXTRACT_CMD in str(err.value)


# ---- (6) an AR stage without a tokenizer ---------------------------------------------------------------------------
def raise_ar_stage_without_tokenizer() -> None:
    fit("any_order")


def test_ar_stage_without_tokenizer_names_the_command(tmp_path, monkeypatch):
    """The DataModule's one-line FileNotFoundError is in the raised chain (wrapped by jsonargparse: next test)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        raise_ar_stage_without_tokenizer()
    causes, cause = [], err.value
    while cause is not None:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    found = [c for c in causes if isinstance(c, FileNotFoundError)]
    assert found and "\n" not in str(found[0]) and TOKENIZER_CMD in str(found[0])
    assert TOKENIZER_CMD in str(err.value)


def test_ar_stage_without_tokenizer_raises_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        raise_ar_stage_without_tokenizer()
    assert TOKENIZER_CMD in one_line(err)


# ---- (7) an interrupted extraction resumes to the same file ------------------------------------------------------
class Crash(Exception):
    pass


class CrashAfterFirstBatch(Callback):
    """Kills `predict` once the first batch's shard is written (the OrderWriter comes first in the list)."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        raise Crash("killed after the first batch")


def test_interrupted_extraction_resumes_to_the_same_orders(stage1_run, orders_run, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(copy_run(stage1_run, tmp_path))
    with pytest.raises(Crash):
        predict("extract_orders", STAGE1_CKPT, "--trainer.callbacks+=tests.test_pipeline.CrashAfterFirstBatch")
    folder = tmp_path / ORDERS
    assert not (folder / "orders.pt").exists()
    assert len(list(folder.glob("shard-*.pt"))) == 1 and not list(folder.glob(".*"))  # no temp files
    assert len(finished_keys(folder)) == 16  # one batch
    with caplog.at_level(logging.INFO, logger="oar.data"):
        cli = predict("extract_orders", STAGE1_CKPT)
    assert "16 of" in caplog.text and "already written" in caplog.text
    resumed = torch.load(folder / "orders.pt", weights_only=True)
    whole = torch.load(orders_run / ORDERS / "orders.pt", weights_only=True)
    assert torch.equal(resumed["done"], whole["done"]) and torch.equal(resumed["orders"], whole["orders"])
    assert resumed["manifest"] == whole["manifest"]
    load_orders(folder, cli.datamodule.token_manifest(), indices=cli.datamodule.split_indices()[0])


# ---- (8) DDP extraction on an odd number of keys ------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_extraction_writes_each_key_once(stage1_run, tmp_path):
    copy_run(stage1_run, tmp_path)
    odd = 45  # 4 validation images, 41 training keys: the two processes get 21 and 20
    run_subprocess(["predict", "--config", config("extract_orders"), *SMALL_DATA, *QUIET, "--ckpt_path", STAGE1_CKPT,
                    "--data.init_args.source.init_args.num_images", odd, *DDP_CPU], cwd=tmp_path)
    from datamodules.datamodule import OARDataModule
    from datamodules.sources import SunsetSource

    dm = OARDataModule(SunsetSource(num_images=odd), tokenizer_ckpt=str(tmp_path / TOKENIZER_CKPT),
                       cache_dir=str(tmp_path / "cache"))
    keys = dm.extraction_keys()
    assert len(keys) % 2 == 1
    folder = tmp_path / ORDERS
    written = []
    for shard in folder.glob("shard-*.pt"):
        data = torch.load(shard, weights_only=True)
        written += list(zip(data["index"].tolist(), data["flip"].tolist(), strict=True))
    assert sorted(written) == sorted(keys)  # every key, each exactly once
    assert {s.name.split("-")[1] for s in folder.glob("shard-*.pt")} == {"r0", "r1"}  # both processes wrote
    orders = load_orders(folder, dm.token_manifest(), indices=dm.split_indices()[0])
    done = torch.load(folder / "orders.pt", weights_only=True)["done"]
    assert int(done.sum()) == len(keys) and orders.shape[0] == odd
