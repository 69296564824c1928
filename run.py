"""The command line of every stage: `python run.py {fit,validate,test,predict} --config configs/<stage>.yaml`.

Vocabulary size, token grid and number of classes are read by the DataModule (from the tokenizer
checkpoint and the data source) and linked into the network, so no config repeats them.

`--ckpt_path` is read as tensors and plain data only (`weights_only=True`), here and by the Trainer:
Lightning 2.6 reads the checkpoint's hyper-parameters with `weights_only=True` but hands the Trainer
`weights_only=None` (torch's default, which the TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD variable can turn off),
so this CLI passes True. The file is checked first: a damaged, unsafe or diverged (NaN) checkpoint
stops with one line naming it.
"""

import logging
import os
import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from callbacks.fid import FIDCallback
from datamodules.token_cache import check_image_size
from models.checkpoint import check_finite, read_checkpoint

# Model arguments that describe a run, not the network: a config's values win over the checkpoint's.
RUN_SETTINGS = ("sampler", "extraction")
# `--ckpt_path` values that Lightning resolves itself (not a file path).
CKPT_ALIASES = ("last", "best", "hpc", "registry")
CKPT_WHAT = "checkpoint (--ckpt_path)"
CKPT_FIX = "pass a checkpoint written by `python run.py fit` of this stage (runs/<stage>/checkpoints/*.ckpt)"


class OARCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # A link whose target the chosen network lacks (the tokenizer has no vocab_size) is skipped.
        for fact in ("vocab_size", "grid_size", "num_classes"):
            parser.link_arguments(f"data.{fact}", f"model.init_args.net.init_args.{fact}", apply_on="instantiate")
        # FID is its own top-level key (not a trainer.callbacks element), so `--fid null` removes it.
        parser.add_lightning_class_args(FIDCallback, "fid", subclass_mode=True, required=False)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        """Drop the forced callbacks set to null (`fid: null`, the default of stages without FID)."""
        return super()._instantiate_trainer(config, [c for c in callbacks if c is not None])

    def instantiate_classes(self) -> None:
        """Surface our one-line errors (missing checkpoint, stale file) instead of jsonargparse's wrapper."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            ours, cause = None, err.__cause__ or err.__context__
            while cause is not None:  # the deepest FileNotFoundError/ValueError under jsonargparse's wrapper
                if isinstance(cause, (FileNotFoundError, ValueError)):
                    ours = cause
                cause = cause.__cause__ or cause.__context__
            if ours is not None:
                raise type(ours)(str(ours)) from None  # a fresh copy: re-raising `ours` would make a cycle
            raise

    def after_instantiate_classes(self) -> None:
        """A tokenizer network must cut the images into whole tokens."""
        net, size = getattr(self.model, "net", None), getattr(self.datamodule, "image_size", None)
        if size is not None and isinstance(getattr(net, "downsample", None), int):
            check_image_size(size, net.downsample, "the tokenizer network (model.init_args.net)")

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("weights_only") is False:
            raise ValueError("--weights_only false is refused: checkpoints are read as tensors and plain data only; "
                             "drop the option")
        if "weights_only" in kwargs:
            kwargs["weights_only"] = True
        return kwargs

    def _check_ckpt_path(self, sub: str) -> None:
        """Read `--ckpt_path` safely once (mapped, not copied): one-line errors for damaged or NaN files."""
        path = self.config[sub].get("ckpt_path")
        if not path or str(path) in CKPT_ALIASES or "://" in str(path):
            return
        ckpt = read_checkpoint(path, CKPT_WHAT, CKPT_FIX, mmap=True)
        check_finite(ckpt.get("state_dict", {}), path, CKPT_WHAT)
        held = ckpt.get("net_spec", {}).get("class_path")
        wanted = self.config[sub].get("model", {}).get("init_args", {}).get("net", {}).get("class_path")
        if held and wanted and held != wanted:
            raise ValueError(f"{CKPT_WHAT} {path} holds a network of class {held.rpartition('.')[2]}, but this "
                             f"config's network is {wanted.rpartition('.')[2]}: {CKPT_FIX}")

    def _parse_ckpt_path(self) -> None:
        """Rebuild the model from the checkpoint's config, but keep this run's sampling/extraction settings."""
        sub = self.config.get("subcommand")
        if sub:
            self._check_ckpt_path(sub)
        init_args = self.config[sub].get("model", {}).get("init_args", {}) if sub else {}
        kept = {k: init_args.get(k) for k in RUN_SETTINGS if init_args.get(k) is not None}
        try:
            super()._parse_ckpt_path()
        except SystemExit as err:  # jsonargparse rejected the checkpoint's hyper-parameters
            path = self.config[sub].get("ckpt_path")
            raise ValueError(f"{CKPT_WHAT} {path} was not written for this config's model (its hyper-parameters "
                             f"do not parse): {CKPT_FIX}") from err
        for key, value in kept.items():
            self.config[sub].model.init_args[key] = value


def main(args: list[str] | None = None) -> OARCLI:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return OARCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  parser_kwargs={"parser_mode": "omegaconf"}, save_config_kwargs={"overwrite": True},
                  args=args)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:  # our errors are one line and name the fix
        if os.environ.get("OAR_TRACEBACK"):
            raise
        sys.exit(f"error: {err} (set OAR_TRACEBACK=1 for the traceback)")
