"""The 256-pixel pipeline's parts (issue 27): the memory-mapped token cache, FID against precomputed reference
statistics (ADM's .npz format) over N samples, and the ImageNet data and multi-GPU trainer overlays."""

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import datamodules.token_cache as token_cache
from callbacks.fid import FIDCallback
from datamodules.datamodule import OARDataModule
from datamodules.sources import ImageFolderSource
from evaluation.fid import FidKid, load_reference_stats
from tests.conftest import config, run_cli
from tests.test_eval_callbacks import ColourStats, FakeAR, FakeData, smooth_images
from tests.test_pretrained import FIXTURES, run_convert
from tests.test_pretrained_chain import SIZE, write_folder


def mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of the file-backed mappings of this process (Linux)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    out = []
    for line in maps.read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[5]))
    return out


def backed_by(tensor: torch.Tensor) -> str | None:
    """The file a tensor's memory is mapped from, if any."""
    ptr = tensor.data_ptr()
    return next((path for start, end, path in mapped_files() if start <= ptr < end), None)


@pytest.fixture
def folder_dm(tmp_path):
    """A token-mode DataModule over a 30-image class folder with the converted fixture VQ (flips cached)."""
    write_folder(tmp_path / "images")
    run_convert(FIXTURES / "llamagen_vq_tiny.pt", tmp_path / "vq.ckpt")
    return OARDataModule(ImageFolderSource(str(tmp_path / "images"), image_size=SIZE), batch_size=4, flip=True,
                         tokenizer_ckpt=str(tmp_path / "vq.ckpt"), cache_dir=str(tmp_path / "cache"),
                         tokenize_batch_size=7)


def test_token_cache_is_built_into_a_file_and_read_memory_mapped(folder_dm, monkeypatch):
    built_in = []
    real = token_cache.tokenize_dataset

    def spy(*args, **kwargs):
        out, labels = real(*args, **kwargs)
        built_in.append(backed_by(out))  # while the scratch file exists
        return out, labels

    monkeypatch.setattr(token_cache, "tokenize_dataset", spy)
    cache = folder_dm.token_cache()
    path = token_cache.cache_path(folder_dm.cache_dir, folder_dm.token_manifest())
    assert built_in and built_in[0] is not None and built_in[0].endswith("tokens.raw")  # never an in-RAM tensor
    assert cache["tokens"].shape == (30, 2, 4, 4) and cache["tokens"].dtype == torch.int16
    assert backed_by(cache["tokens"]) == str(path.resolve())  # the loaded tokens are pages of the cache file
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # the scratch folder is gone
    # the file is the format every cache so far had (one torch.save dict): read as data, without mmap too
    plain = torch.load(path, weights_only=True)
    assert torch.equal(plain["tokens"], cache["tokens"]) and plain["manifest"] == folder_dm.token_manifest()
    # batch by batch (7 images a batch) into the right rows: the tokens of each image and of its mirror image
    from models.checkpoint import load_net

    vq = load_net(folder_dm.tokenizer_ckpt)
    images = torch.stack([folder_dm.source[i][0] for i in range(30)]).float() / 127.5 - 1
    assert torch.equal(cache["tokens"][:, 0].long(), vq.encode(images))
    assert torch.equal(cache["tokens"][:, 1].long(), vq.encode(images.flip(-1)))


def test_interrupted_build_leaves_no_scratch(folder_dm, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(token_cache, "save_torch", crash)
    with pytest.raises(KeyboardInterrupt):
        folder_dm.prepare_data()
    assert list(Path(folder_dm.cache_dir).iterdir()) == []


# ---- FID against reference statistics ----------------------------------------------------------------------------
def write_stats(path: Path, features: torch.Tensor, **extra) -> Path:
    f = features.double().numpy()
    np.savez(path, mu=f.mean(0), sigma=np.cov(f, rowvar=False), **extra)
    return path


def real_and_fake(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    real = smooth_images(n, torch.Generator().manual_seed(0))
    fake = torch.randint(0, 256, real.shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return real, (real.float() * 0.5 + fake.float() * 0.5).byte()


def test_fid_against_statistics_equals_fid_against_the_images(tmp_path):
    real, fake = real_and_fake()
    direct = FidKid(ColourStats(), kid=False)
    direct.update(real, real=True)
    direct.update(fake, real=False)
    expected = direct.compute()["fid"]
    stats = write_stats(tmp_path / "ref.npz", ColourStats()(real), arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    metric = FidKid(ColourStats(), kid=False)
    metric.use_reference(*load_reference_stats(stats))
    metric.update(fake, real=False)
    assert expected > 1e-3 and metric.compute()["fid"] == pytest.approx(expected, rel=1e-6)
    other = FidKid(ColourStats(), kid=False)  # another DDP process: zeros, so the summed states are rank 0's
    other.use_reference(*load_reference_stats(stats), here=False)
    assert other.fid.real_features_num_samples == 0 and not other.fid.real_features_cov_sum.any()


class DataWithSize(FakeData):
    image_size = 32

    def real_images(self, num: int, split: str = "val") -> torch.Tensor:
        raise AssertionError("FID against reference statistics reads no real image")


def test_fid_callback_compares_n_samples_with_the_statistics(tmp_path):
    real, _ = real_and_fake()
    stats = write_stats(tmp_path / "ref.npz", ColourStats()(real))
    module, drawn = FakeAR(kind="noise"), []
    generate = module.generate
    module.generate = lambda labels, **kw: (drawn.append(len(labels)), generate(labels, **kw))[1]
    cb = FIDCallback(num_samples=40, batch_size=16, feature_extractor=ColourStats(), reference_stats=str(stats))
    noisy = cb.evaluate(module, DataWithSize())["fid"]
    assert sum(drawn) == 40  # N samples, not the size of a validation set
    smooth = cb.evaluate(FakeAR(kind="smooth"), DataWithSize())["fid"]  # the statistics are kept across calls
    assert smooth < noisy


@pytest.mark.parametrize("bad, message", [
    ("missing", "not found"), ("text", "not a readable .npz"), ("keys", "hold no mu and sigma (arrays: arr_0)"),
    ("shapes", "have mu (4,) and sigma (3, 3)"), ("kid", "set fid.init_args.kid false"),
])
def test_bad_reference_statistics_stop_with_one_line(tmp_path, bad, message):
    path = tmp_path / "ref.npz"
    if bad == "text":
        path.write_text("mu sigma\n")
    elif bad == "keys":
        np.savez(path, arr_0=np.zeros(3))
    elif bad == "shapes":
        np.savez(path, mu=np.zeros(4), sigma=np.eye(3))
    elif bad == "kid":
        write_stats(path, torch.randn(10, 6))
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        FIDCallback(reference_stats=str(path), kid=bad == "kid", feature_extractor=ColourStats())
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "reference_stats" in str(err.value) or bad == "kid"


def test_statistics_of_another_feature_width_are_refused(tmp_path):
    stats = write_stats(tmp_path / "ref.npz", torch.randn(20, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="statistics are of 5 features, the FID network gives 6"):
            FidKid(ColourStats(), kid=False).use_reference(*load_reference_stats(stats))


# ---- overlays -------------------------------------------------------------------------------------------------------
def test_gpu_ddp_trainer_overlay(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", config("any_order"), "--config", config("trainer/gpu_ddp"),
                "--trainer.num_nodes", "4", "--print_config")
    printed = capsys.readouterr().out
    for line in ("accelerator: gpu", "strategy: ddp", "precision: bf16-mixed", "num_nodes: 4", "devices: -1"):
        assert re.search(rf"^\s*{line}$", printed, re.M), line


def test_imagenet_data_overlay_reads_a_class_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "images")
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", config("any_order"), "--config", config("data/imagenet"),
                "--data.init_args.source.init_args.root", "images", "--print_config")
    printed = capsys.readouterr().out
    assert "class_path: datamodules.sources.ImageFolderSource" in printed
    assert re.search(r"^\s*image_size: 256$", printed, re.M) and re.search(r"^\s*flip: true$", printed, re.M)
    source = ImageFolderSource("images", image_size=256)
    assert source.num_classes == 10 and source[0][0].shape == (3, 256, 256)


def test_sample_writer_shows_the_first_samples_and_keeps_them_all(tmp_path):
    """50,000 samples go to samples.npz; the PNG grid shows the first `max_grid_images`."""
    from types import SimpleNamespace

    from torchvision.io import read_image

    from callbacks.writers import SampleWriter
    from models.sampling import SamplerSettings

    def predictions(b: int) -> list[dict]:
        return [{"images": torch.zeros(b, 3, 8, 8, dtype=torch.uint8), "tokens": torch.zeros(b, 4, 4).long(),
                 "step_map": torch.arange(16).view(1, 4, 4).repeat(b, 1, 1), "labels": torch.zeros(b).long()}]

    trainer, module = SimpleNamespace(global_rank=0, world_size=1), SimpleNamespace(sampler=SamplerSettings())
    sizes = {}
    for shown, b in ((2, 2), (2, 6), (6, 6)):
        folder = tmp_path / f"{shown}_{b}"
        SampleWriter(str(folder), grid_rows=2, max_grid_images=shown).write_on_epoch_end(trainer, module,
                                                                                          predictions(b), [])
        with np.load(folder / "samples.npz") as data:
            assert len(data["images"]) == b
        sizes[(shown, b)] = tuple(read_image(str(folder / "samples.png")).shape)
    assert sizes[(2, 6)] == sizes[(2, 2)] != sizes[(6, 6)]
