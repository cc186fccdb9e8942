"""Platforms: the devices and interrupt plumbing around a guest.

``Machine(platform="pc")`` installs :class:`~.pc.PcPlatform` (``m.platform``):
the devices a kvm-unit-tests guest expects -- one module per device --
and the injection of the local APIC's interrupts through the VMCB.
"""
from __future__ import annotations

from .pc import PcPlatform, install

PLATFORMS = ("pc",)

__all__ = ["PLATFORMS", "PcPlatform", "install"]
