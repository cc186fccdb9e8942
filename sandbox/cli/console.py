"""The command line's rich console: a reader going away is a broken pipe, not an exit.

rich's own ``Console.on_broken_pipe`` points stdout at /dev/null and raises
``SystemExit(1)`` from inside whichever ``print`` hit the closed pipe.  The
front ends decide for themselves what a closed pipe means (stop the run
quietly, keep what was already written, exit with SIGPIPE's status 141), so
here the error stays a ``BrokenPipeError`` for them to catch, and the console
falls quiet so nothing later tries the closed pipe again.
"""
from __future__ import annotations

import errno

from rich.console import Console as _RichConsole


class Console(_RichConsole):
    """rich's Console, except that a closed pipe raises ``BrokenPipeError``."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the reader of this stream went away")
