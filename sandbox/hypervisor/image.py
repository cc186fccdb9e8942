"""A loaded guest image and the guest-physical layout every image can rely on
(the loader's GDT, page tables and stack; see :mod:`.loader` for the entry state)."""
from __future__ import annotations

from dataclasses import dataclass

LOAD_BASE = 0x100000
STACK_TOP = 0x90000
GDT_BASE = 0x1000
PT_BASE = 0x2000

GDT = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
CS_SEL, DS_SEL = 0x08, 0x10
CS_ATTRIB = 0x29B     # code, exec/read, accessed, S, P, L
DS_ATTRIB = 0xC93     # data, read/write, accessed, S, P, D/B, G


class ImageError(Exception):
    """A guest image that cannot be loaded."""


@dataclass
class Image:
    path: str
    segments: list[tuple[int, bytes]]      # (guest-physical address, bytes)
    entry: int
    kind: str
