"""Loading user exit handlers from a Python file (``sandbox run --hooks FILE``).

A hooks file either defines ``setup(machine)``, which registers handlers with
``@machine.on(ExitCode.X)``, or a module-level ``HANDLERS`` dict mapping exit
codes (ints or :class:`~sandbox.svm.exitcodes.ExitCode`) or APM names to
``handler(machine, exit)`` functions.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from ..svm.exitcodes import ExitCode, exit_name

if TYPE_CHECKING:
    from .machine import Machine


class HooksError(Exception):
    """A hooks file that cannot be loaded."""


def load_hooks(machine: "Machine", path: str) -> None:
    """Run the hooks file at ``path`` against ``machine`` (HooksError with a one-line reason)."""
    p = Path(path)
    if not p.is_file():
        raise HooksError(f"{p}: no such hooks file")
    spec = importlib.util.spec_from_file_location(f"sandbox_hooks_{p.stem}", p)
    if spec is None or spec.loader is None:
        raise HooksError(f"{p}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        raise HooksError(f"{p}: error while loading: {type(e).__name__}: {e}") from None
    found = False
    if hasattr(mod, "setup"):
        try:
            mod.setup(machine)
        except Exception as e:
            raise HooksError(f"{p}: setup() failed: {type(e).__name__}: {e}") from None
        found = True
    handlers = getattr(mod, "HANDLERS", {})
    if not isinstance(handlers, dict):
        raise HooksError(f"{p}: HANDLERS must be a dict of exit name or code -> handler, "
                         f"not {type(handlers).__name__}")
    for key, fn in handlers.items():
        if isinstance(key, str):
            try:
                key = ExitCode[key.upper()]
            except KeyError:
                raise HooksError(f"{p}: HANDLERS names unknown exit {key!r}") from None
        elif not isinstance(key, int) or isinstance(key, bool):
            raise HooksError(f"{p}: HANDLERS key {key!r} is neither an exit name nor an exit code")
        if not callable(fn):
            name = key.name if isinstance(key, ExitCode) else exit_name(int(key))
            raise HooksError(f"{p}: handler for {name} is not callable")
        machine.handlers[int(key)] = fn
        found = True
    if not found:
        raise HooksError(f"{p}: defines neither setup(machine) nor HANDLERS")
