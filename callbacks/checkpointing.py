"""`last.ckpt` is the final state of training: written every N steps and when training ends, whatever a metric does.

Lightning's `ModelCheckpoint(save_last=True, monitor=...)` rewrites `last.ckpt` only when it saves a top-k
checkpoint, so a run stopped by `max_steps` or `max_time` between two improvements (or mid-epoch, after a
validation) leaves an earlier step in `last.ckpt`, and every hand-off (`tokenizer_ckpt`, `init_from`,
`--ckpt_path`) would silently use stale weights. Here one monitor-less checkpoint callback owns
`last.ckpt`; the stage configs' monitored `ModelCheckpoint` only keeps the best one (no `save_last`).
"""

import os

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from fileio import atomic_write

# The temp file of a save. No "last" in the name: `--ckpt_path last` (Lightning 2.6.6 `_find_last_checkpoints`) takes
# the newest file of the folder whose name holds "last", and a killed save's temp file must never be resumed from.
TEMP_NAME = ".saving.ckpt.tmp"


class LastCheckpoint(ModelCheckpoint):
    """Writes `<run>/checkpoints/last.ckpt` every `every_n_train_steps` steps and at the end of training.

    The end of training is a `max_steps`, `max_epochs` or `max_time` stop, or an early stop; an exception
    (a crash, a non-finite loss) writes nothing, so `last.ckpt` keeps the last periodic state; a stop signal
    writes it through `save_now` (`callbacks.preemption.StopOnSignal`). The file is written as `TEMP_NAME` in the
    same folder and renamed (Lightning's own temporary file lives in the system temp folder, and a move across
    filesystems is a copy: a kill could leave half a `last.ckpt`).
    Always the same name (no `last-v1.ckpt` when the folder already holds one): a second run into the same
    folder replaces it.

    Args:
        every_n_train_steps: optimizer steps between two saves (0: only at the end of training).
        dirpath: the folder; by default `<logger save_dir>/checkpoints`, as for every `ModelCheckpoint`.
    """

    def __init__(self, every_n_train_steps: int = 200, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)
        self._written_step: int | None = None  # the global step of this process's last save

    def save_now(self, trainer: Trainer) -> str:
        """Write last.ckpt of the current step now, unless this run has just written it; returns its path.

        Every rank calls it (rank 0 writes), at the same point of the run.
        """
        if self._written_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step  # step 0, or the checkpoint this run resumed from

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        # Crossing a multiple of N, not `step % N == 0`: manual optimization may advance the step by 2 per batch.
        # (Lightning's hook would also defer to validation or warn about manual optimization.)
        n, step = self._every_n_train_steps, trainer.global_step
        if n and step // n > self._last_global_step_saved // n and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning's own hook saves only when nothing was saved during the run; this one whenever steps were
        # taken since the last save (skipped under fast_dev_run, like every ModelCheckpoint save).
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        # Every rank takes part in the save (rank 0 writes); one fixed temp name, so a rerun replaces a killed save's.
        if trainer.is_global_zero:
            temp = os.path.join(os.path.dirname(filepath), TEMP_NAME)
            atomic_write(filepath, lambda tmp: super(LastCheckpoint, self)._save_checkpoint(trainer, str(tmp)), temp)
        else:
            super()._save_checkpoint(trainer, filepath)
        trainer.strategy.barrier("LastCheckpoint.rename")
        self._last_checkpoint_saved, self._written_step = filepath, trainer.global_step
