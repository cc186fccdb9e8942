"""An AMD-V (SVM) hypervisor sandbox: real x86-64 guest code on Unicorn,
under a Python model of the SVM processor and a scriptable hypervisor.

``handlers`` is the module of the default exit handlers (``handlers.handle_cpuid``
...), for user handlers that do their own work and then the default one.

The names below are imported when first used (PEP 562), so that ``import
sandbox.cli`` is quick and the command line can answer a Ctrl-C during its own
imports with one line instead of a traceback.
"""
import importlib as _importlib
import os as _os

# numpy (imported by the SEV memory controller for its XOR of AES tweaks) would
# start OpenBLAS's thread pool, one spinning thread per core, for matrix work the
# sandbox never does: on a 2-core machine that pool competes with the guest, and
# a multi-threaded process cannot fork keystone's assembler child cheaply.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    _os.environ.setdefault(_v, "1")

from .version import __version__

#: module -> the public names it gives the package (each its attribute of that name)
_FROM = {
    ".hypervisor.guest": ("Guest",),
    ".hypervisor.handlers": ("DEFAULT_HANDLERS", "RESUME", "STOP", "Action"),
    ".hypervisor.machine": ("Machine", "RunResult"),
    ".svm.exitcodes": ("ExitCode", "exit_name"),
    ".svm.vmcb": ("VMCB", "Event", "EventType", "Segment"),
}
#: public name -> (module, attribute; None: the module itself)
_LAZY = {"handlers": (".hypervisor.handlers", None),
         **{name: (module, name) for module, names in _FROM.items() for name in names}}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}") from None
    mod = _importlib.import_module(module, __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
