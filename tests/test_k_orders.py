"""K orders per training image (`model.init_args.extraction.orders_per_image`): extraction, the orders
file (keys (index, flip, k)), resumption, DDP, statistics and distillation drawing one of the K orders."""

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from datamodules.datamodule import TokenSplit
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
from evaluation.order_stats import agreement_within_images
from lightning_modules.extract import ExtractModule
from models.extraction import ExtractionSettings, extract_orders, noise_seeds
from models.orders import is_permutation, random_order
from tests.conftest import (
    ORDERS,
    QUIET,
    REPO,
    SMALL_DATA,
    STAGE1_CKPT,
    config,
    copy_run,
    fit,
    predict,
    save_ar_checkpoint,
)
from tests.ddp import run_cli_subprocess
from tests.test_orders_file import N_CELLS, H, W, token_manifest
from tests.test_pipeline import Crash, one_line
from tests.test_transformer import VOCAB, N, tiny_net

K = ("--model.init_args.extraction.orders_per_image", "2")
CHOICE_NOISE = ("--model.init_args.extraction.choice_temperature", "2.0")
CRASH = "--trainer.callbacks+=tests.test_pipeline.CrashAfterFirstBatch"


# ---- settings and noise seeds ----------------------------------------------------------------------------
def test_orders_per_image_must_be_positive():
    with pytest.raises(ValueError, match=r"model\.init_args\.extraction\.orders_per_image = 0 .*>= 1") as err:
        ExtractionSettings(orders_per_image=0)
    assert "\n" not in str(err.value)


def test_the_first_order_keeps_the_noise_seeds_of_one_order_per_view():
    """k = 0 gives the seeds (so the orders) of files made before K existed; the values were computed then."""
    index, flip = torch.tensor([0, 1, 7, 12345, 2**33 + 5]), torch.tensor([0, 1, 0, 1, 0])
    before = [0, 1736833618, 499623995, 215210493, 853437256]
    assert noise_seeds(0, index, flip).tolist() == before
    assert noise_seeds(0, index, flip, torch.zeros(5, dtype=torch.long)).tolist() == before
    assert noise_seeds(2**40 + 3, index[:3], 1 - flip[:3]).tolist() == [377990374, 1804754011, 3425145189]
    per_k = torch.stack([noise_seeds(0, index, flip, torch.full((5,), k)) for k in range(4)])  # (K, b)
    assert len(per_k.unique()) == 20 and int(per_k.min()) >= 0 and int(per_k.max()) < 2**32


# ---- extraction by the module -----------------------------------------------------------------------------
def extract(batch: dict, **settings) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_ar_checkpoint(tiny_net(seed=2), Path(tmp) / "stage1.ckpt")
        module = ExtractModule(checkpoint=str(ckpt), extraction=ExtractionSettings(**settings))
    return module.predict_step(batch, 0)


@pytest.fixture
def views() -> dict:
    """Four image views (two images, both flips) of the tiny net's vocabulary."""
    g = torch.Generator().manual_seed(0)
    return {"tokens": torch.randint(0, VOCAB, (4, N), generator=g), "label": torch.tensor([0, 0, 2, 2]),
            "index": torch.tensor([5, 5, 9, 9]), "flip": torch.tensor([0, 1, 0, 1])}


def test_k_orders_are_permutations_that_differ_with_noise_and_are_copies_without(views):
    noisy = extract(views, orders_per_image=3, choice_temperature=2.0, seed=4)
    assert noisy["order"].shape == (12, N) and is_permutation(noisy["order"])
    assert noisy["k"].tolist() == [0, 1, 2] * 4 and noisy["index"].tolist() == [5] * 6 + [9] * 6
    assert noisy["flip"].tolist() == [0, 0, 0, 1, 1, 1] * 2
    per_view = noisy["order"].view(4, 3, N)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert (per_view[:, a] != per_view[:, b]).any(dim=1).all()  # every view: its K orders differ
    greedy = extract(views, orders_per_image=3)
    copies = greedy["order"].view(4, 3, N)
    assert torch.equal(copies, copies[:, :1].expand(4, 3, N))
    assert torch.equal(copies[:, 0], extract_orders(tiny_net(seed=2), views["tokens"], views["label"]))


def test_one_order_per_view_is_extracted_as_before(views):
    """K = 1 calls the extraction as it was before K existed; k = 0 of K = 3 is that same order."""
    settings = dict(choice_temperature=2.0, choice_schedule="linear", random_first=2, seed=4)
    one = extract(views, **settings)
    before = extract_orders(tiny_net(seed=2), views["tokens"], views["label"], ExtractionSettings(**settings),
                            row_seeds=noise_seeds(4, views["index"], views["flip"]))
    assert torch.equal(one["order"], before) and one["k"].tolist() == [0] * 4
    three = extract(views, orders_per_image=3, **settings)
    assert torch.equal(three["order"].view(4, 3, N)[:, 0], before)


# ---- the orders file ----------------------------------------------------------------------------------------
def fake_order(index: int, flip: int, k: int) -> torch.Tensor:
    return torch.randperm(N_CELLS, generator=torch.Generator().manual_seed(1000 * index + 10 * flip + k))


def shard_of(keys: list[tuple[int, int, int]]) -> tuple:
    index, flip, k = torch.tensor(keys).T
    return index, flip, torch.stack([fake_order(*key) for key in keys]), k


def k_folder(path, per: int = 2):
    manifest = orders_manifest(token_manifest(), "model-1", {"orders_per_image": per}, "train", 4, per)
    return open_for_writing(path, manifest)


def test_orders_file_holds_k_orders_per_view(tmp_path):
    folder = k_folder(tmp_path / "orders")
    index, flip, order, k = shard_of([(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (2, 0, 0)])
    write_shard(folder, index, flip, order, tag="a", k=k)
    assert finished_keys(folder) == {(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (2, 0, 0)}
    assert finished_views(folder) == {(0, 0), (0, 1)}  # (2, 0) lacks k = 1: a rerun extracts it again
    with pytest.raises(ValueError, match=r"3 missing \(index, flip, k\) keys .*\[\(2, 0, 1\), \(2, 1, 0\)"):
        consolidate(folder, [(0, 0), (0, 1), (2, 0), (2, 1)])
    write_shard(folder, *shard_of([(2, 0, 0), (2, 0, 1), (2, 1, 0), (2, 1, 1)])[:3], tag="b",
                k=torch.tensor([0, 1, 0, 1]))
    data = torch.load(consolidate(folder, [(0, 0), (0, 1), (2, 0), (2, 1)]), weights_only=True)
    assert data["orders"].shape == (4, 2, 2, N_CELLS) and data["done"].shape == (4, 2, 2)
    assert data["manifest"]["orders_per_image"] == 2 and data["manifest"]["format"] == 2
    orders = load_orders(folder, token_manifest(), indices=torch.tensor([0, 2]))
    assert orders.shape == (4, 2, 2, N_CELLS) and torch.equal(orders[2, 1, 1], fake_order(2, 1, 1))
    write_shard(folder, *shard_of([(3, 0, 2)])[:3], tag="c", k=torch.tensor([2]))  # k outside K = 2
    with pytest.raises(ValueError, match="2 orders per view"):
        consolidate(folder, [(0, 0), (0, 1), (2, 0), (2, 1)])


def test_orders_file_of_format_1_loads_as_one_order_per_view(tmp_path):
    """A file written before K existed: orders (N, F, n), done (N, F), format 1 without orders_per_image."""
    folder = tmp_path / "old"
    folder.mkdir()
    manifest = orders_manifest(token_manifest(), "model-1", {"score": "true_prob"}, "train", 3)
    manifest["format"] = 1
    del manifest["orders_per_image"]
    orders = torch.stack([torch.stack([fake_order(i, f, 0) for f in (0, 1)]) for i in range(3)]).to(torch.int16)
    torch.save({"orders": orders, "done": torch.ones(3, 2, dtype=torch.bool), "manifest": manifest},
               folder / "orders.pt")
    loaded = load_orders(folder, token_manifest())
    assert loaded.shape == (3, 2, 1, N_CELLS) and torch.equal(loaded[:, :, 0], orders.long())
    manifest["format"] = 3  # a format this code does not know
    torch.save({"orders": orders, "done": torch.ones(3, 2, dtype=torch.bool), "manifest": manifest},
               folder / "orders.pt")
    with pytest.raises(ValueError, match="stale") as err:
        load_orders(folder, token_manifest())
    assert EXTRACT_CMD in one_line(err)


def test_a_folder_of_another_k_is_refused_naming_the_extract_command(tmp_path):
    k_folder(tmp_path / "orders", per=1)
    with pytest.raises(ValueError, match="different orders_per_image, settings") as err:
        k_folder(tmp_path / "orders", per=2)
    assert EXTRACT_CMD in one_line(err) and "data.init_args.orders_path" in str(err.value)


# ---- statistics ---------------------------------------------------------------------------------------------
def test_agreement_within_images():
    g = torch.Generator().manual_seed(0)
    one = random_order(5, N_CELLS, generator=g)  # (m, n)
    assert agreement_within_images(one[:, None].expand(5, 3, N_CELLS), H, W) == pytest.approx(1.0)
    assert agreement_within_images(torch.stack([one, one.flip(1)], dim=1), H, W) == pytest.approx(-1.0)
    unrelated = random_order(2000, 64, generator=g).view(500, 4, 64)
    assert abs(agreement_within_images(unrelated, 8, 8)) < 0.05
    assert math.isnan(agreement_within_images(one[:, None], H, W))  # K = 1: no pairs


# ---- distillation draws one of the K orders -------------------------------------------------------------------
def test_token_split_draws_every_k_and_keeps_the_view():
    tokens, labels = torch.zeros(4, 2, 2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    orders = torch.stack([torch.stack([torch.stack([fake_order(i, f, k) for k in range(3)]) for f in (0, 1)])
                          for i in range(4)])  # (N, F, K, n)
    split = TokenSplit(tokens, labels, torch.tensor([1, 3]), flip=True, orders=orders)
    torch.manual_seed(0)
    drawn = set()
    for _ in range(60):
        item = split[1]
        ks = [k for k in range(3) if torch.equal(item["order"], orders[3, item["flip"], k])]
        assert len(ks) == 1
        drawn.add((item["flip"], ks[0]))
    assert drawn == {(f, k) for f in (0, 1) for k in range(3)}
    one = TokenSplit(tokens, labels, torch.tensor([1]), flip=False, orders=orders[:, :, :1])
    state = torch.get_rng_state()
    assert torch.equal(one[0]["order"], orders[1, 0, 0])
    assert torch.equal(torch.get_rng_state(), state)  # K = 1 draws nothing: the DataLoader's stream is unchanged


class OrderRecorder(Callback):
    """The (index, flip, order) of every training item (`--trainer.callbacks+=tests.test_k_orders.OrderRecorder`)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen += list(zip(batch["index"].tolist(), batch["flip"].tolist(), batch["order"], strict=True))


@pytest.fixture(scope="module")
def k_orders_run(stage1_run, tmp_path_factory):
    """A copy of the stage-1 folder plus K = 2 noisy orders per image (runs/extracted_orders)."""
    folder = copy_run(stage1_run, tmp_path_factory.mktemp("k_orders"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        predict("extract_orders", STAGE1_CKPT, *K, *CHOICE_NOISE)
    return folder


def test_k_order_extraction_writes_k_orders_and_their_agreement(k_orders_run):
    data = torch.load(k_orders_run / ORDERS / "orders.pt", weights_only=True)
    done = data["done"]
    assert data["orders"].shape[2] == 2 and torch.equal(done[:, :, 0], done[:, :, 1]) and int(done.sum()) > 16
    orders = data["orders"][done.all(dim=2)].long()  # (views, K, n)
    assert is_permutation(orders.flatten(0, 1)) and (orders[:, 0] != orders[:, 1]).any(dim=1).all()
    stats = read_manifest(k_orders_run / ORDERS)["statistics"]
    assert stats["orders_per_image"] == 2 and stats["num_orders"] == orders.shape[0] * 2
    assert -1 <= stats["agreement_within_image"] < 1  # the noise varies the orders of an image
    json.dumps(stats, allow_nan=False)


def test_interrupted_k_order_extraction_resumes_to_the_same_orders(stage1_run, k_orders_run, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_run(stage1_run, tmp_path))
    with pytest.raises(Crash):
        predict("extract_orders", STAGE1_CKPT, *K, *CHOICE_NOISE, CRASH)
    assert len(finished_keys(tmp_path / ORDERS)) == 32  # one batch of 16 views, 2 orders each
    predict("extract_orders", STAGE1_CKPT, *K, *CHOICE_NOISE, "--data.init_args.batch_size", "7")
    resumed = torch.load(tmp_path / ORDERS / "orders.pt", weights_only=True)
    whole = torch.load(k_orders_run / ORDERS / "orders.pt", weights_only=True)
    assert torch.equal(resumed["done"], whole["done"]) and torch.equal(resumed["orders"], whole["orders"])


def test_extraction_with_another_k_into_a_finished_folder_is_refused(orders_run, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    with pytest.raises(ValueError, match="orders_per_image") as err:
        predict("extract_orders", STAGE1_CKPT, *K)
    assert EXTRACT_CMD in one_line(err)


def test_distill_trains_on_k_orders_and_draws_every_k(k_orders_run, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_run(k_orders_run, tmp_path))
    cli = fit("distill", "--model.init_args.random_order_prob", "0",
              "--trainer.callbacks+=tests.test_k_orders.OrderRecorder")
    orders = torch.load(ORDERS / "orders.pt", weights_only=True)["orders"].long()  # (N, F, K, n)
    [recorder] = [c for c in cli.trainer.callbacks if isinstance(c, OrderRecorder)]
    drawn = []
    for index, flip, order in recorder.seen:
        ks = [k for k in range(2) if torch.equal(order, orders[index, flip, k])]
        assert ks, f"image {index}: its training order is none of its K orders"
        drawn += ks if len(ks) == 1 else []
    assert len(recorder.seen) == 32 and set(drawn) == {0, 1}


@pytest.mark.slow
def test_ddp_extraction_of_k_orders_writes_each_key_once(stage1_run, k_orders_run, tmp_path):
    copy_run(stage1_run, tmp_path)
    ddp = ("--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2")
    run_cli_subprocess(["predict", "--config", config("extract_orders"), *SMALL_DATA, *QUIET, "--ckpt_path",
                        STAGE1_CKPT, *K, *CHOICE_NOISE, *ddp], cwd=tmp_path, repo=REPO)
    written = []
    for shard in (tmp_path / ORDERS).glob("shard-*.pt"):
        data = torch.load(shard, weights_only=True)
        written += list(zip(*(data[x].tolist() for x in ("index", "flip", "k")), strict=True))
    whole = torch.load(k_orders_run / ORDERS / "orders.pt", weights_only=True)
    assert sorted(written) == [tuple(key) for key in whole["done"].nonzero().tolist()]  # every key, each once
    assert {s.name.split("-")[1] for s in (tmp_path / ORDERS).glob("shard-*.pt")} == {"r0", "r1"}
    ddp_file = torch.load(tmp_path / ORDERS / "orders.pt", weights_only=True)
    assert torch.equal(ddp_file["orders"], whole["orders"])  # per-key noise: two processes, the same orders
