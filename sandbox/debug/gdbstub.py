"""A gdb stub: debug a sandbox guest with gdb's ``target remote``.

The stub is the server side of gdb's Remote Serial Protocol (gdb manual,
appendix "GDB Remote Serial Protocol"; the framing is in :mod:`.rsp`, the
register layout in :mod:`.tdesc`). It drives a :class:`DebugTarget` -- the
interface the Machine implements -- and knows nothing of the processor:

===========================  ===============================================================
packet                       (gdb manual section) what the stub does
===========================  ===============================================================
``qSupported``               ("General Query Packets") ``PacketSize``, ``qXfer:features:read+``,
                             ``QStartNoAckMode+``, ``swbreak+``, ``hwbreak+``, ``vContSupported+``;
                             remembers whether gdb accepts ``swbreak``/``hwbreak`` stop reasons
``QStartNoAckMode``          ("Packet Acknowledgment") ``OK``, then no more ``+``/``-``
``qXfer:features:read``      ("qXfer target description read") ``target.xml`` in ``m``/``l`` chunks
``?``                        ("Packets", "Stop Reply Packets") the last stop reply
``g`` ``G`` ``p`` ``P``      all / one register(s), little-endian hex, ``x`` digits if unavailable
``m`` ``M`` ``X``            guest-virtual memory (hex / binary); a partial read returns the bytes
                             before the first unmapped one, nothing readable is ``E14``
``Z0``-``Z4`` ``z0``-``z4``  ("Packets" Z/z) breakpoints and watchpoints; a type the target lacks
                             gets the empty reply, so gdb falls back (software watchpoints)
``c`` ``s`` ``C`` ``S``      resume / single-step (signals are not delivered to a guest)
``vCont?`` ``vCont``         ("Packets" vCont) ``c``, ``C``, ``s``, ``S`` for the one thread
``D`` ``k`` ``vKill``        detach / kill: the session ends, :func:`serve` says which
``qAttached`` ``qC``         ``1`` (quitting gdb detaches), ``QC1``
``qfThreadInfo`` ...         one thread, id 1 (the vCPU)
``qRcmd``                    ("General Query Packets" qRcmd) ``monitor`` commands: hex-decoded,
                             routed to :meth:`DebugTarget.monitor`, the answer sent as ``O``
                             packets, then ``OK``
===========================  ===============================================================

Anything else gets the empty reply ("not supported", "Standard Replies").

**Stop replies** ("Stop Reply Packets"): ``T05thread:1;`` plus ``swbreak:;``,
``hwbreak:;`` or ``watch:ADDR;`` / ``rwatch:`` / ``awatch:`` for what stopped
the guest; ``T02`` after an interrupt; ``W NN`` when the guest ended with an
exit code, ``X NN`` when it ended otherwise. A :class:`StopEvent` message is
shown in gdb first, as an ``O`` console-output packet.

**Interrupts** ("Interrupts"): while the target runs, gdb may send the byte
0x03. A reader thread owns the socket's receiving side for the whole session;
when it sees 0x03 while :meth:`DebugTarget.resume` runs (in the thread that
called :func:`serve`), it calls :meth:`DebugTarget.request_stop` from the
reader thread. The target must return a :class:`StopEvent` of kind
``INTERRUPTED`` soon after.
"""
from __future__ import annotations

import errno
import queue
import socket
import threading
from collections import deque
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Callable, Protocol, runtime_checkable

from . import rsp
from .tdesc import G_PACKET_BYTES, REGISTERS, TARGET_XML

# gdb's own signal numbers (gdb/signals.def), as the stop replies carry them
SIGINT, SIGTRAP, SIGABRT, SIGKILL, SIGSEGV = 2, 5, 6, 9, 11
#: the PacketSize offered in qSupported (bytes of packet data gdb may send)
PACKET_SIZE = 0x4000
#: the one thread (the guest's vCPU) the stub reports
THREAD_ID = 1
#: how long to wait for gdb's '+' before giving up on the connection
ACK_TIMEOUT_S = 10.0
#: errno values in E replies (gdb prints them; EFAULT as gdbserver uses it for memory)
EFAULT, EINVAL = 0x0E, 0x16


# -- the interface the Machine implements ------------------------------------------------
class DebugError(Exception):
    """Base of the errors a :class:`DebugTarget` raises to the stub."""


class MemoryFault(DebugError):
    """Guest-virtual memory that is not mapped (or not writable) at ``addr``,
    the first byte of the access that cannot be made."""

    def __init__(self, addr: int, message: str = "") -> None:
        super().__init__(message or f"guest-virtual address {addr:#x} is not mapped")
        self.addr = addr


class UnavailableRegister(DebugError):
    """The target has no value for this register (gdb shows ``<unavailable>``)."""


class MonitorError(DebugError):
    """A monitor command's own error; its message is what the user sees."""


class GdbStubError(Exception):
    """The stub cannot serve (the port is taken, nobody connected); one line."""


class BreakpointType(IntEnum):
    """The ``Z``/``z`` packet types."""
    SOFTWARE = 0
    HARDWARE = 1
    WRITE_WATCH = 2
    READ_WATCH = 3
    ACCESS_WATCH = 4


class StopKind(Enum):
    BREAKPOINT = "breakpoint"          #: a software breakpoint (Z0) at RIP
    HW_BREAKPOINT = "hw-breakpoint"    #: a hardware breakpoint (Z1) at RIP
    WATCHPOINT = "watchpoint"          #: a watchpoint (Z2-Z4) hit; ``addr``, ``watch``
    STEP = "step"                      #: the single step asked for is done
    EXIT = "exit"                      #: a #VMEXIT of interest (``monitor break-exit``)
    INTERRUPTED = "interrupted"        #: request_stop() took effect
    ENDED = "ended"                    #: the guest is gone; ``exit_code`` or ``signal``


@dataclass(frozen=True)
class StopEvent:
    """Why :meth:`DebugTarget.resume` returned."""
    kind: StopKind
    #: WATCHPOINT: the data address that triggered it
    addr: int | None = None
    #: WATCHPOINT: which kind of watchpoint (WRITE_WATCH, READ_WATCH, ACCESS_WATCH)
    watch: BreakpointType | None = None
    #: ENDED: the guest's exit code (a ``W`` reply); None means it ended abnormally
    exit_code: int | None = None
    #: ENDED abnormally: the gdb signal number of the ``X`` reply
    signal: int = SIGKILL
    #: shown in gdb before the stop (e.g. "#VMEXIT CPUID at 0x100004", "shutdown")
    message: str = ""


@runtime_checkable
class DebugTarget(Protocol):
    """What the stub needs from the thing being debugged (the Machine).

    Registers are named as in :data:`sandbox.debug.tdesc.REGISTERS` (``rax``,
    ``rip``, ``eflags``, ``cs``, ``st0``, ``xmm0``, ``fs_base``, ``cr3``,
    ``efer`` ...), values are unsigned ints; memory addresses are guest-virtual,
    translated through the guest's current page tables.

    All methods are called from the thread that runs :func:`serve`, except
    :meth:`request_stop`, which the stub's socket thread calls.
    """

    def read_register(self, name: str) -> int:
        """The register's value; raise :class:`UnavailableRegister` if there is none."""

    def write_register(self, name: str, value: int) -> None:
        """Set the register; raise :class:`UnavailableRegister` if it cannot be set."""

    def read_memory(self, addr: int, size: int) -> bytes:
        """``size`` bytes at guest-virtual ``addr``; raise :class:`MemoryFault`
        naming the first unmapped byte (the stub then returns the bytes before it)."""

    def write_memory(self, addr: int, data: bytes) -> None:
        """Write guest-virtual memory; raise :class:`MemoryFault` if unmapped/read-only."""

    def add_breakpoint(self, type: BreakpointType, addr: int, length: int) -> bool:
        """Arm a breakpoint (length: gdb's ``kind``) or watchpoint (length in bytes).
        False: this type is not supported (gdb falls back). A breakpoint at the RIP
        that resume() starts from must not fire before that instruction executes
        (gdb removes it and single-steps anyway, like RFLAGS.RF)."""

    def remove_breakpoint(self, type: BreakpointType, addr: int, length: int) -> bool:
        """Disarm it; False if this type is not supported."""

    def resume(self, step: bool) -> StopEvent:
        """Run the guest (one instruction if ``step``) until something stops it.
        Must return soon after :meth:`request_stop` (kind INTERRUPTED), and must
        consume that request before returning, whatever the kind."""

    def request_stop(self) -> None:
        """Ask a running (or just starting) :meth:`resume` to stop. Thread-safe."""

    def monitor(self, command: str) -> str:
        """Run a ``monitor`` command (see :class:`MonitorRegistry`); the text to show."""


# -- monitor commands ------------------------------------------------------------------
#: the commands the Machine fills in, with their help text
STANDARD_MONITOR_COMMANDS: dict[str, str] = {
    "break-exit": "break-exit NAME|CODE|off  stop when a #VMEXIT of this kind happens (APM name or code)",
    "vmcb": "vmcb  show the guest's VMCB control and state-save fields",
    "exits": "exits  count #VMEXITs per exit code so far",
    "npt": "npt GPA  show the nested-page-table walk of a guest-physical address",
    "walk": "walk GVA  show the 2-D walk of a guest-virtual address (guest tables, then NPT)",
}

MonitorHandler = Callable[[str], str]


class MonitorRegistry:
    """The table ``monitor`` commands are routed through.

    ``registry.bind("exits", fn)`` installs a handler; ``fn(args)`` gets the text
    after the command name and returns what gdb shows (raise :class:`MonitorError`
    for a user error). ``help`` lists the commands. A standard command that has
    no handler yet answers that it is not available on this target.
    """

    def __init__(self, standard: bool = True) -> None:
        self._help: dict[str, str] = dict(STANDARD_MONITOR_COMMANDS) if standard else {}
        self._handlers: dict[str, MonitorHandler] = {}

    def bind(self, name: str, handler: MonitorHandler, help: str | None = None) -> None:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"monitor command name {name!r} must be one word")
        if help is None and name not in self._help:
            help = name
        if help is not None:
            self._help[name] = help
        self._handlers[name] = handler

    def command(self, name: str, help: str | None = None) -> Callable[[MonitorHandler], MonitorHandler]:
        """Decorator form of :meth:`bind`."""
        def deco(fn: MonitorHandler) -> MonitorHandler:
            self.bind(name, fn, help)
            return fn
        return deco

    @property
    def names(self) -> list[str]:
        return sorted(self._help)

    def help(self) -> str:
        lines = ["monitor commands:"] + [f"  {self._help[n]}" for n in self.names]
        lines.append("  help  this list")
        return "\n".join(lines) + "\n"

    def dispatch(self, line: str) -> str:
        words = line.strip().split(None, 1)
        if not words or words[0] == "help":
            return self.help()
        name, args = words[0], (words[1] if len(words) > 1 else "")
        handler = self._handlers.get(name)
        if handler is None:
            if name in self._help:
                return f"monitor {name}: not available on this target\n"
            return f"unknown monitor command {name!r}; 'monitor help' lists them\n"
        try:
            out = handler(args)
        except MonitorError as e:
            return f"monitor {name}: {e}\n"
        except Exception as e:                     # a handler bug must not end the session
            return f"monitor {name} failed: {type(e).__name__}: {e}\n"
        out = out or ""
        return out if out.endswith("\n") or not out else out + "\n"


def parse_int(text: str) -> int:
    """An address argument of a monitor command: ``0x1000``, ``4096``, ``1000h``."""
    t = text.strip().replace("_", "")
    try:
        if t.lower().endswith("h"):
            return int(t[:-1], 16)
        return int(t, 0)
    except ValueError:
        raise MonitorError(f"{text.strip()!r} is not a number") from None


# -- the session -----------------------------------------------------------------------
@dataclass(frozen=True)
class ServeResult:
    """How a debugging session ended.

    ``reason``: ``"detached"`` (gdb detached: let the guest run on),
    ``"killed"`` (gdb killed it: stop the run), ``"ended"`` (the guest ended
    while debugged), ``"disconnected"`` (the connection closed without either).
    """
    reason: str
    last_stop: StopEvent | None = None


class _Disconnected(Exception):
    pass


_EOF = object()


class GdbStub:
    """One gdb connection over a connected socket; :meth:`run` serves it to the end."""

    def __init__(self, target: DebugTarget, conn: socket.socket) -> None:
        self.target = target
        self.conn = conn
        self._parser = rsp.PacketParser()
        self._events: queue.Queue = queue.Queue()
        self._pending: deque = deque()
        self._ack = True
        self._lock = threading.Lock()
        self._running = False
        self._gdb_swbreak = False
        self._gdb_hwbreak = False
        self._last_stop = StopEvent(StopKind.STEP)
        self._last_reply = self._stop_reply(self._last_stop)
        self._ended = False
        #: the last exception a target method raised into a packet handler (answered E01)
        self.last_error: Exception | None = None
        self._reader = threading.Thread(target=self._read_loop, name="gdbstub-reader", daemon=True)

    # -- socket side ------------------------------------------------------------
    def _read_loop(self) -> None:
        try:
            while True:
                chunk = self.conn.recv(65536)
                if not chunk:
                    break
                for ev in self._parser.feed(chunk):
                    if isinstance(ev, rsp.Interrupt):
                        with self._lock:          # see _resume: no 0x03 falls between the two
                            if self._running:
                                self.target.request_stop()
                            else:
                                self._events.put(ev)
                        continue
                    self._events.put(ev)
        except OSError:
            pass
        finally:
            self._events.put(_EOF)

    def _next_event(self, timeout: float | None = None):
        if self._pending:
            ev = self._pending.popleft()
        else:
            try:
                ev = self._events.get(timeout=timeout)
            except queue.Empty:
                return None
        if ev is _EOF:
            self._events.put(_EOF)             # every later read sees the end too
            raise _Disconnected
        return ev

    def _write(self, data: bytes) -> None:
        try:
            self.conn.sendall(data)
        except OSError:
            raise _Disconnected from None

    def send_packet(self, payload: bytes | str) -> None:
        """Frame and send; in ack mode, wait for '+' and retransmit on '-'."""
        data = rsp.frame(payload)
        self._write(data)
        if not self._ack:
            return
        for _ in range(20):
            ev = self._next_event(timeout=ACK_TIMEOUT_S)
            if ev is None:
                raise _Disconnected
            if isinstance(ev, rsp.Ack):
                return
            if isinstance(ev, rsp.Nack):
                self._write(data)
                continue
            if isinstance(ev, rsp.Packet):         # gdb moved on: take it as acknowledged
                self._pending.append(ev)
                return
        raise _Disconnected

    def output(self, text: str) -> None:
        """Console output shown by gdb (``O`` packets). Only while the target runs,
        from the thread that runs :meth:`DebugTarget.resume`; dropped otherwise."""
        if self._running and text:
            self._send_output(text)

    def _send_output(self, text: str) -> None:
        raw = text.encode("utf-8")
        for i in range(0, len(raw), 1024):
            self.send_packet("O" + raw[i:i + 1024].hex())

    # -- the main loop ----------------------------------------------------------
    def run(self) -> ServeResult:
        self._reader.start()
        try:
            while True:
                ev = self._next_event()
                if isinstance(ev, rsp.Packet):
                    if self._ack:
                        self._write(rsp.ACK)
                    result = self._handle(ev.data)
                    if isinstance(result, ServeResult):
                        return result
                elif isinstance(ev, rsp.BadPacket):
                    if self._ack:
                        self._write(rsp.NACK)
                # stray acks and interrupts while stopped are ignored
        except _Disconnected:
            return ServeResult("ended" if self._ended else "disconnected", self._last_stop)
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join(timeout=2.0)

    def _handle(self, raw: bytes) -> ServeResult | None:
        """Answer one packet; a ServeResult ends the session."""
        if raw[:1] == b"X":
            head, sep, body = raw.partition(b":")
            reply = self._cmd_X(head[1:], body) if sep else "E%02x" % EINVAL
            self.send_packet(reply)
            return None
        text = raw.decode("latin-1")
        if text == "k" or text.startswith("vKill") or text == "D" or text.startswith("D;"):
            result = ServeResult("detached" if text[0] == "D" else "killed", self._last_stop)
            if text != "k":                  # 'k' has no reply
                try:
                    self.send_packet("OK")
                except _Disconnected:        # gdb may hang up without acknowledging it
                    pass
            return result
        if text == "QStartNoAckMode":
            self.send_packet("OK")
            self._ack = False
            return None
        reply = self._dispatch(text)
        if reply is not None:
            self.send_packet(reply)
        return None

    def _dispatch(self, p: str) -> str | None:
        if not p:
            return ""
        try:
            c = p[:1]
            if c == "?":
                return self._last_reply
            if c == "g":
                return self._read_all_registers()
            if c == "G":
                return self._write_all_registers(p[1:])
            if c == "p":
                return self._read_register(rsp.parse_hex_int(p[1:]))
            if c == "P":
                n, _, v = p[1:].partition("=")
                return self._write_register(rsp.parse_hex_int(n), v)
            if c == "m":
                a, _, n = p[1:].partition(",")
                return self._read_memory(rsp.parse_hex_int(a), rsp.parse_hex_int(n))
            if c == "M":
                head, _, data = p[1:].partition(":")
                a, _, n = head.partition(",")
                return self._write_memory(rsp.parse_hex_int(a), rsp.parse_hex_int(n), rsp.hex_decode(data))
            if c in "Zz" and p[1:2].isdigit():
                return self._breakpoint(p)
            if c in "cs":
                if len(p) > 1:
                    self.target.write_register("rip", rsp.parse_hex_int(p[1:]))
                return self._resume(step=c == "s")
            if c in "CS":
                _sig, _, addr = p[1:].partition(";")
                if addr:
                    self.target.write_register("rip", rsp.parse_hex_int(addr))
                return self._resume(step=c == "S")
            if c == "H":
                return "OK"
            if c == "T":
                return "OK" if p[1:] in (f"{THREAD_ID:x}", "0", "-1") else "E01"
            if p.startswith("vCont"):
                return self._vcont(p)
            if p.startswith("q") or p.startswith("Q"):
                return self._query(p)
        except rsp.RspError:
            return "E%02x" % EINVAL
        except Exception as e:              # a target bug answers this packet with an error,
            self.last_error = e             # it does not end the debugging session
            return "E01"
        return ""

    # -- queries --------------------------------------------------------------
    def _query(self, p: str) -> str:
        name, _, args = p.partition(":")
        if name == "qSupported":
            feats = args.split(";")
            self._gdb_swbreak = "swbreak+" in feats
            self._gdb_hwbreak = "hwbreak+" in feats
            return (f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;QStartNoAckMode+;"
                    "swbreak+;hwbreak+;vContSupported+")
        if name == "qXfer" and args.startswith("features:read:"):
            return self._xfer_features(args[len("features:read:"):])
        if p == "qAttached" or p.startswith("qAttached:"):
            return "1"
        if p == "qC":
            return f"QC{THREAD_ID:x}"
        if p == "qfThreadInfo":
            return f"m{THREAD_ID:x}"
        if p == "qsThreadInfo":
            return "l"
        if p.startswith("qThreadExtraInfo,"):
            return rsp.hex_encode("guest vCPU 0")
        if p.startswith("qSymbol"):
            return "OK"
        if p.startswith("qRcmd,"):
            return self._monitor(rsp.hex_decode(p[len("qRcmd,"):]).decode("utf-8", "replace"))
        return ""

    def _xfer_features(self, spec: str) -> str:
        annex, _, window = spec.rpartition(":")
        if annex != "target.xml":
            return "E00"
        off, _, length = window.partition(",")
        off, length = rsp.parse_hex_int(off), rsp.parse_hex_int(length)
        doc = TARGET_XML.encode("utf-8")
        chunk = doc[off:off + length]
        more = off + length < len(doc)
        return ("m" if more else "l") + rsp.escape(chunk).decode("latin-1")

    def _monitor(self, command: str) -> str:
        try:
            out = self.target.monitor(command)
        except Exception as e:
            out = f"monitor failed: {type(e).__name__}: {e}\n"
        if out:
            self._send_output(out)
        return "OK"

    # -- registers --------------------------------------------------------------
    def _reg_hex(self, i: int) -> str:
        r = REGISTERS[i]
        try:
            return rsp.le_hex(self.target.read_register(r.name), r.size)
        except (UnavailableRegister, KeyError):
            return "xx" * r.size

    def _read_all_registers(self) -> str:
        return "".join(self._reg_hex(i) for i in range(len(REGISTERS)))

    def _read_register(self, n: int) -> str:
        if n >= len(REGISTERS):
            return "E%02x" % EINVAL
        return self._reg_hex(n)

    def _write_all_registers(self, data: str) -> str:
        if len(data) != 2 * G_PACKET_BYTES:
            return "E%02x" % EINVAL
        pos = 0
        for r in REGISTERS:
            chunk = data[pos:pos + 2 * r.size]
            pos += 2 * r.size
            if "x" in chunk:
                continue
            try:
                self.target.write_register(r.name, rsp.le_unhex(chunk))
            except (UnavailableRegister, KeyError):
                pass
        return "OK"

    def _write_register(self, n: int, value: str) -> str:
        if n >= len(REGISTERS) or len(value) != 2 * REGISTERS[n].size:
            return "E%02x" % EINVAL
        try:
            self.target.write_register(REGISTERS[n].name, rsp.le_unhex(value))
        except (UnavailableRegister, KeyError):
            return "E%02x" % EINVAL
        return "OK"

    # -- memory -----------------------------------------------------------------
    def _read_memory(self, addr: int, size: int) -> str:
        size = min(size, (PACKET_SIZE - 4) // 2)
        try:
            return self.target.read_memory(addr, size).hex()
        except MemoryFault as f:
            if addr < f.addr < addr + size:
                try:
                    return self.target.read_memory(addr, f.addr - addr).hex()
                except MemoryFault:
                    pass
            return "E%02x" % EFAULT

    def _write_memory(self, addr: int, size: int, data: bytes) -> str:
        if len(data) != size:
            return "E%02x" % EINVAL
        if not data:
            return "OK"
        try:
            self.target.write_memory(addr, data)
        except MemoryFault:
            return "E%02x" % EFAULT
        return "OK"

    def _cmd_X(self, head: bytes, body: bytes) -> str:
        try:
            a, _, n = head.partition(b",")
            return self._write_memory(rsp.parse_hex_int(a), rsp.parse_hex_int(n), rsp.unescape(body))
        except rsp.RspError:
            return "E%02x" % EINVAL

    # -- breakpoints --------------------------------------------------------------
    def _breakpoint(self, p: str) -> str:
        fields = p[1:].split(";")[0].split(",")
        if len(fields) != 3:
            return "E%02x" % EINVAL
        try:
            btype = BreakpointType(int(fields[0]))
        except ValueError:
            return ""
        addr, length = rsp.parse_hex_int(fields[1]), rsp.parse_hex_int(fields[2])
        op = self.target.add_breakpoint if p[0] == "Z" else self.target.remove_breakpoint
        try:
            ok = op(btype, addr, length)
        except DebugError:
            return "E%02x" % EINVAL
        return "OK" if ok else ""

    # -- running --------------------------------------------------------------------
    def _vcont(self, p: str) -> str:
        if p == "vCont?":
            return "vCont;c;C;s;S"
        for action in p.split(";")[1:]:
            act, _, tid = action.partition(":")
            if tid and tid not in ("-1", f"{THREAD_ID:x}", "0") and not tid.startswith("p"):
                continue
            kind = act[:1]
            if kind in ("c", "C"):
                return self._resume(step=False)
            if kind in ("s", "S"):
                return self._resume(step=True)
            return "E%02x" % EINVAL
        return "E%02x" % EINVAL

    def _resume(self, step: bool) -> str:
        if self._ended:
            return self._last_reply
        with self._lock:
            self._running = True
            # A 0x03 queued now came in behind the resume packet (those before it were
            # dequeued, and ignored, before it): it is meant for this run.
            interrupted = False
            while True:
                try:
                    ev = self._events.get_nowait()
                except queue.Empty:
                    break
                if isinstance(ev, rsp.Interrupt):
                    interrupted = True
                else:
                    self._pending.append(ev)
            if interrupted:
                self.target.request_stop()
        try:
            ev = self.target.resume(step)
        except Exception as e:              # the target failed: show why, stay attached (SIGABRT)
            self._last_stop = StopEvent(StopKind.INTERRUPTED, message=f"resume failed: {type(e).__name__}: {e}")
            self._send_output(self._last_stop.message + "\n")
            self._last_reply = f"T{SIGABRT:02x}thread:{THREAD_ID:x};"
            return self._last_reply
        finally:
            with self._lock:
                self._running = False
        if ev.message:
            self._send_output(ev.message if ev.message.endswith("\n") else ev.message + "\n")
        self._last_stop = ev
        self._last_reply = self._stop_reply(ev)
        if ev.kind is StopKind.ENDED:
            self._ended = True
        return self._last_reply

    def _stop_reply(self, ev: StopEvent) -> str:
        if ev.kind is StopKind.ENDED:
            if ev.exit_code is not None:
                return f"W{ev.exit_code & 0xFF:02x}"
            return f"X{ev.signal & 0xFF:02x}"
        thread = f"thread:{THREAD_ID:x};"
        if ev.kind is StopKind.INTERRUPTED:
            return f"T{SIGINT:02x}{thread}"
        reason = ""
        if ev.kind is StopKind.BREAKPOINT and self._gdb_swbreak:
            reason = "swbreak:;"
        elif ev.kind is StopKind.HW_BREAKPOINT and self._gdb_hwbreak:
            reason = "hwbreak:;"
        elif ev.kind is StopKind.WATCHPOINT and ev.addr is not None:
            name = {BreakpointType.READ_WATCH: "rwatch", BreakpointType.ACCESS_WATCH: "awatch"}.get(
                ev.watch, "watch")
            reason = f"{name}:{ev.addr:x};"
        return f"T{SIGTRAP:02x}{reason}{thread}"


# -- the server ------------------------------------------------------------------------
class GdbServer:
    """A listening socket for one gdb connection.

    Binding happens in the constructor, so a taken port is reported before
    anything runs (a :class:`GdbStubError` with one line); ``port=0`` picks a
    free ephemeral port, readable as :attr:`port`.
    """

    def __init__(self, target: DebugTarget, host: str = "127.0.0.1", port: int = 1234) -> None:
        self.target = target
        self.host = host
        try:
            self._sock = socket.create_server((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise GdbStubError(f"gdb stub: {host}:{port} is already in use; choose another port") from None
            raise GdbStubError(f"gdb stub: cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.port = self._sock.getsockname()[1]
        self.stub: GdbStub | None = None

    def serve_one(self, accept_timeout: float | None = None) -> ServeResult:
        """Wait for gdb, serve it until it detaches, kills or disconnects."""
        self._sock.settimeout(accept_timeout)
        try:
            conn, _ = self._sock.accept()
        except TimeoutError:
            raise GdbStubError(f"gdb stub: no debugger connected to {self.host}:{self.port} "
                               f"within {accept_timeout:g} s") from None
        finally:
            self.close()
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stub = GdbStub(self.target, conn)
        return self.stub.run()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "GdbServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(target: DebugTarget, host: str = "127.0.0.1", port: int = 1234, *,
          accept_timeout: float | None = None,
          on_listening: Callable[[str, int], None] | None = None) -> ServeResult:
    """Listen on ``host:port`` (loopback by default), accept one gdb
    connection and serve ``target`` until gdb detaches, kills or goes away.

    ``on_listening(host, port)`` is called once the socket listens (with the
    real port when ``port`` is 0), e.g. to print ``target remote`` advice.
    Raises :class:`GdbStubError` (one line) if the port is taken or nobody
    connects within ``accept_timeout`` seconds.
    """
    server = GdbServer(target, host, port)
    if on_listening is not None:
        on_listening(host, server.port)
    return server.serve_one(accept_timeout)
