"""``sandbox run IMAGE --sev ... --dump-host-memory PATH`` on the bundled SEV guest."""
from pathlib import Path

from sandbox.cli import main

ROOT = Path(__file__).resolve().parents[2]
SECRETS = ROOT / "guest_images" / "sev_secrets.S"
# the two strings as written in guest_images/sev_secrets.S
PRIVATE = b"FORTRESS-PRIVATE-7f3a9c5e"
SHARED = b"SHARED-BOUNCE-1b2e"


class Run:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


def run_cli(capsys, *args) -> Run:
    code = main(list(args))
    out = capsys.readouterr()
    return Run(code, out.out, out.err)


def test_dram_dump_holds_the_shared_secret_and_not_the_private_one(tmp_path, capsys):
    dump = tmp_path / "dram.bin"
    p = run_cli(capsys, "run", str(SECRETS), "--sev", "--dump-host-memory", str(dump), "--ram", "4", "--dram", "16")
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


def test_without_sev_the_scan_finds_the_private_secret(tmp_path, capsys):
    """The same scan is able to fail: without SEV the private page is plaintext in DRAM.
    (The guest's C-bit clearing then targets address bit 47 of a PTE that never had it.)"""
    dump = tmp_path / "dram.bin"
    p = run_cli(capsys, "run", str(SECRETS), "--dump-host-memory", str(dump), "--ram", "4", "--dram", "16", "--quiet")
    assert p.returncode == 0, p.stderr
    data = dump.read_bytes()
    assert PRIVATE in data and SHARED in data


def test_dump_path_that_cannot_be_written(tmp_path, capsys):
    p = run_cli(capsys, "run", str(SECRETS), "--sev", "--dump-host-memory", str(tmp_path / "no" / "such" / "dir.bin"))
    assert p.returncode == 2
    assert "cannot write --dump-host-memory" in p.stderr and "Traceback" not in p.stderr
