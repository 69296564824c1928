"""Order extraction's writer: one shard per batch and process, then `orders.pt` and order statistics.

Runs under `python run.py predict --config configs/extract_orders.yaml --ckpt_path <stage-1 checkpoint>`,
whose job module (`lightning_modules.extract.ExtractModule`) returns from `predict_step`
`{"order": (b*K,n), "index": (b*K,), "flip": (b*K,), "k": (b*K,)}` for every batch of b views (K =
`extraction.orders_per_image` rows per view, view-major; "k" may be left out when K = 1); each batch
becomes a shard of the orders folder at once (nothing is kept in memory), so an interrupted run resumes:
the DataModule leaves out the (index, flip) views already written (`datamodules.orders_file.finished_views`).

What it needs from `trainer.datamodule`: `orders_path` (the folder), `token_manifest() -> dict` (the
token cache's manifest), `predict_split`, `source` (its length is N), `num_classes`,
`extraction_keys() -> list[(index, flip)]` (every view of the split, finished or not) and
`labels_of(indices (k,)) -> long (k,)`.

Lightning's predict sampler asserts that every process gets at least one item, so when fewer keys
remain than processes the DataModule pads the list with repeats flagged `"pad": 1` in the batch
(`"pad": 0` elsewhere); this writer drops flagged rows, so no key is written twice.
"""

import logging
import math
import os
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from callbacks.heatmaps import order_map_images
from callbacks.tensorboard import tensorboard_writer
from datamodules.orders_file import (
    EXTRACT_CMD,
    consolidate,
    open_for_writing,
    orders_manifest,
    write_shard,
    write_statistics,
)
from evaluation.order_stats import agreement_within_images, as_step_maps, order_statistics
from fileio import file_sha256

log = logging.getLogger("oar.extract")


def _settings(pl_module: LightningModule) -> dict:
    settings = getattr(pl_module, "extraction", None)
    if settings is None:
        return {}
    return settings.record() if hasattr(settings, "record") else dict(settings)


class OrderWriter(BasePredictionWriter):
    """Writes extracted orders to the DataModule's `orders_path` (see `datamodules/orders_file.py`).

    Consolidation happens in `teardown`, not `on_predict_end`: when every key was done before (a
    rerun after a crash between the last shard and `orders.pt`), the DataModule yields nothing and
    Lightning skips the predict loop with its start and end hooks, but every process reaches
    `teardown` (after a successful run only; an exception leaves the shards for the next run).

    Args:
        stats_max_orders: statistics use a seeded random subset of at most this many orders.
        neighbourhood: 8 or 4, the neighbourhood of the adjacency share.
        cmap: colormap of the TensorBoard heatmaps.
        seed: seed of the subset, the compared pairs and the random reference orders.
    """

    def __init__(
        self, stats_max_orders: int = 10000, neighbourhood: int = 8, cmap: str = "viridis", seed: int = 0
    ):
        super().__init__(write_interval="batch")
        self.stats_max_orders, self.neighbourhood = stats_max_orders, neighbourhood
        self.cmap, self.seed = cmap, seed
        self._path: Path | None = None
        self._count, self._start, self._run = 0, time.perf_counter(), ""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "predict":
            # A fresh name per process and run keeps shards of resumed runs and other ranks apart.
            self._path, self._count, self._run = None, 0, os.urandom(4).hex()

    def _open(self, trainer: Trainer, pl_module: LightningModule) -> Path:
        """Create or check the orders folder (once per run and process).

        The manifest records the hash of the job's checkpoint (`pl_module.checkpoint`).
        """
        if self._path is None:
            if not getattr(pl_module, "checkpoint", None):
                raise ValueError(f"order extraction needs the stage-1 model: run `{EXTRACT_CMD}`")
            dm = trainer.datamodule
            settings = _settings(pl_module)
            manifest = orders_manifest(
                dm.token_manifest(),
                file_sha256(pl_module.checkpoint),
                settings,
                dm.predict_split,
                len(dm.source),
                orders_per_image=settings.get("orders_per_image", 1),
            )
            # Every process checks (read-only unless the manifest is new) before it writes any shard.
            self._path = open_for_writing(dm.orders_path, manifest)
        return self._path

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._open(trainer, pl_module)
        self._start = time.perf_counter()

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict,
        batch_indices,
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        index, flip, order = prediction["index"], prediction["flip"], prediction["order"]
        k = prediction.get("k", torch.zeros_like(index))
        pad = torch.as_tensor(batch["pad"], device=order.device)
        keep = (pad == 0).repeat_interleave(len(order) // len(pad))  # filler repeats (module docstring), K rows each
        index, flip, k, order = index[keep], flip[keep], k[keep], order[keep]
        if len(order):
            tag = f"r{trainer.global_rank}-{self._run}-d{dataloader_idx}-b{batch_idx:07d}"
            write_shard(self._open(trainer, pl_module), index, flip, order, tag=tag, k=k)
            self._count += len(order)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        path = self._open(trainer, pl_module)
        seconds = time.perf_counter() - self._start
        # root_device, not pl_module.device: the strategy has moved the module to the CPU by now.
        count = torch.tensor(float(self._count), device=trainer.strategy.root_device)
        total = int(trainer.strategy.reduce(count, reduce_op="sum"))
        trainer.strategy.barrier("OrderWriter.shards_written")
        if trainer.is_global_zero:
            self._finish(trainer, path, total, seconds)

    def _finish(self, trainer: Trainer, path: Path, total: int, seconds: float) -> None:
        dm = trainer.datamodule
        views = dm.extraction_keys()
        out = consolidate(path, views)
        data = torch.load(out, map_location="cpu", weights_only=True)
        per = data["orders"].shape[2]  # K orders per view
        log.info(
            "extracted %d orders in %.1f s (%.2f orders/s; %d of %d were done before): %s",
            total,
            seconds,
            total / max(seconds, 1e-9),
            len(views) * per - total,
            len(views) * per,
            out,
        )
        stats, orders, labels = self._statistics(data, dm)
        stats["orders_per_second"] = total / max(seconds, 1e-9)
        write_statistics(path, stats)
        log.info(
            "order agreement %s (random %s), adjacency share %s (random %s)%s",
            stats["agreement"],
            stats["random"]["agreement"],
            stats["adjacency_share"],
            stats["random"]["adjacency_share"],
            f", agreement of the {per} orders of an image {stats['agreement_within_image']}" if per > 1 else "",
        )
        h, w = data["manifest"]["grid"]
        self._log_tensorboard(trainer, orders, labels, dm.num_classes, h, w, stats)

    def _statistics(self, data: dict, dm) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Statistics of (a seeded subset of) the orders of `orders.pt`; also the orders (m*K, n) and labels used.

        The subset takes whole views (all K orders of each); with K > 1 the statistics add
        `agreement_within_image`, the mean agreement between the K orders of the same image view.
        """
        h, w = data["manifest"]["grid"]
        per = data["orders"].shape[2]
        which = data["done"].all(dim=2).nonzero()  # (m, 2) (index, flip)
        gen = torch.Generator().manual_seed(self.seed)
        most = max(1, self.stats_max_orders // per)
        if len(which) > most:
            which = which[torch.randperm(len(which), generator=gen)[:most]]
        orders = data["orders"][which[:, 0], which[:, 1]].long()  # (m, K, n)
        labels = torch.as_tensor(dm.labels_of(which[:, 0])).long().repeat_interleave(per)
        stats = order_statistics(
            orders.flatten(0, 1), labels, dm.num_classes, h, w, neighbourhood=self.neighbourhood, seed=self.seed
        )
        if per > 1:
            stats["orders_per_image"] = per
            within = agreement_within_images(orders, h, w)
            stats["agreement_within_image"] = None if math.isnan(within) else within  # strict JSON: no NaN
        return stats, orders.flatten(0, 1), labels

    def _log_tensorboard(
        self,
        trainer: Trainer,
        orders: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        h: int,
        w: int,
        stats: dict,
    ) -> None:
        writer, step = tensorboard_writer(trainer), trainer.global_step
        if writer is None:
            return
        for tag, image in order_map_images(as_step_maps(orders, h, w), labels, num_classes, h * w, self.cmap).items():
            writer.add_image(tag, image, step)
        for name, value in (
            ("agreement", stats["agreement"]),
            ("adjacency_share", stats["adjacency_share"]),
            ("adjacency_share_random", stats["random"]["adjacency_share"]),
            ("agreement_within_image", stats.get("agreement_within_image")),
        ):
            if value is not None:
                writer.add_scalar(f"orders/{name}", value, step)
        writer.flush()
