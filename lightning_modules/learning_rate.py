"""On a resume (`--ckpt_path`), the learning rate of the config wins over the checkpoint's.

Lightning restores the optimizers' and schedulers' states after `configure_optimizers`, and those hold the learning
rate the run started with; so lowering the lr and resuming (what the divergence message advises) would otherwise
change nothing. The configured peak learning rates are kept when the optimizers are made (`remember`) and put back
after the restore (`restore_configured`), schedule position kept, with one log line.
"""

import logging

log = logging.getLogger("oar.train")


def remember(module, optimizers: list) -> None:
    """Keep the learning rates the config gives each optimizer's parameter groups (call in `configure_optimizers`)."""
    module._configured_lrs = [[group.get("initial_lr", group["lr"]) for group in opt.param_groups]
                              for opt in optimizers]


def restore_configured(module) -> None:
    """After a resume restored the optimizers: any configured learning rate that differs from the checkpoint's
    replaces it (the scheduler's base too; the current lr follows the schedule at the restored step)."""
    configured = getattr(module, "_configured_lrs", None)
    trainer = module.trainer
    if not configured or not trainer.ckpt_path:
        return
    schedulers = {id(c.scheduler.optimizer): c.scheduler for c in trainer.lr_scheduler_configs}
    for opt, lrs in zip(trainer.optimizers, configured, strict=False):
        restored = [group.get("initial_lr", group["lr"]) for group in opt.param_groups]
        if restored == lrs:
            continue
        scheduler = schedulers.get(id(opt))
        for i, (group, lr) in enumerate(zip(opt.param_groups, lrs, strict=True)):
            group["initial_lr"] = lr
            factor = scheduler.lr_lambdas[i](scheduler.last_epoch) if hasattr(scheduler, "lr_lambdas") else 1.0
            group["lr"] = lr * factor
        if scheduler is not None:
            scheduler.base_lrs = list(lrs)
        log.warning("resuming at step %d with the configured learning rate %s instead of the checkpoint's %s",
                    trainer.global_step, lrs, restored)
