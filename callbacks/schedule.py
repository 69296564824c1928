"""When the evaluation callbacks run (`PeriodicEvaluation`), and how a value computed in `on_train_end` reaches
the loggers."""

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn


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


class PeriodicEvaluation(pl.Callback):
    """Logs `scores()` as "val/<name>" every `every_n_epochs` validation epochs and once more as training ends.

    The end-of-training value (however training stops: max_epochs, max_steps, max_time) is logged at the
    final global step, unless the last evaluation was at that step already. A subclass that cannot
    measure (no weights, no `generate`) calls `_disable` once: one warning, and the run goes on without it.

    Args:
        every_n_epochs: evaluate at the end of every this many validation epochs and of training; 0 = never.
    """

    def __init__(self, every_n_epochs: int):
        super().__init__()
        self.every_n_epochs = every_n_epochs
        self._disabled = False
        self._evaluated_at: int | None = None  # global step of the last training-time evaluation

    def scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The values to log now, by name without the stage ({} when unavailable); every process calls it."""
        raise NotImplementedError

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and is_due(trainer.current_epoch, self.every_n_epochs):
            self.log_scores(trainer, pl_module, "val")
            self._evaluated_at = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if final_evaluation_due(trainer, self.every_n_epochs, self._evaluated_at):
            values = self.scores(trainer, pl_module)
            log_at_train_end(trainer, {f"val/{name}": value for name, value in values.items()})
            self._evaluated_at = trainer.global_step

    def log_scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name, value in self.scores(trainer, pl_module).items():
            pl_module.log(f"{stage}/{name}", value, sync_dist=True)  # the same value in every process

    def _disable(self, message: str) -> None:
        self._disabled = True
        rank_zero_warn(f"{type(self).__name__}: {message}")
