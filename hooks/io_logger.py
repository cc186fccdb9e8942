"""I/O logger: print every intercepted port access, then let the default
handler perform it.

    sandbox run guest_images/hello.S --intercept ioio --hooks hooks/io_logger.py --quiet
"""
import sys

from sandbox import ExitCode, handlers
from sandbox.svm.iopm import IoioInfo


def log_io(m, e):
    info = e.exitinfo1
    size = 1 if info & IoioInfo.SZ8 else 2 if info & IoioInfo.SZ16 else 4
    kind = "IN " if info & IoioInfo.TYPE_IN else "OUT"
    extra = " string" if info & IoioInfo.STR else ""
    extra += " rep" if info & IoioInfo.REP else ""
    value = "" if info & (IoioInfo.TYPE_IN | IoioInfo.STR) else f" value={m.regs.rax & ((1 << 8 * size) - 1):#x}"
    print(f"[io] {kind} port={info >> 16:#06x} size={size}{extra}{value} rip={e.rip:#x}", file=sys.stderr)
    return handlers.handle_ioio(m, e)


HANDLERS = {ExitCode.IOIO: log_io}
