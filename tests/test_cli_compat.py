"""The private parts of jsonargparse and Lightning the CLI relies on (lightning_modules/cli_compat.py and the
`--ckpt_path` hold-back in lightning_modules/cli.py): an upgrade that removes or changes them fails here, loudly."""

from pathlib import Path

import pytest
import torch

from tests.conftest import QUIET, SMALL_DATA, STAGE1_CKPT, config, copy_run, run_cli, tiny_preset
from tests.test_errors import CODE_SPEC, MARKER


def test_jsonargparse_print_config_hooks_exist():
    from jsonargparse import ArgumentParser
    from jsonargparse._actions import _ActionPrintConfig

    assert callable(_ActionPrintConfig.skip_print_config) and callable(_ActionPrintConfig.print_config_if_requested)
    parser = ArgumentParser()
    parser.add_argument("--x", type=int, required=True)
    assert parser.parse_args([], _skip_validation=True).x is None  # an incomplete config parses for printing


def test_lightning_calls_parse_ckpt_path_after_parse_arguments():
    """The CLI stashes --ckpt_path in `parse_arguments` so that Lightning's `_parse_ckpt_path`, which would rebuild
    the module from the checkpoint's hyper-parameters (class paths included), sees none."""
    import inspect

    from lightning.pytorch.cli import LightningCLI

    source = inspect.getsource(LightningCLI.__init__)
    assert source.index("self.parse_arguments(") < source.index("self._parse_ckpt_path()")
    assert source.index("self._parse_ckpt_path()") < source.index("self.before_instantiate_classes()")


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_a_checkpoints_hyper_parameters_never_choose_code(subcommand, stage1_run, tmp_path, monkeypatch):
    """hyper_parameters naming os.system (as the optimizer and the module class): resuming and sampling run with the
    config's classes, and nothing the file names is called."""
    monkeypatch.chdir(copy_run(stage1_run, tmp_path))
    ckpt = torch.load(STAGE1_CKPT, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], "optimizer": CODE_SPEC, "_class_path": "os.system"}
    torch.save(ckpt, "crafted.ckpt")
    if subcommand == "fit":
        cli = run_cli("fit", "--config", config("any_order"), *tiny_preset("any_order"), *SMALL_DATA, *QUIET,
                      "--trainer.max_steps", str(ckpt["global_step"] + 1), "--ckpt_path", "crafted.ckpt")
        assert type(cli.trainer.optimizers[0]).__name__ == "AdamW"
    else:
        cli = run_cli("predict", "--config", config("sample"), *SMALL_DATA, *QUIET, "--ckpt_path", "crafted.ckpt",
                      "--data.init_args.num_samples", "2")
        assert type(cli.model).__name__ == "SampleModule"
    assert not Path(MARKER).exists()
