"""``sandbox run IMAGE --sev ... --dump-host-memory PATH`` on the bundled SEV guest."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECRETS = ROOT / "guest_images" / "sev_secrets.S"
# the two strings as written in guest_images/sev_secrets.S
PRIVATE = b"FORTRESS-PRIVATE-7f3a9c5e"
SHARED = b"SHARED-BOUNCE-1b2e"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sandbox.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_dram_dump_holds_the_shared_secret_and_not_the_private_one(tmp_path):
    dump = tmp_path / "dram.bin"
    p = run_cli("run", str(SECRETS), "--sev", "--dump-host-memory", str(dump), "--ram", "4", "--dram", "16")
    assert p.returncode == 0, p.stderr
    assert f"private page: {PRIVATE.decode()}" in p.stdout      # the guest reads both
    assert f"shared page: {SHARED.decode()}" in p.stdout
    assert "SEV guest launched" in p.stderr and "verified by the guest owner" in p.stderr
    data = dump.read_bytes()
    assert len(data) == 16 << 20
    assert SHARED in data
    assert PRIVATE not in data
    # nor any 8-byte piece of it
    assert not any(PRIVATE[i:i + 8] in data for i in range(len(PRIVATE) - 7))
    assert "(encrypted)" in p.stderr                 # the exit trace cannot disassemble guest code


def test_without_sev_the_scan_finds_the_private_secret(tmp_path):
    """The same scan is able to fail: without SEV the private page is plaintext in DRAM.
    (The guest's C-bit clearing then targets address bit 47 of a PTE that never had it.)"""
    dump = tmp_path / "dram.bin"
    p = run_cli("run", str(SECRETS), "--dump-host-memory", str(dump), "--ram", "4", "--dram", "16", "--quiet")
    assert p.returncode == 0, p.stderr
    data = dump.read_bytes()
    assert PRIVATE in data and SHARED in data


def test_dump_path_that_cannot_be_written(tmp_path):
    p = run_cli("run", str(SECRETS), "--sev", "--dump-host-memory", str(tmp_path / "no" / "such" / "dir.bin"))
    assert p.returncode == 2
    assert "cannot write --dump-host-memory" in p.stderr and "Traceback" not in p.stderr
