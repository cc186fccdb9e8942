"""Findings, the fast oracles, coverage keys, and the reproducer minimizer.

Fast oracles, checked on every case:

* robustness -- a Python exception escaped ``Machine.run`` or a handler raised
  (``handler-error``), or the processor model hit an internal error;
* isolation -- a guest TLB fill outside the guest's nested mappings, or a host
  page outside guest RAM, the VMCB and the nested tables that changed.

The audit oracle (:mod:`.audit`) adds missed / spurious / wrong exits.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable

from .case import Case, CODE_WINDOW, VmcbConfig
from .generate import TERMINATOR
from .snapshot import Outcome
from ..svm.exitcodes import EXCP_FIRST, ExitCode, is_excp
from ..svm.stop import StopReason


@dataclass(frozen=True)
class Finding:
    kind: str            # crash | isolation | missed | spurious | mismatch | order | audit-error | differential | uncounted | history
    message: str

    @property
    def signature(self) -> str:
        """Stable across addresses and values, for de-duplication."""
        s = re.sub(r"at 0x[0-9a-f]+", "at #", self.message)
        if self.kind != "differential":        # there the exit codes are the point
            s = re.sub(r"0x[0-9a-f]+", "#", s)
            s = re.sub(r"\d+", "#", s)
        return f"{self.kind}: {s}"

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.signature.encode()).hexdigest()[:12]


def findings(out: Outcome) -> list[Finding]:
    fs: list[Finding] = []
    if out.crash:
        fs.append(Finding("crash", out.crash))
    elif out.result is not None and out.result.reason == StopReason.ERROR and (
            "internal error" in out.result.detail or "emulation error" in out.result.detail):
        fs.append(Finding("crash", out.result.detail))
    fs += [Finding("isolation", m) for m in out.isolation]
    for a in out.audit:
        # the audit's signature keeps the mnemonic, not the operands
        fs.append(Finding(a.kind, f"{a.insn.split(' ')[0]}: {a.detail}"))
    return fs


def info_class(code: int, info1: int) -> int:
    """The part of EXITINFO1 that distinguishes handler paths (APM §15.7-15.12)."""
    if code == ExitCode.IOIO:             # IOIO: type, string, rep, size, address size
        return info1 & 0x3FF
    if code == ExitCode.MSR:              # MSR: read / write
        return info1 & 1
    if code < EXCP_FIRST:                 # CR/DR: decode-assist valid, extended GPR
        return (info1 >> 63) << 1 | (info1 >> 3 & 1)
    if code == ExitCode.NPF:
        return (info1 & 0x1F) | (info1 >> 32 & 3) << 5
    if is_excp(code):
        return int(info1 != 0)
    return 0


def coverage(out: Outcome) -> frozenset:
    """(EXITCODE, EXITINFO class, handler) per exit, plus how the run ended."""
    keys = {(e.exitcode, info_class(e.exitcode, e.exitinfo1), h) for e, h in zip(out.exits, out.handlers)}
    if out.result is not None:
        keys.add(("end", out.result.reason))
    return frozenset(keys)


def minimize(case: Case, reproduces: Callable[[Case], bool], budget: int = 150) -> Case:
    """Shrink a failing case while ``reproduces`` stays true: fewer code bytes,
    fewer intercept bits, IOPM/MSRPM/NPT entries and registers."""
    runs = [0]

    def ok(c: Case) -> bool:
        if runs[0] >= budget:
            return False
        runs[0] += 1
        try:
            return reproduces(c)
        except Exception:
            return False

    best = case
    # code: remove chunks, halving the chunk size (delta debugging)
    n = max(1, len(best.code) // 2)
    while n >= 1 and runs[0] < budget:
        i, changed = 0, False
        while i < len(best.code) and runs[0] < budget:
            code = best.code[:i] + best.code[i + n:]
            if code:
                c = Case(code, min(best.offset, CODE_WINDOW - len(code)), best.config, best.regs, best.origin)
                if ok(c):
                    best, changed = c, True
                    continue
            i += n
        if not changed:
            n //= 2
    # configuration: drop set intercept bits one at a time
    words = list(best.config.intercepts)
    for b in range(6 * 32):
        if words[b >> 5] >> (b & 31) & 1 and runs[0] < budget:
            w2 = list(words)
            w2[b >> 5] &= ~(1 << (b & 31))
            c = _with(best, VmcbConfig(w2, best.config.iopm, best.config.msrpm, best.config.npt))
            if ok(c):
                best, words = c, w2
    for attr in ("iopm", "msrpm", "npt"):
        items = list(getattr(best.config, attr))
        for it in list(items):
            if runs[0] >= budget:
                break
            trial = [x for x in items if x != it]
            cfg = VmcbConfig(list(best.config.intercepts), **{**_cfg_lists(best.config), attr: trial})
            c = _with(best, cfg)
            if ok(c):
                best, items = c, trial
    for r in list(best.regs):
        if runs[0] >= budget:
            break
        regs = {k: v for k, v in best.regs.items() if k != r}
        c = Case(best.code, best.offset, best.config, regs, best.origin)
        if ok(c):
            best = c
    return best


def _cfg_lists(cfg: VmcbConfig) -> dict:
    return {"iopm": list(cfg.iopm), "msrpm": list(cfg.msrpm), "npt": list(cfg.npt)}


def _with(case: Case, cfg: VmcbConfig) -> Case:
    return Case(case.code, case.offset, cfg, dict(case.regs), case.origin)


__all__ = ["Finding", "findings", "coverage", "info_class", "minimize", "TERMINATOR"]
