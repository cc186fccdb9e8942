"""``sandbox run --record`` / ``sandbox replay`` as a user runs them, on the
bundled guests (SEV and SEV-ES included, one with a timer, one reading the
TSC), and the recordings a replay must refuse or report as divergent."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox import Machine
from sandbox.debug.recording import ReplayDivergence, read_recording
from sandbox.debug.rr import MachineReplayer

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "guest_images"
TIMER_HOOKS = Path(__file__).resolve().parent / "data" / "timer_hooks.py"
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def sandbox(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandbox.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def record(tmp_path: Path, image: str, *flags: str) -> tuple[Path, subprocess.CompletedProcess]:
    rec = tmp_path / "run.rec"
    p = sandbox("run", str(IMAGES / image), "--quiet", "--record", str(rec), *flags)
    assert p.returncode == 0, p.stderr
    return rec, p


def exits_of(stderr: str) -> int:
    return int(re.search(r"run ended: \S+.*; (\d+) exits", stderr).group(1))


@pytest.mark.parametrize("image, flags", [
    ("hello.S", ()),
    ("kernel.S", ()),                                  # exceptions, #PF, INVLPG in the guest
    ("popek_goldberg.S", ("--intercept", "sensitive")),   # RDTSC and RDTSCP: recorded TSC values
    ("sev_secrets.S", ("--sev",)),                     # ciphertext in DRAM: seeded keys
    ("sev_es_vc.S", ("--sev-es",)),                    # registers in the encrypted VMSA
    ("kernel.S", ("--hooks", str(TIMER_HOOKS))),       # timer interrupts at guest-instruction points
])
def test_round_trip(tmp_path, image, flags):
    rec, p = record(tmp_path, image, *flags)
    r = read_recording(rec)
    recorded_exits = sum(1 for _ in r.exits())
    assert recorded_exits == exits_of(p.stderr) > 0
    assert r.final.complete and r.final.dram_sha256 and r.console()
    if "--hooks" in flags:
        assert any(k["k"] == "timer" for k in r.records())
    if image == "popek_goldberg.S":
        assert sum(k["k"] == "tsc" for k in r.records()) >= 2
    q = sandbox("replay", str(rec), "--quiet")
    assert q.returncode == 0, q.stderr
    assert f"replay matches the recording: {recorded_exits} exits, console, final registers and DRAM" in q.stderr


def test_replay_names_the_first_divergent_exit(tmp_path):
    rec, _ = record(tmp_path, "kernel.S")
    recording = read_recording(rec)
    assert not any(e.exitcode == 0x4E for e in recording.exits())     # recorded: #PF handled in the guest
    m = Machine()
    m.load(str(IMAGES / "kernel.S"))
    rp = MachineReplayer(m, recording)
    m.intercept("excp14")            # a different machine: the guest's #PF now exits
    r = m.run()
    with pytest.raises(ReplayDivergence, match=r"diverged at exit #\d+: expected .* got EXCP_PF") as e:
        rp.finish(r)
    assert "exitinfo1" in str(e.value) and str(rec) in str(e.value)


def test_tampered_recording_is_refused(tmp_path):
    rec, _ = record(tmp_path, "hello.S")
    data = bytearray(rec.read_bytes())
    data[len(data) // 2] ^= 0x01
    rec.write_bytes(bytes(data))
    q = sandbox("replay", str(rec))
    assert q.returncode == 2 and "corrupt or was modified" in q.stderr and "Traceback" not in q.stderr


def test_another_format_version_is_refused(tmp_path):
    rec, _ = record(tmp_path, "hello.S")
    data = rec.read_bytes()
    rec.write_bytes(data.replace(b"AMDV-SANDBOX-RECORDING 1\n", b"AMDV-SANDBOX-RECORDING 2\n", 1))
    q = sandbox("replay", str(rec))
    assert q.returncode == 2
    assert "is recording format version 2; this sandbox reads version 1" in q.stderr


def test_a_different_image_is_refused(tmp_path):
    image = tmp_path / "hello.S"
    shutil.copy(IMAGES / "hello.S", image)
    rec = tmp_path / "run.rec"
    assert sandbox("run", str(image), "--quiet", "--record", str(rec)).returncode == 0
    image.write_text(image.read_text() + "\n# changed\n")
    q = sandbox("replay", str(rec))
    assert q.returncode == 2 and "was recorded with another guest image" in q.stderr


def test_replay_to_exit_under_gdb(tmp_path):
    from debug_fakes import GDB, TIMEOUT_S
    if GDB is None:
        pytest.skip("gdb is not installed")
    rec, _ = record(tmp_path, "hello.S")
    p = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "replay", str(rec), "--to-exit", "50", "--gdb",
                          "127.0.0.1:0", "--quiet"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for _ in range(5):
            line = p.stderr.readline()
            m = re.search(r"waiting for gdb on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = m.group(1)
                break
        assert port, line
        g = subprocess.run([GDB, "-batch", "-nx", "-ex", "set architecture i386:x86-64",
                            "-ex", f"target remote 127.0.0.1:{port}", "-ex", "monitor exits",
                            "-ex", "continue"], capture_output=True, text=True, timeout=TIMEOUT_S)
        out, err = p.communicate(timeout=TIMEOUT_S)
    finally:
        if p.poll() is None:
            p.kill()
    assert "50 #VMEXITs:" in g.stdout + g.stderr
    assert "[Inferior 1 (Remote target) exited normally]" in g.stdout
    assert p.returncode == 0, err
    assert "replay matches the recording: 109 exits" in err


def test_to_exit_past_the_recording_is_refused_before_the_replay_runs(tmp_path):
    rec, p = record(tmp_path, "hello.S")
    n = exits_of(p.stderr)                      # the count the recording run printed
    q = sandbox("replay", str(rec), "--to-exit", str(n), "--gdb", "127.0.0.1:0", "--quiet", timeout=60)
    assert q.returncode == 2 and q.stdout == "" and q.stderr.count("\n") == 1
    assert f"holds {n} exit(s), numbered from 0 to {n - 1}" in q.stderr
    assert "waiting for gdb" not in q.stderr
