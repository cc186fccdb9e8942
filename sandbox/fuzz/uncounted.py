"""The counting oracle: a case ends the same way whether or not its instructions are counted.

A campaign runs every case with an instruction budget, and Unicorn counts it
with a code hook on every instruction: a call before each one, in every
translated block.  The processor's own hooks are placed only on candidate
instructions, and must already be in place when QEMU translates a block -- it
asks whether a hook covers an instruction before it fetches it.  A candidate
hooked too late still exits under the counting hook's calls (the late hook is
found when the code runs) and runs unintercepted without them: the audit,
whose own hook is on every instruction, cannot see that either.

So a case that ended within its budget without reading the time (the virtual
TSC counts instructions) is run again from the snapshot on a machine of its
own with no budget, and must end alike: the same stop reason at the same RIP,
the same #VMEXITs at the same RIPs.  A run that does not end there within the
wall-clock limit, or ends otherwise, is an ``uncounted`` finding.  (One such
bug: a candidate at the first byte of a page a translated block ran on into.)

A difference is first confirmed with a counted run on that second machine.
When that run ends as the uncounted one did, counting is not what changed the
outcome but the machine: each has run other cases before, and the case ends
differently after them -- a ``history`` finding (state one case leaves that
the snapshot's restore does not put back; its replay may not reproduce it).

One state both machines may hold differently is allowed: the TLB, which a
harness keeps from case to case while it holds only the snapshot's own
translations.  A case that edits its paging structures without an
invalidation gets the old or the new translation unpredictably (APM vol. 2
§5.5.3, "Invalidation of Table Entry Upgrades"; a processor may hold a
translation for any address the tables map, "Speculative Caching of Address
Translations"), so its outcome may differ between the machines with neither
one wrong -- seed 2's case 9,667 cleared PML4[0].P and ran on through pages
one machine's TLB held and the other's did not.  Such a case is compared
again with both runs from an empty TLB on the reference machine.
"""
from __future__ import annotations

from ..svm.exitcodes import exit_name
from ..svm.stop import StopReason
from .case import Case
from .hooks_fuzz import HookGuard
from .snapshot import DEFAULT_MAX_INSNS, Harness, Outcome


def _ends(out: Outcome) -> tuple:
    r = out.result
    if r is None:
        return ("crash", 0, ())
    return (str(r.reason), r.rip, tuple((int(e.exitcode), e.rip) for e in out.exits))


def _say(ends: tuple) -> str:
    reason, rip, exits = ends
    seq = ", ".join(f"{exit_name(c)} at {r:#x}" for c, r in exits) or "no exit"
    return f"{reason} at {rip:#x} after {seq}"


def comparable(out: Outcome) -> bool:
    """Whether ``out`` (a counted run) can be compared with an uncounted one: it
    ended before its budget and read no time."""
    r = out.result
    return r is not None and r.reason != StopReason.INSN_BUDGET and not out.read_time and not out.crash


class UncountedReference:
    """A second machine, like the campaign's, that runs cases without a budget."""

    def __init__(self, paging: str = "nested", sev: bool = False, hooks: str | None = None) -> None:
        """``hooks``: the user's handlers file the campaign's machine runs (the same
        handlers here, or the runs could not end alike; what they report here is
        the campaign machine's to report, and dropped)."""
        self.harness = Harness(paging=paging, sev=sev, max_insns=0)
        self._guard = HookGuard(self.harness.m, hooks) if hooks is not None else None

    def compare(self, case: Case, out: Outcome) -> list[tuple[str, str]]:
        """The findings for ``case``, whose counted run gave ``out``, as (kind,
        message) pairs (none when ``out`` is not :func:`comparable`)."""
        if not comparable(out):
            return []
        try:
            return self._compare(case, out)
        finally:
            if self._guard is not None:
                self._guard.take()

    def _compare(self, case: Case, out: Outcome) -> list[tuple[str, str]]:
        h = self.harness
        ref = h.run(case, audit=False)
        a, b = _ends(out), _ends(ref)
        if a == b:
            return []
        if out.wrote_tables or ref.wrote_tables:
            return self._from_empty_tlb(case)
        c = self._counted(case)
        if c == b:
            return [("history", f"after other cases the case ends {_say(c)}; after these, {_say(a)}")]
        return [("uncounted", f"uncounted, the case ends {_say(b)}; counted, {_say(a)}")]

    def _from_empty_tlb(self, case: Case) -> list[tuple[str, str]]:
        """The case edits its paging structures: the TLB each machine began with
        may decide how it ends (see the module's note), so both runs, uncounted
        and counted, start from an empty TLB here and must end alike."""
        h = self.harness
        h.forget_tlb()
        b = _ends(h.run(case, audit=False))
        h.forget_tlb()
        a = self._counted(case)
        return [] if a == b else [("uncounted", f"uncounted, the case ends {_say(b)}; counted, {_say(a)}")]

    def _counted(self, case: Case) -> tuple:
        """How ``case`` ends run here with the campaign's budget."""
        h = self.harness
        h.max_insns = DEFAULT_MAX_INSNS
        try:
            return _ends(h.run(case, audit=False))
        finally:
            h.max_insns = 0
