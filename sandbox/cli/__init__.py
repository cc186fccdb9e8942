"""The command line: ``sandbox run``, ``sandbox fuzz`` and their errors."""
from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """The ``sandbox`` command.  Its modules load here, so a Ctrl-C while they
    do (about a second) ends with one line and exit status 130, as later."""
    try:
        from .run import main as run_main
    except KeyboardInterrupt:
        print("sandbox: interrupted", file=sys.stderr)
        return 130
    return run_main(argv)
