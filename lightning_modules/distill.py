"""Stage 2 of OAR: order distillation, fine-tuning the stage-1 model on its own extracted orders.

The same module as stage 1 with another source of training orders: each image's stored order (its
flipped view has its own; with K orders per view, the DataModule draws one of them for each item, anew
every epoch), replaced by a fresh random order with probability `random_order_prob`
to keep the any-order skill that inpainting needs. Starts from the stage-1 network (`init_from`: the
CLI builds `net` from the spec the checkpoint records, so no size is typed twice; `setup` loads its
weights); resuming with `--ckpt_path` restores everything from the checkpoint instead.
"""

import logging
from pathlib import Path

import torch

from datamodules.orders_file import MANIFEST, read_manifest
from fileio import file_sha256
from lightning_modules.any_order import AnyOrderModule
from lightning_modules.checkpoint_checks import check_trained_tokenizer
from models.checkpoint import load_weights_into, net_spec, read_checkpoint
from models.orders import random_order

log = logging.getLogger("oar.train")

STAGE1_HINT = "train it with `python run.py fit --config configs/any_order.yaml`"
INIT_WHAT = "stage-1 checkpoint (model.init_args.init_from)"


def read_stage1(path: str, net_class: str, mmap: bool = False) -> dict:
    """The stage-1 checkpoint `init_from`, refused when unsafe, damaged or holding another network class.

    Args:
        path: the checkpoint.
        net_class: the import path of the network class it must hold.
        mmap: map the tensors instead of reading them (the CLI only reads its `net_spec` and tokenizer record).
    """
    ckpt = read_checkpoint(path, INIT_WHAT, STAGE1_HINT, mmap=mmap)
    held = ckpt.get("net_spec", {}).get("class_path", "none")
    if held != net_class:
        raise ValueError(f"{INIT_WHAT} {path} holds a network of class {held.rpartition('.')[2]}, "
                         f"not {net_class.rpartition('.')[2]}: {STAGE1_HINT}")
    return ckpt


class DistillModule(AnyOrderModule):
    """Fine-tunes on extracted orders (batch["order"]) mixed with random orders.

    Args:
        init_from: stage-1 checkpoint: the CLI builds `net` from the spec it records, `setup` loads its weights.
        random_order_prob: probability that a training sequence uses a random order instead.
        other_orders: train on orders that another model than `init_from` extracted (the orders manifest records
            the extracting checkpoint's sha256); refused unless set, since re-fitting stage 1 without extracting
            again would otherwise go unnoticed.
        **kwargs: `AnyOrderModule`'s arguments by name (`net` included; `train_order` orders the sequences
            of images without a stored order).
    """

    def __init__(self, init_from: str | None = None, random_order_prob: float = 0.2, other_orders: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= random_order_prob <= 1.0:
            raise ValueError(f"model.init_args.random_order_prob must be in [0, 1], got {random_order_prob}")
        self.init_from, self.random_order_prob, self.other_orders = init_from, random_order_prob, other_orders

    def auto_choice_temperature(self) -> float:
        """Greedy (0) once fine-tuned on its own orders: its best sampler (docs/study.md, sections 2d and 2e);
        a fine-tune on random orders only (random_order_prob 1, the control) samples as a stage-1 model."""
        return super().auto_choice_temperature() if self.random_order_prob >= 1.0 else 0.0

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.init_from is not None:
            # When resuming (--ckpt_path), Lightning restores the checkpoint after this and replaces these weights.
            self._load_init_from()
            self._check_orders_source()
            log.info("loaded the stage-1 weights of %s (when resuming, the checkpoint replaces them)", self.init_from)

    def _check_orders_source(self) -> None:
        """Refuse orders extracted by another model than `init_from` (unless `other_orders`), naming both files."""
        orders = getattr(getattr(self.trainer, "datamodule", None), "orders_path", None)
        if orders is None or self.other_orders or not Path(orders, MANIFEST).is_file():
            return
        made_by = read_manifest(orders).get("model_sha256")
        if made_by and made_by != file_sha256(self.init_from):
            raise ValueError(f"the orders in {orders} (data.init_args.orders_path) were extracted by another model "
                             f"(sha256 {made_by[:12]}) than {self.init_from} (model.init_args.init_from): "
                             f"extract them again with `python run.py predict --config configs/extract_orders.yaml "
                             f"--ckpt_path {self.init_from}` into a new folder, or set model.init_args.other_orders: "
                             "true to train on them deliberately")

    def _load_init_from(self) -> None:
        """The stage-1 weights, refused when unsafe, damaged, non-finite, or made for other tokens or sizes."""
        ckpt = read_stage1(self.init_from, net_spec(self.net)["class_path"])
        check_trained_tokenizer(ckpt, f"{self.init_from} (model.init_args.init_from)",
                                getattr(self.trainer, "datamodule", None))
        load_weights_into(self.net, ckpt, self.init_from, INIT_WHAT, "build the network from the checkpoint's "
                          "net_spec (the CLI does, whatever size preset is given)")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.init_from is not None:
            log.info("resuming from a checkpoint: init_from (%s) is ignored, weights and optimizer come from "
                     "the checkpoint", self.init_from)

    def orders_for(self, batch: dict, stage: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """Stored orders in training (with random ones mixed in); random orders where none are stored."""
        if "order" not in batch:
            return super().orders_for(batch, stage, generator)
        order = batch["order"]
        if stage == "train" and self.random_order_prob > 0:
            b, n = order.shape
            use_random = torch.rand(b, 1, generator=generator, device=order.device) < self.random_order_prob
            order = torch.where(use_random, random_order(b, n, generator=generator, device=order.device), order)
        return order
