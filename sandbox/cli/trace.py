"""The exit trace of ``sandbox run``: one line (or JSON object) per #VMEXIT.

A line costs microseconds, not rich's markup pass: it is formatted once with
plain string formatting and written straight to the stream (bold and dim as
SGR codes when the stream is a colour terminal).  The disassembly of an
exit's instruction is cached per (RIP, instruction bytes), and the bytes are
read through the translations the processor fetched them with, so a trace
line never walks the guest's page tables (a full 2-D walk in Python) unless
the fetch translation is gone.

Past ``limit`` lines the human-readable trace stops printing and counts; the
run then ends with one "... N more exits" line.  The JSON trace is never
elided: it is for programs, and its final record carries the counts.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable, TextIO

from ..hypervisor.machine import Machine
from ..svm.cpu import ExitRecord
from ..svm.decode import capstone_decoders
from ..svm.exitcodes import exit_name

if TYPE_CHECKING:
    from rich.console import Console

#: capstone by the guest's code-segment size (64, 32, 16)
_CS = capstone_decoders()
#: the default number of exit lines ``sandbox run`` prints before eliding the rest
DEFAULT_TRACE_LIMIT = 1000
_DISASM_CACHE_MAX = 4096
_LINE = "%s#%-6d%s %s%#018x  %-28s %s%-14s%s exitinfo1=%#x exitinfo2=%#x nrip=%#x\n"


def _code_bytes(m: Machine, rip: int) -> bytes:
    """The 15 bytes at ``rip`` as the processor fetched them; through the
    guest's tables (read_virt) only when that translation has gone."""
    b = m.cpu.fetched_bytes(rip)
    if b is None:
        b = m.read_virt(rip, 15)
    return b


class Disassembler:
    """The mnemonic of an exit's instruction, cached per (RIP, bytes, mode)."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.cache: dict[tuple[int, bytes, int], str] = {}

    def __call__(self, rip: int) -> str:
        m = self.m
        if m.sev is not None:
            return "(encrypted)"          # SEV: the hypervisor sees only ciphertext of guest code
        try:
            code = _code_bytes(m, rip)
        except Exception:
            return "??"
        mode = m.cpu.guest_code_size()            # 64-bit mode, or CS.D's 32 (a multiboot entry) or 16
        key = (rip, code, mode)
        text = self.cache.get(key)
        if text is None:
            text = f"(bytes {code[:4].hex()})"
            for ins in _CS[mode].disasm(code, rip, 1):
                text = f"{ins.mnemonic} {ins.op_str}".strip()
                break
            if len(self.cache) >= _DISASM_CACHE_MAX:
                self.cache.clear()
            self.cache[key] = text
        return text


class ExitTrace:
    """``on_exit_record`` of ``sandbox run``: the per-exit line, elided past ``limit`` (0: never)."""

    def __init__(self, m: Machine, out: TextIO, *, limit: int = DEFAULT_TRACE_LIMIT, color: bool = False,
                 before_line: Callable[[], None] | None = None, on_closed: Callable[[], None] | None = None) -> None:
        self.m, self.out, self.limit = m, out, limit
        self.before_line, self.on_closed = before_line, on_closed
        self.closed = False
        self.disasm = Disassembler(m)
        self.shown = 0
        self.elided = 0
        self._dim, self._bold, self._off = ("\x1b[2m", "\x1b[1m", "\x1b[0m") if color else ("", "", "")

    def __call__(self, rec: ExitRecord) -> None:
        if self.closed or (self.limit and self.shown >= self.limit):
            self.elided += 1
            return
        self.shown += 1
        if self.before_line is not None:
            self.before_line()            # a partial console line goes out before the trace line
        try:
            self.out.write(self.line(rec))
        except BrokenPipeError:           # the reader went away: stop tracing, end the run quietly
            self.closed = True
            if self.on_closed is not None:
                self.on_closed()

    def line(self, rec: ExitRecord) -> str:
        # one %-format: a quarter of the cost of the same line as an f-string with format specs
        return _LINE % (self._dim, rec.index, self._off, f"{rec.level} " if self.m.nested is not None else "",
                        rec.rip, self.disasm(rec.rip), self._bold, exit_name(rec.exitcode), self._off,
                        rec.exitinfo1, rec.exitinfo2, rec.nrip)

    def elision_line(self) -> str | None:
        """The "... N more exits" line, or None when nothing was elided."""
        if not self.elided:
            return None
        return (f"... {self.elided:,} more exit{'s' if self.elided != 1 else ''} not shown "
                f"(the trace stops after {self.limit:,} lines; --trace-limit 0 shows every exit)\n")

    def finish(self) -> None:
        """Write the elision line, if any (before the summary)."""
        if self.closed:
            return
        tail = self.elision_line()
        if tail is not None:
            self.out.write(tail)
        self.out.flush()


def json_exit(m: Machine, disasm: Disassembler, rec: ExitRecord) -> str:
    """One exit as the JSON trace prints it."""
    return json.dumps({"exitcode": rec.exitcode, "exit": exit_name(rec.exitcode), "rip": rec.rip,
                       "nrip": rec.nrip, "exitinfo1": rec.exitinfo1, "exitinfo2": rec.exitinfo2,
                       "exitintinfo": rec.exitintinfo, "insn": disasm(rec.rip),
                       **({"level": rec.level} if m.nested is not None else {})})


def color_of(err: "Console") -> bool:
    """Whether ``err`` takes colour: a terminal, colour not disabled (NO_COLOR honoured by rich)."""
    return bool(err.is_terminal and err.color_system is not None and not err.no_color)
