"""The record/replay file format: round trip, refusals (format version, guest
image, run configuration, tampering, truncation) with one-line messages, and
the Replayer's inputs and divergence messages."""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass

import pytest

from sandbox.debug.recording import (FORMAT_VERSION, MAGIC, Recording, RecordingError, RecordingWriter,
                                     ReplayDivergence, Replayer, config_digest, image_digest, read_recording)

IMAGE = b"\x48\x31\xc0\x0f\xa2" * 100            # a guest image's bytes
CONFIG = {"intercept": "cpuid,rdtsc", "paging": "nested", "ram": 16 << 20, "max_insns": 0}
DRAM = bytes(range(256)) * 64
REGS = {"rax": 0, "rbx": 0x756E6547, "rip": 0x100020}


@dataclass
class Exit:
    exitcode: int
    rip: int
    exitinfo1: int = 0
    exitinfo2: int = 0


EXITS = [Exit(0x72, 0x100000), Exit(0x6E, 0x100002), Exit(0x7B, 0x100004, 0x3F80010, 0x100006),
         Exit(0x7B, 0x100006, 0x3F80219, 0x100007), Exit(0x81, 0x100010)]


def record(path, *, exits=EXITS, complete=True, console=("Hello", ", world\n")):
    """A run: CPUID, RDTSC (TSC by exit), OUT, IN (device input), a TSC read by instruction
    count, a timer point, a handler that wrote registers, VMCB fields and memory."""
    with RecordingWriter(path, image=IMAGE, image_name="hello.S", config=CONFIG, rng_seed=1234) as w:
        for i, e in enumerate(exits):
            idx = w.exit(e)
            assert idx == i
            if e.exitcode == 0x6E:
                w.tsc(0x1234_5678_9ABC, exit=idx)
            if e.exitcode == 0x7B and e.exitinfo1 & 1:
                w.device_input(0x3F8 + 2, 0xC1, 1)
            if i == 0:
                w.handler("resume", regs={"rax": 0x40000001, "rbx": 0x756E6547}, vmcb={"RIP": 0x100002},
                          mem=[(0x1C0000, b"\x00\x7d\xff")])
                w.console(console[0])
        w.tsc(99, insn=12345)
        w.timer(100_000)
        w.console(console[1])
        if complete:
            w.finish("guest-exit", exit_code=0, regs=REGS, dram=DRAM)
    return path


def test_round_trip(tmp_path):
    path = record(tmp_path / "run.rec")
    rec = read_recording(path, image=IMAGE, config=CONFIG)
    assert rec.format == FORMAT_VERSION == 1
    assert rec.image_sha256 == hashlib.sha256(IMAGE).hexdigest()
    assert rec.header["image"] == "hello.S"
    assert rec.config == CONFIG and rec.rng_seed == 1234
    assert rec.header["config_sha256"] == config_digest(CONFIG)
    from sandbox import __version__
    assert rec.sandbox_version == __version__
    assert [(e.index, e.exitcode, e.rip, e.exitinfo1, e.exitinfo2) for e in rec.exits()] == \
        [(i, e.exitcode, e.rip, e.exitinfo1, e.exitinfo2) for i, e in enumerate(EXITS)]
    assert rec.console() == "Hello, world\n"
    f = rec.final
    assert f.complete and f.reason == "guest-exit" and f.exit_code == 0 and f.regs == REGS
    assert f.dram_sha256 == hashlib.sha256(DRAM).hexdigest()
    assert f.console_sha256 == hashlib.sha256(b"Hello, world\n").hexdigest()
    kinds = [r["k"] for r in rec.records()]
    assert kinds[0] == "exit" and kinds[-1] == "end" and {"tsc", "timer", "in", "hv", "out"} <= set(kinds)


def test_file_layout_is_as_documented(tmp_path):
    raw = record(tmp_path / "run.rec").read_bytes()
    magic, header, rest = raw.split(b"\n", 2)
    assert magic == MAGIC + b" 1"
    h = json.loads(header)
    assert set(h) == {"format", "sandbox", "created", "image", "image_sha256", "config", "config_sha256",
                      "rng_seed"}
    assert rest[-73:-65] == b"\nsha256:" and rest.endswith(b"\n")
    assert hashlib.sha256(raw[:-73]).hexdigest() == rest[-65:-1].decode()
    body = zlib.decompress(rest[:-73])
    lines = [json.loads(x) for x in body.splitlines()]
    assert lines[0] == {"k": "exit", "i": 0, "code": 0x72, "rip": 0x100000, "info1": 0, "info2": 0}
    assert {"k": "hv", "exit": 0, "action": "resume", "regs": {"rax": 0x40000001, "rbx": 0x756E6547},
            "vmcb": {"RIP": 0x100002}, "mem": [[0x1C0000, "007dff"]]} in lines
    assert {"k": "tsc", "v": 99, "insn": 12345} in lines


def test_compact(tmp_path):
    exits = [Exit(0x7B, 0x100000 + 4 * (i % 64), 0x3F80010, 0x100002) for i in range(30_000)]
    path = tmp_path / "big.rec"
    with RecordingWriter(path, image=IMAGE, config=CONFIG) as w:
        for e in exits:
            w.exit(e)
        w.finish("guest-exit", exit_code=0)
    assert path.stat().st_size < 300_000                # < 10 bytes an exit
    assert sum(1 for _ in read_recording(path).exits()) == 30_000


def test_image_given_as_a_file(tmp_path):
    img = tmp_path / "guest.bin"
    img.write_bytes(IMAGE)
    assert image_digest(img) == image_digest(IMAGE)
    with RecordingWriter(tmp_path / "r.rec", image=img, config={}) as w:
        w.finish("halt")
    rec = read_recording(tmp_path / "r.rec", image=img)
    assert rec.header["image"] == "guest.bin"


# -- refusals: each a one-line RecordingError that names the file and the problem --------------------------
def refused(path, **kw) -> str:
    with pytest.raises(RecordingError) as e:
        read_recording(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_another_format_version(tmp_path):
    path = record(tmp_path / "run.rec")
    raw = path.read_bytes()
    path.write_bytes(raw.replace(MAGIC + b" 1\n", MAGIC + b" 2\n", 1))
    assert refused(path).endswith("is recording format version 2; this sandbox reads version 1")


def test_not_a_recording(tmp_path):
    p = tmp_path / "x.rec"
    p.write_bytes(b"PK\x03\x04 something else\n")
    assert "is not a sandbox recording" in refused(p)
    p.write_bytes(b"")
    assert "is empty: a recording cut off before its header" in refused(p)     # a killed recorder's file
    assert "cannot read the recording" in refused(tmp_path / "missing.rec")


def test_different_image(tmp_path):
    path = record(tmp_path / "run.rec")
    msg = refused(path, image=IMAGE + b"\x90")
    assert "was recorded with another guest image (hello.S sha256 " in msg
    assert hashlib.sha256(IMAGE).hexdigest()[:12] in msg


def test_different_configuration_names_the_key(tmp_path):
    path = record(tmp_path / "run.rec")
    msg = refused(path, config={**CONFIG, "paging": "shadow"})
    assert msg.endswith("was recorded with another run configuration: paging (recorded 'nested', now 'shadow')")


def test_sandbox_version_only_when_asked(tmp_path):
    path = record(tmp_path / "run.rec")
    read_recording(path)                                   # by default any sandbox version reads it
    assert "was recorded by sandbox" in refused(path, sandbox_version="9.9.9")


@pytest.mark.parametrize("where", [0.5, 0.25, 0.9])
def test_tampered_byte_is_detected(tmp_path, where):
    path = record(tmp_path / "run.rec")
    raw = bytearray(path.read_bytes())
    i = int(len(raw) * where)
    raw[i] ^= 0x01
    path.write_bytes(bytes(raw))
    assert "is corrupt or was modified: its SHA-256" in refused(path)


def test_forged_header_is_detected(tmp_path):
    # a recording passed off as another image's: the header is covered by the digest
    path = record(tmp_path / "run.rec")
    raw = path.read_bytes()
    forged = raw.replace(hashlib.sha256(IMAGE).hexdigest().encode(), hashlib.sha256(b"other").hexdigest().encode())
    path.write_bytes(forged)
    assert "is corrupt or was modified" in refused(path, image=b"other")


@pytest.mark.parametrize("cut", [1, 40, 200])
def test_truncated_file(tmp_path, cut):
    path = record(tmp_path / "run.rec")
    raw = path.read_bytes()
    path.write_bytes(raw[:-cut])
    assert "is truncated" in refused(path)


def test_truncated_to_the_header(tmp_path):
    path = record(tmp_path / "run.rec")
    path.write_bytes(path.read_bytes().split(b"\n", 1)[0] + b"\n")
    assert "is truncated" in refused(path)


def test_ctrl_c_leaves_a_valid_incomplete_recording(tmp_path):
    path = tmp_path / "cut.rec"
    with pytest.raises(KeyboardInterrupt):
        with RecordingWriter(path, image=IMAGE, config=CONFIG) as w:
            w.exit(EXITS[0])
            raise KeyboardInterrupt
    rec = read_recording(path, image=IMAGE)
    assert not rec.final.complete and rec.final.reason == "interrupted"
    assert [e.exitcode for e in rec.exits()] == [0x72]
    with pytest.raises(RecordingError, match="closed"):
        w.exit(EXITS[1])


def test_tsc_needs_exactly_one_position(tmp_path):
    with RecordingWriter(tmp_path / "r.rec", image=IMAGE, config={}) as w:
        with pytest.raises(ValueError):
            w.tsc(1)
        with pytest.raises(ValueError):
            w.tsc(1, exit=0, insn=5)


# -- the replayer ------------------------------------------------------------------------------------------
def replay_ok(rec: Recording) -> Replayer:
    """A replay that does what the recording did, querying inputs as it goes."""
    r = Replayer(rec)
    assert r.rng_seed == 1234
    assert r.next_timer_point() == 100_000
    assert r.next_timer_point() is None
    for i, e in enumerate(EXITS):
        assert r.check_exit(e) == i
        if i == 0:
            eff = r.next_handler_effect()
            assert eff.exit == 0 and eff.action == "resume"
            assert eff.regs == {"rax": 0x40000001, "rbx": 0x756E6547} and eff.vmcb == {"RIP": 0x100002}
            assert eff.mem == ((0x1C0000, b"\x00\x7d\xff"),)
            r.check_console("Hel")
            r.check_console("lo")
        if e.exitcode == 0x6E:
            assert r.next_tsc(exit=i) == 0x1234_5678_9ABC
        if e.exitcode == 0x7B and e.exitinfo1 & 1:
            assert r.next_device_input(0x3FA, 1) == 0xC1
    assert r.next_tsc(insn=12345) == 99
    assert r.next_handler_effect() is None
    r.check_console(", world\n")
    return r


def test_replay_that_matches(tmp_path):
    rec = read_recording(record(tmp_path / "run.rec"), image=IMAGE, config=CONFIG)
    r = replay_ok(rec)
    r.finish("guest-exit", exit_code=0, regs=REGS, dram=DRAM)
    assert r.exits_checked == 5


def diverges(fn, *args, **kw) -> str:
    with pytest.raises(ReplayDivergence) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_divergence_names_the_exit_the_expected_and_what_happened(tmp_path):
    path = record(tmp_path / "run.rec")
    r = Replayer(read_recording(path))
    r.check_exit(EXITS[0])
    r.check_exit(EXITS[1])
    msg = diverges(r.check_exit, Exit(0x7B, 0x100004, 0x3F80210, 0x100006))
    assert msg == (f"replay of {path} diverged at exit #2: expected IOIO (0x7b) at rip 0x100004, "
                   "exitinfo1 0x3f80010, exitinfo2 0x100006; got IOIO (0x7b) at rip 0x100004, "
                   "exitinfo1 0x3f80210, exitinfo2 0x100006")


def test_divergence_other_exit_code(tmp_path):
    r = Replayer(read_recording(record(tmp_path / "run.rec")))
    msg = diverges(r.check_exit, Exit(0x78, 0x100000))
    assert "diverged at exit #0: expected CPUID (0x72) at rip 0x100000" in msg and "got HLT (0x78)" in msg


def test_divergence_more_exits_than_recorded(tmp_path):
    r = Replayer(read_recording(record(tmp_path / "run.rec", exits=EXITS[:1])))
    r.check_exit(EXITS[0])
    msg = diverges(r.check_exit, EXITS[1])
    assert "diverged at exit #1: the recording ended, the replay went on with RDTSC (0x6e)" in msg


def test_divergence_fewer_exits_than_recorded(tmp_path):
    r = Replayer(read_recording(record(tmp_path / "run.rec")))
    r.check_exit(EXITS[0])
    msg = diverges(r.finish, "halt")
    assert "diverged at exit #1: the replay ended (halt), the recording goes on with RDTSC (0x6e)" in msg


def test_divergence_of_inputs(tmp_path):
    rec = read_recording(record(tmp_path / "run.rec"))
    r = Replayer(rec)
    assert "TSC read expected at exit #1, happened at exit #0" in diverges(r.next_tsc, exit=0)
    r = Replayer(rec)
    msg = diverges(r.next_device_input, 0x60, 1)
    assert "device input expected from port 0x3fa (1 bytes), the guest read port 0x60 (1 bytes)" in msg
    r = Replayer(rec)
    r.next_tsc(exit=1)
    r.next_tsc(insn=12345)
    assert "has no more TSC reads" in diverges(r.next_tsc, insn=5)


def test_divergence_of_the_end_state(tmp_path):
    rec = read_recording(record(tmp_path / "run.rec"))
    msg = diverges(replay_ok(rec).finish, "guest-exit", exit_code=1, regs=REGS, dram=DRAM)
    assert "the run ended with guest-exit (exit code 1); the recording with guest-exit (exit code 0)" in msg
    msg = diverges(replay_ok(rec).finish, "guest-exit", exit_code=0, regs={**REGS, "rbx": 5}, dram=DRAM)
    assert "final rbx is 0x5, recorded 0x756e6547" in msg
    msg = diverges(replay_ok(rec).finish, "guest-exit", exit_code=0, regs=REGS, dram=DRAM[:-1] + b"\x01")
    assert "final DRAM differs" in msg


def test_divergence_of_the_console(tmp_path):
    rec = read_recording(record(tmp_path / "run.rec"))
    r = Replayer(rec)
    r.check_console("Hello")
    assert "console output differs at character 5: expected ', world\\n', got '; world'" in \
        diverges(r.check_console, "; world")
    r = replay_ok(rec)
    r.check_console("!")                                    # more output than was recorded
    assert "console output differs at character 13: expected '', got '!'" in \
        diverges(r.finish, "guest-exit", exit_code=0, regs=REGS, dram=DRAM)


def test_incomplete_recording_replays_its_prefix(tmp_path):
    rec = read_recording(record(tmp_path / "run.rec", complete=False))
    r = Replayer(rec)
    for e in EXITS:
        r.check_exit(e)
    r.finish("stopped")                                    # nothing recorded to compare the end with
