"""The command line of every stage: `python run.py {fit,validate,test,predict} --config configs/<stage>.yaml`.

The CLI itself (links, safe checkpoint reading, one-line errors) is `lightning_modules/cli.py`.
"""

import logging
import os
import sys

from lightning.pytorch import LightningDataModule, LightningModule

from lightning_modules.cli import OARCLI


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
