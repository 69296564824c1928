"""The orders file (shards, resumption, staleness), order statistics and the OrderWriter in real predicts."""

import json
import math

import lightning
import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from callbacks.order_writer import OrderWriter
from datamodules.orders_file import (
    EXTRACT_CMD,
    consolidate,
    finished_keys,
    finished_views,
    load_orders,
    open_for_writing,
    orders_manifest,
    read_manifest,
    write_shard,
)
from datamodules.token_cache import cache_manifest
from evaluation.order_stats import (
    adjacency_share,
    mean_step_map,
    order_agreement,
    order_statistics,
    per_class_mean_maps,
)
from fileio import file_sha256
from models.orders import order_to_step_map, random_order, raster_order
from tests.ddp import with_retries

H, W = 3, 4
N_CELLS = H * W


def token_manifest(fingerprint: str = "data-1", tokenizer: str = "tok-1", flip: bool = True) -> dict:
    return cache_manifest(fingerprint, tokenizer, flip, (H, W), 16)


def fake_order(index: int, flip: int) -> torch.Tensor:
    """A fixed permutation per key, so any batching or resumption must give the same file."""
    return torch.randperm(N_CELLS, generator=torch.Generator().manual_seed(1000 * index + flip))


def orders_of(keys: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    index, flip = torch.tensor(keys).T
    return index, flip, torch.stack([fake_order(i, f) for i, f in keys])


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "orders"
    open_for_writing(path, orders_manifest(token_manifest(), "model-1", {"score": "true_prob"}, "train", 5))
    return path


# ---- the file ------------------------------------------------------------------------------------
def test_shards_resume_and_consolidate_with_padding_duplicates(folder):
    write_shard(folder, *orders_of([(0, 0), (0, 1), (2, 0)]), tag="a")
    assert finished_keys(folder) == {(0, 0, 0), (0, 1, 0), (2, 0, 0)}  # (index, flip, k), one order per view
    assert finished_views(folder) == {(0, 0), (0, 1), (2, 0)}
    # DistributedSampler padding repeats items: the same key again, with the same order, is fine.
    write_shard(folder, *orders_of([(2, 1), (4, 0), (4, 1), (0, 0)]), tag="b")
    write_shard(folder, *orders_of([(2, 1), (2, 1)]), tag="c")
    expected = [(i, f) for i in (0, 2, 4) for f in (0, 1)]
    data = torch.load(consolidate(folder, expected), weights_only=True)
    assert data["orders"].shape == (5, 2, 1, N_CELLS) and data["orders"].dtype == torch.int16
    assert data["done"].nonzero().tolist() == [[*k, 0] for k in expected]
    assert (data["orders"][[1, 3]] == -1).all()
    assert torch.equal(data["orders"][2, 1, 0].long(), fake_order(2, 1))
    orders = load_orders(folder, token_manifest(), indices=torch.tensor([0, 2, 4]))
    assert orders.dtype == torch.long and torch.equal(orders[4, 0, 0], fake_order(4, 0))


def test_consolidate_refuses_conflicts_missing_and_unexpected_keys(folder):
    write_shard(folder, *orders_of([(0, 0), (0, 1)]), tag="a")
    with pytest.raises(ValueError, match=r"2 missing .* \[\(1, 0, 0\), \(1, 1, 0\)\]"):
        consolidate(folder, [(0, 0), (0, 1), (1, 0), (1, 1)])
    with pytest.raises(ValueError, match=r"1 unexpected .*\(0, 1, 0\)"):
        consolidate(folder, [(0, 0)])
    index, flip, order = orders_of([(0, 1)])
    write_shard(folder, index, flip, order.flip(1), tag="b")
    with pytest.raises(ValueError, match=r"conflicting orders for \(index, flip, k\) = \(0, 1, 0\)"):
        consolidate(folder, [(0, 0), (0, 1)])
    assert not (folder / "orders.pt").exists()


def test_half_written_temp_files_are_ignored(folder):
    write_shard(folder, *orders_of([(1, 0), (1, 1)]), tag="a")
    (folder / ".shard-b.pt.x1y2.tmp").write_bytes(b"half a shard")  # what a crash mid-write leaves
    (folder / "shard-c.pt.tmp").write_bytes(b"")
    assert finished_keys(folder) == {(1, 0, 0), (1, 1, 0)}
    consolidate(folder, [(1, 0), (1, 1)])
    assert finished_keys(folder.parent / "nothing") == set()


def test_open_for_writing_refuses_another_model(folder):
    open_for_writing(folder, orders_manifest(token_manifest(), "model-1", {"score": "true_prob"}, "train", 5))
    with pytest.raises(ValueError, match="model_sha256.*data.init_args.orders_path") as err:
        open_for_writing(
            folder, orders_manifest(token_manifest(), "model-2", {"score": "true_prob"}, "train", 5)
        )
    assert "\n" not in str(err.value)


def test_load_orders_refuses_missing_stale_incomplete_and_non_permutations(folder):
    with pytest.raises(FileNotFoundError) as err:
        load_orders(folder.parent / "absent", token_manifest())
    assert EXTRACT_CMD in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_orders(folder, token_manifest())  # shards, but never consolidated
    keys = [(i, f) for i in range(3) for f in (0, 1)]
    write_shard(folder, *orders_of(keys), tag="a")
    consolidate(folder, keys)
    for stale in (token_manifest(fingerprint="data-2"), token_manifest(tokenizer="tok-2")):
        with pytest.raises(ValueError, match="stale") as err:
            load_orders(folder, stale)
        assert EXTRACT_CMD in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="lacks orders") as err:
        load_orders(folder, token_manifest(), indices=torch.tensor([0, 3]))
    assert EXTRACT_CMD in str(err.value)
    data = torch.load(folder / "orders.pt", weights_only=True)
    data["orders"][1, 0, 0, :2] = 0
    torch.save(data, folder / "orders.pt")
    with pytest.raises(ValueError, match="not a permutation"):
        load_orders(folder, token_manifest())


# ---- statistics ----------------------------------------------------------------------------------
def test_order_statistics_on_hand_made_orders():
    raster = raster_order(4, N_CELLS)
    reverse = raster.flip(1)
    assert adjacency_share(raster, H, W) == 1.0 and adjacency_share(raster, H, W, neighbourhood=4) == 1.0
    assert adjacency_share(reverse, H, W) == 1.0
    # Column by column: each column's top cell touches the previous column's top cell.
    columns = torch.arange(N_CELLS).view(H, W).T.flatten()[None]
    assert adjacency_share(columns, H, W, neighbourhood=4) == 1.0
    diagonal_jump = torch.tensor([[0, 5, 10, 1, 2, 3, 4, 6, 7, 8, 9, 11]])  # 0->5->10: diagonal neighbours
    assert adjacency_share(diagonal_jump, H, W, 8) == 1.0 and adjacency_share(diagonal_jump, H, W, 4) < 1.0
    assert order_agreement(raster, H, W) == pytest.approx(1.0)
    assert order_agreement(torch.cat([raster[:1], reverse[:1]]), H, W) == pytest.approx(-1.0)
    assert torch.equal(mean_step_map(raster, H, W), torch.arange(N_CELLS, dtype=torch.float).view(H, W))
    step_maps = order_to_step_map(raster, H, W)
    assert torch.equal(mean_step_map(step_maps, H, W), mean_step_map(raster, H, W))  # step maps work too
    maps = per_class_mean_maps(torch.cat([raster[:2], reverse[:1]]), torch.tensor([0, 0, 2]), 4, H, W)
    assert torch.equal(maps[0], mean_step_map(raster, H, W)) and torch.equal(
        maps[2], mean_step_map(reverse, H, W)
    )
    assert maps[1].isnan().all() and maps[3].isnan().all()
    rand = random_order(400, 64, generator=torch.Generator().manual_seed(0))
    assert abs(order_agreement(rand, 8, 8, generator=torch.Generator().manual_seed(1))) < 0.05


def test_order_statistics_is_json_and_has_a_random_reference():
    stats = order_statistics(raster_order(6, N_CELLS), torch.tensor([0, 1, 1, 0, 1, 1]), 3, H, W)
    stats = json.loads(json.dumps(stats, allow_nan=False))
    assert stats["adjacency_share"] == 1.0 and stats["agreement"] == pytest.approx(1.0)
    assert stats["random"]["adjacency_share"] < 0.95 and abs(stats["random"]["agreement"]) < 0.2
    assert stats["class_counts"] == [2, 4, 0] and stats["per_class_mean_maps"][2][0][0] is None
    assert len(stats["mean_step_map"]) == H and len(stats["mean_step_map"][0]) == W


# ---- the writer in real predicts ----------------------------------------------------------------
class FakeExtractor(LightningModule):
    """Returns the fixed permutation of each (index, flip); raises at batch `fail_at` (an interruption)."""

    def __init__(self, fail_at: int | None = None, checkpoint: str | None = None):
        super().__init__()
        self.fail_at, self.checkpoint = fail_at, checkpoint  # the job's checkpoint, as ExtractModule has it
        self.extraction = {"score": "true_prob", "positions_per_step": 1}
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        if batch_idx == self.fail_at:
            raise RuntimeError("interrupted")
        keys = list(zip(batch["index"].tolist(), batch["flip"].tolist(), strict=True))
        return {"order": orders_of(keys)[2], "index": batch["index"], "flip": batch["flip"]}


class FakeData(LightningDataModule):
    """The names the OrderWriter reads; leaves out finished keys as the real DataModule does."""

    def __init__(self, orders_path: str, num_images: int = 9, flip: bool = True, batch_size: int = 4):
        super().__init__()
        self.orders_path, self.batch_size, self.flip = orders_path, batch_size, flip
        self.source = list(range(num_images))  # only its length (N) is read
        self.num_classes, self.predict_split = 3, "train"
        self.indices = [i for i in range(num_images) if i % 4 != 3]  # the rest is "val"

    def token_manifest(self) -> dict:
        return token_manifest(flip=self.flip)

    def extraction_keys(self) -> list[tuple[int, int]]:
        return [(i, f) for i in self.indices for f in range(2 if self.flip else 1)]

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(indices) % self.num_classes

    def predict_dataloader(self) -> DataLoader:
        done = finished_views(self.orders_path)
        items = [{"index": i, "flip": f, "pad": 0} for i, f in self.extraction_keys() if (i, f) not in done]
        # Lightning's predict sampler needs an item per process: repeats flagged as padding fill up.
        if items:
            items += [
                {**items[i % len(items)], "pad": 1} for i in range(self.trainer.world_size - len(items))
            ]
        return DataLoader(items, batch_size=self.batch_size)


def make_ckpt(path, tag: str) -> str:
    torch.save(
        {
            "state_dict": FakeExtractor().state_dict(),
            "pytorch-lightning_version": lightning.__version__,
            "tag": tag,
        },
        path,
    )
    return str(path)


def predict(root, orders_path, ckpt, fail_at=None, **trainer_kwargs) -> None:
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(root / "tb"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer = Trainer(callbacks=[OrderWriter()], **{**kwargs, **trainer_kwargs})
    trainer.predict(
        FakeExtractor(fail_at, ckpt),
        datamodule=FakeData(str(orders_path)),
        ckpt_path=ckpt,
        return_predictions=False,
    )


def tensorboard_tags(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    tags = {"images": set(), "scalars": {}}
    for file in files:
        acc = EventAccumulator(str(file), size_guidance={"images": 0, "scalars": 0}).Reload()
        tags["images"] |= set(acc.Tags()["images"])
        tags["scalars"].update({t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"]})
    return tags


def test_writer_interrupted_run_resumes_to_the_same_file(tmp_path):
    ckpt = make_ckpt(tmp_path / "stage1.ckpt", "a")
    predict(tmp_path / "full", tmp_path / "full_orders", ckpt)
    with pytest.raises(RuntimeError, match="interrupted"):
        predict(tmp_path / "cut", tmp_path / "cut_orders", ckpt, fail_at=2)
    assert (
        len(finished_keys(tmp_path / "cut_orders")) == 8 and not (tmp_path / "cut_orders/orders.pt").exists()
    )
    predict(tmp_path / "cut", tmp_path / "cut_orders", ckpt)  # skips the 8 finished keys
    full = torch.load(tmp_path / "full_orders/orders.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut_orders/orders.pt", weights_only=True)
    assert torch.equal(full["orders"], cut["orders"]) and torch.equal(full["done"], cut["done"])
    assert full["manifest"] == cut["manifest"] and full["done"].sum() == 14
    assert torch.equal(load_orders(tmp_path / "full_orders", token_manifest())[0, 1, 0], fake_order(0, 1))

    manifest = read_manifest(tmp_path / "full_orders")
    assert manifest["split"] == "train" and manifest["num_images"] == 9 and manifest["views"] == 2
    assert manifest["orders_per_image"] == 1 and "agreement_within_image" not in manifest["statistics"]
    assert manifest["settings"] == {"score": "true_prob", "positions_per_step": 1}
    stats = manifest["statistics"]
    assert stats["num_orders"] == 14 and stats["class_counts"] == [4, 4, 6]
    assert stats["random"]["adjacency_share"] is not None and not math.isnan(stats["agreement"])
    tags = tensorboard_tags(tmp_path / "full" / "tb")
    assert {"orders/mean_map", "orders/class_mean_maps"} <= tags["images"]
    assert tags["scalars"]["orders/adjacency_share"] == pytest.approx(stats["adjacency_share"])
    assert {"orders/agreement", "orders/adjacency_share_random"} <= set(tags["scalars"])

    # Everything is done: the predict loop is skipped, and the file is checked and rewritten the same.
    predict(tmp_path / "again", tmp_path / "full_orders", ckpt)
    again = torch.load(tmp_path / "full_orders/orders.pt", weights_only=True)
    assert torch.equal(again["orders"], full["orders"])
    # Another stage-1 checkpoint must not resume these orders.
    with pytest.raises(ValueError, match="model_sha256"):
        predict(tmp_path / "other", tmp_path / "cut_orders", make_ckpt(tmp_path / "other.ckpt", "b"))


def test_writer_needs_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="--ckpt_path"):
        predict(tmp_path, tmp_path / "orders", None)


def _ddp_predict(root, remaining: int | None = None) -> None:
    """Two CPU processes over 7 (odd) images; with `remaining`, all but that many keys are done already."""
    data = FakeData(str(root / "orders"), num_images=7, flip=False, batch_size=2)
    data.indices = list(range(7))
    ckpt = make_ckpt(root / "stage1.ckpt", "a")
    if remaining is not None:  # what an interrupted run leaves: its manifest and shards
        manifest = orders_manifest(
            data.token_manifest(), file_sha256(ckpt), FakeExtractor().extraction, "train", 7
        )
        open_for_writing(root / "orders", manifest)
        write_shard(root / "orders", *orders_of([(i, 0) for i in range(7 - remaining)]), tag="before")
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        callbacks=[OrderWriter()],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.predict(FakeExtractor(checkpoint=ckpt), datamodule=data, ckpt_path=ckpt, return_predictions=False)


@pytest.mark.slow
@pytest.mark.parametrize("remaining", [None, 1])
def test_ddp_predict_writes_each_order_once(tmp_path, remaining):
    # remaining=1: fewer keys than processes; the second one gets a padding repeat, which is not written.
    root = with_retries(lambda folder: _ddp_predict(folder, remaining), tmp_path)
    shards = sorted((root / "orders").glob("shard-*.pt"))
    written = [
        k for s in shards for k in zip(*(torch.load(s)[x].tolist() for x in ("index", "flip")), strict=True)
    ]
    new = [k for k in written if k[0] >= 7 - (remaining or 7)]
    assert sorted(new) == [(i, 0) for i in range(7 - (remaining or 7), 7)]  # each once, nothing repeated
    if remaining is None:
        assert {s.name.split("-")[1] for s in shards} == {"r0", "r1"}
    orders = load_orders(root / "orders", token_manifest(flip=False))
    assert torch.equal(orders[:, 0, 0], torch.stack([fake_order(i, 0) for i in range(7)]))
