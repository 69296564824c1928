"""A non-finite loss or weight stops training, before any checkpoint can hold it.

A diverging run (learning rate too high, no gradient clipping) otherwise goes on with a nan loss, exits 0
and writes nan weights into `last.ckpt` and the best checkpoint, which the next stage then reads.
"""

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

LR = "model.init_args.optimizer.init_args.lr"


class NonFiniteError(ValueError):
    """Training diverged (run.py prints it as one `error:` line and exits with status 1)."""


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point tensor holds only finite values (one device sync)."""
    flags = [torch.isfinite(t).all() for t in tensors if torch.is_floating_point(t)]
    return bool(torch.stack(flags).all()) if flags else True


class StopOnNonFinite(Callback):
    """After every training batch, stop with a `NonFiniteError` if the loss or a weight is nan or inf.

    The check runs before the checkpoint callbacks' (Lightning calls those last), so the step that went
    non-finite is never saved; `last.ckpt` keeps the last periodic state. Under DDP the verdict is reduced
    over processes, so every rank stops at the same step. As a last guard, any checkpoint save whose
    weights are not finite (an end-of-training or on-exception save, `trainer.save_checkpoint`) is refused.
    """

    def __init__(self) -> None:
        self._error = ""  # the message of the divergence being raised, repeated if a save is then attempted

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs  # None under manual optimization
        loss_ok = not torch.is_tensor(loss) or bool(torch.isfinite(loss).all())
        weights_ok = all_finite(p for p in pl_module.parameters() if p.requires_grad)  # frozen ones never change
        bad = torch.tensor([not loss_ok, not weights_ok], dtype=torch.float32, device=pl_module.device)
        bad = trainer.strategy.reduce(bad, reduce_op="max")  # any rank
        if bad.any():
            what = "the loss" if bad[0] else "the weights after the optimizer step"
            self._error = (f"training diverged at step {trainer.global_step}: {what} became nan/inf; "
                           f"{_fix(trainer, pl_module)}. No checkpoint of this step was written")
            raise NonFiniteError(self._error)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if not all_finite(checkpoint["state_dict"].values()):  # e.g. a ModelCheckpoint(save_on_exception=True)
            raise NonFiniteError(self._error or f"refusing to save a checkpoint at step {trainer.global_step}: the "
                                 f"weights are nan/inf (training diverged); {_fix(trainer, pl_module)}")


def _fix(trainer: Trainer, pl_module: LightningModule) -> str:
    """Lower the lr (a resume takes the new one: `lightning_modules.learning_rate`) and clip gradients where the run
    does not; resume from the run's last checkpoint when it has one."""
    # Lightning clips gradients under automatic optimization only (the GAN tokenizer steps by hand).
    clips = pl_module.automatic_optimization and not trainer.gradient_clip_val
    clip = " or set trainer.gradient_clip_val (e.g. 1.0)" if clips else ""
    paths = [getattr(cb, "last_model_path", "") or (Path(cb.dirpath) / "last.ckpt" if cb.dirpath else "")
             for cb in trainer.checkpoint_callbacks]
    last = next((str(p) for p in paths if p and Path(p).is_file()), "")
    then = f"then resume with the same command and --ckpt_path {last}" if last else "then rerun"
    return f"lower {LR}{clip}, {then}"
