"""A fake DebugTarget: a tiny scripted "CPU" that is enough to prove the protocol.

The program is a list of steps, each one "instruction" at an address; running
an instruction moves RIP to the next step's address (or to ``loop_to``'s, to
spin forever) and applies the step's memory writes. When the script runs out
the guest ends with ``exit_code``. Breakpoints fire before the instruction at
their address executes (not at the address resume starts from); write
watchpoints after the instruction whose write overlaps them, as x86 data
breakpoints do. A step can carry a #VMEXIT name, which stops the run when
``monitor break-exit NAME`` armed it.
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

from sandbox.debug import rsp
from sandbox.debug.gdbstub import (BreakpointType, GdbServer, MemoryFault, MonitorError, MonitorRegistry,
                                   ServeResult, StopEvent, StopKind, UnavailableRegister, parse_int)
from sandbox.debug.tdesc import GPR_NAMES, SEGMENT_NAMES, SYSTEM_NAMES


@dataclass
class Step:
    rip: int
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    exit: str | None = None


class FakeCpu:
    def __init__(self, script: list[Step], *, exit_code: int | None = 0, loop_to: int | None = None,
                 regions: dict[int, bytes] | None = None, slow: float = 0.0) -> None:
        self.script = script
        self.pc = 0
        self.exit_code = exit_code
        self.loop_to = loop_to
        self.slow = slow
        self.regs: dict[str, int] = {n: 0 for n in GPR_NAMES + SEGMENT_NAMES + SYSTEM_NAMES}
        self.regs.update(rip=script[0].rip, eflags=0x2, cs=0x8, ss=0x10, ds=0x10, es=0x10,
                         rsp=0x90000, cr0=0x80010001, cr3=0x2000, cr4=0x20, efer=0xD00,
                         fs_base=0, gs_base=0)
        self.regs["rax"] = 0x1122334455667788
        self.mem: dict[int, bytearray] = {}
        for base, data in (regions or {0x100000: bytes(range(256)) * 16}).items():
            self.mem[base] = bytearray(data)
        self.breaks: dict[BreakpointType, set[tuple[int, int]]] = {t: set() for t in BreakpointType}
        self.break_exits: set[str] = set()
        self.exits: dict[str, int] = {}
        self._stop = threading.Event()
        self.resumes: list[bool] = []
        self.monitor_table = MonitorRegistry()
        self.monitor_table.bind("exits", self._mon_exits)
        self.monitor_table.bind("break-exit", self._mon_break_exit)
        self.monitor_table.bind("npt", lambda a: f"GPA {parse_int(a):#x} -> HPA {parse_int(a) + 0x4000000:#x}")
        self.ended = False

    # -- registers and memory -------------------------------------------------------
    def read_register(self, name: str) -> int:
        if name not in self.regs:
            raise UnavailableRegister(name)
        return self.regs[name]

    def write_register(self, name: str, value: int) -> None:
        if name not in self.regs:
            raise UnavailableRegister(name)
        self.regs[name] = value
        if name == "rip":
            for i, s in enumerate(self.script):
                if s.rip == value:
                    self.pc = i
                    break

    def _locate(self, addr: int) -> tuple[bytearray, int] | None:
        for base, buf in self.mem.items():
            if base <= addr < base + len(buf):
                return buf, addr - base
        return None

    def read_memory(self, addr: int, size: int) -> bytes:
        out = bytearray()
        for a in range(addr, addr + size):
            loc = self._locate(a)
            if loc is None:
                raise MemoryFault(a)
            out.append(loc[0][loc[1]])
        return bytes(out)

    def write_memory(self, addr: int, data: bytes) -> None:
        for i in range(len(data)):                    # all or nothing
            if self._locate(addr + i) is None:
                raise MemoryFault(addr + i)
        for i, b in enumerate(data):
            buf, off = self._locate(addr + i)
            buf[off] = b

    # -- breakpoints ------------------------------------------------------------------
    def add_breakpoint(self, type: BreakpointType, addr: int, length: int) -> bool:
        if type is BreakpointType.READ_WATCH:
            return False                               # this target cannot watch reads
        self.breaks[type].add((addr, length))
        return True

    def remove_breakpoint(self, type: BreakpointType, addr: int, length: int) -> bool:
        if type is BreakpointType.READ_WATCH:
            return False
        self.breaks[type].discard((addr, length))
        return True

    # -- running -----------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def resume(self, step: bool) -> StopEvent:
        self.resumes.append(step)
        try:
            return self._run(step)
        finally:
            self._stop.clear()

    def _run(self, step: bool) -> StopEvent:
        first = True
        while True:
            if self._stop.is_set():
                return StopEvent(StopKind.INTERRUPTED)
            s = self.script[self.pc]
            if not first:
                if any(a == s.rip for a, _ in self.breaks[BreakpointType.SOFTWARE]):
                    return StopEvent(StopKind.BREAKPOINT)
                if any(a == s.rip for a, _ in self.breaks[BreakpointType.HARDWARE]):
                    return StopEvent(StopKind.HW_BREAKPOINT)
            first = False
            # execute it
            hit = None
            for addr, data in s.writes:
                self.write_memory(addr, data)
                for t in (BreakpointType.WRITE_WATCH, BreakpointType.ACCESS_WATCH):
                    for wa, wl in self.breaks[t]:
                        if addr < wa + wl and wa < addr + len(data):
                            hit = (t, wa)
            if self.pc + 1 < len(self.script):
                self.pc += 1
            elif self.loop_to is not None:
                self.pc = self.loop_to
            else:
                self.ended = True
                return StopEvent(StopKind.ENDED, exit_code=self.exit_code,
                                 message="" if self.exit_code is not None else "guest shutdown")
            self.regs["rip"] = self.script[self.pc].rip
            if s.exit:
                self.exits[s.exit] = self.exits.get(s.exit, 0) + 1
                if s.exit in self.break_exits:
                    return StopEvent(StopKind.EXIT, message=f"#VMEXIT {s.exit} at {s.rip:#x}")
            if hit is not None:
                return StopEvent(StopKind.WATCHPOINT, addr=hit[1], watch=hit[0])
            if step:
                return StopEvent(StopKind.STEP)
            if self.slow:
                time.sleep(self.slow)

    # -- monitor -----------------------------------------------------------------------
    def monitor(self, command: str) -> str:
        return self.monitor_table.dispatch(command)

    def _mon_exits(self, args: str) -> str:
        return "".join(f"{n} {c}\n" for n, c in sorted(self.exits.items())) or "no exits yet\n"

    def _mon_break_exit(self, args: str) -> str:
        name = args.strip().upper()
        if not name:
            raise MonitorError("needs an exit name, e.g. CPUID")
        self.break_exits.add(name)
        return f"will stop at #VMEXIT {name}"


# -- driving the stub -------------------------------------------------------------------

GDB = shutil.which("gdb")
TIMEOUT_S = 60


class ServerThread:
    """A GdbServer on a free loopback port, served from a background thread."""

    def __init__(self, target) -> None:
        self.server = GdbServer(target, "127.0.0.1", 0)
        self.port = self.server.port
        self.result: ServeResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.result = self.server.serve_one(accept_timeout=TIMEOUT_S)
        except BaseException as e:          # reported by join()
            self.error = e

    def join(self) -> ServeResult:
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive(), "the stub did not end its session"
        if self.error is not None:
            raise self.error
        return self.result


def run_gdb(target, commands: list[str], *, interrupt: bool = False) -> tuple[str, ServeResult]:
    """Run the real gdb in batch mode against ``target``; stdout and stderr
    (where gdb writes monitor output) merged. ``interrupt``: once the target
    is running, send gdb SIGINT, as a Ctrl-C at its terminal does."""
    srv = ServerThread(target)
    args = [GDB, "-batch", "-nx", "-ex", "set architecture i386:x86-64",
            "-ex", f"target remote 127.0.0.1:{srv.port}"]
    for c in commands:
        args += ["-ex", c]
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        if interrupt:
            deadline = time.monotonic() + TIMEOUT_S
            while not target.resumes and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)
            p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=TIMEOUT_S)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return out, srv.join()


class RawClient:
    """gdb's side of the protocol by hand, for crafted packets."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = rsp.PacketParser()
        self.events: list = []
        self.ack = True

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_event(self):
        while not self.events:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("stub closed the connection")
            self.events += self.parser.feed(chunk)
        return self.events.pop(0)

    def send(self, payload: bytes | str) -> None:
        self.send_raw(rsp.frame(payload))
        if self.ack:
            ev = self.next_event()
            assert isinstance(ev, rsp.Ack), ev

    def recv(self) -> bytes:
        """The next packet's data (acknowledged in ack mode); O packets included."""
        ev = self.next_event()
        assert isinstance(ev, rsp.Packet), ev
        if self.ack:
            self.send_raw(b"+")
        return ev.data

    def cmd(self, payload: bytes | str) -> str:
        self.send(payload)
        return self.recv().decode("latin-1")

    def close(self) -> None:
        self.sock.close()
