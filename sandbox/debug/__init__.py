"""Debugging, tracing and record/replay building blocks for the sandbox.

This package sits above the processor and the hypervisor (it may use
:mod:`sandbox.svm`, :mod:`sandbox.memory` and :mod:`sandbox.hypervisor`) and
below the command line. The protocol modules work against a small, explicit
interface (a :class:`typing.Protocol`), so they can be built and tested
without the processor:

* :mod:`.rsp` -- the framing layer of gdb's Remote Serial Protocol:
  ``$data#xx`` packets, checksums, ``+``/``-`` acknowledgements, binary
  escaping and the interrupt byte.
* :mod:`.tdesc` -- the x86-64 register layout and the target description
  (``target.xml``) the stub offers gdb.
* :mod:`.gdbstub` -- the gdb stub: the :class:`~.gdbstub.DebugTarget`
  protocol, the packet handlers, ``monitor`` command routing and
  :func:`~.gdbstub.serve`.
* :mod:`.timeline` -- a streaming Chrome trace-event / Perfetto timeline
  writer (#VMEXITs, guest run spans, injected events, TLB flushes) and its
  validator.
* :mod:`.recording` -- the versioned, integrity-checked record/replay file
  format and the :class:`~.recording.Replayer` that feeds a run its recorded
  nondeterministic inputs and reports the first divergence.
* :mod:`.exits` -- :class:`~.exits.ExitLike`, what the timeline and the
  recordings need from a #VMEXIT record.

Wired to a real :class:`~sandbox.Machine` (through its ``on_exit_record`` and
``resume_hooks``, and public processor calls; nothing below imports this
package):

* :mod:`.target` -- :class:`~.target.MachineTarget`, the DebugTarget gdb drives;
* :mod:`.monitor` -- ``monitor break-exit / vmcb / exits / npt / walk`` on it;
* :mod:`.rr` -- recording and replaying a Machine's run;
* :mod:`.observe` -- chaining exit observers, and the Machine's timeline.
"""
