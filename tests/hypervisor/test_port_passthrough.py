"""Port I/O the IOPM does not intercept reaches the platform's devices
through Unicorn's IN/OUT instruction hooks, with no #VMEXIT; the bus finds a
port's device once and finds it again after a device is attached."""
from __future__ import annotations

from sandbox.hypervisor.devices import DeviceBus
from sandbox.svm.exitcodes import ExitCode

from conftest import hc_exit

PORT = 0x2F8


class Latch:
    """Remembers what is written; reads give it back plus ``bias`` (and count both)."""

    def __init__(self, bias: int = 0, ports: tuple[int, ...] = (PORT,)) -> None:
        self.bias, self.ports = bias, ports
        self.value = 0
        self.log: list[tuple[str, int, int, int]] = []

    def owns(self, port: int) -> bool:
        return port in self.ports

    def read(self, port: int, size: int) -> int:
        v = self.value + self.bias
        self.log.append(("in", port, size, v & ((1 << 8 * size) - 1)))
        return v

    def write(self, port: int, size: int, value: int) -> None:
        self.log.append(("out", port, size, value))
        self.value = value


class Broken:
    def owns(self, port: int) -> bool:
        return port == PORT

    def read(self, port: int, size: int) -> int:
        raise RuntimeError("device fell over")

    def write(self, port: int, size: int, value: int) -> None:
        raise RuntimeError("device fell over")


LOOP = f"""
    mov dx, {PORT:#x}
    mov ecx, 5
    xor ebx, ebx
again:
    mov eax, ecx
    add eax, 0x1230
    out dx, ax
    in ax, dx
    add ebx, eax
    dec ecx
    jnz again
    mov eax, 0x11223344
    out dx, eax
    mov eax, 0xFFFFFFFF
    in al, dx
    mov r12, rax
""" + hc_exit(0x55)


def test_unintercepted_in_out_reach_the_device_without_an_exit(guest):
    m = guest(LOOP)
    dev = Latch(bias=0x100)
    m.bus.attach(dev)
    m.set_ports([])                                  # IOIO armed, no port intercepted
    r = m.run(timeout=30)
    assert r.reason == "guest-exit", r.detail
    assert ExitCode.IOIO not in r.counts
    want = []
    for c in range(5, 0, -1):
        want += [("out", PORT, 2, 0x1230 + c), ("in", PORT, 2, 0x1330 + c)]
    want += [("out", PORT, 4, 0x11223344), ("in", PORT, 1, (0x11223344 + 0x100) & 0xFF)]
    assert dev.log == want
    # IN AX keeps RAX[63:16] (here the loop counter's upper bits are zero); IN AL keeps RAX[63:8]
    assert r.regs["rbx"] == sum(0x1330 + c for c in range(1, 6))
    assert r.regs["r12"] == 0xFFFFFF00 | (0x11223344 + 0x100) & 0xFF


def test_a_device_attached_after_a_port_was_used_takes_it(guest):
    """The bus remembers each port's device; attaching one forgets that."""
    m = guest(LOOP)
    m.set_ports([])
    r = m.run(timeout=30)
    assert r.reason == "guest-exit" and r.regs["r12"] == 0xFFFFFFFF        # nobody: reads float high
    bus: DeviceBus = m.bus
    assert bus.port_owner(PORT) is None
    late = Latch(bias=1)
    bus.attach(late)
    assert bus.port_owner(PORT) is late and bus.io(PORT, 1, True) == 1
    bus.attach(Latch(bias=2))                        # the first device that owns a port keeps it
    assert bus.port_owner(PORT) is late
    assert bus.port_owner(PORT + 1) is None


def test_a_device_failing_in_a_passthrough_access_stops_the_run_clearly(guest):
    m = guest(LOOP)
    m.bus.attach(Broken())
    m.set_ports([])
    r = m.run(timeout=30)
    assert r.reason == "error"
    assert "OUT to port 0x2f8" in r.detail and "device fell over" in r.detail
    assert isinstance(r.error, RuntimeError)


def test_ctrl_c_in_a_passthrough_access_stops_the_run_as_interrupted(guest):
    m = guest(LOOP)

    class CtrlC(Latch):
        def write(self, port: int, size: int, value: int) -> None:
            raise KeyboardInterrupt
    m.bus.attach(CtrlC())
    m.set_ports([])
    r = m.run(timeout=30)
    assert (r.reason, r.detail) == ("stopped", "interrupted")
