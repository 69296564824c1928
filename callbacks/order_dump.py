"""Dump generation orders every few epochs: an `.npz` file per epoch plus order heatmaps in TensorBoard.

Also holds the small sampling helpers the evaluation callbacks share (`cycle_labels`, `eval_mode`,
`generate_batches`). They rely on the AR LightningModule's sampling interface:
`pl_module.generate(labels (b,), generator=None, policy=None) -> {"images": uint8 (b,3,H,W),
"step_map": long (b,h,w), "order": long (b,n), "labels": (b,)}` and `pl_module.num_classes`.
"""

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.heatmaps import (
    labelled_maps_image,
    mean_step_map,
    per_class_mean_maps,
    samples_with_heatmaps_grid,
)
from models.sampling import choice_generator


def cycle_labels(num: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., C-1, 0, 1, ... (all zeros when unconditional, C = 0): long (num,)."""
    return torch.arange(num) % num_classes if num_classes > 0 else torch.zeros(num, dtype=torch.long)


def is_due(epoch: int, every_n_epochs: int) -> bool:
    """True on the last epoch of every block of `every_n_epochs` (0-based epochs)."""
    return every_n_epochs > 0 and (epoch + 1) % every_n_epochs == 0


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for sampling; the module's previous train/eval mode comes back after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def generate_batches(
    pl_module: pl.LightningModule, labels: torch.Tensor, batch_size: int, seed: int, policy: str | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Generate samples for `labels` in chunks of `batch_size`, with one generator seeded by `seed`.

    The generator lives on the module's device because samplers draw on that device (a CPU generator
    cannot drive CUDA sampling). Call inside `eval_mode(pl_module)`.

    Yields:
        The module's `generate` output for each chunk, on the module's device.
    """
    generator = torch.Generator(device=pl_module.device).manual_seed(seed)
    choices = choice_generator(seed, pl_module.device)
    for chunk in labels.split(batch_size):
        yield pl_module.generate(chunk.to(pl_module.device), generator=generator, policy=policy,
                                 choice_generator=choices)


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an `.npz` to a temp file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # a file object, so numpy does not append another ".npz"
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tensorboard_writer(trainer: pl.Trainer):
    """The SummaryWriter of the first TensorBoardLogger among the trainer's loggers, else None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class OrderDumpCallback(pl.Callback):
    """Every `every_n_epochs` validation epochs, sample a fixed set and record the orders it used.

    Writes `<out_dir or the run folder (trainer.log_dir)>/orders/epoch_<N>.npz` (N the 0-based epoch) with
    `step_maps` (b,h,w), `orders` (b,n), `labels` (b,), `images` uint8 (b,3,H,W), and scalars
    `n_steps`, `epoch`, `global_step`. With a TensorBoardLogger it also logs the images
    "orders/samples_and_heatmaps", "orders/mean_map" and "orders/class_mean_maps" (one panel per
    class that occurs). All heatmaps share the fixed colour scale 0..n-1, so epochs compare directly.
    Runs on global rank 0 only; the same seed each time, so the samples differ only by training.

    Args:
        every_n_epochs: dump after every this many epochs.
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

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            trainer.sanity_checking
            or not trainer.is_global_zero
            or not is_due(trainer.current_epoch, self.every_n_epochs)
        ):
            return
        if not hasattr(pl_module, "generate"):
            if not self._warned:
                rank_zero_warn(f"OrderDumpCallback: {type(pl_module).__name__} has no `generate`; skipped.")
                self._warned = True
            return
        labels = cycle_labels(self.num_samples, pl_module.num_classes)
        with eval_mode(pl_module):
            out = next(generate_batches(pl_module, labels, self.num_samples, self.seed))
        out = {k: v.detach().cpu() for k, v in out.items()}
        self.write(out, trainer)
        writer = tensorboard_writer(trainer)
        if writer is not None:
            self.log_images(writer, out, pl_module.num_classes, trainer.global_step)

    def write(self, out: dict[str, torch.Tensor], trainer: pl.Trainer) -> Path:
        """Save one dump; returns the path of the `.npz`."""
        root = Path(self.out_dir or trainer.log_dir or trainer.default_root_dir)
        path = root / "orders" / f"epoch_{trainer.current_epoch}.npz"
        save_npz_atomic(
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
        step_maps, labels = out["step_map"], out["labels"]
        n_steps = out["order"].shape[1]
        grid = samples_with_heatmaps_grid(out["images"], step_maps, n_steps)
        writer.add_image("orders/samples_and_heatmaps", grid, step, dataformats="CHW")
        title = [f"mean over {len(step_maps)} samples"]
        mean = labelled_maps_image(mean_step_map(step_maps), n_steps, title, tile_px=192)
        writer.add_image("orders/mean_map", mean, step, dataformats="CHW")
        if num_classes > 0:
            maps = per_class_mean_maps(step_maps, labels, num_classes)
            present = torch.unique(labels).tolist()  # only classes that occur: ImageNet has 1000
            titles = [f"class {k} (n={int((labels == k).sum())})" for k in present]
            image = labelled_maps_image(maps[present], n_steps, titles)
            writer.add_image("orders/class_mean_maps", image, step, dataformats="CHW")
