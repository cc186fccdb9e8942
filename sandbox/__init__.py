"""An AMD-V (SVM) hypervisor sandbox: real x86-64 guest code on Unicorn,
under a Python model of the SVM processor and a scriptable hypervisor.

``handlers`` is the module of the default exit handlers (``handlers.handle_cpuid``
...), for user handlers that do their own work and then the default one.
"""
from .hypervisor import handlers
from .hypervisor.guest import Guest
from .hypervisor.handlers import DEFAULT_HANDLERS, RESUME, STOP, Action
from .hypervisor.machine import Machine, RunResult
from .version import __version__
from .svm.exitcodes import ExitCode, exit_name
from .svm.vmcb import VMCB, Event, EventType, Segment

__all__ = ["Machine", "Guest", "RunResult", "Action", "RESUME", "STOP", "ExitCode", "exit_name",
           "VMCB", "Event", "EventType", "Segment", "handlers", "DEFAULT_HANDLERS"]
