"""An AMD-V (SVM) hypervisor sandbox: real x86-64 guest code on Unicorn,
under a Python model of the SVM processor and a scriptable hypervisor."""
from .svm.exitcodes import ExitCode, exit_name
from .hypervisor.machine import RESUME, STOP, Action, Guest, Machine, RunResult
from .svm.vmcb import VMCB, Event, EventType, Segment

__all__ = ["Machine", "Guest", "RunResult", "Action", "RESUME", "STOP", "ExitCode", "exit_name",
           "VMCB", "Event", "EventType", "Segment"]
__version__ = "0.1.0"
