"""VMCB states for the VMRUN fuzzer, and a generator near every check's boundary.

A :class:`VmrunState` is the part of a VMCB that VMRUN checks and loads
(APM vol. 2 §15.5.1 "Canonicalization and Consistency Checks", §15.20 event
injection, §15.25.3 nested paging, §15.29 AVIC, §15.34 SEV).  The generator
starts from a legal 64-bit guest state and perturbs one to three fields; each
perturbation is one of three classes:

* ``valid``   -- another legal value (CR0.CD=1 with NW=1, an ASID other than 1, ...);
* ``edge``    -- the last legal value before a check's boundary, or a value the
  check must ignore (bits 11:0 of IOPM_BASE_PA, CR3 bit 51, a table that ends at
  the last byte below 2^MAXPHYADDR, AVIC addresses with AVIC off);
* ``invalid`` -- the first illegal value past the boundary (CR0 bit 32, ASID 0,
  an IOPM one page too high, EVENTINJ TYPE 5 ...).

The label of each perturbation (``field:class:what``) travels with the state,
so a finding says which boundary it was found at.  States are saved as JSON
(format ``sandbox-fuzz-vmrun``), which ``sandbox run FILE.case`` replays.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

FORMAT = "sandbox-fuzz-vmrun"
VERSION = 1
#: the width of physical addresses this processor model reports (CPUID Fn8000_0008 EAX[7:0])
PHYS_BITS = 48
#: guest-physical layout of the VMRUN harness (identity-mapped guest RAM)
ENTRY = 0x100000                # a HLT the HLT intercept stops before it runs
IDT_BASE = 0x1D0000             # 256 64-bit gates
HANDLERS = 0x1D1000             # handler for vector v: a HLT at HANDLERS + v
STACK = 0x1CF000                # RSP: the frame an injected event pushes lands below it


class StateError(ValueError):
    """A saved VMRUN state that cannot be used."""


@dataclass
class VmrunState:
    """The VMCB fields VMRUN checks or loads; ints as the VMCB holds them."""
    efer: int = 0x1D00                       # SVME NXE LMA LME
    cr0: int = 0x8001_0033                   # PG WP NE ET MP PE
    cr3: int = 0x2000
    cr4: int = 0x620                         # OSXMMEXCPT OSFXSR PAE
    dr6: int = 0xFFFF_0FF0
    dr7: int = 0x400
    rflags: int = 0x2
    rip: int = ENTRY
    rsp: int = STACK
    rax: int = 0
    cs_attr: int = 0x29B                     # P, DPL 0, code, L
    cpl: int = 0
    asid: int = 1
    intercepts: list[int] = field(default_factory=lambda: [0] * 6)
    iopm_base: int = 0                       # 0: the harness's own IOPM
    msrpm_base: int = 0                      # 0: the harness's own MSRPM
    eventinj: int = 0
    np_control: int = 1                      # NP_ENABLE
    n_cr3: int = 0                           # 0: the harness's own nested tables
    v_intr: int = 0
    avic_backing: int = 0
    avic_logical: int = 0
    avic_physical: int = 0
    labels: list[str] = field(default_factory=list)
    #: how the state reaches VMRUN: "vmrun" (the hypervisor's VMRUN) or "vmrun-nested" (VMCB12 of an L1)
    target: str = "vmrun"

    def to_json(self) -> dict:
        d = asdict(self)
        out = {"format": FORMAT, "version": VERSION}
        for k, v in d.items():
            out[k] = [hex(w) for w in v] if k == "intercepts" else (v if k in ("labels", "target") else hex(v))
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps())

    @classmethod
    def from_json(cls, d: object, where: str = "state") -> "VmrunState":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise StateError(f"{where}: not a {FORMAT} file")
        if d.get("version") != VERSION:
            raise StateError(f"{where}: unsupported VMRUN state version {d.get('version')!r}")
        kw: dict = {}
        try:
            for f in fields(cls):
                if f.name not in d:
                    continue
                v = d[f.name]
                if f.name == "labels":
                    kw[f.name] = [str(x) for x in v]
                elif f.name == "target":
                    if v not in ("vmrun", "vmrun-nested"):
                        raise StateError(f"{where}: unknown target {v!r}")
                    kw[f.name] = v
                elif f.name == "intercepts":
                    kw[f.name] = [int(w, 0) & 0xFFFF_FFFF for w in v]
                    if len(kw[f.name]) != 6:
                        raise StateError(f"{where}: 'intercepts' must be six 32-bit words")
                else:
                    kw[f.name] = int(v, 0) & (2**64 - 1)
        except StateError:
            raise
        except (TypeError, ValueError, AttributeError) as e:
            raise StateError(f"{where}: malformed VMRUN state ({type(e).__name__}: {e})") from None
        return cls(**kw)

    @classmethod
    def load(cls, path: str | Path) -> "VmrunState":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise StateError(f"{p}: cannot read: {e}") from None
        except json.JSONDecodeError as e:
            raise StateError(f"{p}: corrupt VMRUN state (not JSON: {e})") from None
        return cls.from_json(d, str(p))


def is_state_file(path: str | Path) -> bool:
    """True when ``path`` holds a saved VMRUN state (not an intercept case)."""
    try:
        return json.loads(Path(path).read_text()).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


# -- the intercept bits the generator varies (flat bit = exit code, APM Appendix C) ----------
VMRUN_BIT, IOIO_BIT, MSR_BIT, HLT_BIT, NMI_BIT = 0x80, 0x7B, 0x7C, 0x78, 0x61


def set_bit(words: list[int], bit: int, on: bool) -> list[int]:
    w = list(words)
    if on:
        w[bit >> 5] |= 1 << (bit & 31)
    else:
        w[bit >> 5] &= ~(1 << (bit & 31))
    return w


def base_intercepts() -> list[int]:
    """VMRUN and HLT, and every exception: the first guest event stops before anything runs."""
    w = [0] * 6
    w[2] = 0xFFFF_FFFF
    for b in (VMRUN_BIT, HLT_BIT):
        w = set_bit(w, b, True)
    return w


def base_state() -> VmrunState:
    return VmrunState(intercepts=base_intercepts())


Mutation = tuple[str, Callable[[VmrunState, random.Random], VmrunState]]
TOP = 1 << PHYS_BITS


def _bit(name: str, b: int) -> Callable[[VmrunState, random.Random], VmrunState]:
    return lambda s, r: replace(s, **{name: getattr(s, name) | (1 << b)})


def _clr(name: str, b: int) -> Callable[[VmrunState, random.Random], VmrunState]:
    return lambda s, r: replace(s, **{name: getattr(s, name) & ~(1 << b)})


def _set(name: str, v: int) -> Callable[[VmrunState, random.Random], VmrunState]:
    return lambda s, r: replace(s, **{name: v})


def _ev(ty: int, vec: int | None = None, err: bool = False) -> Callable[[VmrunState, random.Random], VmrunState]:
    def f(s: VmrunState, r: random.Random) -> VmrunState:
        v = r.randrange(256) if vec is None else vec
        raw = (1 << 31) | (ty << 8) | v
        if err:
            raw |= (1 << 11) | (r.getrandbits(32) << 32)
        return replace(s, eventinj=raw)
    return f


def _table(name: str, size: int, at: int, bit: int | None) -> Callable[[VmrunState, random.Random], VmrunState]:
    """The IOPM/MSRPM at ``at`` (with its intercept on, off or left as is)."""
    def f(s: VmrunState, r: random.Random) -> VmrunState:
        w = s.intercepts if bit is None else set_bit(s.intercepts, bit, r.random() < 0.5)
        return replace(s, **{name: at | r.choice((0, 0xFFF, 0x7A5))}, intercepts=w)
    return f


#: per field: (class, what) -> how; the boundary of every §15.5.1 check, and the values it must ignore
MUTATIONS: dict[str, list[tuple[str, str, Callable]]] = {
    "efer": [("invalid", "SVME=0", _clr("efer", 12)), ("invalid", "bit 9", _bit("efer", 9)),
             ("invalid", "bit 16", _bit("efer", 16)), ("invalid", "bit 63", _bit("efer", 63)),
             ("edge", "bit 15 TCE", _bit("efer", 15)), ("edge", "SCE", _bit("efer", 0)),
             ("edge", "LMA=0", _clr("efer", 10)), ("valid", "NXE=0", _clr("efer", 11)),
             ("valid", "LME=0 LMA=0", lambda s, r: replace(s, efer=s.efer & ~0x500))],
    "cr0": [("invalid", "CD=0 NW=1", lambda s, r: replace(s, cr0=(s.cr0 & ~(1 << 30)) | 1 << 29)),
            ("edge", "CD=1 NW=1", lambda s, r: replace(s, cr0=s.cr0 | 3 << 29)),
            ("valid", "CD=1", _bit("cr0", 30)), ("invalid", "bit 32", _bit("cr0", 32)),
            ("invalid", "bit 63", _bit("cr0", 63)), ("edge", "bit 31:0 all set but NW",
                                                     lambda s, r: replace(s, cr0=0xDFFF_FFFF)),
            ("invalid", "PE=0 (LME, PG)", _clr("cr0", 0)), ("valid", "PG=0", _clr("cr0", 31)),
            ("valid", "PG=0 PE=0", lambda s, r: replace(s, cr0=s.cr0 & ~0x8000_0001)),
            ("edge", "WP=0", _clr("cr0", 16))],
    "cr3": [("edge", "bit 51", _bit("cr3", 51)), ("invalid", "bit 52", _bit("cr3", 52)),
            ("invalid", "bit 63", _bit("cr3", 63)), ("valid", "PCD PWT", lambda s, r: replace(s, cr3=s.cr3 | 0x18)),
            ("edge", "bits 47:12 all set", lambda s, r: replace(s, cr3=(TOP - 1) & ~0xFFF))],
    "cr4": [("invalid", "PAE=0 (LME, PG)", _clr("cr4", 5)), ("invalid", "bit 13", _bit("cr4", 13)),
            ("invalid", "bit 14", _bit("cr4", 14)), ("invalid", "bit 15", _bit("cr4", 15)),
            ("invalid", "bit 19", _bit("cr4", 19)), ("invalid", "bit 25", _bit("cr4", 25)),
            ("invalid", "bit 31", _bit("cr4", 31)), ("invalid", "bit 32", _bit("cr4", 32)),
            ("invalid", "bit 63", _bit("cr4", 63)), ("valid", "OSXSAVE", _bit("cr4", 18)),
            ("valid", "PGE", _bit("cr4", 7)), ("valid", "TSD DE", lambda s, r: replace(s, cr4=s.cr4 | 0xC)),
            ("edge", "SMEP", _bit("cr4", 20)), ("edge", "FSGSBASE", _bit("cr4", 16)),
            ("edge", "LA57", _bit("cr4", 12)), ("edge", "PCIDE", _bit("cr4", 17)),
            ("edge", "PKS", _bit("cr4", 24))],
    "dr6": [("edge", "bits 31:0 all set", _set("dr6", 0xFFFF_FFFF)), ("invalid", "bit 32", _bit("dr6", 32)),
            ("invalid", "bit 63", _bit("dr6", 63)), ("valid", "B0 BS", lambda s, r: replace(s, dr6=s.dr6 | 0x4001))],
    "dr7": [("edge", "bits 31:0 all set", _set("dr7", 0xFFFF_FFFF)), ("invalid", "bit 32", _bit("dr7", 32)),
            ("invalid", "bit 63", _bit("dr7", 63)), ("valid", "GD", _bit("dr7", 13))],
    "cs": [("invalid", "L=1 D=1 (LME, PG, PAE)", lambda s, r: replace(s, cs_attr=s.cs_attr | 0x600)),
           ("valid", "L=0 D=1 (compatibility)", lambda s, r: replace(s, cs_attr=(s.cs_attr & ~0x200) | 0x400)),
           ("valid", "L=0 D=0", lambda s, r: replace(s, cs_attr=s.cs_attr & ~0x600))],
    "vmrun": [("invalid", "VMRUN intercept clear", lambda s, r: replace(s, intercepts=set_bit(s.intercepts, VMRUN_BIT, False)))],
    "asid": [("invalid", "ASID 0", _set("asid", 0)), ("valid", "ASID 2", _set("asid", 2)),
             ("edge", "ASID 0xFFFFFFFF", _set("asid", 0xFFFF_FFFF))],
    "iopm": [("edge", "IOPM ends at 2^MAXPHYADDR - 1", _table("iopm_base", 0x3000, TOP - 0x3000, IOIO_BIT)),
             ("invalid", "IOPM crosses 2^MAXPHYADDR", _table("iopm_base", 0x3000, TOP - 0x2000, IOIO_BIT)),
             ("invalid", "IOPM far beyond MAXPHYADDR", _table("iopm_base", 0x3000, 1 << 63, IOIO_BIT)),
             ("valid", "IOPM bits 11:0 set", _table("iopm_base", 0x3000, 0, None))],
    "msrpm": [("edge", "MSRPM ends at 2^MAXPHYADDR - 1", _table("msrpm_base", 0x2000, TOP - 0x2000, MSR_BIT)),
              ("invalid", "MSRPM crosses 2^MAXPHYADDR", _table("msrpm_base", 0x2000, TOP - 0x1000, MSR_BIT)),
              ("invalid", "MSRPM far beyond MAXPHYADDR", _table("msrpm_base", 0x2000, 1 << 52, MSR_BIT)),
              ("valid", "MSRPM bits 11:0 set", _table("msrpm_base", 0x2000, 0, None))],
    "eventinj": [("valid", "exception 0-31 but 2", lambda s, r: _ev(3, r.choice([v for v in range(32) if v != 2]),
                                                                  r.random() < 0.5)(s, r)),
                 ("valid", "#GP with error code", _ev(3, 13, True)), ("valid", "#PF with error code", _ev(3, 14, True)),
                 ("invalid", "exception vector 2", _ev(3, 2)), ("invalid", "exception vector 32-255",
                                                                 lambda s, r: _ev(3, r.randrange(32, 256))(s, r)),
                 ("edge", "exception vector 31", _ev(3, 31)), ("valid", "INTR", _ev(0)),
                 ("valid", "NMI (vector 2)", _ev(2, 2)), ("edge", "NMI with VECTOR != 2", _ev(2)),
                 ("valid", "software interrupt", _ev(4)),
                 ("invalid", "TYPE 1", _ev(1)), ("invalid", "TYPE 5", _ev(5)), ("invalid", "TYPE 6", _ev(6)),
                 ("invalid", "TYPE 7", _ev(7)), ("edge", "#OF/#BR in 64-bit mode", lambda s, r: _ev(3, r.choice((4, 5)))(s, r)),
                 ("edge", "V=0 with TYPE 7", lambda s, r: replace(s, eventinj=(7 << 8) | r.randrange(256)))],
    "np": [("invalid", "N_CR3 bit 52", lambda s, r: replace(s, n_cr3=1 << 52)),
           ("invalid", "N_CR3 bit 63", lambda s, r: replace(s, n_cr3=1 << 63)),
           ("invalid", "SEV enable without a secure processor", _bit("np_control", 1)),
           ("invalid", "SEV-ES enable without a secure processor", lambda s, r: replace(s, np_control=s.np_control | 6))],
    "avic": [("edge", "AVIC off, tables beyond MAXPHYADDR",
              lambda s, r: replace(s, avic_backing=1 << 52, avic_logical=1 << 63, avic_physical=TOP | 0xFF)),
             ("edge", "AVIC enable on a processor without AVIC", _bit("v_intr", 31))],
    "rflags": [("valid", "IF", _set("rflags", 0x202)), ("valid", "TF", _set("rflags", 0x102)),
               ("valid", "arithmetic flags", _set("rflags", 0x8D7))],
}


def mutate(s: VmrunState, rng: random.Random, n: int) -> VmrunState:
    """``n`` perturbations of distinct fields of ``s``."""
    for name in rng.sample(sorted(MUTATIONS), n):
        cls, what, fn = rng.choice(MUTATIONS[name])
        s = fn(s, rng)
        s.labels = [*s.labels, f"{name}:{cls}:{what}"]
    return s


def generate(rng: random.Random, corpus: list[VmrunState] | None = None) -> VmrunState:
    """A fresh state: the legal base with 1-3 fields at a boundary, or a corpus state mutated once more."""
    if corpus and rng.random() < 0.25:
        return mutate(replace(rng.choice(corpus)), rng, 1)
    return mutate(base_state(), rng, rng.choice((1, 1, 1, 2, 2, 3)))
