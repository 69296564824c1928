"""Bad inputs stop with one line naming the file or key and the fix; untrusted files never run (issue 8).

Every case runs the real CLI (in-process; a few also as `python run.py` subprocesses) in a copy of the
fixture pipeline folder (tokenizer, stage-1 model, token cache, extracted orders).
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.orders_file import EXTRACT_CMD
from tests.bad_files import KINDS, MARKER, write_other_vocab_tokenizer, write_truncated, write_without_tokenizer_record
from tests.conftest import (
    ORDERS,
    QUIET,
    REPO,
    SHORT_FIT,
    SMALL_DATA,
    STAGE1_CKPT,
    TOKENIZER_CKPT,
    config,
    copy_run,
    resave_with_one_weight_changed,
    run_cli,
    stage_configs,
    tiny_preset,
)

BAD = "bad.ckpt"
TOKENIZER_FIX = "python run.py fit --config configs/tokenizer.yaml"
STAGE1_FIX = "python run.py fit --config configs/any_order.yaml"
CKPT_FIX = "python run.py fit"


def fit_args(stage: str, *extra, data=SMALL_DATA) -> list[str]:
    return ["fit", *stage_configs(stage), *tiny_preset(stage), *data, *QUIET, *SHORT_FIT, *extra]


def predict_args(stage: str, ckpt: str | Path, *extra) -> list[str]:
    return ["predict", *stage_configs(stage), *SMALL_DATA, *QUIET, "--ckpt_path", str(ckpt), *extra]


TARGETS = {  # where the file goes: (good file it is made from, CLI arguments, words naming the key and the fix)
    "tokenizer_ckpt": (TOKENIZER_CKPT, lambda: fit_args("any_order", "--data.init_args.tokenizer_ckpt", BAD),
                       ("data.init_args.tokenizer_ckpt", TOKENIZER_FIX)),
    "init_from": (STAGE1_CKPT, lambda: fit_args("distill", "--model.init_args.init_from", BAD),
                  ("model.init_args.init_from", STAGE1_FIX)),
    "ckpt_path": (STAGE1_CKPT, lambda: predict_args("sample", BAD), ("--ckpt_path", CKPT_FIX)),
}


def bad_checkpoint_case(target: str, kind: str):
    src, args, words = TARGETS[target]
    write, kind_words = KINDS[kind]

    def prepare() -> tuple[list[str], tuple[str, ...]]:
        write(Path(src), Path(BAD))
        fix = words[1:] if kind != "nan" else ()  # a diverged run's fix is the learning rate
        return args(), (BAD, words[0], *fix, *kind_words)

    return prepare


# ---- every other case: prepare() runs in the run folder and returns (CLI arguments, words of the message) -----------
def sampler_case(key: str, value: str, fix: str):
    def prepare():
        return (predict_args("sample", STAGE1_CKPT, f"--model.init_args.sampler.{key}", value),
                (f"model.init_args.sampler.{key} must be {fix}", value))
    return prepare


def extraction_case(key: str, value: str):
    def prepare():
        return (predict_args("extract_orders", STAGE1_CKPT, f"--model.init_args.extraction.{key}", value,
                             "--data.init_args.orders_path", "runs/new_orders"),
                (f"model.init_args.extraction.{key} = ", "set it to"))
    return prepare


def other_tokenizer_case(command: str):
    """The stage-1 model with a tokenizer of the same vocabulary and grid but other weights."""
    def prepare():
        resave_with_one_weight_changed(TOKENIZER_CKPT, "other.ckpt")
        tok = ("--data.init_args.tokenizer_ckpt", "other.ckpt")
        args = {
            "sample": predict_args("sample", STAGE1_CKPT, *tok),
            "extract": predict_args("extract_orders", STAGE1_CKPT, *tok, "--data.init_args.orders_path", "runs/o2"),
            "resume": fit_args("any_order", *tok, "--trainer.max_epochs", "2", "--ckpt_path", str(STAGE1_CKPT)),
            "init_from": fit_args("distill", *tok, "--data.init_args.orders_path", "null"),
        }[command]
        option = "model.init_args.init_from" if command == "init_from" else "--ckpt_path"
        return args, (f"{STAGE1_CKPT} ({option})", str(TOKENIZER_CKPT), "other.ckpt", "data.init_args.tokenizer_ckpt",
                      "the tokenizer the model was trained with")
    return prepare


def other_vocabulary_case():
    """A checkpoint without a tokenizer record (older) and a tokenizer of another vocabulary."""
    write_without_tokenizer_record(STAGE1_CKPT, Path("old.ckpt"))
    write_other_vocab_tokenizer(Path("vocab32.ckpt"))
    return (predict_args("sample", "old.ckpt", "--data.init_args.tokenizer_ckpt", "vocab32.ckpt"),
            ("old.ckpt (--ckpt_path)", "vocab32.ckpt", "64 tokens", "32 tokens", "data.init_args.tokenizer_ckpt",
             "the tokenizer the model was trained with"))


def no_tokenizer_case():
    """A checkpoint without a tokenizer record and no data.init_args.tokenizer_ckpt: nothing names the tokenizer."""
    write_without_tokenizer_record(STAGE1_CKPT, Path("old.ckpt"))
    return (predict_args("sample", "old.ckpt"),
            ("data.init_args.tokenizer_ckpt is not set", "old.ckpt (--ckpt_path) records no tokenizer",
             "the tokenizer the model was trained on"))


def small_folder_case():
    """Six images, a batch of 16."""
    folder = Path("six_images")
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = ("--config", config("data/folder"), "--data.init_args.source.init_args.root", str(folder),
            "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "16")
    return fit_args("tokenizer", data=data), ("six_images", "6 usable images", "data.init_args.batch_size = 16",
                                              "set data.init_args.batch_size to 5 or less")


def corrupt_orders_file_case():
    write_truncated(ORDERS / "orders.pt", ORDERS / "orders.pt")
    return fit_args("distill"), (str(ORDERS / "orders.pt"), "truncated or corrupt", EXTRACT_CMD)


ORDER_WRITER_ONLY = '[{"class_path": "callbacks.order_writer.OrderWriter"}]'
# A class spec that runs a command if anything imports and calls it: creates the MARKER file.
CODE_SPEC = {"class_path": "os.system", "init_args": {"command": f"touch {MARKER}"}}


def crafted_case(craft, words: tuple[str, ...]):
    """The stage-1 checkpoint rewritten by `craft` (a dict -> dict), given to sampling as --ckpt_path."""
    def prepare():
        torch.save(craft(torch.load(STAGE1_CKPT, map_location="cpu", weights_only=True)), BAD)
        return predict_args("sample", BAD), (BAD, *words)
    return prepare


def restaged_case(config_stage: str, written_by: str, resume_with: str):
    """A checkpoint recording another training stage than the config's, given to `fit --ckpt_path`."""
    def prepare():
        ckpt = torch.load(STAGE1_CKPT, map_location="cpu", weights_only=True)
        ckpt["trained"] = {**ckpt["trained"], "stage": written_by}
        torch.save(ckpt, BAD)
        return fit_args(config_stage, "--ckpt_path", BAD), (BAD, f"written by the {written_by} stage", resume_with)
    return prepare


def other_orders_case():
    """Stage 1 re-fitted (one weight changed) and the orders not extracted again."""
    resave_with_one_weight_changed(STAGE1_CKPT, "refit.ckpt")
    return fit_args("distill", "--model.init_args.init_from", "refit.ckpt"), (
        str(ORDERS), "refit.ckpt (model.init_args.init_from)", "extracted by another model",
        "model.init_args.other_orders")


def code_tokenizer_case():
    """A tokenizer checkpoint whose network spec names code, given as data.init_args.tokenizer_ckpt."""
    ckpt = torch.load(TOKENIZER_CKPT, map_location="cpu", weights_only=True)
    torch.save({**ckpt, "net_spec": CODE_SPEC}, BAD)
    return fit_args("any_order", "--data.init_args.tokenizer_ckpt", BAD), (BAD, "net_spec.class_path", "'os.system'")


def fixed(args: list[str], words: tuple[str, ...]):
    return lambda: (args, words)


IMAGE_SIZE = "--data.init_args.source.init_args.image_size"
CASES = {
    **{f"{kind} as {target}": bad_checkpoint_case(target, kind) for target in TARGETS for kind in KINDS},
    "stage-1 checkpoint as tokenizer_ckpt": fixed(
        fit_args("any_order", "--data.init_args.tokenizer_ckpt", str(STAGE1_CKPT)),
        ("data.init_args.tokenizer_ckpt", "not a tokenizer", TOKENIZER_FIX)),
    "missing init_from": fixed(fit_args("distill", "--model.init_args.init_from", "runs/nowhere.ckpt"),
                               ("model.init_args.init_from", "runs/nowhere.ckpt", "not found", STAGE1_FIX)),
    "missing --ckpt_path": fixed(predict_args("sample", "runs/nowhere.ckpt"),
                                 ("--ckpt_path", "runs/nowhere.ckpt", "not found", CKPT_FIX)),
    "tokenizer checkpoint as init_from": fixed(
        fit_args("distill", "--model.init_args.init_from", str(TOKENIZER_CKPT)),
        ("model.init_args.init_from", "VQAutoencoder", "not OrderedTransformer", STAGE1_FIX)),
    "tokenizer checkpoint as --ckpt_path of sampling": fixed(
        predict_args("sample", TOKENIZER_CKPT), ("--ckpt_path", str(TOKENIZER_CKPT), "VQAutoencoder", CKPT_FIX)),
    "--weights_only false": fixed(fit_args("tokenizer", "--weights_only", "false"), ("--weights_only", "drop")),
    "another tokenizer, sampling": other_tokenizer_case("sample"),
    "another tokenizer, extraction": other_tokenizer_case("extract"),
    "another tokenizer, resumed fit": other_tokenizer_case("resume"),
    "another tokenizer, distillation init_from": other_tokenizer_case("init_from"),
    "another vocabulary, checkpoint without record": other_vocabulary_case,
    "checkpoint without record, no tokenizer given": no_tokenizer_case,
    "sampling without --ckpt_path": fixed(["predict", "--config", config("sample"), *SMALL_DATA, *QUIET],
                                          ("tokenizer_ckpt is not set", "--ckpt_path", TOKENIZER_FIX)),
    "image_size not a multiple, AR stage": fixed(
        fit_args("any_order", IMAGE_SIZE, "30"), (IMAGE_SIZE[2:] + " = 30", "multiple of 4", str(TOKENIZER_CKPT))),
    "image_size not a multiple, tokenizer stage": fixed(
        fit_args("tokenizer", IMAGE_SIZE, "30"), (IMAGE_SIZE[2:] + " = 30", "multiple of 4", "model.init_args.net")),
    "image_size 0": fixed(fit_args("tokenizer", IMAGE_SIZE, "0"), (IMAGE_SIZE[2:] + " = 0", "positive multiple")),
    "temperature 0": sampler_case("temperature", "0", "> 0"),
    "temperature -1": sampler_case("temperature", "-1", "> 0"),
    "top_p 0": sampler_case("top_p", "0", "in (0, 1]"),
    "top_p 1.5": sampler_case("top_p", "1.5", "in (0, 1]"),
    "top_k -1": sampler_case("top_k", "-1", ">= 0"),
    "cfg_scale -1": sampler_case("cfg_scale", "-1", ">= 0"),
    "unknown policy": sampler_case("policy", "zigzag", "one of"),
    "positions_per_step 0": extraction_case("positions_per_step", "0"),
    "choice_temperature -1": extraction_case("choice_temperature", "-1"),
    "num_samples 0": fixed(predict_args("sample", STAGE1_CKPT, "--data.init_args.num_samples", "0"),
                           ("data.init_args.num_samples = 0", ">= 1")),
    "num_samples -3": fixed(predict_args("sample", STAGE1_CKPT, "--data.init_args.num_samples", "-3"),
                            ("data.init_args.num_samples = -3", ">= 1")),
    "folder smaller than one batch": small_folder_case,
    "extraction over the samples split": fixed(
        predict_args("extract_orders", STAGE1_CKPT, "--data.init_args.predict_split", "samples"),
        ("configs/extract_orders.yaml runs over data.init_args.predict_split train or val, not samples",)),
    "sampling over the train split": fixed(
        predict_args("sample", STAGE1_CKPT, "--data.init_args.predict_split", "train"),
        ("configs/sample.yaml runs over data.init_args.predict_split samples, not train",)),
    "sampling without its writer": fixed(
        predict_args("sample", STAGE1_CKPT, "--trainer.callbacks", ORDER_WRITER_ONLY),
        ("configs/sample.yaml writes its results with callbacks.writers.SampleWriter", "trainer.callbacks")),
    "predict with a training config": fixed(
        ["predict", "--config", config("any_order"), "--ckpt_path", str(STAGE1_CKPT), *SMALL_DATA, *QUIET],
        ("predict runs a job on a trained model", "configs/sample.yaml", "AnyOrderModule")),
    "predict with the tokenizer config": fixed(
        ["predict", "--config", config("tokenizer"), "--ckpt_path", str(TOKENIZER_CKPT), *SMALL_DATA, *QUIET],
        ("predict runs a job on a trained model", "configs/extract_orders.yaml", "TokenizerModule")),
    "distilled checkpoint resumed by the stage-1 config": restaged_case("any_order", "DistillModule",
                                                                         "configs/distill.yaml"),
    "stage-1 checkpoint resumed by the distillation config": restaged_case("distill", "AnyOrderModule",
                                                                           "configs/any_order.yaml"),
    "plain state dict as --ckpt_path": crafted_case(lambda ckpt: {"weight": torch.zeros(2)},
                                                    ("no state_dict or net_spec", CKPT_FIX)),
    "malformed tokenizer record": crafted_case(lambda ckpt: {**ckpt, "tokenizer": "runs/tokenizer"},
                                               ("malformed tokenizer record", "data.init_args.tokenizer_ckpt")),
    "net_spec naming code as --ckpt_path": crafted_case(
        lambda ckpt: {**ckpt, "net_spec": CODE_SPEC}, ("net_spec.class_path", "'os.system'", "refused unread")),
    "net_spec naming code as tokenizer_ckpt": code_tokenizer_case,
    "net_spec argument naming code": crafted_case(
        lambda ckpt: {**ckpt, "net_spec": {**ckpt["net_spec"], "init_args": {**ckpt["net_spec"]["init_args"],
                                                                              "width": CODE_SPEC}}},
        ("net_spec.init_args.width", "not a plain value")),
    "orders extracted by another model": other_orders_case,
    "orders_path is a file": fixed(predict_args("extract_orders", STAGE1_CKPT, "--data.init_args.orders_path",
                                                str(TOKENIZER_CKPT)), ("data.init_args.orders_path", "is a file")),
    "save_dir is a file": fixed(fit_args("any_order", "--trainer.logger.init_args.save_dir", str(TOKENIZER_CKPT)),
                                ("trainer.logger.init_args.save_dir", "is a file")),
    "validate --ckpt_path last without a last checkpoint": fixed(  # fit starts afresh (test_checkpointing.py)
        ["validate", *fit_args("distill", "--ckpt_path", "last")[1:]],
        ("--ckpt_path last", "runs/distill/checkpoints/last.ckpt", "start without --ckpt_path")),
    "corrupt orders.pt": corrupt_orders_file_case,
}


# One case per kind of error runs in the fast subset; the variants run with `-m slow` (CI).
FAST = ("payload as tokenizer_ckpt", "payload as init_from", "payload as ckpt_path", "truncated as ckpt_path",
        "corrupt as tokenizer_ckpt", "text as ckpt_path", "nan as tokenizer_ckpt", "nan as init_from",
        "nan as ckpt_path", "another tokenizer, sampling", "another vocabulary, checkpoint without record",
        "checkpoint without record, no tokenizer given",
        "image_size not a multiple, AR stage", "image_size 0", "temperature 0", "num_samples 0",
        "folder smaller than one batch", "corrupt orders.pt", "extraction over the samples split",
        "sampling without its writer", "predict with a training config", "distilled checkpoint resumed by the stage-1 "
        "config", "net_spec naming code as --ckpt_path", "net_spec naming code as tokenizer_ckpt",
        "malformed tokenizer record", "plain state dict as --ckpt_path", "orders extracted by another model")


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_bad_input_stops_with_one_line(case, orders_run, tmp_path, monkeypatch):
    """Each case ends in the ValueError/FileNotFoundError that run.py prints as one `error:` line."""
    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    args, words = CASES[case]()
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        run_cli(*args)
    message = str(err.value)
    assert "\n" not in message, message
    assert all(word in message for word in words), (words, message)
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert not Path(MARKER).exists()  # nothing was unpickled that could run code


@pytest.mark.slow
@pytest.mark.parametrize("case", ["payload as ckpt_path", "payload as tokenizer_ckpt", "temperature 0",
                                  "folder smaller than one batch"])
def test_bad_input_stops_the_script_with_one_error_line(case, orders_run, tmp_path):
    """The same through `python run.py`: exit code 1, one `error:` line, no traceback."""
    folder = copy_run(orders_run, tmp_path)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        args, words = CASES[case]()
    finally:
        os.chdir(cwd)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("OAR_TRACEBACK", None)
    result = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode != 0, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert all(word in errors[0] for word in words), errors[0]
    assert not (folder / MARKER).exists()


@pytest.mark.parametrize("key,value", [("data.init_args.batch_size", "0"), ("data.init_args.val_fraction", "-0.1"),
                                       ("model.init_args.label_dropout", "1.5"),
                                       ("model.init_args.warmup_steps", "-1")])
def test_impossible_training_settings_name_their_key(key, value, orders_run, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    with pytest.raises(ValueError) as err:
        run_cli(*fit_args("any_order", f"--{key}", value))
    assert f"{key} = {value}" in str(err.value) and "set it to" in str(err.value) and "\n" not in str(err.value)


def test_a_token_cache_with_fewer_rows_than_its_images_is_refused(orders_run, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    cache = next(Path(".").rglob("tokens-*.pt"))
    data = torch.load(cache, weights_only=True)
    torch.save({**data, "tokens": data["tokens"][:-3], "labels": data["labels"][:-3]}, cache)
    with pytest.raises(ValueError) as err:
        run_cli(*fit_args("any_order"))
    assert str(cache) in str(err.value) and "delete it and rerun" in str(err.value)


def test_an_empty_class_subfolder_is_named(tmp_path, caplog):
    from datamodules.sources import ImageFolderSource

    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    (tmp_path / "birds").mkdir()
    with caplog.at_level(logging.WARNING):
        source = ImageFolderSource(str(tmp_path), image_size=8)
    assert source.num_classes == 2 and "birds" in caplog.text and "no images" in caplog.text
