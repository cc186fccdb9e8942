"""SEV's part of the processor: the extension the SVM core calls.

It ties the memory controller (:mod:`.memctl`: encryption in the walk, DRAM
kept as ciphertext while the hypervisor runs, VMRUN's SEV checks), SEV-ES's
VMSA and #VC (:mod:`.vmsa`) and SEV-SNP's PVALIDATE (:mod:`.rmp`) to the
hook points of :class:`~sandbox.svm.extension.ProcessorExtension`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..svm.extension import ProcessorExtension
from ..svm.vmcb import NpControl
from .rmp import emulate_pvalidate

if TYPE_CHECKING:
    from ..svm.cpu import ExitRecord, SvmCpu
    from .memctl import MemoryController


class SevExtension(ProcessorExtension):
    """The processor's SEV, SEV-ES and SEV-SNP behaviour, around one memory controller."""

    def __init__(self, memctl: "MemoryController") -> None:
        self.memctl = memctl

    def vmrun_check(self, cpu: "SvmCpu", asid: int, np_control: int) -> str:
        return self.memctl.vmrun_check(asid, bool(np_control & NpControl.SEV_ENABLE),
                                       bool(np_control & NpControl.NP_ENABLE),
                                       bool(np_control & NpControl.SEV_ES_ENABLE))

    def before_vmrun(self, cpu: "SvmCpu") -> None:
        self.memctl.before_vmrun(cpu)

    def intercept(self, cpu: "SvmCpu", exitcode: int, rip: int, length: int) -> bool:
        es = self.memctl.es
        return es is not None and es.intercept(cpu, exitcode, rip, length)

    def emulate_invalid(self, cpu: "SvmCpu", rip: int) -> bool:
        mc = self.memctl
        return mc.snp and mc.active and mc.rmp is not None and emulate_pvalidate(cpu, mc, rip)

    # No write-back at #VMEXIT: DRAM holds only ciphertext at every moment
    # (plaintext lives in the processor's cache), and a page the guest changed
    # is encrypted back when the hypervisor first touches it through
    # HostMemory (host_access), when another key takes over, and when the run
    # stops -- what a write-back cache does; the exits of a guest whose
    # hypervisor never reads its memory pay no AES.

    def after_vmexit(self, cpu: "SvmCpu", rec: "ExitRecord") -> None:
        if self.memctl.es is not None:
            self.memctl.es.on_vmexit(cpu, rec)

    def at_stop(self, cpu: "SvmCpu") -> None:
        self.memctl.flush_dirty()

    def host_access(self, hpa: int, n: int, write: bool) -> None:
        self.memctl.host_access(hpa, n, write)

    def encryption(self):
        return self.memctl if self.memctl.active else None
