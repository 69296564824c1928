"""When the evaluation callbacks run, and how a value computed in `on_train_end` reaches the loggers."""

import lightning.pytorch as pl
import torch


def is_due(epoch: int, every_n_epochs: int) -> bool:
    """True on the last epoch of every block of `every_n_epochs` (0-based epochs)."""
    return every_n_epochs > 0 and (epoch + 1) % every_n_epochs == 0


def final_evaluation_due(trainer: pl.Trainer, every_n_epochs: int, last_step: int | None) -> bool:
    """Whether a callback evaluating every `every_n_epochs` (0 = never) should evaluate as training ends.

    Not when its last evaluation was at this global step already, and not under `fast_dev_run` (a smoke
    test of the loops, for which Lightning also turns loggers and checkpoints off).
    """
    return every_n_epochs > 0 and last_step != trainer.global_step and not trainer.fast_dev_run


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
