"""``sandbox run --mode classic``: the guest kernel deprivileged to ring 3,
privileged instructions emulated from their faults, memory on shadow paging.

Expected values: the guests' own output (the LCG payload of
virtio_console.S recomputed from its header's formula; hello.S's fixed
strings), the APM exit codes (#GP = 0x4D, #UD = 0x46, Appendix C) and the
architecture's rule that CPUID, unlike WRMSR and VMMCALL, does not fault at
CPL 3 -- so in classic mode it runs on the real processor and the
hypervisor cannot answer it.
"""
from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import ROOT, run_cli
from tests.hypervisor.test_multiboot import kernel

IMAGES = ROOT / "guest_images"


def lcg_payload(n: int) -> bytes:
    """virtio_console.S's payload, from the formula in its header."""
    x, out = 0x12345678, bytearray()
    for _ in range(n):
        x = (x * 1103515245 + 12345) % 2**32
        out.append(0x30 + ((x >> 16) & 0x3F))
    return bytes(out)


def final(p) -> dict:
    return json.loads([x for x in p.stdout.splitlines() if x.startswith("{")][-1])


def test_bundled_guest_same_console_as_under_svm():
    svm = run_cli("run", str(IMAGES / "virtio_console.S"), "--json", "--quiet", "--timeout", "300")
    classic = run_cli("run", str(IMAGES / "virtio_console.S"), "--mode", "classic", "--json", "--quiet",
                      "--timeout", "300")
    assert svm.returncode == 0 == classic.returncode, classic.stderr
    fs, fc = final(svm), final(classic)
    assert fc["paging"] == "shadow" and fs["paging"] == "nested"
    assert fc["console"] == fs["console"] == lcg_payload(4096).decode()
    assert fc["reason"] == fs["reason"] == "guest-exit"
    # classic: the EXIT hypercall's VMMCALL reaches the monitor as #UD at CPL 3, not as a VMMCALL exit
    assert "VMMCALL" in fs["counts"] and "VMMCALL" not in fc["counts"]
    assert fc["counts"].get("EXCP_UD", 0) >= 1


def test_privileged_instructions_trap_as_gp_and_are_emulated():
    """msr_syscalls.S writes TSC_AUX 1,000 times: one #GP per WRMSR at CPL 3 (and
    one for the RDMSR), none under SVM's defaults (no MSR intercept)."""
    svm = run_cli("run", str(IMAGES / "msr_syscalls.S"), "--json", "--quiet", "--timeout", "300")
    classic = run_cli("run", str(IMAGES / "msr_syscalls.S"), "--mode", "classic", "--json", "--quiet",
                      "--timeout", "300")
    assert svm.returncode == 0 == classic.returncode, classic.stderr
    fs, fc = final(svm), final(classic)
    assert fs["counts"] == {"VMMCALL": 1}
    assert fc["counts"]["EXCP_GP"] >= 1001


def test_hello_differs_only_where_cpuid_does_not_trap():
    svm = run_cli("run", str(IMAGES / "hello.S"))
    classic = run_cli("run", str(IMAGES / "hello.S"), "--mode", "classic")
    assert svm.returncode == 0 == classic.returncode, classic.stderr
    s, c = svm.stdout.splitlines(), classic.stdout.splitlines()
    assert len(s) == len(c) == 3
    assert s[0] == c[0] == "Hello from the guest!" and s[2] == c[2] == "hypercall print works"
    assert s[1] == "hypervisor vendor: AMDVSandbox" and c[1] != s[1]      # CPUID ran natively at CPL 3
    assert "CPUID" not in classic.stderr


@pytest.mark.parametrize("extra, words", [
    (["--sev"], "--sev"),
    (["--sev-es"], "--sev-es"),
    (["--nested"], "--nested"),
    (["--paging", "nested"], "shadow paging"),
    (["--intercept", "cpuid"], "--intercept"),
    (["--platform", "pc"], "--platform pc"),
    (["--npt-page", "2m"], "--npt-page"),
])
def test_bad_combinations_are_one_line_errors(extra, words):
    p = run_cli("run", str(IMAGES / "hello.S"), "--mode", "classic", *extra)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("sandbox: error: ") and words in p.stderr
    assert "Traceback" not in p.stderr


def test_multiboot_kernel_is_refused(tmp_path):
    p = run_cli("run", kernel(tmp_path, "hlt"), "--mode", "classic")
    assert p.returncode == 2 and "multiboot" in p.stderr and p.stderr.count("\n") == 1
