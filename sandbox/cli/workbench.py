"""The researcher's tools on ``sandbox run`` and ``sandbox replay``: ``--gdb``,
``--record``, ``--timeline``, and replaying a recording (``--to-exit``)."""
from __future__ import annotations

import argparse
import hashlib
import os
import secrets

from rich.console import Console

from ..debug.gdbstub import GdbStubError, serve
from ..debug.observe import MachineTimeline
from ..debug.recording import Recording, RecordingError, RecordingWriter, ReplayDivergence, read_recording
from ..debug.rr import MachineRecorder, MachineReplayer, run_config
from ..debug.target import MachineTarget
from ..debug.timeline import TimelineError
from ..hypervisor.machine import PAGING_MODES, Machine, RunResult
from ..svm.stop import StopReason
from ..version import __version__
from .errors import CliError
from .trace import DEFAULT_TRACE_LIMIT

#: the ``sandbox run`` arguments that make the machine; a recording keeps them and a replay rebuilds from them
RECORDED_ARGS = ("image", "intercept", "no_default_intercepts", "ports", "msrs", "hooks", "max_insns",
                 "max_exits", "timeout", "dram", "ram", "append", "platform", "nested", "paging", "npt_page",
                 "tlb", "sev", "sev_es", "snp", "mode", "without")


#: what each recorded argument must be (None is allowed for all but the booleans and the budgets)
_RECORDED_TYPES = {"no_default_intercepts": bool, "nested": bool, "sev": bool, "sev_es": bool, "snp": bool,
                   "max_insns": int, "max_exits": int, "timeout": (int, float), "dram": int, "ram": int}
#: the ``sandbox run`` arguments that take one of a few values: the run parser's
#: ``choices`` and what a recording's arguments are checked against
RUN_CHOICES = {"platform": ("none", "pc"), "paging": PAGING_MODES, "npt_page": ("4k", "2m", "1g"),
               "tlb": ("tagged", "flush"), "mode": ("svm", "classic")}


def _check_recorded(path: str, cfg: dict) -> None:
    """The recorded ``sandbox run`` arguments have the types and values the command line gives them."""
    for k in RECORDED_ARGS:
        v = cfg.get(k)
        want = _RECORDED_TYPES.get(k, str)
        if k in RUN_CHOICES:
            ok = v is None or v in RUN_CHOICES[k]
        elif want is bool:
            ok = v is None or isinstance(v, bool)
        else:
            ok = v is None or (isinstance(v, want) and not isinstance(v, bool))
        if ok and k in ("max_insns", "max_exits", "timeout") and v is not None:
            ok = v >= 0 and v == v and v != float("inf")
        if not ok:
            raise CliError(f"{path}: its recorded {k} is {v!r}, which sandbox run would not accept")


def parse_gdb_address(spec: str) -> tuple[str, int]:
    """``--gdb [HOST:]PORT``: loopback unless a host is given."""
    host, _, port = spec.rpartition(":")
    try:
        n = int(port, 10)
    except ValueError:
        raise CliError(f"--gdb {spec}: give [HOST:]PORT, e.g. --gdb 1234 or --gdb 127.0.0.1:1234") from None
    if not 0 <= n <= 0xFFFF:
        raise CliError(f"--gdb {spec}: port {n} is outside 0-65535")
    return host.strip("[]") or "127.0.0.1", n


def _file_sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def recorded_config(a: argparse.Namespace) -> dict:
    cfg = run_config(a, RECORDED_ARGS)
    cfg["image"] = os.path.abspath(a.image)          # a replay may run from another directory
    if a.hooks:
        cfg["hooks"] = os.path.abspath(a.hooks)
        cfg["hooks_sha256"] = _file_sha(a.hooks)
    return cfg


def open_replay(a: argparse.Namespace) -> tuple[Recording, argparse.Namespace]:
    """``sandbox replay``: the checked recording, and the ``sandbox run`` arguments it was made with."""
    try:
        probe = read_recording(a.recording)
        if not isinstance(probe.config, dict):
            raise CliError(f"{a.recording}: its header holds no run configuration (a {type(probe.config).__name__})")
        cfg = dict(probe.config)
        _check_recorded(a.recording, cfg)
        image = a.image or cfg.get("image")
        if not image or not os.path.isfile(image):
            raise CliError(f"{a.recording}: its guest image {image!r} is not here; give it with --image PATH")
        rec = read_recording(a.recording, image=image, sandbox_version=__version__)
        if cfg.get("hooks") and (not os.path.isfile(cfg["hooks"]) or _file_sha(cfg["hooks"]) != cfg.get("hooks_sha256")):
            raise CliError(f"{a.recording} was recorded with hooks file {cfg['hooks']}, which is missing or changed")
    except RecordingError as e:
        raise CliError(str(e)) from None
    ns = argparse.Namespace(**{k: cfg.get(k) for k in RECORDED_ARGS})
    ns.image = image
    ns.timeout = 0.0 if rec.final.complete else ns.timeout       # guest time, not the wall clock, decides
    ns.audit = False
    ns.dump_host_memory = None
    ns.record = None
    ns.replay, ns.to_exit = rec, a.to_exit
    ns.gdb, ns.timeline, ns.json, ns.quiet = a.gdb, a.timeline, a.json, a.quiet
    ns.mode = ns.mode or "svm"                              # recordings made before --mode existed
    ns.trace_limit = DEFAULT_TRACE_LIMIT
    recorded_exits = sum(1 for _ in rec.exits())
    if not rec.final.complete:
        ns.max_exits = recorded_exits                           # the recorded run was cut short there
    if a.to_exit is not None and not 0 <= a.to_exit:
        raise CliError(f"--to-exit {a.to_exit}: must be >= 0")
    if a.to_exit is not None and a.to_exit >= recorded_exits:
        # refused before the replay runs to its end only to find the exit missing
        raise CliError(f"--to-exit {a.to_exit}: {a.recording} holds {recorded_exits} exit(s), numbered from 0"
                       + (f" to {recorded_exits - 1}" if recorded_exits else ""))
    if a.to_exit is not None and not a.gdb:
        raise CliError("--to-exit stops the replay for a debugger: give --gdb PORT too")
    return rec, ns


class Workbench:
    """What ``--record``, ``--timeline``, ``--gdb`` and a replay add to one run."""

    def __init__(self, m: Machine, a: argparse.Namespace, err: Console, user_exits: set[int]) -> None:
        self.m, self.a, self.err = m, a, err
        self.recorder: MachineRecorder | None = None
        self.replayer: MachineReplayer | None = None
        self.timeline: MachineTimeline | None = None
        self.target: MachineTarget | None = None
        #: output files that could not be written at the end (see :meth:`close`)
        self.write_errors: list[str] = []
        replay = getattr(a, "replay", None)
        if replay is not None:
            self.replayer = MachineReplayer(m, replay, user_exits)
        elif getattr(a, "record", None):
            try:
                writer = RecordingWriter(a.record, image=a.image, config=recorded_config(a),
                                         rng_seed=a.rng_seed, image_name=os.path.basename(a.image))
            except OSError as e:
                raise CliError(f"cannot write --record file: {e.strerror}: {a.record}") from None
            self.recorder = MachineRecorder(m, writer, user_exits)
        if getattr(a, "timeline", None):
            try:
                self.timeline = MachineTimeline(m, a.timeline, other_data={"image": os.path.basename(a.image)})
            except OSError as e:
                raise CliError(f"cannot write --timeline file: {e.strerror}: {a.timeline}") from None

    def run(self) -> RunResult:
        a, m = self.a, self.m
        if self.timeline is not None:
            self.timeline.start()
        to_exit = getattr(a, "to_exit", None)
        if to_exit is not None:
            r = m.run(max_insns=a.max_insns, timeout=a.timeout, max_exits=min(to_exit, a.max_exits))
            if self.replayer is not None and self.replayer.divergence is not None:
                return r
            if r.reason != StopReason.EXIT_BUDGET:
                raise CliError(f"the replay ended ({r.reason}) after {r.exits} exits, before exit {to_exit}")
            self.err.print(f"replay: stopped before exit #{to_exit} ({r.exits} exits handled)")
            return self.debug(prior=r)
        if a.gdb:
            return self.debug()
        return m.run(max_insns=a.max_insns, timeout=a.timeout, max_exits=a.max_exits)

    def debug(self, prior: RunResult | None = None) -> RunResult:
        """Wait for gdb, serve it, then finish the run as gdb left it (detach: the guest
        runs on; kill: the run stops)."""
        a, m, err = self.a, self.m, self.err
        host, port = parse_gdb_address(a.gdb)
        t = self.target = MachineTarget(m, max_exits=a.max_exits)
        if prior is not None:
            t.absorb(prior)

        def listening(h: str, p: int) -> None:
            err.print(f"gdb stub: waiting for gdb on {h}:{p} (gdb -ex 'target remote {h}:{p}')")

        try:
            session = serve(t, host, port, on_listening=listening)
        except GdbStubError as e:
            raise CliError(str(e)) from None
        if not a.quiet and not a.json:
            err.print(f"gdb stub: session {session.reason}")
        if session.reason in ("detached", "disconnected") and not t.ended:
            t.absorb(m.run(max_insns=a.max_insns, timeout=a.timeout, max_exits=max(0, a.max_exits - t.exits)))
        result = t.result()
        if result is None:                      # killed before the guest ran an instruction
            v = m.guest.vmcb
            return RunResult(StopReason.STOPPED, "killed by gdb before the guest ran", None, 0, {},
                             {} if m.sev is not None and m.sev.es is not None else m.regs.as_dict(),
                             v.RIP, v.RFLAGS, "")
        if session.reason == "killed" and not t.ended:
            result.reason, result.detail = StopReason.STOPPED, "killed by gdb"
        return result

    def close(self, r: RunResult | None) -> str | None:
        """End the timeline and the recording; check a replay. Returns a replay's
        verdict line (or raises CliError naming the first divergence).  A file
        that cannot be written (a full disk) is named in :attr:`write_errors`,
        so the run's console and summary are still shown."""
        if self.timeline is not None:
            try:
                self.timeline.end(r)
            except TimelineError as e:
                raise CliError(f"--timeline: {e}") from None
            except OSError as e:
                self.write_errors.append(f"cannot write --timeline file: {e.strerror}: {self.a.timeline}")
        if self.recorder is not None:
            try:
                if r is None:
                    self.recorder.w.close()          # an incomplete recording
                else:
                    self.recorder.finish(r)
            except OSError as e:
                self.write_errors.append(f"cannot write --record file: {e.strerror}: {self.a.record}")
        if self.replayer is not None and r is not None:
            cut = self.target is not None and not self.target.ended
            try:
                self.replayer.finish(r, check_end=not cut)
            except ReplayDivergence as e:
                raise ReplayFailed(str(e)) from None
            except RecordingError as e:
                raise CliError(str(e)) from None
            n = self.replayer.rp.exits_checked
            return f"replay matches the recording: {n} exits" + ("" if cut else
                                                                 ", console, final registers and DRAM")
        return None


class ReplayFailed(CliError):
    """The replay did not do what the recording did (exit status 1)."""


def new_rng_seed() -> int:
    return secrets.randbits(63)
