"""The command line: ``sandbox run``, ``sandbox fuzz`` and their errors."""
from .run import main

__all__ = ["main"]
