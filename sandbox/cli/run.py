"""``sandbox`` command line: run guest images under the SVM hypervisor."""
from __future__ import annotations

import argparse
import json
import sys
from typing import BinaryIO, Callable

from capstone import CS_ARCH_X86, CS_MODE_32, CS_MODE_64, Cs
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..hypervisor.hooks_loader import HooksError, load_hooks
from ..hypervisor.loader import ImageError
from ..hypervisor.machine import Machine, RunResult
from ..hypervisor.multiboot import is_multiboot
from ..memory.tlb import TlbMode
from ..svm.cpu import ExitRecord
from ..svm.exitcodes import exit_name
from ..svm.intercepts import UnknownIntercept
from ..svm.msrpm import msrpm_bit
from ..svm.stop import StopReason
from .errors import CliError
from .fuzz import add_parser, replay_case

_CS = Cs(CS_ARCH_X86, CS_MODE_64)
_CS32 = Cs(CS_ARCH_X86, CS_MODE_32)

EPILOG = """\
intercept names are the APM's, lowercase: cpuid hlt rdtsc rdtscp pushf popf gdtr_read cr0_read
cr3_write ioio msr excp14 ... plus the groups 'all' and 'sensitive'.
examples:
  sandbox run guest_images/hello.S
  sandbox run guest_images/popek_goldberg.S --intercept sensitive
  sandbox run guest_images/hello.S --ports 0x3f8-0x3ff --json --quiet
  sandbox run guest_images/kernel.S --paging shadow --quiet
  sandbox run guest_images/sev_secrets.S --sev --dump-host-memory dram.bin
  sandbox run ../shared/kvm-unit-tests/x86/msr.flat --quiet   (multiboot: PC platform, 256 MiB)
  sandbox run crashes/missed-0123456789ab.case --audit     (replay a fuzz finding)
  sandbox fuzz --seconds 60 --seed 1 --crashes crashes/
"""


def _int(s: str) -> int:
    try:
        return int(s, 0)
    except ValueError:
        raise CliError(f"not a number: {s!r}") from None


def parse_ports(spec: str) -> list[int]:
    ports: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
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
            raise CliError(f"port {p:#x} is outside 0-0xffff")
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


def _disasm(m: Machine, rip: int) -> str:
    if m.sev is not None:
        return "(encrypted)"          # SEV: the hypervisor sees only ciphertext of guest code
    try:
        code = m.read_virt(rip, 15)
    except Exception:
        return "??"
    long_mode = m.guest.vmcb.seg("CS").attrib & 0x200       # CS.L: else 32-bit code (a multiboot entry)
    for ins in (_CS if long_mode else _CS32).disasm(code, rip, 1):
        return f"{ins.mnemonic} {ins.op_str}".strip()
    return f"(bytes {code[:4].hex()})"


def _machine(a: argparse.Namespace) -> Machine:
    """The machine ``sandbox run`` describes: memory, paging, the image, intercepts and hooks."""
    ports = parse_ports(a.ports) if a.ports else None
    msrs = parse_msrs(a.msrs) if a.msrs else None
    if a.max_insns < 0:
        raise CliError("--max-insns must be >= 0")
    npt_page = {"4k": 4 << 10, "2m": 2 << 20, "1g": 1 << 30}[a.npt_page]
    if a.paging == "shadow" and npt_page != 4 << 10:
        raise CliError("--npt-page applies to nested paging; shadow paging backs guest RAM with 4 KiB pages")
    if (a.sev or a.sev_es or a.snp) and a.paging == "shadow":
        raise CliError("SEV needs nested paging: the hypervisor cannot read an encrypted guest's page tables")
    multiboot = is_multiboot(a.image)
    # a multiboot kernel (kvm-unit-tests) gets the PC platform and 256 MiB, as under QEMU's -m 256
    ram = a.ram if a.ram is not None else (256 if multiboot else 16)
    dram = a.dram if a.dram is not None else max(64, ram + 32)
    platform = a.platform if a.platform is not None else ("pc" if multiboot else "none")
    try:
        m = Machine(dram=dram << 20, ram=ram << 20, npt_page=npt_page, paging=a.paging,
                    tlb_mode=TlbMode(a.tlb), platform=None if platform == "none" else platform,
                    nested=a.nested)
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        m.load(a.image, append=a.append)
    except ImageError as e:
        raise CliError(str(e)) from None
    try:
        if a.intercept:
            m.intercept(a.intercept)
    except UnknownIntercept as e:
        raise CliError(str(e)) from None
    if ports is not None:
        m.set_ports(ports)
    if msrs is not None:
        m.set_msrs(msrs)
    if a.hooks:
        try:
            load_hooks(m, a.hooks)
        except HooksError as e:
            raise CliError(str(e)) from None
    return m


def _launch_sev(m: Machine, a: argparse.Namespace, err: Console) -> None:
    # deferred: the SEV stack imports cryptography and numpy (about 0.5 s), which runs without SEV never need
    from .sev import launch_from_cli
    try:
        note = launch_from_cli(m, es=a.sev_es, snp=a.snp)
    except ValueError as e:
        raise CliError(str(e)) from None
    if not a.json and not a.quiet:
        err.print(note)


def _exit_printer(m: Machine, a: argparse.Namespace, err: Console) -> Callable[[ExitRecord], None]:
    """The per-exit line (or JSON object) of ``sandbox run``."""
    def show(rec: ExitRecord) -> None:
        if a.quiet:
            return
        if a.json:
            print(json.dumps({"exitcode": rec.exitcode, "exit": exit_name(rec.exitcode), "rip": rec.rip,
                              "nrip": rec.nrip, "exitinfo1": rec.exitinfo1, "exitinfo2": rec.exitinfo2,
                              "exitintinfo": rec.exitintinfo, "insn": _disasm(m, rec.rip),
                              **({"level": rec.level} if m.nested is not None else {})}), flush=True)
        else:
            lvl = f"{rec.level} " if m.nested is not None else ""
            err.print(f"[dim]#{rec.index:<6}[/dim] {lvl}{rec.rip:#018x}  {escape(_disasm(m, rec.rip)):<28} "
                      f"[bold]{exit_name(rec.exitcode):<14}[/bold] exitinfo1={rec.exitinfo1:#x} "
                      f"exitinfo2={rec.exitinfo2:#x} nrip={rec.nrip:#x}")
    return show


def _open_dump(path: str | None) -> BinaryIO | None:
    if not path:
        return None
    try:
        return open(path, "wb")
    except OSError as e:
        raise CliError(f"cannot write --dump-host-memory file: {e.strerror}: {path}") from None


def cmd_run(a: argparse.Namespace) -> int:
    if a.image.endswith(".case"):
        return replay_case(a)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    m = _machine(a)
    dump = _open_dump(a.dump_host_memory)
    if a.sev or a.sev_es or a.snp:
        _launch_sev(m, a, err)
    if not a.json:
        m.console_sink = lambda b: (sys.stdout.write(b.decode("utf-8", "replace")), sys.stdout.flush())
    m.on_exit_record = _exit_printer(m, a, err)
    r = m.run(max_insns=a.max_insns, timeout=a.timeout, max_exits=a.max_exits)
    if dump is not None:
        with dump:
            dump.write(m.mem.dump())          # raw DRAM: what the hypervisor (or a probe) could read
    ok = r.reason in (StopReason.GUEST_EXIT, StopReason.HALT) and not r.exit_code
    dbg = getattr(getattr(m.platform, "debug_exit", None), "status", None)
    if a.json:
        print(json.dumps({
            "final": True, "reason": r.reason, "detail": r.detail, "guest_exit_code": r.exit_code,
            "debug_exit_status": dbg,
            "ok": ok, "regs": r.regs or None,         # SEV-ES: none, they are in the encrypted VMSA
            "rip": r.rip, "rflags": r.rflags,
            "exits": r.exits, "counts": {exit_name(k): v for k, v in sorted(r.counts.items())},
            "insns": r.insns, "console": r.console, "paging": a.paging,
            "walks": r.walk, "tlb": r.tlb,
            "shadow": m.shadow.stats.snapshot() if m.shadow is not None else None,
        }))
    else:
        err.print(exits_table(r))
        err.print(memory_table(a.paging, r, m))
        style = "green" if ok else "red"
        err.print(f"[{style}]run ended: {r.reason}[/{style}]" + (f" - {r.detail}" if r.detail else "")
                  + f"; {r.exits} exits")
    return 0 if ok else 1


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
    p = argparse.ArgumentParser(prog="sandbox", description="AMD-V (SVM) hypervisor sandbox",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a guest image", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("image", help="guest image: .S/.asm (keystone), .bin (flat), ELF64, an ELF32 multiboot kernel "
                                 "(kvm-unit-tests .flat), or a saved fuzz case (.case)")
    r.add_argument("--intercept", metavar="NAMES", help="comma-separated intercepts to arm (APM names, 'all', 'sensitive')")
    r.add_argument("--ports", metavar="LIST", help="intercept exactly these ports, e.g. 0x80,0x3f8-0x3ff")
    r.add_argument("--msrs", metavar="LIST", help="intercept exactly these MSR accesses, e.g. r:0x10,w:0xc0000103")
    r.add_argument("--hooks", metavar="FILE", help="Python file with user exit handlers")
    r.add_argument("--max-insns", type=int, default=0, metavar="N",
                   help="instruction budget for the run; also reports the count (0 = uncounted: counting slows the guest)")
    r.add_argument("--max-exits", type=int, default=10_000_000, metavar="N", help="stop after N exits")
    r.add_argument("--timeout", type=float, default=10.0, metavar="S", help="wall-clock limit in seconds")
    r.add_argument("--dram", type=int, default=None, metavar="MIB",
                   help="host DRAM size (MiB; default 64, or guest RAM + 32 when that is more)")
    r.add_argument("--ram", type=int, default=None, metavar="MIB",
                   help="guest RAM size (MiB; default 16, 256 for a multiboot kernel)")
    r.add_argument("--append", metavar="ARGS", help="command line of a multiboot kernel (kvm-unit-tests' test_args)")
    r.add_argument("--platform", choices=("none", "pc"), default=None,
                   help="devices beyond COM1: 'pc' (debug-exit, fw_cfg, PIC, local APIC); default pc for a "
                        "multiboot kernel, else none")
    r.add_argument("--nested", action="store_true",
                   help="nested SVM: the guest may run its own guests (VMRUN emulated by this hypervisor)")
    r.add_argument("--paging", choices=("nested", "shadow"), default="nested",
                   help="memory virtualization: the processor's nested paging, or hypervisor shadow tables")
    r.add_argument("--npt-page", choices=("4k", "2m", "1g"), default="4k",
                   help="leaf size of the nested page table backing guest RAM")
    r.add_argument("--tlb", choices=("tagged", "flush"), default="tagged",
                   help="TLB tagged by ASID, or flushed on every world switch (pre-ASID hardware)")
    r.add_argument("--sev", action="store_true", help="launch the guest encrypted (SEV): measured, C-bit set")
    r.add_argument("--sev-es", action="store_true", help="SEV-ES: encrypted register state, #VC and the GHCB (implies --sev)")
    r.add_argument("--snp", action="store_true", help="SEV-SNP: reverse-map table integrity (implies --sev)")
    r.add_argument("--dump-host-memory", metavar="PATH", help="write the raw host DRAM image here when the run ends")
    r.add_argument("--json", action="store_true", help="one JSON object per exit, then a final record")
    r.add_argument("--quiet", action="store_true", help="no per-exit lines, only the summary")
    r.add_argument("--audit", action="store_true", help="for a saved fuzz case (.case): run the soundness audit too")
    r.set_defaults(fn=cmd_run)
    add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except CliError as e:
        print(f"sandbox: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sandbox: interrupted", file=sys.stderr)
        return 130


