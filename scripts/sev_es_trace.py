#!/usr/bin/env python3
"""What the hypervisor's exit trace holds for the same guest with SEV and with SEV-ES.

Runs guest_images/sev_es_vc.S twice in this process -- encrypted with SEV, then
with SEV-ES -- and prints, for the first exit of each kind in each run, what the
hypervisor can see: EXITCODE, the guest RIP in the exit record, RAX and CR3 in
the VMCB save area, RBX through the register API, and (SEV-ES) the request the
guest put in its GHCB.

    python scripts/sev_es_trace.py [--exits N]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sandbox import ExitCode, Machine, exit_name                                  # noqa: E402
from sandbox.cli.helpfmt import Parser                                            # noqa: E402
from sandbox.hypervisor.ghcb import handle_vmgexit                                # noqa: E402
from sandbox.hypervisor.machine import SevEsRegisterError                         # noqa: E402
from sandbox.hypervisor.sev_launch import launch_sev, launch_sev_es               # noqa: E402

IMAGE = os.path.join(os.path.dirname(__file__), "..", "guest_images", "sev_es_vc.S")


def trace(es: bool, limit: int) -> list[str]:
    m = Machine(dram=16 << 20, ram=4 << 20)
    m.load(IMAGE)
    if es:
        launch_sev_es(m)
    else:
        launch_sev(m)
        m.set_msrs([(0x1B, True, False)])          # the same MSR exit as the SEV-ES guest's #VC
    log = m.sev.ghcb_log
    lines: list[str] = []
    kinds: set[int] = set()

    def rec(r):
        kind = log[-1][0] if es and log else r.exitcode
        if len(lines) >= limit or kind in kinds:
            return                                  # the first exit of each kind
        kinds.add(kind)
        v = m.guest.vmcb
        try:
            rbx = f"{m.regs.rbx:#x}"
        except SevEsRegisterError:
            rbx = "(refused)"
        line = (f"  {exit_name(r.exitcode):<8} rip={r.rip:#010x} vmcb.RAX={v.RAX:#x} vmcb.CR3={v.CR3:#x} "
                f"regs.rbx={rbx}")
        if es:
            line += "  GHCB: " + (f"SW_EXITCODE={log[-1][0]:#x} SW_EXITINFO1={log[-1][1]:#x}" if log else "-")
        lines.append(line)
    # the GHCB request is logged by the VMGEXIT handler; read it after the handler ran
    if es:
        def logged(m_, e):
            act = handle_vmgexit(m_, e)
            rec(e)
            return act
        m.on(ExitCode.VMGEXIT)(logged)
    else:
        m.on_exit_record = rec
    r = m.run()
    lines.append(f"  run ended: {r.reason}; {r.exits} exits; console {r.console!r}")
    return lines


def main() -> int:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=8, help="at most this many exits per run (8)")
    a = ap.parse_args()
    print("SEV (registers and VMCB save area visible to the hypervisor):")
    print("\n".join(trace(False, a.exits)))
    print("\nSEV-ES (state in the encrypted VMSA; requests through the GHCB):")
    print("\n".join(trace(True, a.exits)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
