"""The command line of every stage: `python run.py {fit,validate,test,predict} --config configs/<stage>.yaml`.

The CLI itself (links, safe checkpoint reading, one-line errors) is `lightning_modules/cli.py`.
"""

import logging
import os
import sys

from lightning.pytorch import LightningDataModule, LightningModule

from callbacks.preemption import StopOnSignal, StopRequested
from lightning_modules.cli import OARCLI


def main(args: list[str] | None = None) -> OARCLI:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return OARCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  parser_kwargs={"parser_mode": "omegaconf"}, save_config_kwargs={"overwrite": True},
                  # Every stage stops on SIGTERM/SIGINT at a step boundary, on every rank, with last.ckpt written
                  # (callbacks/preemption.py); added after the config's callbacks, so the writers run before it.
                  trainer_defaults={"callbacks": [StopOnSignal()]},
                  args=args)


if __name__ == "__main__":
    try:
        main()
    except StopRequested as stop:  # stopped by a signal: everything is written and closed (callbacks/preemption.py)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop.code)  # skips the interpreter's teardown of torch, seconds on a busy machine
    except (FileNotFoundError, ValueError) as err:  # our errors are one line and name the fix
        if os.environ.get("OAR_TRACEBACK"):
            raise
        sys.exit(f"error: {err} (set OAR_TRACEBACK=1 for the traceback)")
