"""The ``--help`` layout shared by the command-line front ends."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The epilog as written, and each option's default (when it has a value) in its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings and "default" not in h:
            h += " (default: %(default)s)"
        return h
