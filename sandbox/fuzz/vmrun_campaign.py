"""The VMRUN campaign: generate VMCB states, run VMRUN, judge, keep, save.

One process (the states are cheap: a few hundred VMRUNs a second).  A state
joins the in-memory corpus when it reaches a new (perturbed fields and their
classes, outcome) key, where the outcome is VMEXIT_INVALID with the
sandbox's reason, or the first exit after entry.  Findings are de-duplicated
by signature, minimized (each field put back to the legal base while the
finding still reproduces) and saved as ``KIND-HASH.case`` (the state as
JSON, format ``sandbox-fuzz-vmrun``) with a ``.txt`` holding the replay
command ``sandbox run FILE.case``.
"""
from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from ..svm.exitcodes import exit_name
from .campaign import SigintFlag
from .oracle import Finding
from .vmrun_nested import NestedVmrunHarness
from .vmrun_qemu import compare
from .vmrun_state import VmrunState, base_state, generate
from .vmrun_target import VmrunHarness, VmrunOutcome, judge

STATUS_EVERY_S = 0.5


@dataclass
class VmrunOptions:
    seed: int = 0
    seconds: float | None = None
    cases: int | None = None
    crashes: Path | None = None
    differential_every: int = 8         # compare one state in N with QEMU's SVM (0: never)
    minimize: bool = True
    stop_on_finding: bool = False
    nested: bool = False                # VMCB12 of an L1 guest hypervisor (vmrun_nested.py)


@dataclass
class VmrunStats:
    execs: int = 0
    invalid: int = 0
    entered: int = 0
    differential: int = 0
    coverage: set = field(default_factory=set)
    corpus: int = 0
    labels: collections.Counter = field(default_factory=collections.Counter)
    findings: dict = field(default_factory=dict)      # signature -> (Finding, saved path or "")


def outcome_key(s: VmrunState, out: VmrunOutcome) -> tuple:
    """The coverage key: which boundaries were perturbed, and what VMRUN made of them."""
    fields_ = tuple(sorted(lbl.rsplit(":", 1)[0] for lbl in s.labels))
    if out.crash:
        end = "crash"
    elif out.invalid:
        end = f"invalid: {out.reason}"
    else:
        end = exit_name(out.first.exitcode) if out.first is not None else "none"
    return fields_, end


class VmrunWorker:
    """The campaign's state: harness, generator, corpus, findings."""

    def __init__(self, opts: VmrunOptions, patch: Callable[[], None] | None = None) -> None:
        if patch is not None:
            patch()
        self.opts = opts
        self.rng = random.Random(opts.seed * 1_000_003)
        self.h = NestedVmrunHarness() if opts.nested else VmrunHarness()
        self.corpus: list[VmrunState] = []
        self.stats = VmrunStats()

    def check(self, s: VmrunState, qemu: bool) -> tuple[VmrunOutcome, list[Finding]]:
        """Run the (unresolved) state ``s`` and every oracle on it."""
        r = self.h.resolve(s)
        out = self.h.run(r)
        fs = judge(r, out, self.h.dram)
        if qemu:
            try:
                fs += compare(r, out, self.h.dram)
            except Exception as e:        # the reference failing is not the sandbox's bug
                if isinstance(e, AssertionError):
                    raise
        return out, fs

    def step(self) -> list[Finding]:
        o, st = self.opts, self.stats
        s = generate(self.rng, self.corpus)
        s.target = "vmrun-nested" if o.nested else "vmrun"
        qemu = bool(o.differential_every) and st.execs % o.differential_every == o.differential_every - 1
        out, fs = self.check(s, qemu)
        st.execs += 1
        st.differential += qemu
        st.invalid += out.invalid
        st.entered += not out.invalid and out.first is not None
        st.labels.update(s.labels)
        key = outcome_key(s, out)
        if key not in st.coverage:
            st.coverage.add(key)
            self.corpus.append(s)
            st.corpus += 1
        fresh = [f for f in fs if f.signature not in st.findings]
        for f in fresh:
            st.findings[f.signature] = (f, self._save(f, s))
        return fresh

    def _reproduces(self, f: Finding) -> Callable[[VmrunState], bool]:
        return lambda c: any(g.signature == f.signature for g in self.check(c, f.kind == "vmrun-differential")[1])

    def minimize(self, s: VmrunState, f: Finding) -> VmrunState:
        """Put each field back to the legal base while the finding reproduces."""
        base, small, still = base_state(), s, self._reproduces(f)
        for fl in fields(VmrunState):
            if fl.name in ("labels", "target") or getattr(small, fl.name) == getattr(base, fl.name):
                continue
            trial = replace(small, **{fl.name: getattr(base, fl.name)})
            if still(trial):
                small = trial
        return small

    def _save(self, f: Finding, s: VmrunState) -> str:
        d = self.opts.crashes
        if d is None:
            return ""
        base = d / f"{f.kind}-{f.digest}"
        if base.with_suffix(".case").exists():
            return str(base.with_suffix(".case"))
        small = self.minimize(s, f) if self.opts.minimize else s
        small.save(base.with_suffix(".case"))
        base.with_suffix(".txt").write_text(
            f"{f.kind}: {f.message}\nperturbed: {', '.join(s.labels)}\nseed {self.opts.seed}\n"
            f"replay: sandbox run {base.with_suffix('.case')}\n")
        return str(base.with_suffix(".case"))


def replay(s: VmrunState, qemu: bool = True) -> tuple[VmrunOutcome, list[Finding]]:
    """One saved state through every oracle (``sandbox run FILE.case``), by its own target."""
    w = VmrunWorker(VmrunOptions(nested=s.target == "vmrun-nested"))
    return w.check(s, qemu)


def run(opts: VmrunOptions, on_status: Callable[[VmrunStats, float], None] | None = None,
        patch: Callable[[], None] | None = None) -> tuple[VmrunStats, float, bool]:
    """The campaign in this process.  Returns (stats, seconds, interrupted)."""
    if opts.crashes is not None:
        opts.crashes.mkdir(parents=True, exist_ok=True)
    with SigintFlag() as intr:
        w = VmrunWorker(opts, patch)
        t0 = last = time.monotonic()
        while not intr.hit:
            if opts.seconds is not None and time.monotonic() - t0 >= opts.seconds:
                break
            if opts.cases is not None and w.stats.execs >= opts.cases:
                break
            if w.step() and opts.stop_on_finding:
                break
            now = time.monotonic()
            if on_status is not None and now - last >= STATUS_EVERY_S:
                last = now
                on_status(w.stats, now - t0)
    return w.stats, time.monotonic() - t0, intr.hit
