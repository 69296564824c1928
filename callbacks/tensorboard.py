"""The TensorBoard writer and the folder of a run, for callbacks that log images or write files."""

from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


def tensorboard_writer(trainer: pl.Trainer) -> "SummaryWriter | None":
    """The SummaryWriter of the first TensorBoardLogger among the trainer's loggers, else None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def run_folder(trainer: pl.Trainer, out_dir: str | None = None) -> Path:
    """`out_dir`, else the run's log folder, else the trainer's root folder.

    `trainer.log_dir` is a collective under DDP (rank 0 broadcasts it): every rank must call this, never
    rank 0 alone, or the ranks wait on each other for ever."""
    return Path(out_dir or trainer.log_dir or trainer.default_root_dir)
