import sys, time
from sandbox.experiments.common import machine, results, CLOCK_BUDGET
from sandbox.hypervisor.avic import enable_avic
mode = sys.argv[1]; N = int(sys.argv[2])
m = machine("avic_irq.S", [N, 0x41], ram=4<<20, platform="pc")
m.intercept("intr")
posted = [0]
if mode == "avic":
    av = enable_avic(m)
    def dev():
        if posted[0] < N:
            posted[0] += 1; av.post(0x41)
else:
    apic = m.platform.apic
    def dev():
        if posted[0] < N:
            posted[0] += 1; apic.set_irr(0x41); m.cpu.kick()
class Dev:
    def owns(self, port): return port == 0xE0
    def read(self, port, size): return 0
    def write(self, port, size, value): m.cpu.schedule_remote(20_000, dev)
m.bus.attach(Dev()); m.guest.iopm.set(0xE0, True)
r = m.run(max_insns=CLOCK_BUDGET, timeout=5)
print(mode, r.counts, r.reason, r.detail, results(m, 4), posted, m.cpu._run.remote_events, m.cpu.guest_clock)
print(r.console[-300:] if r.console else "")
for rec in list(m.trace)[:12]: print(hex(rec.exitcode), hex(rec.rip), hex(rec.exitinfo1), hex(rec.exitinfo2))
