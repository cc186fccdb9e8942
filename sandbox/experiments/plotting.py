"""Plots: matplotlib with the Agg backend (files only, no display).

matplotlib is imported lazily, inside :func:`pyplot`: importing it costs
about half a second, which ``sandbox run`` and the experiments' runs never
need -- only drawing does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

DPI = 100
#: the colours the plots use for "before" (trapped, legacy) and "after" (hardware assist)
BEFORE, AFTER, THIRD = "#c0392b", "#2471a3", "#7d3c98"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (a lazy import: see the module docstring)."""
    import matplotlib  # noqa: PLC0415 -- heavy optional import, deferred on purpose
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def save(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG (the format is explicit: the path may be a temporary name)."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    pyplot().close(fig)


def subtitle(data: dict[str, Any]) -> str:
    return " (--quick run)" if data.get("quick") else ""
