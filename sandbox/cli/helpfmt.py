"""The ``--help`` layout and the argument errors shared by the command-line front ends."""
from __future__ import annotations

import argparse
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error on stderr, exit status 2: ``sandbox run:
    error: MESSAGE (see 'sandbox run --help')`` instead of the usage block and
    the message.  Subcommand parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The epilog as written, and each option's default (when it has a value) in its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings and "default" not in h:
            h += " (default: %(default)s)"
        return h
