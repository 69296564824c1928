"""The command line of every stage: `python run.py {fit,validate,test,predict} --config configs/<stage>.yaml`.

Vocabulary size, token grid and number of classes are read by the DataModule (from the tokenizer
checkpoint and the data source) and linked into the network, so no config repeats them.
"""

import logging
import os
import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from callbacks.fid import FIDCallback

# Model arguments that describe a run, not the network: a config's values win over the checkpoint's.
RUN_SETTINGS = ("sampler", "extraction")


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
            cause = err
            while cause.__cause__ is not None or cause.__context__ is not None:
                cause = cause.__cause__ or cause.__context__
            if isinstance(cause, (FileNotFoundError, ValueError)) and cause is not err:
                raise type(cause)(str(cause)) from None  # a fresh copy: re-raising `cause` would make a cycle
            raise

    def _parse_ckpt_path(self) -> None:
        """Rebuild the model from the checkpoint's config, but keep this run's sampling/extraction settings."""
        sub = self.config.get("subcommand")
        init_args = self.config[sub].get("model", {}).get("init_args", {}) if sub else {}
        kept = {k: init_args.get(k) for k in RUN_SETTINGS if init_args.get(k) is not None}
        super()._parse_ckpt_path()
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
