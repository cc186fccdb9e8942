"""The command line: ``sandbox run``, ``sandbox fuzz`` and their errors."""
from __future__ import annotations

import signal
import sys
import threading

__all__ = ["main"]


def interrupt_handled() -> None:
    """Tell CPython the Ctrl-C was handled.  An ``exec`` of source text that a
    KeyboardInterrupt ends (``dataclasses`` builds every ``__init__`` that way)
    marks the interrupt as unhandled even when it is caught, and the interpreter
    then kills itself with SIGINT at exit instead of returning our status
    (Python/pythonrun.c ``run_eval_code_obj``); the next such ``exec`` that
    completes clears the mark."""
    exec("")


def main(argv: list[str] | None = None) -> int:
    """The ``sandbox`` command.  Its modules load and its arguments are parsed here
    (about a second); a Ctrl-C meanwhile is noted, not raised -- a KeyboardInterrupt
    inside a library's import machinery, or in argparse's message catalogue lookup,
    can surface as another exception or a traceback -- and ends the command with one
    line and exit status 130 once that is done, as later."""
    pressed: list[int] = []
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, lambda *_: pressed.append(1)) if main_thread else None
    try:
        from .run import main as run_main, parse
        args = parse(argv)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old)
    if pressed:
        print("sandbox: interrupted", file=sys.stderr)
        return 130
    code = run_main(args=args)
    if code == 130:
        interrupt_handled()
    return code
