"""Record/replay files: a run's nondeterministic inputs, and what to verify.

A guest run in the sandbox is deterministic except for what comes from
outside the guest: time stamp counter values, where timer interrupts land,
bytes from devices, what user handlers decide, and the seed of any random
choices. A recording keeps those, in the order they happened, so a replay can
feed them back; and it keeps what the run produced -- every #VMEXIT, the
console output, the final registers and a hash of DRAM -- so the replay can
show it did the same thing, or say where it stopped doing so.

**File layout** (format version 1)::

    AMDV-SANDBOX-RECORDING 1\\n            magic and format version (ASCII)
    {header JSON}\\n                        one line, UTF-8
    zlib stream                            the records: JSON lines, compressed
    \\nsha256:<64 hex digits>\\n             the integrity trailer

The trailer's SHA-256 covers every byte before it (magic, header, compressed
records), so a flipped byte anywhere, a truncated file or a forged header is
detected before anything is decompressed. The magic line carries the format
version so that a reader can refuse another version before parsing anything
else.

**Header** keys: ``format`` (1), ``sandbox`` (the sandbox version that
recorded it), ``created`` (UTC, ISO 8601), ``image`` (its name) and
``image_sha256`` (of the guest image's bytes), ``config`` (the run
configuration: intercepts, ports, paging, limits ...; any JSON object) and
``config_sha256`` (of its canonical JSON: sorted keys, no spaces),
``rng_seed``.

**Records**, one JSON object per line, in the order the run produced them;
``k`` is the kind, integers are JSON numbers, bytes are hex strings:

=========  ========================================================================
``k``      fields
=========  ========================================================================
``exit``   ``i`` exit index (from 0), ``code`` EXITCODE, ``rip``, ``info1``, ``info2``
``tsc``    ``v`` the TSC value the guest read; ``exit`` the index of the RDTSC(P) exit
           that returned it, or ``insn`` the retired-instruction count of a read
           that did not exit
``timer``  ``insn`` the retired-instruction count where a timer interrupt was taken
``in``     ``port``, ``size``, ``v``: a value a device gave the guest (port or MMIO)
``hv``     ``exit`` index, ``action`` (``resume``/``stop``), and what a user handler
           wrote: ``regs`` {name: value}, ``vmcb`` {field: value}, ``mem`` [[gpa, hex]]
``out``    ``t``: console output, as it appeared
``end``    ``complete`` (false when the run was cut short, e.g. Ctrl-C), ``reason``,
           ``exit_code``, ``regs`` {name: value}, ``dram_sha256``, ``console_sha256``
=========  ========================================================================

Compactness: the JSON lines compress well (repeated keys); a million-exit
run is a few megabytes.

:class:`RecordingWriter` streams a recording (nothing is held in memory; a
``with`` block closes the file properly on an exception or Ctrl-C, marking it
incomplete). :func:`read_recording` checks a file and returns a
:class:`Recording`; every problem is a :class:`RecordingError` with a one-line
message naming the file and what is wrong. :class:`Replayer` answers a
replay's "next TSC value", "next timer point", "next device input" and
"next handler effect" in order and checks each exit against the recorded one,
raising :class:`ReplayDivergence` at the first difference.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..version import __version__
from .exits import ExitLike, describe_exit

FORMAT_VERSION = 1
MAGIC = b"AMDV-SANDBOX-RECORDING"
TRAILER_PREFIX = b"\nsha256:"
TRAILER_LEN = len(TRAILER_PREFIX) + 64 + 1
_CHUNK = 1 << 16


class RecordingError(Exception):
    """A recording that cannot be used (one line: the file and what is wrong)."""


class ReplayDivergence(Exception):
    """The replayed run did not do what the recorded one did (one line)."""


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def image_digest(image: bytes | str | os.PathLike) -> str:
    """SHA-256 of a guest image (its bytes, or the file at that path)."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    return sha256_hex(image)


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of a run configuration's canonical JSON (sorted keys, no spaces)."""
    return sha256_hex(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())


# -- records -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExitRecord:
    index: int
    exitcode: int
    rip: int
    exitinfo1: int
    exitinfo2: int

    def describe(self) -> str:
        return describe_exit(self.exitcode, self.rip, self.exitinfo1, self.exitinfo2)


@dataclass(frozen=True)
class TscRead:
    value: int
    exit: int | None = None
    insn: int | None = None


@dataclass(frozen=True)
class DeviceInput:
    port: int
    size: int
    value: int


@dataclass(frozen=True)
class HandlerEffect:
    exit: int
    action: str
    regs: dict[str, int] = field(default_factory=dict)
    vmcb: dict[str, int] = field(default_factory=dict)
    mem: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True)
class Final:
    complete: bool
    reason: str
    exit_code: int | None
    regs: dict[str, int]
    dram_sha256: str | None
    console_sha256: str | None


def _encode(rec: dict) -> bytes:
    return json.dumps(rec, separators=(",", ":")).encode() + b"\n"


# -- writing -------------------------------------------------------------------------------------
class RecordingWriter:
    """Streams a recording to ``path``.

    Call :meth:`exit` at each #VMEXIT (before its handler), :meth:`tsc`,
    :meth:`timer`, :meth:`device_input`, :meth:`handler` and :meth:`console`
    as those happen, and :meth:`finish` at the end of the run. Used as a
    context manager, an exception (Ctrl-C included) before :meth:`finish`
    closes the file with an incomplete ``end`` record.
    """

    def __init__(self, path: str | os.PathLike, *, image: bytes | str | os.PathLike, config: dict[str, Any],
                 rng_seed: int | None = None, image_name: str | None = None,
                 sandbox_version: str | None = None) -> None:
        if sandbox_version is None:
            sandbox_version = __version__
        self.path = os.fspath(path)
        self.header = {
            "format": FORMAT_VERSION,
            "sandbox": sandbox_version,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "image": image_name if image_name is not None else (
                os.path.basename(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else ""),
            "image_sha256": image_digest(image),
            "config": config,
            "config_sha256": config_digest(config),
            "rng_seed": rng_seed,
        }
        self._f = open(self.path, "wb")
        self._hash = hashlib.sha256()
        self._z = zlib.compressobj(6)
        self._buf: list[bytes] = []
        self._buffered = 0
        self._raw(MAGIC + b" %d\n" % FORMAT_VERSION)
        self._raw(json.dumps(self.header, sort_keys=True, separators=(",", ":")).encode() + b"\n")
        self.exits = 0
        self.closed = False
        self._finished = False
        self._console = hashlib.sha256()

    def _raw(self, data: bytes) -> None:
        if data:
            self._hash.update(data)
            self._f.write(data)

    def _rec(self, rec: dict) -> None:
        self._line(_encode(rec))

    def _line(self, line: bytes) -> None:
        # lines are batched: one compress call per ~64 KiB, not per record
        if self.closed:
            raise RecordingError(f"{self.path}: the recording is closed")
        self._buf.append(line)
        self._buffered += len(line)
        if self._buffered >= _CHUNK:
            self._drain()

    def _drain(self) -> None:
        if self._buf:
            self._raw(self._z.compress(b"".join(self._buf)))
            self._buf.clear()
            self._buffered = 0

    # -- what happened ----------------------------------------------------------------
    def exit(self, e: ExitLike) -> int:
        """Record a #VMEXIT; returns its index."""
        i = self.exits
        # the hot record, formatted directly (the same JSON as _encode would write)
        self._line(b'{"k":"exit","i":%d,"code":%d,"rip":%d,"info1":%d,"info2":%d}\n'
                   % (i, e.exitcode, e.rip, e.exitinfo1, e.exitinfo2))
        self.exits += 1
        return i

    def tsc(self, value: int, *, exit: int | None = None, insn: int | None = None) -> None:
        if (exit is None) == (insn is None):
            raise ValueError("a TSC read is placed by its exit index or by its instruction count, one of them")
        rec: dict[str, Any] = {"k": "tsc", "v": value}
        rec.update({"exit": exit} if exit is not None else {"insn": insn})
        self._rec(rec)

    def timer(self, insn: int) -> None:
        self._rec({"k": "timer", "insn": insn})

    def device_input(self, port: int, value: int, size: int = 1) -> None:
        self._rec({"k": "in", "port": port, "size": size, "v": value})

    def handler(self, action: str, *, exit: int | None = None, regs: dict[str, int] | None = None,
                vmcb: dict[str, int] | None = None, mem: list[tuple[int, bytes]] | None = None) -> None:
        """What a user handler did for an exit (default: the last one recorded)."""
        rec: dict[str, Any] = {"k": "hv", "exit": self.exits - 1 if exit is None else exit, "action": str(action)}
        if regs:
            rec["regs"] = dict(regs)
        if vmcb:
            rec["vmcb"] = dict(vmcb)
        if mem:
            rec["mem"] = [[gpa, bytes(data).hex()] for gpa, data in mem]
        self._rec(rec)

    def console(self, text: str) -> None:
        if text:
            self._console.update(text.encode("utf-8"))
            self._rec({"k": "out", "t": text})

    def finish(self, reason: str, *, exit_code: int | None = None, regs: dict[str, int] | None = None,
               dram: bytes | bytearray | memoryview | None = None, complete: bool = True) -> None:
        """The end of the run: how it ended, final registers, a hash of DRAM; closes the file."""
        self._rec({"k": "end", "complete": complete, "reason": str(reason), "exit_code": exit_code,
                   "regs": dict(regs or {}), "dram_sha256": sha256_hex(dram) if dram is not None else None,
                   "console_sha256": self._console.hexdigest()})
        self._finished = True
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        if not self._finished:
            self._rec({"k": "end", "complete": False, "reason": "interrupted", "exit_code": None, "regs": {},
                       "dram_sha256": None, "console_sha256": self._console.hexdigest()})
            self._finished = True
        self._drain()
        self.closed = True
        self._raw(self._z.flush())
        self._f.write(TRAILER_PREFIX + self._hash.hexdigest().encode() + b"\n")
        self._f.close()

    def __enter__(self) -> "RecordingWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- reading -------------------------------------------------------------------------------------
def _short(h: str | None) -> str:
    return (h or "?")[:12] + "…"


class Recording:
    """A checked recording. :meth:`records` streams its records."""

    def __init__(self, path: str, header: dict[str, Any], body_offset: int, body_end: int) -> None:
        self.path = path
        self.header = header
        self._body = (body_offset, body_end)
        self._final: Final | None = None

    @property
    def format(self) -> int:
        return self.header["format"]

    @property
    def sandbox_version(self) -> str:
        return self.header.get("sandbox", "")

    @property
    def image_sha256(self) -> str:
        return self.header["image_sha256"]

    @property
    def config(self) -> dict[str, Any]:
        return self.header.get("config", {})

    @property
    def rng_seed(self) -> int | None:
        return self.header.get("rng_seed")

    def records(self) -> Iterator[dict[str, Any]]:
        """The records in order, as dicts (``k`` is the kind)."""
        start, end = self._body
        z = zlib.decompressobj()
        tail = b""
        with open(self.path, "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise RecordingError(f"{self.path} is truncated: the records end early")
                left -= len(chunk)
                try:
                    data = tail + z.decompress(chunk)
                except zlib.error as e:
                    raise RecordingError(f"{self.path} is corrupt: the records do not decompress ({e})") from None
                *lines, tail = data.split(b"\n")
                for line in lines:
                    yield self._parse(line)
            data = tail + z.flush()
        if not z.eof:
            raise RecordingError(f"{self.path} is corrupt: the record stream does not end")
        for line in data.split(b"\n"):
            if line:
                yield self._parse(line)

    def _parse(self, line: bytes) -> dict[str, Any]:
        try:
            rec = json.loads(line)
        except ValueError:
            raise RecordingError(f"{self.path} is corrupt: a record is not JSON ({line[:40]!r})") from None
        if not isinstance(rec, dict) or "k" not in rec:
            raise RecordingError(f"{self.path} is corrupt: a record has no kind ({line[:40]!r})")
        return rec

    def exits(self) -> Iterator[ExitRecord]:
        for r in self.records():
            if r["k"] == "exit":
                yield ExitRecord(r["i"], r["code"], r["rip"], r["info1"], r["info2"])

    def console(self) -> str:
        return "".join(r["t"] for r in self.records() if r["k"] == "out")

    @property
    def final(self) -> Final:
        if self._final is None:
            end = None
            for r in self.records():
                if r["k"] == "end":
                    end = r
            if end is None:
                raise RecordingError(f"{self.path} is corrupt: it has no end record")
            self._final = _final(end)
        return self._final


def _final(r: dict[str, Any]) -> Final:
    return Final(bool(r.get("complete")), r.get("reason", ""), r.get("exit_code"), dict(r.get("regs") or {}),
                 r.get("dram_sha256"), r.get("console_sha256"))


def read_recording(path: str | os.PathLike, *, image: bytes | str | os.PathLike | None = None,
                   config: dict[str, Any] | None = None, sandbox_version: str | None = None) -> Recording:
    """Open and check a recording.

    Refuses (:class:`RecordingError`, one line) a file that is not a recording,
    another format version, a truncated, corrupt or modified file (the SHA-256
    trailer), and -- when given -- a different guest image, run configuration
    or sandbox version.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as e:
        raise RecordingError(f"{path}: cannot read the recording: {e.strerror or e}") from None
    with f:
        first = f.readline(64)
        if not first:
            raise RecordingError(f"{path} is empty: a recording cut off before its header was written "
                                 "(the recording process was killed?)")
        parts = first.rstrip(b"\n").split(b" ")
        if not first.endswith(b"\n") or len(parts) != 2 or parts[0] != MAGIC:
            raise RecordingError(f"{path} is not a sandbox recording (no '{MAGIC.decode()}' line at its start)")
        if not parts[1].isdigit():
            raise RecordingError(f"{path} is not a sandbox recording (bad format version {parts[1][:16]!r})")
        version = int(parts[1])
        if version != FORMAT_VERSION:
            raise RecordingError(f"{path} is recording format version {version}; this sandbox reads "
                                 f"version {FORMAT_VERSION}")
        if size < len(first) + TRAILER_LEN:
            raise RecordingError(f"{path} is truncated: it ends before its integrity trailer")
        f.seek(size - TRAILER_LEN)
        trailer = f.read(TRAILER_LEN)
        if not trailer.startswith(TRAILER_PREFIX) or not trailer.endswith(b"\n"):
            raise RecordingError(f"{path} is truncated: the integrity trailer (sha256) is missing")
        want = trailer[len(TRAILER_PREFIX):-1].decode("ascii", "replace")
        h = hashlib.sha256()
        f.seek(0)
        left = size - TRAILER_LEN
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise RecordingError(f"{path} is truncated")
            h.update(chunk)
            left -= len(chunk)
        if h.hexdigest() != want:
            raise RecordingError(f"{path} is corrupt or was modified: its SHA-256 ({_short(h.hexdigest())}) "
                                 f"does not match the digest it was written with ({_short(want)})")
        f.seek(len(first))
        line = f.readline()
        try:
            header = json.loads(line)
            assert isinstance(header, dict) and header["format"] == version and "image_sha256" in header
        except (ValueError, AssertionError, KeyError, TypeError):
            raise RecordingError(f"{path} is corrupt: its header is not a recording header") from None
        body = f.tell()
    rec = Recording(path, header, body, size - TRAILER_LEN)
    if image is not None:
        got = image_digest(image)
        if got != header["image_sha256"]:
            raise RecordingError(f"{path} was recorded with another guest image ({header.get('image') or 'image'} "
                                 f"sha256 {_short(header['image_sha256'])}, this one {_short(got)})")
    if config is not None and config_digest(config) != header.get("config_sha256"):
        recorded = header.get("config", {})
        diffs = [k for k in sorted(set(recorded) | set(config)) if recorded.get(k) != config.get(k)]
        what = ", ".join(f"{k} (recorded {recorded.get(k)!r}, now {config.get(k)!r})" for k in diffs[:3])
        raise RecordingError(f"{path} was recorded with another run configuration: {what or 'it differs'}")
    if sandbox_version is not None and header.get("sandbox") != sandbox_version:
        raise RecordingError(f"{path} was recorded by sandbox {header.get('sandbox')}, this is {sandbox_version}")
    return rec


# -- replaying -----------------------------------------------------------------------------------
class Replayer:
    """Feeds a replay its recorded inputs in order and checks what it does.

    Every query reads forward through the one record stream, keeping records
    of other kinds for their own queries, so a replay that consumes inputs in
    the recorded order holds only a few records at a time.
    """

    _KINDS = ("exit", "tsc", "timer", "in", "hv", "out", "end")

    def __init__(self, recording: Recording) -> None:
        self.recording = recording
        self._it = recording.records()
        self._queues: dict[str, deque] = {k: deque() for k in self._KINDS}
        self._done = False
        self.exits_checked = 0
        self._console_checked = False
        self._console_at = 0              # characters of console output matched so far
        self._rec_out = ""                # recorded console output not matched yet
        self._rep_out = ""                # replayed console output not matched yet

    def _next(self, kind: str) -> dict[str, Any] | None:
        q = self._queues[kind]
        while not q and not self._done:
            try:
                r = next(self._it)
            except StopIteration:
                self._done = True
                break
            self._queues.setdefault(r["k"], deque()).append(r)
        return q.popleft() if q else None

    def _diverged(self, what: str) -> ReplayDivergence:
        return ReplayDivergence(f"replay of {self.recording.path} diverged at exit #{self.exits_checked}: {what}")

    # -- inputs -----------------------------------------------------------------------
    def next_tsc(self, *, exit: int | None = None, insn: int | None = None) -> int:
        """The next TSC value the guest reads; ``exit``/``insn`` say where the replay
        is, and must match where the recording read it."""
        r = self._next("tsc")
        if r is None:
            raise self._diverged("the guest reads the TSC, but the recording has no more TSC reads")
        if exit is not None and r.get("exit") != exit or insn is not None and r.get("insn") != insn:
            rec_at = f"exit #{r['exit']}" if "exit" in r else f"instruction {r.get('insn')}"
            now_at = f"exit #{exit}" if exit is not None else f"instruction {insn}"
            raise self._diverged(f"TSC read expected at {rec_at}, happened at {now_at}")
        return r["v"]

    def next_timer_point(self) -> int | None:
        """Retired-instruction count of the next timer interrupt (None: no more)."""
        r = self._next("timer")
        return None if r is None else r["insn"]

    def next_device_input(self, port: int | None = None, size: int | None = None) -> int:
        """The next value a device gives the guest; ``port``/``size`` must match the recording's."""
        r = self._next("in")
        if r is None:
            raise self._diverged(f"the guest reads port {port:#x}, but the recording has no more device input"
                                 if port is not None else "no more device input in the recording")
        if port is not None and r["port"] != port or size is not None and r["size"] != size:
            raise self._diverged(f"device input expected from port {r['port']:#x} ({r['size']} bytes), "
                                 f"the guest read port {port:#x} ({size} bytes)")
        return r["v"]

    def next_handler_effect(self) -> HandlerEffect | None:
        """What the user handler did at the next exit that had one (None: no more)."""
        r = self._next("hv")
        if r is None:
            return None
        return HandlerEffect(r["exit"], r["action"], dict(r.get("regs", {})), dict(r.get("vmcb", {})),
                             tuple((gpa, bytes.fromhex(h)) for gpa, h in r.get("mem", [])))

    @property
    def rng_seed(self) -> int | None:
        return self.recording.rng_seed

    # -- checks -----------------------------------------------------------------------
    def check_exit(self, e: ExitLike) -> int:
        """Compare the replay's next #VMEXIT with the recorded one; returns its index."""
        r = self._next("exit")
        got = describe_exit(e.exitcode, e.rip, e.exitinfo1, e.exitinfo2)
        if r is None:
            raise self._diverged(f"the recording ended, the replay went on with {got}")
        want = ExitRecord(r["i"], r["code"], r["rip"], r["info1"], r["info2"])
        if (want.exitcode, want.rip, want.exitinfo1, want.exitinfo2) != (e.exitcode, e.rip, e.exitinfo1,
                                                                         e.exitinfo2):
            raise self._diverged(f"expected {want.describe()}; got {got}")
        self.exits_checked += 1
        return want.index

    def check_console(self, text: str) -> None:
        """Console output of the replay, as it appears: compared with the recording's
        as it goes (and in full at :meth:`finish`)."""
        self._console_checked = True
        self._rep_out += text
        self._compare_console(final=False)

    def _compare_console(self, final: bool) -> None:
        while final or len(self._rec_out) < len(self._rep_out):
            r = self._next("out")
            if r is None:
                break
            self._rec_out += r["t"]
        rec, rep = self._rec_out, self._rep_out
        n = min(len(rec), len(rep))
        if rec[:n] != rep[:n] or final and len(rec) != len(rep):
            at = next((i for i in range(n) if rec[i] != rep[i]), n)
            raise self._diverged(f"console output differs at character {self._console_at + at}: expected "
                                 f"{rec[at:at + 24]!r}, got {rep[at:at + 24]!r}")
        self._console_at += n
        self._rec_out, self._rep_out = rec[n:], rep[n:]

    def finish(self, reason: str, *, exit_code: int | None = None, regs: dict[str, int] | None = None,
               dram: bytes | bytearray | memoryview | None = None) -> None:
        """The replay ended: no recorded exit may be left, and (for a complete
        recording) how it ended, the registers, DRAM and the console must match."""
        left = self._next("exit")
        if left is not None:
            raise self._diverged(f"the replay ended ({reason}), the recording goes on with "
                                 f"{ExitRecord(left['i'], left['code'], left['rip'], left['info1'], left['info2']).describe()}")
        end = self._next("end")
        if end is None:
            raise RecordingError(f"{self.recording.path} is corrupt: it has no end record")
        final = _final(end)
        if not final.complete:
            return                              # the recorded run was cut short: nothing more to compare
        if str(reason) != final.reason or exit_code != final.exit_code:
            raise self._diverged(f"the run ended with {reason} (exit code {exit_code}); the recording with "
                                 f"{final.reason} (exit code {final.exit_code})")
        if self._console_checked:
            self._compare_console(final=True)
        if regs is not None:
            for name in sorted(set(final.regs) | set(regs)):
                if final.regs.get(name) != regs.get(name):
                    want, got = final.regs.get(name), regs.get(name)
                    raise self._diverged(f"final {name} is {_hex(got)}, recorded {_hex(want)}")
        if dram is not None and final.dram_sha256 is not None and sha256_hex(dram) != final.dram_sha256:
            raise self._diverged(f"final DRAM differs (sha256 {_short(sha256_hex(dram))}, recorded "
                                 f"{_short(final.dram_sha256)})")


def _hex(v: int | None) -> str:
    return "absent" if v is None else f"{v:#x}"
