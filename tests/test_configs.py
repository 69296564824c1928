"""Every YAML in configs/ runs: stage configs fit two batches, predict configs write their files, overlays
parse and instantiate on top of their stage config (tiny presets train, bigger ones only build the network).
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules.datamodule import OARDataModule
from datamodules.orders_file import load_orders, read_manifest
from datamodules.sources import SunsetSource
from experiments.plan import stage_config_files
from models.sampling import NOISY_CHOICE_TEMPERATURE
from tests.conftest import (
    CONFIGS,
    NUM_IMAGES,
    ORDERS,
    QUIET,
    SMALL_DATA,
    STAGE1_CKPT,
    TOKENIZER_CKPT,
    config,
    copy_run,
    predict,
    run_cli,
    stage_configs,
    tiny_preset,
)

STAGES = ("tokenizer", "any_order", "raster", "distill")
PREDICT = ("sample", "extract_orders", "edit")  # edit.yaml runs in tests/test_editing.py
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def fast_dev_fit(stage: str, *extra, data: tuple[str, ...] = SMALL_DATA):
    cli = run_cli("fit", *stage_configs(stage), *extra, *data, *QUIET, "--trainer.fast_dev_run", "2")
    assert cli.trainer.global_step == 2
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    return cli


def instantiate_only(monkeypatch, *args):
    """Parse the arguments and instantiate trainer, model and data, without running the subcommand."""
    import run

    monkeypatch.setattr(run.OARCLI, "_run_subcommand", lambda self, subcommand: None)
    return run_cli(*args)


def print_config(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args, "--print_config")
    assert exit_info.value.code in (None, 0)
    return capsys.readouterr().out


def work_folder(stage: str, request, tmp_path) -> Path:
    """The fixture run a stage needs, copied into tmp_path."""
    needs = {"tokenizer": None, "any_order": "tokenizer_run", "raster": "tokenizer_run", "distill": "orders_run"}[stage]
    if needs is not None:
        copy_run(request.getfixturevalue(needs), tmp_path)
    return tmp_path


def config_name(path: Path) -> str:
    return str(path.relative_to(CONFIGS).with_suffix(""))


def test_every_top_level_yaml_and_experiment_overlay_is_covered():
    used = {config_name(p) for stage in STAGES + PREDICT for p in stage_config_files(stage)}
    assert {config_name(p) for p in [*CONFIGS.glob("*.yaml"), *CONFIGS.glob("experiment/*.yaml")]} == used


@pytest.mark.parametrize("stage", STAGES)
def test_stage_config_fits(stage, request, tmp_path, monkeypatch):
    monkeypatch.chdir(work_folder(stage, request, tmp_path))
    cli = fast_dev_fit(stage, *tiny_preset(stage))
    if stage == "distill":
        assert cli.datamodule.train_set.orders is not None  # trained on the extracted orders


def test_sample_config_writes_samples(stage1_run, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_run(stage1_run, tmp_path))
    cli = predict("sample", STAGE1_CKPT, "--data.init_args.num_samples", "5", "--data.init_args.batch_size", "3")
    out = tmp_path / "runs" / "sample"
    assert (out / "samples.png").is_file()
    data = np.load(out / "samples.npz")
    assert set(data.files) == {"images", "tokens", "orders", "labels", "sampler"}
    h, w = cli.model.grid
    assert data["images"].dtype == np.uint8 and data["images"].shape == (5, 32, 32, 3)  # NHWC
    assert data["tokens"].shape == (5, h, w)
    assert data["orders"].shape == (5, h, w)
    steps = np.sort(data["orders"].reshape(5, -1), axis=1)
    assert (steps == np.arange(h * w)).all()  # each map is a permutation of 0..n-1
    assert data["labels"].tolist() == [i % cli.datamodule.num_classes for i in range(5)]
    sampler = json.loads(str(data["sampler"]))
    assert sampler["policy"] == "confidence" and sampler["temperature"] == 1.0
    assert sampler["choice_temperature"] == NOISY_CHOICE_TEMPERATURE  # `auto` for a stage-1 model: noisy choice


def test_extract_orders_config_writes_orders(orders_run):
    """The `orders_run` fixture ran `python run.py predict --config configs/extract_orders.yaml --ckpt_path ...`."""
    dm = OARDataModule(SunsetSource(num_images=NUM_IMAGES), tokenizer_ckpt=str(orders_run / TOKENIZER_CKPT),
                       cache_dir=str(orders_run / "cache"))
    train, val = dm.split_indices()
    orders = load_orders(orders_run / ORDERS, dm.token_manifest(), indices=train)
    h, w = dm.grid_size
    assert orders.shape == (NUM_IMAGES, 1, 1, h * w)  # (N, F, K, n): one view, one order per view
    assert (orders[train].sort(dim=-1).values == torch.arange(h * w)).all()
    assert (orders[val] == -1).all()  # only the train split is extracted
    manifest = read_manifest(orders_run / ORDERS)
    assert manifest["split"] == "train" and manifest["settings"]["score"] == "max_prob"
    assert 0 <= manifest["statistics"]["adjacency_share"] <= 1


# ---- overlays ------------------------------------------------------------------------------------------------------
def documented_size(preset: Path) -> float | None:
    """The parameter count a preset's comment claims ("~100M parameters"), if any."""
    found = re.search(r"~\s*([\d.]+)\s*([KM])\s*param", preset.read_text())
    return float(found[1]) * {"K": 1e3, "M": 1e6}[found[2]] if found else None


def yaml_net_args(preset: str) -> dict:
    return yaml.safe_load((CONFIGS / "model" / f"{preset}.yaml").read_text())["model"]["init_args"]["net"]["init_args"]


def test_size_presets_exist():
    for kind in ("tokenizer", "ar"):
        assert {p.stem for p in (CONFIGS / "model" / kind).glob("*.yaml")} >= {"tiny", "small", "base"}, kind


def slow_if(name: str, slow: bool):
    return pytest.param(name, marks=pytest.mark.slow) if slow else name


# Building the base networks (~100M parameters) and the released sizes (gpt_b ... randar_xl) takes seconds: in the
# slow suite.
def big_preset(name: str) -> bool:
    return name.endswith("base") or (documented_size(CONFIGS / "model" / f"{name}.yaml") or 0) > 5e7


MODEL_PRESETS = [slow_if(name, big_preset(name)) for name in sorted(
    str(p.relative_to(CONFIGS / "model").with_suffix("")) for p in CONFIGS.glob("model/*/*.yaml"))]


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_model_preset(preset, tokenizer_run, tmp_path, monkeypatch):
    kind = preset.split("/")[0]
    stage = "tokenizer" if kind == "tokenizer" else "any_order"
    if stage != "tokenizer":
        copy_run(tokenizer_run, tmp_path)
    monkeypatch.chdir(tmp_path)
    # Only build the network: test_stage_config_fits trains with the tiny presets, small/base train for minutes.
    cli = instantiate_only(monkeypatch, "fit", "--config", config(stage), "--config", config(f"model/{preset}"),
                           *SMALL_DATA, *QUIET)
    built = cli.model.net.init_args
    for key, value in yaml_net_args(preset).items():  # the overlay reached the network
        assert (list(built[key]) if isinstance(value, list) else built[key]) == value, key
    params = sum(p.numel() for p in cli.model.net.parameters())
    claimed = documented_size(CONFIGS / "model" / f"{preset}.yaml")
    if claimed is not None:
        assert 0.6 * claimed < params < 1.4 * claimed, f"{preset}: {params} parameters, the comment says {claimed:.0f}"


def write_png_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")


@pytest.mark.parametrize("data", ["synthetic", slow_if("fashion_mnist", True), slow_if("folder", True)])
def test_data_overlay(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if data == "fashion_mnist" and not FASHION_MNIST.is_dir():
        pytest.skip(f"Fashion-MNIST is not installed at {FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
    data_args = {"synthetic": SMALL_DATA, "fashion_mnist": ("--data.init_args.batch_size", "16"),
                 "folder": ("--data.init_args.batch_size", "8", "--data.init_args.source.init_args.root",
                            str(tmp_path / "images"))}[data]
    if data == "folder":
        write_png_folder(tmp_path / "images")
    cli = fast_dev_fit("tokenizer", "--config", config(f"data/{data}"), *tiny_preset("tokenizer"), data=data_args)
    expected = {"synthetic": 8, "fashion_mnist": 10, "folder": 2}[data]
    assert cli.datamodule.num_classes == expected
    if data == "synthetic":
        assert len(cli.datamodule.source) == NUM_IMAGES  # the command line wins over the overlay


def test_cpu_trainer_overlay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = fast_dev_fit("tokenizer", "--config", config("trainer/cpu"), *tiny_preset("tokenizer"))
    assert cli.trainer.num_devices == 1 and type(cli.trainer.accelerator).__name__ == "CPUAccelerator"


def test_gpu_trainer_overlay_parses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    printed = print_config(capsys, "fit", "--config", config("tokenizer"), "--config", config("trainer/gpu"))
    assert "accelerator: gpu" in printed and "precision: bf16-mixed" in printed


def test_ddp_trainer_overlay_instantiates_on_cpu(tokenizer_run, tmp_path, monkeypatch, capsys):
    from lightning.pytorch.strategies import DDPStrategy

    monkeypatch.chdir(copy_run(tokenizer_run, tmp_path))
    printed = print_config(capsys, "fit", "--config", config("any_order"), "--config", config("trainer/ddp"))
    assert "strategy: ddp" in printed and "devices: -1" in printed
    cli = instantiate_only(monkeypatch, "fit", "--config", config("any_order"), *tiny_preset("any_order"),
                           "--config", config("trainer/ddp"), "--trainer.accelerator", "cpu",
                           "--trainer.devices", "2", *SMALL_DATA, *QUIET)
    assert isinstance(cli.trainer.strategy, DDPStrategy) and cli.trainer.num_devices == 2
