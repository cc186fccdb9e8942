"""Every engine's translated code reaches libunicorn's helpers with a rel32 call.

An x86-64 ``call rel32`` reaches +-2 GiB.  QEMU calls a helper directly only
within that reach; farther, each call goes through the block's constant pool,
which QEMU keeps sorted by insertion -- quadratic in the calls of a block, and
a code hook or instruction budget puts a call before every guest instruction.
Unicorn's default buffer is 1 GiB, so a process with a few engines (a fuzz
worker has the machine's and the reference engine) put most of them out of
reach.  Checked in a fresh process, as a campaign worker starts.
"""
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    from sandbox.fuzz.campaign import Options, Worker
    from sandbox.svm.engine import TCG_BUFFER, TCG_BUFFER_SMALL
    w = Worker(Options(seed=1, cases=40))
    for _ in range(40):
        w.step()
    assert w.qemu.uc is not None          # the reference engine, built by the differential cases
    lib, bufs = [], []
    for line in open("/proc/self/maps"):
        f = line.split()
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        if len(f) > 5 and "libunicorn" in f[5] and "x" in f[1]:
            lib.append((lo, hi))
        elif len(f) == 5 and f[1].startswith("rwx") and hi - lo >= TCG_BUFFER_SMALL - 0x1000:
            bufs.append((lo, hi))
    print((lib, bufs))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_every_translation_buffer_is_within_rel32_reach_of_libunicorn():
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lib, bufs = eval(p.stdout.strip().splitlines()[-1])
    assert lib, "libunicorn's code is not mapped"
    # the machine's engine, the reference engine and the small probes: at least the first two
    assert len(bufs) >= 2, bufs
    lib_lo, lib_hi = min(a for a, _ in lib), max(b for _, b in lib)
    reach = 2 << 30
    for lo, hi in bufs:
        # the farthest pair of points: any generated code to any helper
        assert max(hi - lib_lo, lib_hi - lo) < reach, (hex(lo), hex(hi), hex(lib_lo), hex(lib_hi))
