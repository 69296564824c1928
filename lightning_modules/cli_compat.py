"""The one place the CLI uses private parts of jsonargparse: holding `--print_config` back until the config holds
what the checkpoints record (`OARCLI.parse_arguments`), and parsing a config to print without validating it (it may
be incomplete: `fit --print_config`), as jsonargparse itself does. jsonargparse has no public hook for either;
tests/test_cli_compat.py fails loudly when an upgrade removes or changes them.
"""

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from jsonargparse import Namespace
from jsonargparse._actions import _ActionPrintConfig


class HeldPrintConfig:
    """Parses with `--print_config` held back; `print_if_requested` prints the final config (and exits) if asked."""

    def __init__(self, parser, args):
        self.parser, self.args = parser, args
        argv = sys.argv[1:] if args is None else args
        self.printing = isinstance(argv, list) and any(str(a).split("=")[0] == "--print_config" for a in argv)

    def parse(self):
        if isinstance(self.args, (dict, Namespace)):
            return self.parser.parse_object(self.args)
        if self.printing:
            return self.parser.parse_args(self.args, _skip_validation=True)
        return self.parser.parse_args(self.args)

    def print_if_requested(self, config) -> None:
        _ActionPrintConfig.print_config_if_requested(self.parser, config)


@contextmanager
def print_config_after(parser, args) -> Iterator[HeldPrintConfig]:
    """Inside: parsing (and what the CLI adds to the config) prints nothing; the config is printed by the caller."""
    with _ActionPrintConfig.skip_print_config():
        yield HeldPrintConfig(parser, args)
