"""A fuzz case: guest code bytes paired with a VMCB configuration.

Saved as JSON (``*.case``), which ``sandbox run`` replays.  Every field is
plain data so a case file can be read and edited by hand.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..hypervisor.machine import PAGING_MODES

FORMAT = "sandbox-fuzz-case"
VERSION = 1
#: guest-physical (= guest-virtual, identity mapped) base of the code window
CODE_BASE = 0x100000
#: the code window: two pages, so placement can straddle 0x101000
CODE_WINDOW = 0x2000
#: a scratch data page memory operands point into
DATA_BASE = 0x1C0000
#: GPR names in QEMU order (as sandbox.svm.cpustate.GPR_NAMES)
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


class CaseError(ValueError):
    """A case file that cannot be used."""


def _flag(v: object) -> bool:
    """A case file's true/false (JSON booleans, or 0 and 1)."""
    if v in (True, False):
        return bool(v)
    raise ValueError(f"expected true or false, got {v!r}")


@dataclass
class VmcbConfig:
    """What the hypervisor arms for one case (APM §15.9-15.13, §15.25)."""
    #: the six intercept words at VMCB 000h-014h (CR, DR, exceptions, misc1-3)
    intercepts: list[int] = field(default_factory=lambda: [0] * 6)
    #: ports whose IOPM bit is set (bits up to 0x10002 exist, APM §15.10.1)
    iopm: list[int] = field(default_factory=list)
    #: (msr, read, write) MSRPM bits set
    msrpm: list[tuple[int, bool, bool]] = field(default_factory=list)
    #: nested-page edits: (gpa, present, write, execute)
    npt: list[tuple[int, bool, bool, bool]] = field(default_factory=list)


@dataclass
class Case:
    code: bytes
    offset: int = 0                      # placement in the code window
    config: VmcbConfig = field(default_factory=VmcbConfig)
    regs: dict[str, int] = field(default_factory=dict)   # initial GPRs
    origin: str = ""                     # generator that made it
    #: the machine it ran on: the hypervisor's paging mode, and whether the guest was SEV
    paging: str = "nested"
    sev: bool = False
    #: the --hooks file of the campaign that found it ("" for none): a replay needs it too
    hooks: str = ""

    @property
    def entry(self) -> int:
        return CODE_BASE + self.offset

    def to_json(self) -> dict:
        c = asdict(self.config)
        return {"format": FORMAT, "version": VERSION, "origin": self.origin, "code": self.code.hex(),
                "offset": self.offset, "regs": {k: hex(v) for k, v in self.regs.items()},
                "intercepts": [hex(w) for w in c["intercepts"]], "iopm": c["iopm"],
                "msrpm": [[hex(m), r, w] for m, r, w in c["msrpm"]],
                "npt": [[hex(g), p, w, x] for g, p, w, x in c["npt"]],
                **({"paging": self.paging} if self.paging != "nested" else {}),
                **({"sev": True} if self.sev else {}),
                **({"hooks": self.hooks} if self.hooks else {})}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    @classmethod
    def from_json(cls, d: object, where: str = "case") -> "Case":
        try:
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise CaseError(f"{where}: not a {FORMAT} file")
            if d.get("version") != VERSION:
                raise CaseError(f"{where}: unsupported case version {d.get('version')!r}")
            code = bytes.fromhex(d["code"])
            offset = d.get("offset", 0)
            if not isinstance(offset, int) or isinstance(offset, bool):
                raise CaseError(f"{where}: 'offset' must be a whole number of bytes, not {offset!r}")
            if not code or offset < 0 or offset + len(code) > CODE_WINDOW:
                raise CaseError(f"{where}: code of {len(code)} bytes at offset {offset} does not fit "
                                f"the {CODE_WINDOW:#x}-byte code window")
            regs = {k: int(v, 0) & (2**64 - 1) for k, v in d.get("regs", {}).items()}
            bad = set(regs) - set(GPRS)
            if bad:
                raise CaseError(f"{where}: unknown register(s) {', '.join(sorted(bad))}")
            words = [int(w, 0) for w in d["intercepts"]]
            if len(words) != 6 or any(not 0 <= w < 2**32 for w in words):
                raise CaseError(f"{where}: 'intercepts' must be six 32-bit words")
            iopm = [int(p) for p in d.get("iopm", [])]
            if any(not 0 <= p <= 0x10002 for p in iopm):
                raise CaseError(f"{where}: IOPM port outside 0-0x10002")
            msrpm = [(int(m, 0), _flag(r), _flag(w)) for m, r, w in d.get("msrpm", [])]
            if any(not 0 <= m < 2**32 for m, _, _ in msrpm):
                raise CaseError(f"{where}: an MSRPM entry names an MSR outside 0-0xffffffff")
            npt = [(int(g, 0), _flag(p), _flag(w), _flag(x)) for g, p, w, x in d.get("npt", [])]
            if any(not 0 <= g < 2**52 or g & 0xFFF for g, *_ in npt):
                raise CaseError(f"{where}: an 'npt' edit names a guest-physical address that is not a "
                                f"4 KiB page below 2^52")
            if not isinstance(d.get("origin", ""), str):
                raise CaseError(f"{where}: 'origin' must be a string")
            hooks = d.get("hooks", "")
            if not isinstance(hooks, str):
                raise CaseError(f"{where}: 'hooks' must be the path of a hooks file")
            paging, sev = d.get("paging", "nested"), d.get("sev", False)
            if paging not in PAGING_MODES or not isinstance(sev, bool) or (sev and paging != "nested"):
                raise CaseError(f"{where}: 'paging' must be one of {', '.join(PAGING_MODES)} and 'sev' "
                                f"true or false (SEV with nested paging only)")
        except CaseError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CaseError(f"{where}: malformed case file ({type(e).__name__}: {e})") from None
        return cls(code, offset, VmcbConfig(words, iopm, msrpm, npt), regs, str(d.get("origin", "")), paging, sev,
                   hooks)

    @classmethod
    def load(cls, path: str | Path) -> "Case":
        p = Path(path)
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise CaseError(f"{p}: cannot read case file: {e}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CaseError(f"{p}: corrupt case file (not JSON: {e})") from None
        return cls.from_json(d, str(p))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps())
