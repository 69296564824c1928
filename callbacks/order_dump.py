"""Dump generation orders every few epochs: an `.npz` file per epoch plus order heatmaps in TensorBoard.

Also holds the small helpers the evaluation callbacks share: sampling (`cycle_labels`, `eval_mode`,
`generate_batches`), the split of that work over processes (`process_share`, `all_ranks_agree`,
`all_sum`) and logging from `on_train_end` (`log_at_train_end`). They rely on the AR LightningModule's
sampling interface: `pl_module.generate(labels (b,), generator=None, policy=None) -> {"images": uint8
(b,3,H,W), "step_map": long (b,h,w), "order": long (b,n), "labels": (b,)}` and `pl_module.num_classes`.

Distributed runs: the samples are cut into chunks, chunk j is sampled with a generator seeded `seed + j`,
and process r generates the chunks j = r, r + W, r + 2W, ... of W processes: together they generate
exactly the samples one process generates with the same chunk size.
"""

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
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


def final_evaluation_due(trainer: pl.Trainer, every_n_epochs: int, last_step: int | None) -> bool:
    """Whether a callback evaluating every `every_n_epochs` (0 = never) should evaluate as training ends.

    Not when its last evaluation was at this global step already, and not under `fast_dev_run` (a smoke
    test of the loops, for which Lightning also turns loggers and checkpoints off).
    """
    return every_n_epochs > 0 and last_step != trainer.global_step and not trainer.fast_dev_run


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
    pl_module: pl.LightningModule, labels: torch.Tensor, batch_size: int, seed: int, policy: str | None = None,
    rank: int = 0, world_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Generate samples for `labels` in chunks of `batch_size`; chunk j with generators seeded from `seed + j`.

    With `world_size > 1`, only the chunks j with j % world_size == rank (this process's share). The
    generators live on the module's device because samplers draw on that device (a CPU generator cannot
    drive CUDA sampling). Call inside `eval_mode(pl_module)`.

    Yields:
        The module's `generate` output for each chunk of this share, on the module's device.
    """
    for j, chunk in enumerate(labels.split(batch_size)):
        if j % world_size == rank:
            generator = torch.Generator(device=pl_module.device).manual_seed(seed + j)
            yield pl_module.generate(chunk.to(pl_module.device), generator=generator, policy=policy,
                                     choice_generator=choice_generator(seed + j, pl_module.device))


def share_chunk_size(num: int, batch_size: int, world_size: int) -> int:
    """`batch_size`, or less so that `num` (>= world_size) samples make >= world_size chunks (one per process)."""
    return max(1, min(batch_size, num // world_size))


def process_share() -> tuple[int, int]:
    """(rank, world size) of this process in the default torch.distributed group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is True in every process (a collective: every process must call it)."""
    if process_share()[1] == 1:
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over all processes (a collective); `value` itself without torch.distributed."""
    if process_share()[1] == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def log_at_train_end(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Record values computed in `on_train_end`, where `LightningModule.log` is not allowed.

    Every process must call it (the values are averaged over processes, as `log(..., sync_dist=True)`
    does). They go to every logger at the final global step (loggers write on global rank 0 only) and
    into `trainer.callback_metrics` on every process.
    """
    if not metrics:
        return
    values = torch.tensor(list(metrics.values()), device=trainer.strategy.root_device)
    values = trainer.strategy.reduce(values, reduce_op="mean").tolist()
    metrics = dict(zip(metrics, values, strict=True))
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})


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
    """Every `every_n_epochs` validation epochs, and at the end of training, sample a fixed set and record its orders.

    Writes `<out_dir or the run folder (trainer.log_dir)>/orders/epoch_<N>.npz` (N the 0-based epoch), and
    `orders/final.npz` when training ends (however it stops: max_epochs, max_steps, max_time), with
    `step_maps` (b,h,w), `orders` (b,n), `labels` (b,), `images` uint8 (b,3,H,W), and scalars
    `n_steps`, `epoch`, `global_step`. With a TensorBoardLogger it also logs the images
    "orders/samples_and_heatmaps", "orders/mean_map" and "orders/class_mean_maps" (one panel per
    class that occurs). All heatmaps share the fixed colour scale 0..n-1, so epochs compare directly.
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
        return self.write(out, trainer, name)

    def write(self, out: dict[str, torch.Tensor], trainer: pl.Trainer, name: str | None = None) -> Path:
        """Save one dump as `orders/<name>.npz` (default `epoch_<current epoch>`); returns its path."""
        root = Path(self.out_dir or trainer.log_dir or trainer.default_root_dir)
        path = root / "orders" / f"{name or f'epoch_{trainer.current_epoch}'}.npz"
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
