"""An AMD-V (SVM) hypervisor sandbox: real x86-64 guest code on Unicorn,
under a Python model of the SVM processor and a scriptable hypervisor.

``handlers`` is the module of the default exit handlers (``handlers.handle_cpuid``
...), for user handlers that do their own work and then the default one.
"""
import os as _os

# numpy (imported by the SEV memory controller for its XOR of AES tweaks) would
# start OpenBLAS's thread pool, one spinning thread per core, for matrix work the
# sandbox never does: on a 2-core machine that pool competes with the guest, and
# a multi-threaded process cannot fork keystone's assembler child cheaply.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    _os.environ.setdefault(_v, "1")

from .hypervisor import handlers
from .hypervisor.guest import Guest
from .hypervisor.handlers import DEFAULT_HANDLERS, RESUME, STOP, Action
from .hypervisor.machine import Machine, RunResult
from .version import __version__
from .svm.exitcodes import ExitCode, exit_name
from .svm.vmcb import VMCB, Event, EventType, Segment

__all__ = ["Machine", "Guest", "RunResult", "Action", "RESUME", "STOP", "ExitCode", "exit_name",
           "VMCB", "Event", "EventType", "Segment", "handlers", "DEFAULT_HANDLERS"]
