"""Popek and Goldberg's test: the same probe kernel under classic
trap-and-emulate (kernel deprivileged to ring 3) and under SVM.

Seed 000, "The Classical Dream and its Flaw": *"the set of sensitive
instructions ... must be a subset of the privileged instructions ... x86
... possessed a category of instructions that were sensitive but not
privileged: SGDT/SIDT ... SMSW ... POPF ... silently fails"*; seed 002:
*"POPF, SGDT, and their kin could be configured to trap, perfectly
restoring the trap-and-emulate model."*

``guest_images/pg_probe.S`` loads its own descriptor tables, sets CR0.TS
and clears IF with privileged instructions, then executes every sensitive
instruction x86 lets any privilege level run and stores what it saw.

``classic``
    :class:`~sandbox.hypervisor.classic.ClassicMonitor`: the kernel at CPL 3
    on the monitor's GDT, shadow paging, no SVM instruction intercepts,
    every exception intercepted; privileged instructions fault and are
    emulated against a virtual CPU.
``svm``
    the kernel at its own CPL 0 in non-root mode with the ``sensitive``
    intercept group armed (GDTR/IDTR/LDTR/TR reads, CR0 reads, PUSHF,
    POPF ... exit; the default handlers re-execute them).

What a real ring-0 kernel sees is derived from the probe's own constants
(the GDTR and IDTR it loads, its descriptors, CR0 with TS, IF after CLI
and after POPF), not from either run.  An instruction *breaks* Popek and
Goldberg when it does not trap and the kernel sees something else.
"""
from __future__ import annotations

import struct
from typing import Any

from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from ..hypervisor import handlers as H
from ..hypervisor.classic import MON_CS, MON_DS, MONITOR_GDT, ClassicMonitor
from ..hypervisor.loader import load_image
from ..svm.exitcodes import ExitCode, exit_name
from .base import Comparison, Context, Experiment, Outcome
from .common import IMAGES, RESULTS, machine, run
from .plotting import pyplot, save, subtitle

IMAGE = "pg_probe.S"
STEP = 0xF07F8
ALL_PHASES = 0x1F                 # pg_probe.S runs every phase in one run
RFLAGS_IF = 1 << 9
REPORT = 0x50                     # the probe's "note my interrupt flag" hypercall

# the probe's constants (pg_probe.S) and the loader's CR0 (README, "Guest images")
GDT_BASE, GDT_LIMIT, IDT_BASE, IDT_LIMIT = 0x60000, 0x37, 0x61000, 0xFFF
LDT_SEL, TSS_SEL, TSS_LIMIT = 0x18, 0x28, 0x67
LOADER_CR0, CR0_TS = 0x8001_0033, 1 << 3
CODE_DESC = 0x00AF9B000000FFFF
KERNEL_CS, KERNEL_SS = 0x08, 0x10

#: (row, mnemonic and operand text to find in the image, result slot(s), how to show it)
PRIVILEGED = (("LGDT", "lgdt"), ("LIDT", "lidt"), ("LLDT", "lldt"), ("LTR", "ltr"),
              ("MOV to CR0", "mov cr0"), ("CLI", "cli"))
SENSITIVE = (
    ("SGDT", "sgdt", "gdtr"), ("SIDT", "sidt", "idtr"), ("SLDT", "sldt", "ldtr"), ("STR", "str", "tr"),
    ("SMSW", "smsw", "msw"), ("PUSHF after CLI (IF)", "pushfq", "pushf_if"),
    ("POPF of IF=1 (the VM's IF)", "popfq", "popf_if"), ("LAR 0x08", "lar", "lar"), ("LSL 0x28", "lsl", "lsl"),
    ("VERR 0x08", "verr", "verr"), ("VERW 0x10", "verw", "verw"), ("MOV from CS (RPL)", "mov ax, cs", "cs"),
    ("MOV from SS (RPL)", "mov ax, ss", "ss"))


def expected() -> dict[str, str]:
    """What a real ring-0 kernel sees after the probe's set-up (derived from its constants)."""
    ar = (CODE_DESC >> 32) & 0x00F0_FF00              # LAR: the descriptor's attribute bytes (APM vol. 3 LAR)
    return {"gdtr": _dt(GDT_BASE, GDT_LIMIT), "idtr": _dt(IDT_BASE, IDT_LIMIT), "ldtr": f"{LDT_SEL:#x}",
            "tr": f"{TSS_SEL:#x}", "msw": f"{(LOADER_CR0 | CR0_TS) & 0xFFFF:#06x}", "pushf_if": "IF=0",
            "popf_if": "IF=1", "lar": f"ZF=1, {ar:#010x}", "lsl": f"ZF=1, {TSS_LIMIT:#x}", "verr": "ZF=1",
            "verw": "ZF=1", "cs": f"{KERNEL_CS:#x} (RPL 0)", "ss": f"{KERNEL_SS:#x} (RPL 0)"}


def _short(label: str) -> str:
    return f"{label[9:11]} RPL" if label.startswith("MOV from") else label.split(" ")[0]


def _dt(base: int, limit: int) -> str:
    return f"base {base:#x}, limit {limit:#x}"


def _observed(res: list[int], vm_if: list[bool]) -> dict[str, str]:
    """The probe's results (pg_probe.S's layout) as the kernel saw them."""
    def dt(slot: int) -> str:
        raw = struct.pack("<QQ", res[slot], res[slot + 1])
        limit, base = struct.unpack_from("<HQ", raw)
        return _dt(base, limit)
    return {"gdtr": dt(0), "idtr": dt(2), "ldtr": f"{res[4]:#x}", "tr": f"{res[5]:#x}", "msw": f"{res[6]:#06x}",
            "pushf_if": f"IF={res[7] >> 9 & 1}", "popf_if": f"IF={int(vm_if[0])}" if vm_if else "?",
            "lar": f"ZF={res[10]}, {res[9]:#010x}" if res[10] else "ZF=0",
            "lsl": f"ZF={res[12]}, {res[11]:#x}" if res[12] else "ZF=0", "verr": f"ZF={res[13]}",
            "verw": f"ZF={res[14]}", "cs": f"{res[15]:#x} (RPL {res[15] & 3})",
            "ss": f"{res[16]:#x} (RPL {res[16] & 3})"}


def _addresses() -> dict[str, int]:
    """Where each probed instruction sits (capstone over the assembled image)."""
    img = load_image(str(IMAGES / IMAGE), 4 << 20)
    gpa, code = img.segments[0]
    out: dict[str, int] = {}
    cs = Cs(CS_ARCH_X86, CS_MODE_64)
    for i in cs.disasm(code, gpa):
        text = f"{i.mnemonic} {i.op_str}".strip()
        for key in [t[1] for t in PRIVILEGED + SENSITIVE]:
            if key not in out and (text == key or i.mnemonic == key or text.startswith(key + ",")):
                out[key] = i.address
    return out


def probe(mode: str, mask: int) -> dict[str, Any]:
    """One run of the probe: results, the VM's IF at the report, exits by RIP."""
    m = machine(IMAGE, [mask], ram=4 << 20, paging="shadow" if mode == "classic" else "nested")
    mon = ClassicMonitor(m).attach() if mode == "classic" else None
    if mon is None:
        m.intercept("sensitive")
    exits: dict[int, list[str]] = {}
    m.on_exit_record = lambda rec: exits.setdefault(rec.rip, []).append(exit_name(rec.exitcode))
    vm_if: list[bool] = []

    def vmmcall(m_, e):
        if m_.regs.rax == REPORT:
            vm_if.append(mon.virtual.if_ if mon is not None else bool(m_.guest.vmcb.RFLAGS & RFLAGS_IF))
        return H.handle_vmmcall(m_, e)
    m.on(ExitCode.VMMCALL)(vmmcall)
    run(m, timeout=60)
    res = list(struct.unpack("<17Q", m.guest.read_phys(RESULTS, 17 * 8)))
    return {"results": res, "vm_if": vm_if, "exits": exits,
            "emulated": dict(mon.emulated) if mon is not None else {}}


def _steps(quick: bool) -> int:
    return 2


def run_experiment(ctx: Context) -> Outcome:
    addr = _addresses()
    svm = probe("svm", ALL_PHASES)
    ctx.step("svm")
    classic = probe("classic", ALL_PHASES)
    ctx.step("classic")
    want = expected()
    seen = {"classic": _observed(classic["results"], classic["vm_if"]), "svm": _observed(svm["results"], svm["vm_if"])}

    def trapped(exits: dict[int, list[str]], key: str) -> str:
        names = [n for n in exits.get(addr[key], []) if n != "EXCP_PF"]     # a shadow #PF is not a trap
        return ", ".join(names)

    rows, table = [], []
    for label, key in PRIVILEGED:
        c, s = trapped(classic["exits"], key), trapped(svm["exits"], key)
        rows.append([label, "privileged", c or "no", "emulated", s or "no (runs on the VM's own state)", "", ""])
        table.append({"instruction": label, "kind": "privileged", "classic_trap": c, "svm_exit": s})
    broken = []
    for label, key, slot in SENSITIVE:
        c, s = trapped(classic["exits"], key), trapped(svm["exits"], key)
        cv, sv = seen["classic"][slot], seen["svm"][slot]
        breaks = not c and cv != want[slot]
        if breaks:
            broken.append(label)
        rows.append([label, want[slot], c or "no", cv + ("  BREAKS P&G" if breaks else ""),
                     s or "no (not needed: CPL 0 in its own tables)", sv, "yes" if sv == want[slot] else "NO"])
        table.append({"instruction": label, "kind": "sensitive", "real": want[slot], "classic_trap": c,
                      "classic_saw": cv, "breaks": breaks, "svm_exit": s, "svm_saw": sv, "svm_ok": sv == want[slot]})
    sens = [t for t in table if t["kind"] == "sensitive"]
    priv = [t for t in table if t["kind"] == "privileged"]
    checks = {
        "classic: every privileged set-up instruction trapped": all(t["classic_trap"] for t in priv),
        "classic: no sensitive, unprivileged instruction trapped": not any(t["classic_trap"] for t in sens),
        "classic: each of them showed the kernel something a ring-0 kernel would not see":
            len(broken) == len(SENSITIVE),
        "SVM: the kernel sees what a ring-0 kernel sees, for every one": all(t["svm_ok"] for t in sens),
        "SVM: the seven with an intercept exited (GDTR/IDTR/LDTR/TR/CR0 read, PUSHF, POPF)": all(
            t["svm_exit"] for t in sens[:7]),
    }
    comps = [
        Comparison("sensitive instructions that do not trap at CPL 3",
                   "SGDT/SIDT, SMSW, POPF (\"a category of ... sensitive but not privileged\")",
                   f"{len(broken)} of {len(SENSITIVE)} break P&G in classic mode: " + ", ".join(
                       _short(b) for b in broken)),
        Comparison("under SVM", "\"could be configured to trap, perfectly restoring trap-and-emulate\"",
                   f"{sum(1 for t in sens if t['svm_ok'])} of {len(SENSITIVE)} correct; "
                   f"{sum(1 for t in sens if t['svm_exit'])} exit on an intercept",
                   "LAR, LSL, VERR, VERW and CS/SS reads have no intercept and need none: non-root mode runs "
                   "the kernel at its real CPL 0 on its own descriptor tables"),
    ]
    return Outcome(
        comparisons=comps,
        columns=["instruction", "real ring-0 kernel sees", "classic: trapped", "classic: kernel saw",
                 "SVM (sensitive intercepts): exit", "SVM: kernel saw", "SVM correct"],
        rows=rows,
        data={"rows": table, "monitor_gdt": MONITOR_GDT, "monitor_cs": MON_CS | 3, "monitor_ss": MON_DS | 3,
              "classic_emulated": classic["emulated"]},
        checks=checks,
        notes=[               "POPF row: what the guest saw is the interrupt flag the VM has after POPF (the monitor's virtual "
               "IF, or the real one under SVM), noted at the probe's report hypercall."])


def plot(data: dict[str, Any], path) -> None:
    plt = pyplot()
    rows = [r for r in data["rows"] if r["kind"] == "sensitive"]
    cols = ["classic: traps", "classic: correct", "SVM: exits", "SVM: correct"]
    grid = [[bool(r["classic_trap"]), not r["breaks"], bool(r["svm_exit"]), r["svm_ok"]] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(rows) + 1.4))
    green, red, grey = (0.36, 0.72, 0.45), (0.85, 0.33, 0.3), (0.82, 0.82, 0.82)
    colours = [[green if v else (grey if j in (0, 2) else red) for j, v in enumerate(g)] for g in grid]
    ax.imshow(colours, aspect="auto")
    for i, g in enumerate(grid):
        for j, v in enumerate(g):
            txt = ("yes" if v else "no") if j in (0, 2) else ("yes" if v else "BREAKS")
            ax.text(j, i, txt, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, fontsize=9)
    ax.set_yticks(range(len(rows)), [r["instruction"] for r in rows], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_title("Sensitive, unprivileged x86 instructions: classic trap-and-emulate vs SVM" + subtitle(data),
                 fontsize=10, pad=24)
    save(fig, path)


EXPERIMENT = Experiment(
    name="popek-goldberg",
    title="Popek and Goldberg: sensitive instructions in classic trap-and-emulate and under SVM",
    source="seed 000, The Classical Dream and its Flaw; seed 002, The Illusionist's Dilemma",
    claim="x86 has sensitive instructions that do not trap at ring 3; SVM's intercepts restore trap-and-emulate",
    steps=_steps, run=run_experiment, plot=plot)
