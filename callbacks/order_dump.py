"""Dump generation orders every few epochs: an `.npz` file per epoch plus order heatmaps in TensorBoard.

It relies on the AR LightningModule's sampling interface (`evaluation.sampling`): `pl_module.generate`
and `pl_module.num_classes`.
"""

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.heatmaps import order_map_images, samples_with_heatmaps_grid
from callbacks.schedule import final_evaluation_due, is_due
from callbacks.tensorboard import run_folder, tensorboard_writer
from evaluation.sampling import cycle_labels, eval_mode, generate_batches
from fileio import save_npz


class OrderDumpCallback(pl.Callback):
    """Every `every_n_epochs` validation epochs, and at the end of training, sample a fixed set and record its orders.

    Writes `<out_dir or the run folder (trainer.log_dir)>/orders/epoch_<N>.npz` (N the 0-based epoch), and
    `orders/final.npz` when training ends (however it stops: max_epochs, max_steps, max_time), with
    `step_maps` (b,h,w), `orders` (b,n), `labels` (b,), `images` uint8 (b,3,H,W), and scalars
    `n_steps`, `epoch`, `global_step`. With a TensorBoardLogger it also logs the images
    "orders/samples_and_heatmaps", "orders/mean_map" and, with several classes, "orders/class_mean_maps"
    (`callbacks.heatmaps.order_map_images`). All heatmaps share the fixed colour scale 0..n-1, so epochs
    compare directly.
    Runs on global rank 0 only; the same seed each time, so the samples differ only by training.

    Args:
        every_n_epochs: dump after every this many epochs; 0 = never (not at the end either).
        num_samples: samples per dump; labels cycle over the classes.
        seed: seed of the sampling generator.
        out_dir: root folder of the `orders/` folder; default the run folder (`trainer.log_dir`, e.g. runs/any_order).
    """

    def __init__(
        self, every_n_epochs: int = 1, num_samples: int = 16, seed: int = 0, out_dir: str | None = None
    ):
        super().__init__()
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.seed = seed
        self.out_dir = out_dir
        self._warned = False
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None  # (global step, samples) of the last dump

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and is_due(trainer.current_epoch, self.every_n_epochs):
            self.dump(trainer, pl_module, f"epoch_{trainer.current_epoch}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if final_evaluation_due(trainer, self.every_n_epochs, None):  # written even if this step's dump exists
            self.dump(trainer, pl_module, "final")

    def dump(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> Path | None:
        """Sample (or reuse this step's samples), write `orders/<name>.npz` and log the heatmaps; rank 0 only."""
        root = run_folder(trainer, self.out_dir)  # on every rank: a collective under DDP
        if not trainer.is_global_zero:
            return None
        if not hasattr(pl_module, "generate"):
            if not self._warned:
                rank_zero_warn(f"OrderDumpCallback: {type(pl_module).__name__} has no `generate`; skipped.")
                self._warned = True
            return None
        if self._last is not None and self._last[0] == trainer.global_step:
            out = self._last[1]  # the same weights: the same samples, already in TensorBoard
        else:
            labels = cycle_labels(self.num_samples, pl_module.num_classes)
            with eval_mode(pl_module):
                out = next(generate_batches(pl_module, labels, self.num_samples, self.seed))
            out = {k: v.detach().cpu() for k, v in out.items()}
            self._last = (trainer.global_step, out)
            writer = tensorboard_writer(trainer)
            if writer is not None:
                self.log_images(writer, out, pl_module.num_classes, trainer.global_step)
        return self.write(out, trainer, name, root)

    def write(self, out: dict[str, torch.Tensor], trainer: pl.Trainer, name: str | None = None,
              root: Path | None = None) -> Path:
        """Save one dump as `<root>/orders/<name>.npz` (default name `epoch_<current epoch>`, default root
        `callbacks.tensorboard.run_folder`); returns its path."""
        root = run_folder(trainer, self.out_dir) if root is None else root
        path = root / "orders" / f"{name or f'epoch_{trainer.current_epoch}'}.npz"
        save_npz(
            path,
            {
                "step_maps": out["step_map"].numpy(),
                "orders": out["order"].numpy(),
                "labels": out["labels"].numpy(),
                "images": out["images"].numpy(),
                "n_steps": np.array(out["order"].shape[1]),
                "epoch": np.array(trainer.current_epoch),
                "global_step": np.array(trainer.global_step),
            },
        )
        return path

    @staticmethod
    def log_images(writer, out: dict[str, torch.Tensor], num_classes: int, step: int) -> None:
        """Add the sample/heatmap grid, the mean map and the per-class mean maps to a SummaryWriter."""
        n_steps = out["order"].shape[1]
        grid = samples_with_heatmaps_grid(out["images"], out["step_map"], n_steps)
        writer.add_image("orders/samples_and_heatmaps", grid, step, dataformats="CHW")
        for tag, image in order_map_images(out["step_map"], out["labels"], num_classes, n_steps).items():
            writer.add_image(tag, image, step, dataformats="CHW")
