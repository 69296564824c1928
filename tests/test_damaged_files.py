"""Damaged derived files are rebuilt, checkpoints are plain data with a tokenizer record, and `test` runs
every stage's validation metrics (issue 8; the one-line errors are tests/test_errors.py)."""

import logging
from functools import partial
from pathlib import Path

import pytest
import torch

from fileio import file_sha256
from lightning_modules.any_order import AnyOrderModule
from models.checkpoint import build_net, plain_data
from models.sampling import SamplerSettings, TokenSampler
from tests.bad_files import write_corrupt, write_truncated, write_without_tokenizer_record
from tests.conftest import (
    ORDERS,
    QUIET,
    SMALL_DATA,
    STAGE1_CKPT,
    TOKENIZER_CKPT,
    copy_run,
    run_cli,
    stage_configs,
    tiny_preset,
)
from tests.test_errors import fit_args, predict_args


# ---- damaged derived files are rebuilt, not fatal --------------------------------------------------------------------
def test_corrupt_token_cache_is_rebuilt(stage1_run, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(copy_run(stage1_run, tmp_path))
    [cache] = Path("cache").glob("tokens-*.pt")
    good = torch.load(cache, weights_only=True)
    write_truncated(cache, cache)
    with caplog.at_level(logging.WARNING, logger="oar.data"):
        run_cli(*fit_args("any_order"))
    assert f"token cache {cache} is unreadable" in caplog.text and "rebuilding" in caplog.text
    rebuilt = torch.load(cache, weights_only=True)
    assert torch.equal(rebuilt["tokens"], good["tokens"]) and rebuilt["manifest"] == good["manifest"]


def test_corrupt_orders_shard_is_extracted_again(orders_run, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    whole = torch.load(ORDERS / "orders.pt", weights_only=True)
    shard = sorted(ORDERS.glob("shard-*.pt"))[0]
    write_truncated(shard, shard)
    (ORDERS / "orders.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="oar.extract"):
        run_cli(*predict_args("extract_orders", STAGE1_CKPT))
    assert f"orders shard {shard} is unreadable" in caplog.text and not shard.exists()
    again = torch.load(ORDERS / "orders.pt", weights_only=True)
    assert torch.equal(again["done"], whole["done"]) and torch.equal(again["orders"], whole["orders"])


def test_corrupt_orders_file_is_rebuilt_by_the_command_the_error_names(orders_run, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    whole = torch.load(ORDERS / "orders.pt", weights_only=True)
    write_corrupt(ORDERS / "orders.pt", ORDERS / "orders.pt")
    with pytest.raises(ValueError, match="rebuilds orders.pt"):
        run_cli(*fit_args("distill"))
    run_cli(*predict_args("extract_orders", STAGE1_CKPT))  # nothing left to extract: it only consolidates
    assert torch.equal(torch.load(ORDERS / "orders.pt", weights_only=True)["orders"], whole["orders"])


# ---- checkpoints: plain data, tokenizer records -------------------------------------------------------------------
def test_checkpoints_load_as_plain_data_and_record_their_tokenizer(stage1_run):
    tokenizer = torch.load(stage1_run / TOKENIZER_CKPT, weights_only=True)
    stage1 = torch.load(stage1_run / STAGE1_CKPT, weights_only=True)
    assert "net_spec" in tokenizer and "net_spec" in stage1
    assert stage1["tokenizer"] == {"path": str(TOKENIZER_CKPT), "sha256": file_sha256(stage1_run / TOKENIZER_CKPT)}


def test_hyper_parameters_given_in_python_are_saved_as_plain_data(tmp_path):
    """Outside the CLI, save_hyperparameters holds a dataclass, a network and a factory: saved as plain data."""
    net = build_net({"class_path": "models.transformer.OrderedTransformer",
                     "init_args": {"vocab_size": 16, "grid_size": (2, 2), "num_classes": 2, "width": 8, "depth": 1,
                                   "heads": 2}})
    module = AnyOrderModule(net, sampler=SamplerSettings(policy="raster", temperature=0.5),
                            optimizer=partial(torch.optim.SGD, lr=0.1))
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "python.ckpt")
    hparams = torch.load(tmp_path / "python.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["sampler"]["temperature"] == 0.5 and hparams["net"]["init_args"]["vocab_size"] == 16
    assert "optimizer" not in hparams  # a factory is not data: left out, so a config keeps its own
    assert plain_data({"path": tmp_path, "pair": (1, [SamplerSettings()])})["pair"][1][0]["policy"] == "confidence"


def test_checkpoint_without_tokenizer_record_loads_with_a_warning(stage1_run, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(copy_run(stage1_run, tmp_path))
    write_without_tokenizer_record(STAGE1_CKPT, Path("old.ckpt"))
    with caplog.at_level(logging.WARNING, logger="oar.train"):  # the tokenizer named: no record to read it from
        run_cli(*predict_args("sample", "old.ckpt", "--data.init_args.num_samples", "4",
                              "--data.init_args.tokenizer_ckpt", str(TOKENIZER_CKPT)))
    assert "old.ckpt (--ckpt_path) records no tokenizer" in caplog.text
    assert Path("runs/sample/samples.npz").is_file()


# ---- settings checked where they are made ---------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [{"temperature": 0.0}, {"temperature": -1.0}, {"temperature": float("nan")},
                                      {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.01}])
def test_token_sampler_refuses_impossible_settings(settings):
    """Built directly (not from SamplerSettings), the token sampler applies the same checks."""
    with pytest.raises(ValueError, match=f"sampler.{next(iter(settings))} must be"):
        TokenSampler(**settings)


# ---- `test` runs every stage's validation metrics ----------------------------------------------------------------
@pytest.mark.parametrize("stage,ckpt,metric", [("tokenizer", TOKENIZER_CKPT, "test/psnr"),
                                               ("any_order", STAGE1_CKPT, "test/nll_random")])
def test_test_subcommand_reports_the_validation_metrics(stage, ckpt, metric, stage1_run, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_run(stage1_run, tmp_path))
    cli = run_cli("test", *stage_configs(stage), *tiny_preset(stage), *SMALL_DATA, *QUIET,
                  "--trainer.limit_test_batches", "1", "--ckpt_path", ckpt)
    metrics = cli.trainer.callback_metrics
    assert metric in metrics and "test/loss" in metrics and bool(torch.isfinite(metrics["test/loss"]))
