"""The TensorBoard writer of a run, for callbacks that log images."""

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
