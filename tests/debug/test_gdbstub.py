"""The gdb stub's packets, driven by hand over a loopback socket against the
fake target (tests/debug/debug_fakes.py). Packet formats and replies are the
gdb manual's ("Packets", "General Query Packets", "Stop Reply Packets",
"Packet Acknowledgment", "Interrupts", "qXfer target description read")."""
from __future__ import annotations

import socket
import threading
import time
import xml.etree.ElementTree as ET

import pytest

from debug_fakes import FakeCpu, RawClient, ServerThread, Step
from sandbox.debug import rsp
from sandbox.debug.gdbstub import (STANDARD_MONITOR_COMMANDS, BreakpointType, DebugTarget, GdbServer, GdbStubError,
                                   MonitorError, MonitorRegistry, StopEvent, StopKind, parse_int, serve)
from sandbox.debug.tdesc import G_PACKET_BYTES, REGISTERS, REGISTER_NUMBER, TARGET_XML

SCRIPT = [Step(0x100000), Step(0x100004), Step(0x100008, exit="CPUID"), Step(0x100010),
          Step(0x100014, writes=[(0x100800, b"\x05\x00\x00\x00")]), Step(0x100018)]


@pytest.fixture
def session():
    """(client, fake cpu, server thread) with a connected client in ack mode."""
    made = []

    def make(cpu: FakeCpu | None = None):
        cpu = cpu or FakeCpu(list(SCRIPT), exit_code=3)
        srv = ServerThread(cpu)
        c = RawClient(srv.port)
        made.append((c, srv))
        return c, cpu, srv
    yield make
    for c, srv in made:
        c.close()
        srv.thread.join(10)


def test_fake_is_a_debug_target():
    assert isinstance(FakeCpu(list(SCRIPT)), DebugTarget)


# -- the target description ------------------------------------------------------------------------
def test_target_xml_register_order_is_gdbs_amd64_core_order():
    root = ET.fromstring(TARGET_XML.split("\n", 2)[2])      # past the XML and DOCTYPE lines
    assert root.find("architecture").text == "i386:x86-64"
    core = root.find("feature[@name='org.gnu.gdb.i386.core']")
    names = [r.get("name") for r in core.findall("reg")]
    expected = (["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
                + ["rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs"] + [f"st{i}" for i in range(8)]
                + ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"])
    assert names == expected
    all_regs = [r.get("name") for r in root.iter("reg")]
    assert all_regs == [r.name for r in REGISTERS]
    for name in ("fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer", "xmm15", "mxcsr"):
        assert name in all_regs
    assert G_PACKET_BYTES == sum(int(r.get("bitsize")) // 8 for r in root.iter("reg"))


# -- acknowledgements and framing ------------------------------------------------------------------
def test_ack_mode_then_no_ack_mode(session):
    c, _, _ = session()
    assert "QStartNoAckMode+" in c.cmd("qSupported:multiprocess+;swbreak+;hwbreak+")
    assert c.cmd("QStartNoAckMode") == "OK"
    c.ack = False
    assert c.cmd("qC") == "QC1"
    c.send("qAttached")
    assert c.recv() == b"1"
    assert c.events == []                     # nothing but the reply: no '+' in no-ack mode


def test_bad_checksum_gets_a_nack_and_the_stub_goes_on(session):
    c, _, _ = session()
    c.send_raw(b"$qC#00")
    assert isinstance(c.next_event(), rsp.Nack)
    assert c.cmd("qC") == "QC1"


def test_stub_retransmits_on_nack(session):
    c, _, _ = session()
    c.send("qC")
    ev = c.next_event()
    assert ev == rsp.Packet(b"QC1")
    c.send_raw(b"-")                                    # "please retransmit"
    assert c.next_event() == rsp.Packet(b"QC1")
    c.send_raw(b"+")
    assert c.cmd("qAttached") == "1"


def test_unknown_packets_get_the_empty_reply(session):
    c, _, _ = session()
    for p in ("vMustReplyEmpty", "qTStatus", "Qbogus", "vFile:open:", "!", "qXfer:auxv:read::0,100"):
        assert c.cmd(p) == "", p


def test_empty_packet_is_not_a_command(session):
    c, cpu, _ = session()
    assert c.cmd("") == ""
    assert cpu.resumes == []


def test_threads(session):
    c, _, _ = session()
    assert c.cmd("qfThreadInfo") == "m1"
    assert c.cmd("qsThreadInfo") == "l"
    assert c.cmd("Hg0") == "OK" and c.cmd("Hc-1") == "OK"
    assert c.cmd("T1") == "OK" and c.cmd("T2") == "E01"
    assert bytes.fromhex(c.cmd("qThreadExtraInfo,1")) == b"guest vCPU 0"


def test_qxfer_target_xml_in_chunks(session):
    c, _, _ = session()
    doc, off = b"", 0
    while True:
        reply = c.send("qXfer:features:read:target.xml:%x,%x" % (off, 0x100)) or c.recv()
        assert reply[:1] in (b"m", b"l")
        chunk = rsp.unescape(reply[1:])
        doc += chunk
        off += len(chunk)
        if reply[:1] == b"l":
            break
    assert doc.decode() == TARGET_XML
    assert c.cmd("qXfer:features:read:other.xml:0,100") == "E00"


# -- registers ----------------------------------------------------------------------------------------
def test_g_packet_layout_and_unavailable_registers(session):
    c, cpu, _ = session()
    g = c.cmd("g")
    assert len(g) == 2 * G_PACKET_BYTES
    pos = {}
    off = 0
    for r in REGISTERS:
        pos[r.name] = g[off:off + 2 * r.size]
        off += 2 * r.size
    assert pos["rax"] == "8877665544332211"
    assert pos["rip"] == (0x100000).to_bytes(8, "little").hex()
    assert pos["eflags"] == "02000000"
    assert pos["cr3"] == (0x2000).to_bytes(8, "little").hex()
    assert pos["st0"] == "xx" * 10 and pos["xmm3"] == "xx" * 16     # the fake has no FPU


def test_G_writes_registers_and_skips_unavailable_ones(session):
    c, cpu, _ = session()
    g = c.cmd("g")
    n = REGISTER_NUMBER["rbx"] * 16
    new = g[:n] + rsp.le_hex(0xDEADBEEF, 8) + g[n + 16:]
    assert c.cmd("G" + new) == "OK"
    assert cpu.regs["rbx"] == 0xDEADBEEF and cpu.regs["rax"] == 0x1122334455667788
    assert c.cmd("G00") == "E16"                       # wrong length


def test_p_and_P(session):
    c, cpu, _ = session()
    assert c.cmd("p%x" % REGISTER_NUMBER["cr3"]) == rsp.le_hex(0x2000, 8)
    assert c.cmd("p%x" % REGISTER_NUMBER["eflags"]) == "02000000"
    assert c.cmd("p%x" % REGISTER_NUMBER["xmm0"]) == "xx" * 16
    assert c.cmd("p%x" % len(REGISTERS)) == "E16"
    assert c.cmd("P%x=%s" % (REGISTER_NUMBER["r15"], rsp.le_hex(0x42, 8))) == "OK"
    assert cpu.regs["r15"] == 0x42
    assert c.cmd("P%x=%s" % (REGISTER_NUMBER["st0"], "00" * 10)) == "E16"   # unavailable
    assert c.cmd("P0=00") == "E16"                                         # wrong size


# -- memory ----------------------------------------------------------------------------------------------
def test_memory_read_write_and_faults(session):
    c, cpu, _ = session()
    assert c.cmd("m100000,4") == "00010203"
    assert c.cmd("M100000,2:aabb") == "OK"
    assert cpu.mem[0x100000][:2] == b"\xaa\xbb"
    assert c.cmd("m300000,4") == "E0e"
    assert c.cmd("m100ffe,4") == "feff"               # partial: up to the first unmapped byte
    assert c.cmd("M300000,1:00") == "E0e"
    assert c.cmd("M100000,2:aa") == "E16"             # length does not match the data
    assert c.cmd("mzz,4") == "E16"


def test_X_binary_write_with_every_escaped_byte(session):
    c, cpu, _ = session()
    data = bytes([0x23, 0x24, 0x7D, 0x2A, 0x03, 0x00, 0xFF])
    assert c.cmd(b"X100010,0:") == "OK"                  # gdb's probe
    assert c.cmd(b"X100010,%x:" % len(data) + rsp.escape(data)) == "OK"
    assert bytes(cpu.mem[0x100000][0x10:0x10 + len(data)]) == data
    assert c.cmd(b"X300000,1:A") == "E0e"


# -- breakpoints and running -------------------------------------------------------------------------------
def test_breakpoint_continue_step_and_exit(session):
    c, cpu, _ = session()
    c.cmd("qSupported:swbreak+;hwbreak+")
    assert c.cmd("?") == "T05thread:1;"
    assert c.cmd("Z0,100010,1") == "OK"
    assert c.cmd("c") == "T05swbreak:;thread:1;"
    assert cpu.regs["rip"] == 0x100010
    assert c.cmd("z0,100010,1") == "OK"
    assert c.cmd("vCont;s:1") == "T05thread:1;"
    assert cpu.regs["rip"] == 0x100014
    assert c.cmd("?") == "T05thread:1;"
    assert c.cmd("vCont;c") == "W03"
    assert cpu.resumes == [False, True, False]


def test_swbreak_only_when_gdb_announced_it(session):
    c, _, _ = session()
    c.cmd("qSupported:multiprocess+")
    c.cmd("Z0,100008,1")
    assert c.cmd("c") == "T05thread:1;"


def test_hardware_breakpoint_and_watchpoint_replies(session):
    c, cpu, _ = session()
    c.cmd("qSupported:swbreak+;hwbreak+")
    assert c.cmd("Z1,100008,1") == "OK"
    assert c.cmd("c") == "T05hwbreak:;thread:1;"
    assert c.cmd("z1,100008,1") == "OK"
    assert c.cmd("Z2,100800,4") == "OK"
    assert c.cmd("c") == "T05watch:100800;thread:1;"
    assert cpu.regs["rip"] == 0x100018                  # stopped after the writing instruction
    assert c.cmd("Z3,100800,4") == ""                   # the fake cannot watch reads: not supported
    assert c.cmd("Z9,100800,4") == ""


def test_access_watchpoint_reply_name(session):
    c, _, _ = session()
    c.cmd("Z4,100800,4")
    assert c.cmd("c") == "T05awatch:100800;thread:1;"


def test_continue_at_address_and_vcont_query(session):
    c, cpu, _ = session()
    assert c.cmd("vCont?") == "vCont;c;C;s;S"
    assert c.cmd("s100010") == "T05thread:1;"
    assert cpu.regs["rip"] == 0x100014
    assert c.cmd("S05;100004") == "T05thread:1;"         # signals are not delivered; address honoured
    assert cpu.regs["rip"] == 0x100008
    assert c.cmd("vCont;s:2") == "E16"                  # no such thread


def test_abnormal_end_is_an_X_reply_and_ends_the_session(session):
    c, cpu, srv = session(FakeCpu(list(SCRIPT), exit_code=None))
    assert bytes.fromhex(c.cmd("c")[1:]) == b"guest shutdown\n"     # the O packet first
    assert c.recv() == b"X09"
    assert c.cmd("c") == "X09"                          # still ended
    c.close()
    assert srv.join().reason == "ended"


def test_stop_message_is_shown_before_the_stop_reply(session):
    c, cpu, _ = session()
    cpu.break_exits.add("CPUID")
    c.send("c")
    out = c.recv()
    assert out.startswith(b"O") and bytes.fromhex(out[1:].decode()) == b"#VMEXIT CPUID at 0x100008\n"
    assert c.recv() == b"T05thread:1;"


def test_console_output_while_the_guest_runs(session):
    c, cpu, srv = session()
    real_resume = cpu.resume

    def resume(step):
        srv.server.stub.output("hello from the guest\n")
        return real_resume(step)
    cpu.resume = resume
    c.send("s")
    assert bytes.fromhex(c.recv()[1:].decode()) == b"hello from the guest\n"
    assert c.recv() == b"T05thread:1;"
    srv.server.stub.output("dropped: the guest is stopped")
    assert c.cmd("qC") == "QC1"


def test_resume_that_raises_reports_sigabrt_and_stays_attached(session):
    c, cpu, _ = session()
    cpu.resume = lambda step: 1 / 0
    c.send("c")
    assert b"ZeroDivisionError" in bytes.fromhex(c.recv()[1:].decode())
    assert c.recv() == b"T06thread:1;"
    assert c.cmd("qC") == "QC1"


def test_a_target_bug_is_an_error_reply_not_the_end_of_the_session(session):
    c, cpu, srv = session()

    def broken(name):
        raise RuntimeError("register file on fire")
    cpu.read_register = broken
    assert c.cmd("g") == "E01"
    assert str(srv.server.stub.last_error) == "register file on fire"
    assert c.cmd("m100000,1") == "00"


def test_keyboard_interrupt_in_the_stub_closes_the_connection(session):
    c, cpu, srv = session()

    def ctrl_c(name):
        raise KeyboardInterrupt
    cpu.read_register = ctrl_c
    c.send("g")
    with pytest.raises(KeyboardInterrupt):
        srv.join()
    with pytest.raises((EOFError, OSError)):
        c.next_event()


# -- interrupts -------------------------------------------------------------------------------------------------
def spinning() -> FakeCpu:
    return FakeCpu([Step(0x100000), Step(0x100004), Step(0x100008)], loop_to=1, slow=0.0005)


def test_interrupt_while_running(session):
    c, cpu, _ = session(spinning())
    c.send("c")
    deadline = time.monotonic() + 10
    while not cpu.resumes and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    c.send_raw(b"\x03")
    assert c.recv() == b"T02thread:1;"
    assert c.cmd("qC") == "QC1"                            # the session goes on
    assert c.cmd("s") == "T05thread:1;"                    # and the stop request was consumed


def test_interrupt_right_behind_the_continue_packet(session):
    # 0x03 can reach the stub before it starts the target: it must not be lost
    c, cpu, _ = session(spinning())
    c.send_raw(rsp.frame("c") + b"\x03")
    assert isinstance(c.next_event(), rsp.Ack)
    assert c.recv() == b"T02thread:1;"


def test_interrupt_while_stopped_is_ignored(session):
    c, _, _ = session()
    c.send_raw(b"\x03")
    assert c.cmd("qC") == "QC1"
    assert c.cmd("s") == "T05thread:1;"


# -- monitor -------------------------------------------------------------------------------------------------------
def monitor(c: RawClient, command: str) -> str:
    c.send("qRcmd," + rsp.hex_encode(command))
    out = b""
    while True:
        p = c.recv()
        if p.startswith(b"O") and p != b"OK":
            out += bytes.fromhex(p[1:].decode())
        else:
            assert p == b"OK"
            return out.decode()


def test_monitor_commands_route_to_the_target(session):
    c, cpu, _ = session()
    assert monitor(c, "npt 0x1000") == "GPA 0x1000 -> HPA 0x4001000\n"
    assert monitor(c, "break-exit cpuid") == "will stop at #VMEXIT CPUID\n"
    assert c.cmd("c").startswith("O")                  # the exit's message ...
    assert c.recv() == b"T05thread:1;"                 # ... then the stop
    assert monitor(c, "exits") == "CPUID 1\n"
    assert "walk GVA" in monitor(c, "help")
    assert monitor(c, "walk 0x1000") == "monitor walk: not available on this target\n"
    assert monitor(c, "frobnicate") == "unknown monitor command 'frobnicate'; 'monitor help' lists them\n"
    assert monitor(c, "break-exit") == "monitor break-exit: needs an exit name, e.g. CPUID\n"


def test_long_monitor_output_is_split_into_several_O_packets(session):
    c, cpu, _ = session()
    cpu.monitor_table.bind("long", lambda a: "x" * 5000, "long  much text")
    c.send("qRcmd," + rsp.hex_encode("long"))
    packets = []
    while (p := c.recv()) != b"OK":
        packets.append(p)
    assert len(packets) == 5 and all(p.startswith(b"O") for p in packets)
    assert b"".join(bytes.fromhex(p[1:].decode()) for p in packets) == b"x" * 5000 + b"\n"


def test_monitor_registry():
    reg = MonitorRegistry()
    assert set(STANDARD_MONITOR_COMMANDS) <= set(reg.names)
    assert set(STANDARD_MONITOR_COMMANDS) == {"break-exit", "vmcb", "exits", "npt", "walk"}

    @reg.command("npt")
    def npt(args):
        return f"{parse_int(args):#x}"
    assert reg.dispatch("npt 1000h") == "0x1000\n"
    assert reg.dispatch("  npt   4096 ") == "0x1000\n"
    assert reg.dispatch("npt zz") == "monitor npt: 'zz' is not a number\n"
    reg.bind("boom", lambda a: [][1])
    assert reg.dispatch("boom").startswith("monitor boom failed: IndexError")
    assert reg.dispatch("") == reg.help() == reg.dispatch("help")
    assert "boom" in reg.help()
    with pytest.raises(ValueError):
        reg.bind("two words", lambda a: "")
    assert MonitorRegistry(standard=False).names == []


# -- the session's end and the server ------------------------------------------------------------------------------
@pytest.mark.parametrize("packet, reason, reply", [("D", "detached", "OK"), ("D;1", "detached", "OK"),
                                                   ("k", "killed", None), ("vKill;1", "killed", "OK")])
def test_detach_and_kill(session, packet, reason, reply):
    c, _, srv = session()
    c.send(packet)
    if reply is not None:
        assert c.recv().decode() == reply
    result = srv.join()
    assert result.reason == reason
    with pytest.raises((EOFError, OSError)):
        c.next_event()


def test_disconnect(session):
    c, _, srv = session()
    c.cmd("qC")
    c.close()
    assert srv.join().reason == "disconnected"


def test_port_in_use_is_a_one_line_error():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(GdbStubError) as e:
            GdbServer(FakeCpu(list(SCRIPT)), "127.0.0.1", port)
    assert str(e.value) == f"gdb stub: 127.0.0.1:{port} is already in use; choose another port"


def test_nobody_connects():
    with pytest.raises(GdbStubError, match=r"no debugger connected to 127\.0\.0\.1:\d+ within 0.2 s"):
        serve(FakeCpu(list(SCRIPT)), port=0, accept_timeout=0.2)


def test_serve_reports_the_port_it_listens_on():
    seen = []
    done = []

    def connect(host, port):
        seen.append((host, port))
        def go():
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(rsp.frame("D"))
                s.recv(100)
        threading.Thread(target=go, daemon=True).start()

    done.append(serve(FakeCpu(list(SCRIPT)), port=0, accept_timeout=10, on_listening=connect))
    assert seen[0][0] == "127.0.0.1" and seen[0][1] > 0
    assert done[0].reason == "detached"


def test_stop_event_defaults():
    ev = StopEvent(StopKind.WATCHPOINT, addr=0x10, watch=BreakpointType.WRITE_WATCH)
    assert ev.exit_code is None and ev.message == ""
    with pytest.raises(MonitorError):
        parse_int("nope")
