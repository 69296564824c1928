"""Evaluation callbacks (FID, LPIPS diversity, order dumps) and the heatmap functions, on CPU, offline.

A fake AR LightningModule implements the sampling interface (`generate`, `num_classes`) and a fake
DataModule `real_images`. Real metric weights cannot be downloaded here, so the FID test uses a
randomly initialised Inception whose BatchNorm statistics are recalibrated on a batch (plain random
init gives near-constant features and FID ~ 0), and the LPIPS test a random SqueezeNet backbone.
"""

import urllib.error
import warnings
from pathlib import Path

import lightning.pytorch as pl
import matplotlib
import numpy as np
import pytest
import torch
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from callbacks.fid import INCEPTION_FILE, FIDCallback
from callbacks.heatmaps import (
    colorbar_image,
    labelled_maps_image,
    order_map_images,
    samples_with_heatmaps_grid,
    step_map_to_rgb,
)
from callbacks.lpips import LPIPSDiversityCallback
from callbacks.order_dump import OrderDumpCallback
from evaluation.order_stats import mean_step_map, per_class_mean_maps
from evaluation.sampling import cycle_labels

IMAGE, GRID = 32, 4  # image size, token grid side


def smooth_images(num: int, generator: torch.Generator) -> torch.Tensor:
    """Vertical two-colour gradients: a 'real' distribution far from noise. uint8 (num,3,H,W)."""
    top, bottom = torch.rand(2, num, 3, 1, 1, generator=generator)
    ramp = torch.linspace(0, 1, IMAGE).view(1, 1, IMAGE, 1)
    return ((top * (1 - ramp) + bottom * ramp) * 255).round().to(torch.uint8).expand(-1, -1, -1, IMAGE)


def class_order(label: int, generator: torch.Generator) -> torch.Tensor:
    """Class 0 raster, class 1 centre-out, other classes random: long (n,)."""
    n = GRID * GRID
    if label == 0:
        return torch.arange(n)
    if label == 1:
        yy, xx = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
        centre = (GRID - 1) / 2
        return torch.argsort(((yy - centre) ** 2 + (xx - centre) ** 2).flatten(), stable=True)
    return torch.randperm(n, generator=generator)


class TinyModule(pl.LightningModule):
    """Trains a linear layer on noise: something for the Trainer to run, without `generate`."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch).pow(2).mean())

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self.layer(batch).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class FakeAR(TinyModule):
    """Implements the AR module's sampling interface; `kind` picks smooth, noise or constant images."""

    def __init__(self, num_classes: int = 3, kind: str = "smooth"):
        super().__init__()
        self.num_classes, self.kind = num_classes, kind

    def generate(self, labels, generator=None, policy=None, choice_generator=None) -> dict:
        b = len(labels)
        if self.kind == "noise":
            images = torch.randint(0, 256, (b, 3, IMAGE, IMAGE), generator=generator, dtype=torch.uint8)
        elif self.kind == "constant":
            images = torch.full((b, 3, IMAGE, IMAGE), 128, dtype=torch.uint8)
        else:
            images = smooth_images(b, generator)
        order = torch.stack([class_order(int(c), generator) for c in labels])
        step_map = torch.argsort(order, dim=1).view(b, GRID, GRID)  # inverse permutation
        return {"images": images, "step_map": step_map, "order": order, "labels": labels}


class FakeData(pl.LightningDataModule):
    def _loader(self):
        return DataLoader(torch.randn(8, 4), batch_size=4)

    train_dataloader = val_dataloader = test_dataloader = _loader

    def real_images(self, num: int, split: str = "val") -> torch.Tensor:
        return smooth_images(num, torch.Generator().manual_seed(1234))


def make_trainer(tmp_path, callbacks, max_epochs: int = 1, logger=False) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        limit_test_batches=1,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> str:
    """A random torch-fidelity Inception with BN statistics recalibrated on one batch, saved as a file."""
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    with pytest.MonkeyPatch.context() as mp:  # its constructor always loads pretrained weights: skip that
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["64"])
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the exact batch statistics
    net.train()
    with torch.no_grad():  # feature "64" only runs the stem: those are the BN layers the tests use
        net(torch.randint(0, 256, (8, 3, IMAGE, IMAGE), generator=torch.Generator().manual_seed(0)).byte())
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch hub cache and downloads that fail at once, without touching the network."""
    calls = []

    def fail(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("offline (test)")

    # The private attribute, not set_dir(): monkeypatch restores it exactly, even if unset before.
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    return calls


# ---- (a) FID with a random Inception loaded through weights_path ------------------------------------
def test_fid_real_beats_noise(inception_weights):
    cb = FIDCallback(num_samples=16, batch_size=16, weights_path=inception_weights, feature_dim=64)
    real_like = cb.evaluate(FakeAR(kind="smooth"), FakeData())["fid"]
    noise = cb.evaluate(FakeAR(kind="noise"), FakeData())["fid"]  # reuses the cached real features
    assert np.isfinite(real_like) and real_like < noise


class ColourStats(nn.Module):
    """A custom FID feature network: per-channel mean and spread of uint8 (b,3,H,W) images -> (b,6)."""

    num_features = 6

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().flatten(2) / 255
        return torch.cat([x.mean(-1), x.std(-1)], dim=1)


def test_fid_and_kid_with_custom_feature_extractor():
    cb = FIDCallback(num_samples=16, batch_size=8, feature_extractor=ColourStats(), kid=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Kernel Inception Distance.*")
        real_like = cb.evaluate(FakeAR(kind="smooth"), FakeData())
        noise = cb.evaluate(FakeAR(kind="noise"), FakeData())
    assert real_like["fid"] < noise["fid"] and real_like["kid"] < noise["kid"]


# ---- (e) in a Trainer: logged, and no Inception weights in the checkpoint --------------------------
@pytest.mark.slow
def test_fid_logged_and_not_in_checkpoint(tmp_path, inception_weights):
    cb = FIDCallback(
        every_n_epochs=1,
        num_samples=16,
        batch_size=8,
        weights_path=inception_weights,
        feature_dim=64,
        kid=True,
    )
    trainer = make_trainer(tmp_path, [cb], max_epochs=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Kernel Inception Distance.*")
        trainer.fit(FakeAR(), datamodule=FakeData())
        assert {"val/fid", "val/kid"} <= set(trainer.callback_metrics)
        trainer.test(FakeAR(), datamodule=FakeData())
    assert "test/fid" in trainer.callback_metrics
    ckpt_path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert not [k for k in ckpt["state_dict"] if "inception" in k.lower()]
    assert all(state == {} for state in ckpt.get("callbacks", {}).values())
    assert ckpt_path.stat().st_size < 1_000_000  # Inception alone is ~95 MB


# ---- (b) offline and no weights file: one warning, no metric, training goes on ---------------------
def test_offline_metrics_warn_once_and_skip(tmp_path, offline):
    callbacks = [
        FIDCallback(every_n_epochs=1, num_samples=8, feature_dim=64),
        LPIPSDiversityCallback(every_n_epochs=1, samples_per_class=2, num_classes_to_eval=2),
    ]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(FakeAR(), datamodule=FakeData())
    messages = [str(w.message) for w in caught]
    fid = [m for m in messages if m.startswith("FIDCallback")]
    lpips = [m for m in messages if m.startswith("LPIPSDiversityCallback")]
    assert len(fid) == 1 and "weights_path" in fid[0] and INCEPTION_FILE in fid[0]
    assert len(lpips) == 1 and "weights_path" in lpips[0] and "alexnet-owt" in lpips[0]
    assert offline, "the download was attempted (and failed) instead of hitting the network"
    assert trainer.current_epoch == 2
    assert "val/fid" not in trainer.callback_metrics and "val/lpips_diversity" not in trainer.callback_metrics


def test_fid_missing_weights_path_is_skipped(tmp_path):
    cb = FIDCallback(num_samples=8, weights_path=str(tmp_path / "missing.pth"))
    with pytest.warns(UserWarning, match="does not exist"):
        assert cb.evaluate(FakeAR(), FakeData()) == {}
    assert cb.evaluate(FakeAR(), FakeData()) == {}  # stays off, no second warning


@pytest.fixture
def flush_denormal():
    """A random backbone's activations decay into denormal floats, which are ~100x slower on CPU."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


# ---- LPIPS diversity with a local (random) backbone file -------------------------------------------
def test_lpips_diversity_with_local_backbone(tmp_path, offline, flush_denormal):
    path = tmp_path / "squeezenet1_1-b8a52dc0.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    hub_before = torch.hub.get_dir()
    cb = LPIPSDiversityCallback(
        samples_per_class=3, num_classes_to_eval=2, net_type="squeeze", weights_path=str(path)
    )
    same = cb.evaluate(FakeAR(kind="constant"))
    varied = cb.evaluate(FakeAR(kind="noise"))
    assert same == pytest.approx(0.0, abs=1e-6) and varied > 1e-4
    assert not offline and torch.hub.get_dir() == hub_before


# ---- (c) order dumps and TensorBoard images -----------------------------------------------------------
def test_order_dump_files_and_tensorboard(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, [OrderDumpCallback(every_n_epochs=1, num_samples=6)], logger=logger)
    model = FakeAR()
    trainer.fit(model, datamodule=FakeData())
    assert model.training  # train mode restored after sampling
    dump = np.load(Path(trainer.log_dir) / "orders" / "epoch_0.npz")  # the run folder
    assert dump["step_maps"].shape == (6, GRID, GRID) and dump["images"].shape == (6, 3, IMAGE, IMAGE)
    assert dump["labels"].tolist() == [0, 1, 2, 0, 1, 2] and int(dump["n_steps"]) == GRID * GRID
    for steps, order in zip(dump["step_maps"], dump["orders"], strict=True):
        assert (steps.reshape(-1)[order] == np.arange(GRID * GRID)).all()
    assert not [p for p in (Path(trainer.log_dir) / "orders").iterdir() if p.suffix != ".npz"]  # no temp files left
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["images"])
    assert {"orders/samples_and_heatmaps", "orders/mean_map", "orders/class_mean_maps"} <= tags


def test_order_dump_skips_module_without_generate(tmp_path):
    trainer = make_trainer(tmp_path, [OrderDumpCallback(num_samples=2)])
    with pytest.warns(UserWarning, match="no `generate`"):
        trainer.fit(TinyModule(), datamodule=FakeData())
    assert not (tmp_path / "orders").exists()


# ---- (d) heatmap functions ---------------------------------------------------------------------------
def _rgb(value: float) -> torch.Tensor:
    rgb = np.array(matplotlib.colormaps["viridis"](value)[:3])
    return torch.tensor(np.round(rgb * 255), dtype=torch.uint8)


def test_step_map_colours_use_a_fixed_scale():
    n = 16
    full = step_map_to_rgb(torch.tensor([[[0, n - 1], [3, 5]]]), n)
    assert full.shape == (1, 3, 2, 2) and full.dtype == torch.uint8
    assert torch.equal(full[0, :, 0, 0], _rgb(0.0)) and torch.equal(full[0, :, 0, 1], _rgb(1.0))
    narrow = step_map_to_rgb(torch.tensor([[3, 5]]), n)  # the data's own min/max must not stretch it
    assert torch.equal(narrow[0, :, 0, 0], full[0, :, 1, 0])
    assert not torch.equal(narrow[0, :, 0, 0], _rgb(0.0))
    big = step_map_to_rgb(torch.tensor([[[0, n - 1], [3, 5]]]), n, out_size=32)
    assert big.shape == (1, 3, 32, 32)
    assert (big[0, :, :16, :16] == full[0, :, :1, :1]).all()  # nearest: each cell is a flat block


def test_colorbar_runs_from_first_at_top_to_last_at_bottom():
    bar = colorbar_image(16, height=200, width=64)
    assert bar.shape == (3, 200, 64) and bar.dtype == torch.uint8
    column = bar[:, :, 10].int()  # through the bar
    assert (column[:, 10] - _rgb(0.0).int()).abs().max() < 40
    assert (column[:, 190] - _rgb(1.0).int()).abs().max() < 40


def test_grid_and_mean_maps():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 0, 1, 0])
    order = torch.stack([class_order(int(c), g) for c in labels])
    steps = torch.argsort(order, dim=1).view(5, GRID, GRID)
    grid = samples_with_heatmaps_grid(smooth_images(5, g), steps, GRID * GRID, nrow=4)
    assert grid.dim() == 3 and grid.shape[0] == 3 and grid.dtype == torch.uint8
    assert torch.equal(mean_step_map(steps[labels == 0]), torch.arange(16.0).view(GRID, GRID))
    maps = per_class_mean_maps(steps, labels, num_classes=3)
    assert maps.shape == (3, GRID, GRID) and torch.isnan(maps[2]).all()
    assert torch.allclose(maps[1], steps[1].float())
    image = labelled_maps_image(maps, GRID * GRID, titles=["a", "b", "c"])
    assert image.shape[0] == 3 and image.dtype == torch.uint8
    assert cycle_labels(5, 0).tolist() == [0] * 5 and cycle_labels(5, 2).tolist() == [0, 1, 0, 1, 0]


def test_order_map_images_draw_the_mean_map_one_way_and_class_maps_only_with_classes():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 0, 1])
    steps = torch.argsort(torch.stack([class_order(int(c), g) for c in labels]), dim=1).view(4, GRID, GRID)
    images = order_map_images(steps, labels, num_classes=3, n_steps=GRID * GRID)
    assert set(images) == {"orders/mean_map", "orders/class_mean_maps"}
    mean = labelled_maps_image(mean_step_map(steps), GRID * GRID, ["mean over 4 orders"], tile_px=192)
    assert torch.equal(images["orders/mean_map"], mean)  # titled panel, fixed scale, legend
    assert set(order_map_images(steps.numpy(), labels.numpy(), 0, GRID * GRID)) == {"orders/mean_map"}
