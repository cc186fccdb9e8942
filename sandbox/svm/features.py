"""Processor features a run can take away, as QEMU's ``-cpu max,-rdtscp,...``
(``sandbox run --without rdtscp,xsave``; ``Machine(without=...)``).

A processor without a feature does not know its instructions: they raise #UD,
and an intercept armed for them never fires (APM vol. 3: each instruction's
"#UD: instruction not supported, as indicated by CPUID"; the intercept check
comes after decode).  Control bits that enable the feature become reserved:
setting them is #GP (APM vol. 2 §3.1.3, CR4), and so is RDMSR/WRMSR of an MSR
that belongs to the feature (TSC_AUX to RDTSCP).  The hypervisor's CPUID model
clears the feature's bit, so the guest is told what the processor now does.

SKINIT is the exception QEMU shares: with EFER.SVME = 1 it is an SVM
instruction whatever Fn8000_0001_ECX[SKINIT] says (APM vol. 3 "SKINIT", #UD
only when SVME = 0 and neither DEV nor SVM-Lock exists), so taking ``skinit``
away clears its CPUID bit and nothing more.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..arch import CR4_OSXSAVE, MSR_TSC_AUX
from .decode import Kind

#: the CPUID output registers, in the order a leaf returns them
EAX, EBX, ECX, EDX = range(4)


@dataclass(frozen=True)
class Feature:
    """One feature: its CPUID bit, the instructions that #UD without it, the CR4 bits it owns."""
    name: str
    leaf: int
    reg: int
    bit: int
    undefined: frozenset = frozenset()
    cr4: int = 0
    #: MSRs that exist only with the feature: RDMSR/WRMSR of them is #GP without it
    msrs: frozenset = frozenset()


FEATURES: dict[str, Feature] = {f.name: f for f in (
    # TSC_AUX exists with RDTSCP or RDPID (APM vol. 2 §13.2.4); this processor has no RDPID
    Feature("rdtscp", 0x8000_0001, EDX, 27, frozenset({Kind.RDTSCP}), msrs=frozenset({MSR_TSC_AUX})),
    # XSAVE's instructions need CR4.OSXSAVE, which can no longer be set (XGETBV, XSAVE and
    # XRSTOR are #UD without it in Unicorn too); XSETBV is hooked so an armed intercept never fires
    Feature("xsave", 0x0000_0001, ECX, 26, frozenset({Kind.XSETBV}), CR4_OSXSAVE),
    Feature("invpcid", 0x0000_0007, EBX, 10, frozenset({Kind.INVPCID})),
    Feature("rdpru", 0x8000_0008, EBX, 4, frozenset({Kind.RDPRU})),
    Feature("skinit", 0x8000_0001, ECX, 12),
)}


class FeatureError(ValueError):
    """An unknown feature name."""


def parse_without(spec: str | None) -> frozenset[str]:
    """``"rdtscp,xsave"`` (QEMU's names, commas, an optional leading ``-`` each) -> the names."""
    if not spec:
        return frozenset()
    names = set()
    for part in spec.split(","):
        name = part.strip().lstrip("-").lower()
        if name not in FEATURES:
            raise FeatureError(f"unknown CPU feature {part.strip()!r}; choose from {', '.join(FEATURES)}")
        names.add(name)
    return frozenset(names)


def cpuid_masks(names: frozenset[str]) -> dict[int, tuple[int, int, int, int]]:
    """leaf -> the AND masks of EAX, EBX, ECX, EDX that take ``names`` away."""
    out: dict[int, list[int]] = {}
    for n in names:
        f = FEATURES[n]
        m = out.setdefault(f.leaf, [0xFFFF_FFFF] * 4)
        m[f.reg] &= ~(1 << f.bit)
    return {k: (m[0], m[1], m[2], m[3]) for k, m in out.items()}


def undefined_kinds(names: frozenset[str]) -> frozenset:
    """The instruction kinds that #UD once ``names`` are gone."""
    return frozenset().union(*(FEATURES[n].undefined for n in names))


def absent_msrs(names: frozenset[str]) -> frozenset:
    """The MSRs that no longer exist once ``names`` are gone."""
    return frozenset().union(*(FEATURES[n].msrs for n in names))


def reserved_cr4(names: frozenset[str]) -> int:
    """The CR4 bits that become reserved once ``names`` are gone."""
    out = 0
    for n in names:
        out |= FEATURES[n].cr4
    return out
