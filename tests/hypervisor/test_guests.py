"""The bundled guest images, run end to end under the default hypervisor.

Expected exit codes come from the APM's Appendix C (Table C-1) for the
instructions each image's header says it executes; expected #PF error codes
from the x86 page-fault error-code definition (APM vol. 2 §8.4.2).
"""
from pathlib import Path

import pytest

from sandbox import Machine

IMAGES = Path(__file__).resolve().parents[2] / "guest_images"

# popek_goldberg.S steps -> APM exit code (Table C-1)
PROBE_EXITS = {
    "SGDT": 0x67, "SIDT": 0x66, "SLDT": 0x68, "STR": 0x69, "SMSW / MOV from CR0": 0x00,
    "PUSHF": 0x70, "POPF": 0x71, "CPUID": 0x72, "RDTSC": 0x6E, "RDTSCP": 0x87, "RDPMC": 0x6F,
    "IN/OUT": 0x7B, "RDMSR/WRMSR": 0x7C, "MOV to CR0 / LMSW / CLTS": 0x10, "MOV from CR3": 0x03,
    "MOV to CR3": 0x13, "MOV from CR4": 0x04, "MOV to CR4": 0x14, "MOV from DR7": 0x27,
    "MOV to DR7": 0x37, "INVLPG": 0x79, "WBINVD": 0x89, "INVD": 0x76, "PAUSE": 0x77,
    "XSETBV": 0x8D, "LGDT": 0x6B, "LIDT": 0x6A, "LLDT": 0x6C, "VMMCALL": 0x81,
}


def run(image: str, intercept: str | None = None, **kw):
    m = Machine()
    m.load(str(IMAGES / image))
    if intercept:
        m.intercept(intercept)
    return m, m.run(timeout=60, **kw)


@pytest.mark.parametrize("group", ["sensitive", "all"])
def test_popek_goldberg_probe_exits_on_every_sensitive_instruction(group):
    m, r = run("popek_goldberg.S", group)
    assert r.reason == "guest-exit" and r.exit_code == 0, r.detail
    missing = {name: code for name, code in PROBE_EXITS.items() if code not in r.counts}
    assert not missing, f"no #VMEXIT for {missing}"
    assert "probe done" in r.console


def test_popek_goldberg_probe_without_intercepts_runs_natively():
    m, r = run("popek_goldberg.S")
    assert r.reason == "guest-exit" and r.exit_code == 0
    # default intercepts only: nothing from the sensitive set but CPUID and I/O
    assert set(r.counts) == {0x72, 0x7B, 0x81}


@pytest.mark.parametrize("intercept", [None, "sensitive", "all", "excp0,excp3,excp6,excp8,excp13,excp14"])
def test_kernel_handles_its_own_faults(intercept):
    m, r = run("kernel.S", intercept)
    assert r.reason == "guest-exit" and r.exit_code == 0, (r.detail, r.console[-400:])
    # a supervisor write to a not-present page: P=0, W/R=1, U/S=0 -> error code 2
    assert "#PF at 0x0000000000400000 err 0x0000000000000002" in r.console
    assert "kernel: all handlers ran" in r.console
    if intercept and "excp14" in intercept:
        assert r.counts.get(0x4E) == 1 and r.counts.get(0x4D) == 1 and r.counts.get(0x46) == 1


def test_svm_instructions_exit_with_their_codes():
    m, r = run("svm_insns.S")
    # VMRUN 0x80, VMLOAD 0x82, VMSAVE 0x83, STGI 0x84, CLGI 0x85, SKINIT 0x86, INVLPGA 0x7A
    for code in (0x80, 0x82, 0x83, 0x84, 0x85, 0x86, 0x7A):
        assert r.counts.get(code) == 1, hex(code)
    assert r.reason == "halt"


def test_triple_fault_image_shuts_down():
    m, r = run("fault_triple.S")
    assert r.reason == "shutdown" and r.counts == {0x7F: 1}


def test_hot_loop_result_matches_an_independent_computation():
    m, r = run("hot_loop.S")
    assert r.reason == "guest-exit"
    # the loop from hot_loop.S (add rax, rcx; xor rdx, rax; dec rcx; jnz) computed in Python
    text = (IMAGES / "hot_loop.S").read_text()
    n = int(text.split(".equ ITERATIONS,")[1].split()[0], 0)
    rax = rdx = 0
    mask = (1 << 64) - 1
    for rcx in range(n, 0, -1):
        rax = (rax + rcx) & mask
        rdx ^= rax
    assert r.regs["rbx"] == rax and r.regs["rdx"] == rdx


def _first_primes_sum(n: int) -> int:
    primes, k = [], 2
    while len(primes) < n:
        if all(k % p for p in primes if p * p <= k):
            primes.append(k)
        k += 1
    return sum(primes)


def test_freestanding_c_elf_guest():
    m, r = run("cguest.elf")
    assert r.reason == "guest-exit" and r.exit_code == 0
    assert "Hello from a C guest!" in r.console
    assert f"sum of the first 20 primes: {_first_primes_sum(20):#018x}" in r.console
    assert "printed by hypercall" in r.console


def test_flat_binary_matches_its_source():
    from sandbox.hypervisor.loader import assemble
    binary = (IMAGES / "hello.bin").read_bytes()
    assert binary == assemble((IMAGES / "hello.S").read_text())
    m, r = run("hello.bin")
    assert r.reason == "guest-exit" and "Hello from the guest!" in r.console
