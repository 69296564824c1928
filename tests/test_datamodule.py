"""The shared DataModule: image batches, the seeded split, token mode and its keyed, atomic token cache."""

import logging
import os

import pytest
import torch

from datamodules.datamodule import OARDataModule
from datamodules.sources import SunsetSource
from datamodules.token_cache import cache_path, load_token_cache
from models.checkpoint import load_net
from tests.conftest import TOKENIZER_CKPT, resave_with_one_weight_changed

N = 40  # images of the DataModule-level tests (the fixture's tokenizer was trained on others: fine)


def image_dm(**kwargs) -> OARDataModule:
    kwargs.setdefault("source", SunsetSource(num_images=N))
    return OARDataModule(batch_size=8, **kwargs)


@pytest.fixture
def tokenizer_ckpt(tokenizer_run) -> str:
    return str(tokenizer_run / TOKENIZER_CKPT)


def token_dm(tokenizer_ckpt: str, cache_dir, num_images: int = N, seed: int = 0, **kwargs) -> OARDataModule:
    return OARDataModule(SunsetSource(num_images=num_images, seed=seed), batch_size=8, tokenizer_ckpt=tokenizer_ckpt,
                         cache_dir=str(cache_dir), **kwargs)


def cache_files(cache_dir) -> list[str]:
    return sorted(os.listdir(cache_dir))


def source_images(source, indices=None) -> torch.Tensor:
    """uint8 (N,3,H,W) of the given (default all) items of a source."""
    indices = range(len(source)) if indices is None else indices
    return torch.stack([source[int(i)][0] for i in indices])


# ---- image mode ----------------------------------------------------------------------------------------------------
def test_image_batches():
    dm = image_dm()
    dm.setup("fit")
    assert not dm.token_mode and dm.vocab_size is None and dm.grid_size is None
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["image"].min() < -0.5 and batch["image"].max() > 0.5  # really scaled, not just clipped
    assert batch["label"].dtype == torch.long and batch["index"].dtype == torch.long
    assert ((batch["label"] >= 0) & (batch["label"] < dm.num_classes)).all()
    # the item is the source's image, scaled
    i = int(batch["index"][0])
    assert torch.allclose(batch["image"][0], dm.source[i][0].float() / 127.5 - 1)
    assert int(batch["label"][0]) == dm.source[i][1]


def test_split_is_seeded_and_disjoint():
    train, val = image_dm().split_indices()
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(N))  # disjoint and complete
    assert len(val) == round(N * 0.1)
    again = image_dm().split_indices()
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    other = image_dm(split_seed=1).split_indices()
    assert not torch.equal(val, other[1])
    # the loaders serve exactly their split; validation in a fixed order
    dm = image_dm()
    dm.setup("fit")
    seen_val = torch.cat([b["index"] for b in dm.val_dataloader()])
    assert torch.equal(seen_val, val)
    seen_train = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert set(seen_train.tolist()) <= set(train.tolist()) and not set(seen_train.tolist()) & set(val.tolist())


def test_real_images_are_uint8_of_the_split():
    dm = image_dm()
    real = dm.real_images(3)
    assert real.dtype == torch.uint8 and real.shape == (3, 3, 32, 32)
    assert torch.equal(real, source_images(dm.source, dm.split_indices()[1][:3]))
    assert torch.equal(dm.real_images(2, split="train"), source_images(dm.source, dm.split_indices()[0][:2]))


def test_predict_samples_cycle_over_classes():
    dm = image_dm(num_samples=20, sample_seed=7)
    batches = list(dm.predict_dataloader())
    labels = torch.cat([b["label"] for b in batches])
    seeds = torch.cat([b["seed"] for b in batches])
    assert torch.equal(labels, torch.arange(20) % dm.num_classes)
    assert torch.equal(seeds, 7 + torch.arange(20))


# ---- token mode ----------------------------------------------------------------------------------------------------
def test_token_mode_facts_come_from_the_tokenizer(tokenizer_ckpt, tmp_path):
    dm = token_dm(tokenizer_ckpt, tmp_path)
    net = load_net(tokenizer_ckpt)
    assert dm.token_mode
    assert dm.vocab_size == net.vocab_size
    assert tuple(dm.grid_size) == tuple(net.grid_size(32))
    assert dm.num_classes == dm.source.num_classes
    dm.prepare_data()
    dm.setup("fit")
    h, w = dm.grid_size
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"tokens", "label", "index", "flip"}
        assert batch["tokens"].dtype == torch.long and batch["tokens"].shape[1:] == (h, w)
        assert batch["tokens"].min() >= 0 and batch["tokens"].max() < dm.vocab_size
        assert (batch["flip"] == 0).all()  # no flips configured
        cache = dm.token_cache()
        assert torch.equal(batch["tokens"], cache["tokens"][batch["index"], 0].long())
        assert torch.equal(batch["label"], cache["labels"][batch["index"]])


def test_token_cache_is_written_once(tokenizer_ckpt, tmp_path, caplog):
    first = token_dm(tokenizer_ckpt, tmp_path)
    with caplog.at_level(logging.INFO, logger="oar.data"):
        first.prepare_data()
    assert "building token cache" in caplog.text
    [name] = cache_files(tmp_path)
    assert name.startswith("tokens-") and name.endswith(".pt")  # no temp file left behind
    mtime = (tmp_path / name).stat().st_mtime_ns
    caplog.clear()
    second = token_dm(tokenizer_ckpt, tmp_path)
    with caplog.at_level(logging.INFO, logger="oar.data"):
        second.prepare_data()
        second.setup("fit")
    assert "up to date" in caplog.text and "building" not in caplog.text
    assert cache_files(tmp_path) == [name] and (tmp_path / name).stat().st_mtime_ns == mtime


def test_cache_matches_the_tokenizer(tokenizer_ckpt, tmp_path):
    dm = token_dm(tokenizer_ckpt, tmp_path)
    cache = dm.token_cache()
    assert cache["tokens"].shape == (N, 1, *dm.grid_size)
    expected = load_net(tokenizer_ckpt).encode(source_images(dm.source).float() / 127.5 - 1)
    assert torch.equal(cache["tokens"][:, 0].long(), expected)
    assert torch.equal(cache["labels"], torch.tensor([dm.source[i][1] for i in range(N)]))


def test_changed_tokenizer_gets_a_new_cache(tokenizer_ckpt, tmp_path):
    cache_dir = tmp_path / "cache"
    old = token_dm(tokenizer_ckpt, cache_dir)
    old.prepare_data()
    changed = tmp_path / "changed.ckpt"
    resave_with_one_weight_changed(tokenizer_ckpt, changed)
    new = token_dm(str(changed), cache_dir)
    new_path, old_path = cache_path(cache_dir, new.token_manifest()), cache_path(cache_dir, old.token_manifest())
    assert new_path != old_path
    new.prepare_data()
    assert sorted(cache_files(cache_dir)) == sorted([old_path.name, new_path.name])
    assert new.token_cache()["manifest"]["tokenizer_sha256"] != old.token_cache()["manifest"]["tokenizer_sha256"]


@pytest.mark.parametrize("change", [{"num_images": N - 8}, {"seed": 1}, {"flip": True}])
def test_changed_dataset_gets_another_key(tokenizer_ckpt, tmp_path, change):
    base = token_dm(tokenizer_ckpt, tmp_path)
    other = token_dm(tokenizer_ckpt, tmp_path, **change)
    assert cache_path(tmp_path, base.token_manifest()) != cache_path(tmp_path, other.token_manifest())
    assert base.token_manifest() != other.token_manifest()


def test_interrupted_cache_write_leaves_nothing(tokenizer_ckpt, tmp_path, monkeypatch):
    real_save = torch.save

    def save_then_crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the temp file is complete: the crash comes before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        token_dm(tokenizer_ckpt, tmp_path).prepare_data()
    assert cache_files(tmp_path) == []  # neither a cache nor a temp file
    monkeypatch.setattr(torch, "save", real_save)
    dm = token_dm(tokenizer_ckpt, tmp_path)
    dm.prepare_data()  # the next run builds it
    assert cache_files(tmp_path) == [cache_path(tmp_path, dm.token_manifest()).name]


def test_cache_with_wrong_manifest_is_refused(tokenizer_ckpt, tmp_path):
    dm = token_dm(tokenizer_ckpt, tmp_path)
    dm.prepare_data()
    path = cache_path(tmp_path, dm.token_manifest())
    data = torch.load(path, weights_only=True)
    data["manifest"] = {**data["manifest"], "vocab_size": 12345}
    torch.save(data, path)
    with pytest.raises(ValueError, match="does not match its manifest") as err:
        token_dm(tokenizer_ckpt, tmp_path).prepare_data()
    assert str(path) in str(err.value) and "delete" in str(err.value)
    with pytest.raises(ValueError, match="does not match its manifest"):
        load_token_cache(path, dm.token_manifest())


def test_missing_tokenizer_checkpoint_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        token_dm(str(tmp_path / "nowhere.ckpt"), tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "nowhere.ckpt" in message and "python run.py fit --config configs/tokenizer.yaml" in message


def test_flip_caches_both_views(tokenizer_ckpt, tmp_path):
    dm = token_dm(tokenizer_ckpt, tmp_path, flip=True)
    dm.prepare_data()
    dm.setup("fit")
    tokens = dm.token_cache()["tokens"]
    assert tokens.shape == (N, 2, *dm.grid_size)
    images = source_images(dm.source).float() / 127.5 - 1
    net = load_net(tokenizer_ckpt)
    assert torch.equal(tokens[:, 0].long(), net.encode(images))
    assert torch.equal(tokens[:, 1].long(), net.encode(images.flip(-1)))  # the mirrored image's tokens
    assert not torch.equal(tokens[:, 0], tokens[:, 1])
    # training draws either view, and each batch row is the cached view it names; validation never flips
    torch.manual_seed(0)
    batches = list(dm.train_dataloader())
    flips = torch.cat([b["flip"] for b in batches])
    assert set(flips.tolist()) == {0, 1}
    for b in batches:
        assert torch.equal(b["tokens"], tokens[b["index"], b["flip"]].long())
    assert all((b["flip"] == 0).all() for b in dm.val_dataloader())
