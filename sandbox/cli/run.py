"""``sandbox`` command line: run guest images under the SVM hypervisor."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import stat
import sys
import threading
from typing import BinaryIO, Callable, TextIO

from rich.markup import escape
from rich.table import Table

from ..debug.recording import RecordingError
from ..hypervisor.classic import ClassicMonitor
from ..hypervisor.hooks_loader import HooksError, load_hooks
from ..hypervisor.loader import ImageError
from ..hypervisor.machine import Machine, RunResult
from ..hypervisor.multiboot import is_multiboot
from ..memory.hostmem import HostMemoryError
from ..memory.tlb import TlbMode
from ..svm.cpu import ExitRecord
from ..svm.exitcodes import exit_name
from ..svm.features import FEATURES, FeatureError, parse_without
from ..svm.intercepts import UnknownIntercept
from ..svm.msrpm import msrpm_bit
from ..svm.stop import StopReason
from .console import Console
from .errors import CliError
from .experiment import add_parser as add_experiment_parser
from .fuzz import add_parser, replay_case
from .helpfmt import HelpFormatter, Parser
from .trace import DEFAULT_TRACE_LIMIT, Disassembler, ExitTrace, color_of, json_exit
from .workbench import RUN_CHOICES, ReplayFailed, Workbench, new_rng_seed, open_replay


#: what Machine.default_intercepts arms (the --intercept help names them)
DEFAULT_INTERCEPTS = ("vmrun vmmcall vmload vmsave stgi clgi skinit invlpga hlt shutdown cpuid, "
                      "and ioio for the COM1 ports 0x3f8-0x3ff only")

EPILOG = """\
console: the guest's serial output goes to stdout, a line at a time; the exit trace and the
summary go to stderr. Exit status: 0 guest exited 0 (or halted), 1 run failed, 2 bad input,
130 interrupted by Ctrl-C (the summary is still printed).
intercept names are the APM's, lowercase: cpuid hlt rdtsc rdtscp pushf popf gdtr_read cr0_read
cr3_write ioio msr excp14 ... plus the groups 'all' and 'sensitive'.
examples:
  sandbox run guest_images/hello.S
  sandbox run guest_images/popek_goldberg.S --intercept sensitive
  sandbox run guest_images/hello.S --ports 0x3f8-0x3ff --json --quiet
  sandbox run guest_images/kernel.S --paging shadow --quiet
  sandbox run guest_images/virtio_console.S --mode classic   (trap-and-emulate at ring 3)
  sandbox run guest_images/sev_secrets.S --sev --dump-host-memory dram.bin
  sandbox run ../shared/kvm-unit-tests/x86/msr.flat --quiet   (multiboot: PC platform, 256 MiB)
  sandbox run crashes/missed-0123456789ab.case --audit     (replay a fuzz finding)
  sandbox fuzz --seconds 60 --seed 1 --crashes crashes/
"""


def _int(s: str, what: str = "") -> int:
    try:
        return int(s, 0)
    except ValueError:
        raise CliError(f"{what or 'not a number'}: {s!r}" if what else f"not a number: {s!r}") from None


#: host DRAM (MiB): the model maps twice this (DRAM, then the processor's plaintext cache)
DRAM_MIN, DRAM_MAX = 4, 16384
#: guest RAM (MiB); host DRAM must hold it and the hypervisor's own pages (VMCB, NPT, IOPM, MSRPM)
RAM_MIN, RAM_OVERHEAD = 2, 8


def check_sizes(ram: int, dram: int, dram_given: bool = True) -> None:
    """One line on guest RAM / host DRAM sizes the machine cannot have
    (``dram_given``: False when ``dram`` was derived from ``ram``)."""
    if not DRAM_MIN <= dram <= DRAM_MAX:
        if not dram_given:
            raise CliError(f"--ram {ram}: the host DRAM it needs ({dram} MiB) is above {DRAM_MAX} MiB")
        raise CliError(f"--dram {dram}: host DRAM must be {DRAM_MIN}-{DRAM_MAX} MiB")
    if ram < RAM_MIN:
        raise CliError(f"--ram {ram}: guest RAM must be at least {RAM_MIN} MiB")
    if dram < ram + RAM_OVERHEAD:
        raise CliError(f"guest RAM of {ram} MiB needs --dram of at least {ram + RAM_OVERHEAD} MiB "
                       f"(guest RAM + {RAM_OVERHEAD} MiB for the hypervisor), got {dram}")


#: the largest instruction budget: Unicorn's count is 64 bits wide, and a larger number
#: given to it wraps around (2**64 would be 0, i.e. uncounted)
MAX_INSNS_LIMIT = (1 << 63) - 1
#: the outputs ``sandbox run`` and ``sandbox replay`` write, by argument name
_OUTPUTS = (("record", "--record"), ("timeline", "--timeline"), ("dump_host_memory", "--dump-host-memory"))
#: a run still going this long after its wall-clock limit has a handler that does not return
STUCK_GRACE_S = 2.0


class HandlerStuck(Exception):
    """Raised into a handler still running :data:`STUCK_GRACE_S` after the run's
    wall-clock limit (the processor stopped, but Python code never returned to it)."""


def _same_file(p: str, q: str) -> bool:
    """Whether two paths name one regular file (or, for a path not there yet, one place)."""
    try:
        return os.path.samefile(p, q) and stat.S_ISREG(os.stat(p).st_mode)
    except OSError:
        return os.path.realpath(p) == os.path.realpath(q)


def check_outputs(a: argparse.Namespace, inputs: list[tuple[str, str | None]]) -> None:
    """Refuse an output path that is empty, or names an input (``(what, path)``)
    or another output: opening it for writing would destroy what is there."""
    seen = [(what, path) for what, path in inputs if path]
    for attr, flag in _OUTPUTS:
        path = getattr(a, attr, None)
        if path is None:
            continue
        if not path:
            raise CliError(f"{flag}: empty file name")
        for what, other in seen:
            if _same_file(path, other):
                raise CliError(f"{flag} {path} is {what}: writing it would destroy it")
        seen.append((f"the {flag} file", path))


def check_limits(a: argparse.Namespace) -> None:
    """The run's budgets: finite, not negative."""
    if not (a.timeout >= 0) or a.timeout == float("inf"):
        raise CliError(f"--timeout {a.timeout:g}: give a number of seconds >= 0 (0: no wall-clock limit)")
    if a.max_exits < 0:
        raise CliError(f"--max-exits {a.max_exits}: must be >= 0")
    if not 0 <= a.max_insns <= MAX_INSNS_LIMIT:
        raise CliError(f"--max-insns {a.max_insns}: must be 0-{MAX_INSNS_LIMIT}")
    if getattr(a, "trace_limit", 0) < 0:
        raise CliError(f"--trace-limit {a.trace_limit}: must be >= 0 (0: every exit)")


def parse_ports(spec: str) -> list[int]:
    ports: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("-"):
            raise CliError(f"port {part!r} is negative; ports are 0-0xffff")
        if "-" in part:
            a, b = part.split("-", 1)
            lo, hi = _int(a), _int(b)
            if lo > hi:
                raise CliError(f"empty port range {part!r}")
            ports.extend(range(lo, hi + 1))
        else:
            ports.append(_int(part))
    for p in ports:
        if not 0 <= p <= 0xFFFF:
            raise CliError(f"port {p} is outside 0-0xffff" if p < 0 else f"port {p:#x} is outside 0-0xffff")
    return ports


def parse_msrs(spec: str) -> list[tuple[int, bool, bool]]:
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        rw, _, num = part.rpartition(":")
        rw = rw.lower() or "rw"
        if rw not in ("r", "w", "rw"):
            raise CliError(f"MSR access must be r:, w: or rw:, got {part!r}")
        msr = _int(num)
        if msrpm_bit(msr, False) is None:
            raise CliError(f"MSR {msr:#x} is outside the MSRPM ranges (it always exits when 'msr' is armed)")
        out.append((msr, "r" in rw, "w" in rw))
    return out


def _machine(a: argparse.Namespace) -> Machine:
    """The machine ``sandbox run`` describes: memory, paging, the image, intercepts and hooks."""
    ports = parse_ports(a.ports) if a.ports else None
    msrs = parse_msrs(a.msrs) if a.msrs else None
    check_limits(a)
    check_mode(a)
    npt_page = {"4k": 4 << 10, "2m": 2 << 20, "1g": 1 << 30}[a.npt_page]
    if a.paging == "shadow" and npt_page != 4 << 10:
        raise CliError("--npt-page applies to nested paging; shadow paging backs guest RAM with 4 KiB pages")
    if (a.sev or a.sev_es or a.snp) and a.paging == "shadow":
        raise CliError("SEV needs nested paging: the hypervisor cannot read an encrypted guest's page tables")
    a.user_exits = set()
    multiboot = is_multiboot(a.image)
    # a multiboot kernel (kvm-unit-tests) gets the PC platform and 256 MiB, as under QEMU's -m 256
    ram = a.ram if a.ram is not None else (256 if multiboot else 16)
    dram = a.dram if a.dram is not None else max(64, ram + 32)
    check_sizes(ram, dram, dram_given=a.dram is not None)
    platform = a.platform if a.platform is not None else ("pc" if multiboot else "none")
    try:
        without = parse_without(a.without)
    except FeatureError as e:
        raise CliError(f"--without {a.without}: {e}") from None
    try:
        m = Machine(dram=dram << 20, ram=ram << 20, npt_page=npt_page, paging=a.paging,
                    tlb_mode=TlbMode(a.tlb), platform=None if platform == "none" else platform,
                    nested=a.nested, without=without)
    except (ValueError, HostMemoryError) as e:
        raise CliError(str(e)) from None
    except (OSError, MemoryError) as e:
        raise CliError(f"cannot allocate {dram} MiB of host DRAM (the model maps twice that): "
                       f"{getattr(e, 'strerror', None) or type(e).__name__}") from None
    try:
        m.load(a.image, append=a.append)
    except (ImageError, HostMemoryError) as e:
        raise CliError(str(e)) from None
    if a.mode == "classic":
        ClassicMonitor(m).attach()          # the kernel at CPL 3, no SVM instruction intercepts
    if a.no_default_intercepts:
        clear_intercepts(m)
    try:
        if a.intercept is not None:
            apply_intercepts(m, a.intercept)
    except UnknownIntercept as e:
        raise CliError(str(e)) from None
    if ports is not None:
        m.set_ports(ports)
    if msrs is not None:
        m.set_msrs(msrs)
    if a.hooks:
        if os.path.isdir(a.hooks):
            raise CliError(f"--hooks {a.hooks}: a directory; give one Python file of handlers, "
                           "e.g. --hooks hooks/cpuid_spoofer.py")
        before = dict(m.handlers)
        try:
            load_hooks(m, a.hooks)
        except HooksError as e:
            raise CliError(str(e)) from None
        a.user_exits = {c for c, h in m.handlers.items() if before.get(c) is not h}
    return m


def check_mode(a: argparse.Namespace) -> None:
    """``--mode classic``: trap-and-emulate on shadow paging.  Resolves ``--paging``
    (shadow for classic, nested otherwise) and refuses what the monitor cannot do."""
    if a.mode != "classic":
        a.paging = a.paging or "nested"
        return
    if a.paging == "nested":
        raise CliError("--mode classic runs on shadow paging (--paging shadow), not nested paging")
    a.paging = "shadow"
    refused = [flag for flag, on in (
        ("--sev", a.sev), ("--sev-es", a.sev_es), ("--snp", a.snp), ("--nested", a.nested),
        ("--platform pc", a.platform == "pc"), ("--intercept", bool(a.intercept)),
        ("--no-default-intercepts", a.no_default_intercepts), ("--npt-page", a.npt_page != "4k"),
        ("--without", bool(a.without))) if on]
    if refused:
        raise CliError(f"--mode classic cannot be combined with {', '.join(refused)}: the classic monitor "
                       "deprivileges a plain 64-bit guest and traps privileged instructions without SVM intercepts")
    if is_multiboot(a.image):
        raise CliError("--mode classic runs 64-bit images (.S, .bin, ELF64); a multiboot kernel starts in "
                       "32-bit protected mode, which the classic monitor does not emulate")


def clear_intercepts(m: Machine) -> None:
    """``--no-default-intercepts``: disarm every intercept and clear the IOPM and MSRPM.
    VMRUN stays armed: the APM makes a VMRUN without it fail (VMEXIT_INVALID)."""
    m.intercept("all", on=False)
    m.guest.iopm.set_all(False)
    m.guest.msrpm.set_all(False)
    m.intercept("vmrun")


def apply_intercepts(m: Machine, spec: str) -> None:
    """``--intercept a,b,-c``: arm each name; a leading '-' disarms it."""
    if any(not n.strip().lstrip("-") for n in spec.split(",")):
        raise CliError(f"--intercept {spec!r}: an empty name (give names separated by commas, e.g. cpuid,hlt)")
    arm = [n.strip() for n in spec.split(",") if n.strip() and not n.strip().startswith("-")]
    disarm = [n.strip()[1:] for n in spec.split(",") if n.strip().startswith("-")]
    if arm:
        m.intercept(arm)
    if disarm:
        m.intercept(disarm, on=False)
        if "ioio" in disarm:
            m.guest.iopm.set_all(False)
        if "msr" in disarm:
            m.guest.msrpm.set_all(False)


def _launch_sev(m: Machine, a: argparse.Namespace, err: Console) -> None:
    # deferred: the SEV stack imports cryptography and numpy (about 0.5 s), which runs without SEV never need
    from .sev import launch_from_cli
    try:
        note = launch_from_cli(m, es=a.sev_es, snp=a.snp, key_seed=a.rng_seed)
    except ValueError as e:
        raise CliError(str(e)) from None
    if not a.json and not a.quiet:
        err.print(note)


def _exit_printer(m: Machine, a: argparse.Namespace, err: Console, console: "ConsoleLines",
                  closed: Callable[[], None]) -> tuple[Callable[[ExitRecord], None] | None, ExitTrace | None]:
    """The per-exit line (or JSON object) of ``sandbox run``, and the human trace (to finish at the end)."""
    if a.quiet:
        return None, None
    if a.json:
        disasm = Disassembler(m)

        def show(rec: ExitRecord) -> None:
            try:
                print(json_exit(m, disasm, rec), flush=True)
            except BrokenPipeError:
                closed()
        return show, None
    # On two destinations the console's partial line goes out before each trace line, so
    # each stream keeps its order; on one (a terminal, 2>&1) that would put the trace line
    # behind it on the same line, so a console line is written only once it is whole.
    before = None if _same_destination(sys.stdout, err.file) else console.flush
    trace = ExitTrace(m, err.file, limit=a.trace_limit, color=color_of(err), before_line=before,
                      on_closed=closed)
    return trace, trace


def _same_destination(a: TextIO, b: TextIO) -> bool:
    """Whether two streams reach the same terminal, pipe or file."""
    try:
        x, y = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)


def _open_dump(path: str | None) -> BinaryIO | None:
    if not path:
        return None
    try:
        return open(path, "wb")
    except OSError as e:
        raise CliError(f"cannot write --dump-host-memory file: {e.strerror}: {path}") from None


class ConsoleLines:
    """The guest console on stdout, a line at a time: a partial line is kept
    until its newline, or until the exit trace (on stderr, when that is another
    destination) is about to print a line, so the two never share a line."""

    def __init__(self, out: TextIO, on_closed: Callable[[], None]) -> None:
        self.out, self.on_closed = out, on_closed
        self.partial = b""
        self.closed = False
        #: why stdout could not be written (not a closed pipe), or None
        self.error: str | None = None

    def write(self, b: bytes) -> None:
        data = self.partial + b
        head, nl, self.partial = data.rpartition(b"\n")
        if nl:
            self._emit(head + nl)

    def flush(self) -> None:
        """Write out a partial line (before a trace line, at the end of the run)."""
        if self.partial:
            data, self.partial = self.partial, b""
            self._emit(data)

    def _emit(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.out.write(data.decode("utf-8", "replace"))
            self.out.flush()
        except BrokenPipeError:
            self.closed = True
            self.on_closed()
        except (OSError, ValueError) as e:   # a full disk, a closed stdout (main() refuses a missing one)
            self.closed = True
            self.error = f"cannot write the guest's console to stdout: {getattr(e, 'strerror', None) or e}"
            self.on_closed()


def quiet_broken_pipe() -> int:
    """stdout's reader went away (``| head``): end quietly, as Unix tools do.
    Point stdout at /dev/null so the interpreter's final flush cannot complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 128 + signal.SIGPIPE if hasattr(signal, "SIGPIPE") else 1


@contextlib.contextmanager
def ctrl_c_stops(m: Machine, timeout: float = 0.0):
    """While the guest runs, Ctrl-C asks the processor to stop (Machine.request_stop).

    Python runs signal handlers only between bytecodes, and a guest that never
    exits keeps the main thread inside Unicorn's C loop.  The kernel may also
    hand SIGINT to any thread that does not block it -- native threads too (a
    BLAS pool started at import), so blocking it in this thread is not enough.
    Python's C-level handler, in whichever thread takes the signal, writes the
    signal number to the wakeup fd; a helper thread reads it and asks for the
    stop.

    Python code that never returns to the processor (a user's handler in a
    loop) runs on through both: a second Ctrl-C raises KeyboardInterrupt in it,
    which stops the run as interrupted, and with a wall-clock limit an alarm
    :data:`STUCK_GRACE_S` after it raises :class:`HandlerStuck` there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    state = {"presses": 0, "running": True}

    def on_sigint(*_) -> None:
        state["presses"] += 1
        m.request_stop()
        if state["presses"] > 1 and state["running"]:
            raise KeyboardInterrupt

    def on_alarm(*_) -> None:
        if state["running"]:
            raise HandlerStuck(f"still running {STUCK_GRACE_S:g} s after the wall-clock limit of {timeout:g} s "
                               "(a handler that does not return?)")

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    old_alarm = None
    if timeout and hasattr(signal, "setitimer"):
        old_alarm = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout + STUCK_GRACE_S)
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    done = threading.Event()

    def waiter() -> None:
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data or done.is_set():
                return
            if signal.SIGINT in data:
                m.request_stop()

    t = threading.Thread(target=waiter, name="sandbox-sigint", daemon=True)
    t.start()
    try:
        yield
    finally:
        state["running"] = False
        if old_alarm is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_alarm)
        done.set()
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGINT, old_handler)
        os.close(w)                       # the waiter reads end-of-file and leaves
        t.join(1.0)
        os.close(r)


#: ``sandbox run`` options that configure a machine; a saved .case brings its own
_CASE_IGNORES = ("intercept", "ports", "msrs", "max_insns", "max_exits", "timeout", "dram", "ram",
                 "append", "platform", "paging", "npt_page", "tlb", "sev", "sev_es", "snp", "mode",
                 "dump_host_memory", "no_default_intercepts", "gdb", "record", "timeline", "nested",
                 "trace_limit", "without")


def _refuse_for_case(a: argparse.Namespace) -> None:
    defaults = vars(build_parser().parse_args(["run", a.image]))
    given = [n for n in _CASE_IGNORES if getattr(a, n) != defaults[n]]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise CliError(f"{flags}: a saved fuzz case (.case) carries its own machine configuration; "
                       "only --audit, --hooks, --json and --quiet apply to it")


def cmd_run(a: argparse.Namespace) -> int:
    if a.image.endswith(".case"):
        _refuse_for_case(a)
        return replay_case(a)
    if a.audit:
        raise CliError("--audit applies to a saved fuzz case (.case) only")
    check_outputs(a, [("the guest image", a.image), ("the --hooks file", a.hooks),
                      ("the recording", getattr(a, "recording", None))])
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    m = _machine(a)
    dump = _open_dump(a.dump_host_memory)
    replay = getattr(a, "replay", None)
    a.rng_seed = replay.rng_seed if replay is not None else (new_rng_seed() if getattr(a, "record", None) else None)
    if a.sev or a.sev_es or a.snp:
        _launch_sev(m, a, err)
    pipe = {"closed": False}

    def closed() -> None:
        pipe["closed"] = True
        m.request_stop()

    console = ConsoleLines(sys.stdout, closed)
    if not a.json:
        m.console_sink = console.write
    m.on_exit_record, trace = _exit_printer(m, a, err, console, closed)
    bench = Workbench(m, a, err, a.user_exits)
    r = None
    # under gdb, Ctrl-C here must also end the wait for a connection: the default KeyboardInterrupt
    # does (gdb's own Ctrl-C reaches the guest through the remote protocol)
    debugging = bool(a.gdb)
    try:
        with contextlib.nullcontext() if debugging else ctrl_c_stops(m, a.timeout):
            r = bench.run()
    finally:
        verdict = bench.close(r)
    write_errors = list(bench.write_errors)
    console.flush()
    if console.error:
        write_errors.insert(0, console.error)
    if trace is not None:
        try:
            trace.finish()                # "... N more exits", before the summary
        except BrokenPipeError:
            pass
    if (pipe["closed"] or console.closed) and not console.error:
        if dump is not None:
            dump.close()
        return quiet_broken_pipe()
    if dump is not None:
        try:
            with dump:
                dump.write(m.mem.dump())          # raw DRAM: what the hypervisor (or a probe) could read
        except OSError as e:
            write_errors.append(f"cannot write --dump-host-memory file: {e.strerror}: {a.dump_host_memory}")
    interrupted = r.reason == StopReason.STOPPED and r.detail == "interrupted"
    ok = r.reason in (StopReason.GUEST_EXIT, StopReason.HALT) and not r.exit_code
    dbg = getattr(getattr(m.platform, "debug_exit", None), "status", None)
    if a.json and not console.error:
        try:
            _print_json_result(a, r, m, ok, dbg)
        except BrokenPipeError:
            return quiet_broken_pipe()
        except (OSError, ValueError) as e:
            write_errors.append(f"cannot write the JSON result to stdout: {getattr(e, 'strerror', None) or e}")
    else:
        err.print(exits_table(r))
        err.print(memory_table(a.paging, r, m))
        style = "green" if ok else "red"
        err.print(f"[{style}]run ended: {r.reason}[/{style}]" + (f" - {escape(r.detail)}" if r.detail else "")
                  + f"; {r.exits} exits")
    if write_errors:
        for e in write_errors:
            print(f"sandbox: error: {e}", file=sys.stderr)
        return 2
    if verdict:
        err.print(f"[green]{escape(verdict)}[/green]")
        return 130 if interrupted else 0          # a replay succeeds when it is the recorded run
    if interrupted:
        return 130
    return 0 if ok else 1


def _print_json_result(a: argparse.Namespace, r: RunResult, m: Machine, ok: bool, dbg) -> None:
    """``--json``: the run's final record on stdout."""
    print(json.dumps({
        "final": True, "reason": r.reason, "detail": r.detail, "guest_exit_code": r.exit_code,
        "debug_exit_status": dbg,
        "ok": ok, "regs": r.regs or None,         # SEV-ES: none, they are in the encrypted VMSA
        "rip": r.rip, "rflags": r.rflags,
        "exits": r.exits, "counts": {exit_name(k): v for k, v in sorted(r.counts.items())},
        "insns": r.insns, "console": r.console, "paging": a.paging,
        "walks": r.walk, "tlb": r.tlb,
        "shadow": m.shadow.stats.snapshot() if m.shadow is not None else None,
    }), flush=True)


def cmd_replay(a: argparse.Namespace) -> int:
    check_outputs(a, [("the recording", a.recording), ("the guest image", a.image)])
    _, ns = open_replay(a)
    try:
        return cmd_run(ns)
    except ReplayFailed as e:
        print(f"sandbox: {e}", file=sys.stderr)
        return 1


def exits_table(r: RunResult) -> Table:
    """The run's exits per code."""
    t = Table(title="exits by code", show_lines=False)
    t.add_column("EXITCODE", justify="right")
    t.add_column("exit")
    t.add_column("count", justify="right")
    for code, n in sorted(r.counts.items()):
        t.add_row(f"{code:#x}", exit_name(code), str(n))
    return t


def memory_table(paging: str, r: RunResult, m: Machine) -> Table:
    """The run's memory-virtualization figures: walks, their page-table
    references, TLB hits and misses (and the shadow MMU's work)."""
    w, tlb = r.walk, r.tlb
    t = Table(title=f"memory ({paging} paging)", show_header=False)
    t.add_column("what")
    t.add_column("count", justify="right")
    kind = "2-D walks" if paging == "nested" else "walks of the shadow tables"
    t.add_row(kind, str(w.get("walks", 0)))
    t.add_row("  guest page-table references", str(w.get("guest_pte_refs", 0)))
    if paging == "nested":
        t.add_row("  nested page-table references", str(w.get("nested_pte_refs", 0)))
    t.add_row("  data references", str(w.get("data_refs", 0)))
    t.add_row("TLB hits / misses", f"{tlb.get('hits', 0)} / {tlb.get('misses', 0)}")
    if m.shadow is not None:
        s = m.shadow.stats
        t.add_row("shadow faults fixed / reflected", f"{s.shadow_faults} / {s.guest_faults}")
        t.add_row("guest table entries the hypervisor read", str(s.guest_entries))
        t.add_row("page-table writes trapped / shadow rebuilds", f"{s.pt_write_faults} / {s.zaps}")
    return t


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sandbox", description="AMD-V (SVM) hypervisor sandbox",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="run a guest image", epilog=EPILOG, formatter_class=HelpFormatter)
    r.add_argument("image", help="guest image: .S/.asm (keystone), .bin (flat), a static non-PIE ELF64, an ELF32 "
                                 "multiboot kernel (kvm-unit-tests .flat), or a saved fuzz case (.case: only "
                                 "--audit, --hooks, --json and --quiet apply)")
    r.add_argument("--intercept", metavar="NAMES",
                   help="comma-separated intercepts to arm (APM names, 'all', 'sensitive'); a leading '-' disarms "
                        f"one (--intercept=-cpuid,rdtsc). Armed by default: {DEFAULT_INTERCEPTS}")
    r.add_argument("--no-default-intercepts", action="store_true",
                   help="start from no intercepts (VMRUN only, as the APM requires) and an empty IOPM/MSRPM")
    r.add_argument("--ports", metavar="LIST", help="intercept exactly these ports, e.g. 0x80,0x3f8-0x3ff")
    r.add_argument("--msrs", metavar="LIST", help="intercept exactly these MSR accesses, e.g. r:0x10,w:0xc0000103")
    r.add_argument("--hooks", metavar="FILE", help="Python file with user exit handlers, e.g. hooks/cpuid_spoofer.py")
    r.add_argument("--max-insns", type=int, default=0, metavar="N",
                   help="instruction budget for the run; also reports the count (0 = uncounted: counting slows the guest)")
    r.add_argument("--max-exits", type=int, default=10_000_000, metavar="N",
                   help="handle N exits, then stop the run at the next one (>= 0)")
    r.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="wall-clock limit in seconds; 0 = no limit (Ctrl-C still stops the run)")
    r.add_argument("--dram", type=int, default=None, metavar="MIB",
                   help=f"host DRAM size, {DRAM_MIN}-{DRAM_MAX} MiB and at least guest RAM + {RAM_OVERHEAD}; "
                        "default: 64, or guest RAM + 32 when that is more")
    r.add_argument("--ram", type=int, default=None, metavar="MIB",
                   help=f"guest RAM size, at least {RAM_MIN} MiB; default: 16, or 256 for a multiboot kernel")
    r.add_argument("--append", metavar="ARGS", help="command line of a multiboot kernel (kvm-unit-tests' test_args)")
    r.add_argument("--platform", choices=RUN_CHOICES["platform"], default=None,
                   help="devices beyond COM1: 'pc' (debug-exit, fw_cfg, PIC, local APIC); default: pc for a "
                        "multiboot kernel, else none")
    r.add_argument("--nested", action="store_true",
                   help="nested SVM: the guest may run its own guests (VMRUN emulated by this hypervisor)")
    r.add_argument("--mode", choices=RUN_CHOICES["mode"], default="svm",
                   help="svm: the guest in non-root mode at its own CPL; classic: trap-and-emulate -- the kernel "
                        "deprivileged to ring 3 with no SVM intercepts, privileged instructions emulated from their "
                        "#GP/#UD, memory on shadow paging")
    r.add_argument("--paging", choices=RUN_CHOICES["paging"], default=None,
                   help="memory virtualization: the processor's nested paging, or hypervisor shadow tables "
                        "(default: nested); --mode classic runs on shadow tables only")
    r.add_argument("--npt-page", choices=RUN_CHOICES["npt_page"], default="4k",
                   help="leaf size of the nested page table backing guest RAM")
    r.add_argument("--without", metavar="FEATURES",
                   help="a processor without these features, by QEMU's names (as -cpu max,-rdtscp,...): "
                        f"{', '.join(FEATURES)}; their instructions #UD before any intercept, and CPUID "
                        "stops reporting them")
    r.add_argument("--tlb", choices=RUN_CHOICES["tlb"], default="tagged",
                   help="TLB tagged by ASID, or flushed on every world switch (pre-ASID hardware)")
    r.add_argument("--sev", action="store_true", help="launch the guest encrypted (SEV): measured, C-bit set")
    r.add_argument("--sev-es", action="store_true", help="SEV-ES: encrypted register state, #VC and the GHCB (implies --sev)")
    r.add_argument("--snp", action="store_true", help="SEV-SNP: reverse-map table integrity (implies --sev)")
    r.add_argument("--dump-host-memory", metavar="PATH", help="write the raw host DRAM image here when the run ends")
    r.add_argument("--gdb", metavar="[HOST:]PORT",
                   help="wait for gdb ('target remote HOST:PORT') before the first VMRUN and let it debug the "
                        "guest; HOST defaults to 127.0.0.1 (see README, 'Debugging a guest')")
    r.add_argument("--record", metavar="RUN.rec",
                   help="record the run's nondeterministic inputs and its exits, console, final registers and "
                        "DRAM hash for 'sandbox replay' (RDTSC/RDTSCP are intercepted while recording)")
    r.add_argument("--timeline", metavar="FILE.json",
                   help="write exits, handler times, injected events and TLB flushes as a Chrome trace-event "
                        "timeline (open it in ui.perfetto.dev or chrome://tracing)")
    r.add_argument("--json", action="store_true", help="one JSON object per exit, then a final record")
    r.add_argument("--quiet", action="store_true", help="no per-exit lines, only the summary")
    r.add_argument("--trace-limit", type=int, default=DEFAULT_TRACE_LIMIT, metavar="N",
                   help=f"print the first N exit lines, then one '... M more exits' line (default {DEFAULT_TRACE_LIMIT:,}; "
                        "0: every exit; the summary and --json are never cut)")
    r.add_argument("--audit", action="store_true", help="for a saved fuzz case (.case): run the soundness audit too")
    r.set_defaults(fn=cmd_run)
    rp = sub.add_parser("replay", help="replay a recording (sandbox run --record) and check it",
                        formatter_class=HelpFormatter,
                        description="Rebuild the recorded machine, feed it the recorded inputs and check every "
                                    "exit (code, RIP, EXITINFO), the console, the final registers and the DRAM "
                                    "hash; the first difference is named. Exit status: 0 same run, 1 diverged, "
                                    "2 a recording that cannot be used (another format version, another image, "
                                    "corrupt or modified).")
    rp.add_argument("recording", metavar="RUN.rec", help="a file written by sandbox run --record")
    rp.add_argument("--image", metavar="PATH", help="the guest image, if not at the path it was recorded from")
    rp.add_argument("--to-exit", type=int, metavar="N", default=None,
                    help="stop before exit N (counted from 0) and wait for gdb there (needs --gdb)")
    rp.add_argument("--gdb", metavar="[HOST:]PORT", help="debug the replay with gdb (see sandbox run --gdb)")
    rp.add_argument("--timeline", metavar="FILE.json", help="a timeline of the replay (see sandbox run)")
    rp.add_argument("--json", action="store_true", help="one JSON object per exit, then a final record")
    rp.add_argument("--quiet", action="store_true", help="no per-exit lines, only the summary")
    rp.set_defaults(fn=cmd_replay)
    add_parser(sub)
    add_experiment_parser(sub)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's arguments (argparse exits 2 with one line on bad ones)."""
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """Run the command ``argv`` (or the already parsed ``args``)."""
    a = args if args is not None else parse(argv)
    if sys.stdout is None:             # started with stdout closed (>&-): results would vanish
        print("sandbox: error: stdout is closed; redirect it to a file or /dev/null instead", file=sys.stderr)
        return 2
    try:
        return a.fn(a)
    except (CliError, RecordingError) as e:      # a recording found corrupt while it is replayed
        print(f"sandbox: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return quiet_broken_pipe()
    except KeyboardInterrupt:
        print("sandbox: interrupted", file=sys.stderr)
        return 130


