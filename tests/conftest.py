"""Shared test set-up: one thread (the tiny models here are faster without intra-op threading), and the
tiny runs of the pipeline that the CLI tests build on (tokenizer, stage 1, extracted orders).

The runs happen once per session, each in its own folder (every stage config uses paths relative to
the working directory); a test that writes copies the folder first (`copy_run`), so tests stay
independent.
"""

import shutil
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import yaml

from experiments.jobs import config_files
from experiments.plan import stage_config_files

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
NUM_IMAGES = 64  # every fixture run uses this many synthetic images (the token cache is keyed by it)
TOKENIZER_CKPT = Path("runs/tokenizer/checkpoints/last.ckpt")
STAGE1_CKPT = Path("runs/any_order/checkpoints/last.ckpt")
ORDERS = Path("runs/extracted_orders")

SMALL_DATA = ("--data.init_args.source.init_args.num_images", str(NUM_IMAGES), "--data.init_args.batch_size", "16")
QUIET = ("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")
SHORT_FIT = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.max_time", "null")


def config(name: str) -> str:
    """Absolute path of a config, e.g. config("model/ar/tiny")."""
    return str(CONFIGS / f"{name}.yaml")


def stage_configs(stage: str) -> tuple[str, ...]:
    """The `--config` arguments of a stage: its stage config, then its overlays (raster: any_order + overlay)."""
    return tuple(a for path in stage_config_files(stage) for a in ("--config", str(path)))


def typed_in(stage: str, key: str) -> dict:
    """The YAML of the file that types the top-level `key` of a stage: its stage config, or the file that config
    includes (`config:`; configs/distill.yaml takes its trainer and FID from any_order.yaml)."""
    texts = [yaml.safe_load(path.read_text()) for path in config_files([stage_config_files(stage)[0]])]
    return next((text for text in texts if key in text), texts[0])


def tiny_preset(stage: str) -> tuple[str, ...]:
    """The tiny size preset overlay of a stage config."""
    return ("--config", config("model/tokenizer/tiny" if stage == "tokenizer" else "model/ar/tiny"))


def run_cli(*args) -> object:
    """`python run.py *args` in-process, in the current folder; returns the LightningCLI."""
    import run

    with patch.object(sys, "argv", ["run.py"]):  # pytest's own arguments are not the CLI's
        return run.main(args=[str(a) for a in args])


def fit(stage: str, *extra) -> object:
    """A two-batch, one-epoch fit of a stage config with its tiny preset on the small data."""
    return run_cli("fit", *stage_configs(stage), *tiny_preset(stage), *SMALL_DATA, *QUIET, *SHORT_FIT, *extra)


def predict(stage: str, ckpt_path: str | Path, *extra) -> object:
    """`predict` of sample / extract_orders from a checkpoint on the small data."""
    return run_cli("predict", *stage_configs(stage), *SMALL_DATA, *QUIET, "--ckpt_path", ckpt_path, *extra)


def save_ar_checkpoint(net, path: Path, trained: dict | None = None, tokenizer: dict | None = None) -> Path:
    """A checkpoint of `net` as the AR training modules write it (network spec, `net.` weights, what the predict
    jobs read), without training: for unit tests of the predict modules."""
    from models.checkpoint import net_spec

    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "net_spec": net_spec(net),
                "trained": trained or {"stage": "AnyOrderModule", "train_order": "random", "choice_temperature": 3.0},
                **({"tokenizer": tokenizer} if tokenizer else {})}, path)
    return path


def copy_run(src: Path, dst: Path) -> Path:
    """Copy a fixture run folder into `dst` (a test's tmp_path) so the test may write into it."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def resave_with_one_weight_changed(src: str | Path, dst: str | Path) -> None:
    """Save a copy of a checkpoint whose first network weight is nudged (a stale-input test's new tokenizer)."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    name = next(k for k in ckpt["state_dict"] if k.startswith("net."))
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 1e-3
    torch.save(ckpt, dst)


@pytest.fixture(scope="session")
def tokenizer_run(tmp_path_factory) -> Path:
    """A folder holding runs/tokenizer/checkpoints/last.ckpt of a tiny tokenizer (2 steps)."""
    folder = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        fit("tokenizer")
    assert (folder / TOKENIZER_CKPT).is_file()
    return folder


@pytest.fixture(scope="session")
def stage1_run(tokenizer_run) -> Path:
    """The tokenizer folder plus a tiny stage-1 any-order run (runs/any_order/...) and its token cache (cache/)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tokenizer_run)
        fit("any_order")
    assert (tokenizer_run / STAGE1_CKPT).is_file()
    return tokenizer_run


@pytest.fixture(scope="session")
def orders_run(stage1_run, tmp_path_factory) -> Path:
    """A copy of the stage-1 folder plus orders extracted from it (runs/extracted_orders/orders.pt)."""
    folder = copy_run(stage1_run, tmp_path_factory.mktemp("orders"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        predict("extract_orders", STAGE1_CKPT)
    assert (folder / ORDERS / "orders.pt").is_file()
    return folder
