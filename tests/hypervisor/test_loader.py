"""Guest image loading (sandbox.hypervisor.loader): malformed images give ImageError
with a message that names the file and the problem; a hand-built ELF64
(System V gABI / x86-64 psABI layout, built with struct) loads and runs."""
from __future__ import annotations

import os
import struct

import pytest

from sandbox.hypervisor.loader import ImageError, load_image, strip_comment

from conftest import assemble, hc_exit, new_machine

RAM = 2 << 20
EM_X86_64, EM_386, EM_AARCH64 = 62, 3, 183
PT_LOAD, PT_NOTE = 1, 4


def elf64(segments, entry, machine=EM_X86_64, cls=2, data=1, etype=2) -> bytes:
    """ELF header (64 bytes) + program headers (56 bytes each) + segment bodies.
    ``segments`` = [(p_type, paddr, body, memsz)]."""
    phoff = 64
    off = phoff + 56 * len(segments)
    phdrs, bodies = b"", b""
    for ptype, paddr, body, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", ptype, 5, off + len(bodies), paddr, paddr, len(body), memsz, 0x1000)
        bodies += body
    ident = b"\x7fELF" + bytes([cls, data, 1, 0]) + bytes(8)
    hdr = ident + struct.pack("<HHIQQQIHHHHHH", etype, machine, 1, entry, phoff, 0, 0, 64, 56,
                              len(segments), 64, 0, 0)
    assert len(hdr) == 64
    return hdr + phdrs + bodies


def write(tmp_path, name, data):
    p = tmp_path / name
    if isinstance(data, str):
        p.write_text(data)
    else:
        p.write_bytes(data)
    return p


def load_err(path) -> str:
    with pytest.raises(ImageError) as ei:
        load_image(path, RAM)
    msg = str(ei.value)
    assert path.name in msg, msg
    return msg.lower()


# ============================================================ malformed images
def test_missing_file(tmp_path):
    assert "no such file" in load_err(tmp_path / "nope.S")


def test_directory(tmp_path):
    d = tmp_path / "dir.S"
    d.mkdir()
    assert "directory" in load_err(d)


@pytest.mark.parametrize("name", ["empty.S", "empty.asm"])
def test_empty_assembly(tmp_path, name):
    msg = load_err(write(tmp_path, name, ""))
    assert "nothing" in msg or "empty" in msg


def test_comment_only_assembly(tmp_path):
    msg = load_err(write(tmp_path, "c.S", "# only a comment\n// and another\n"))
    assert "nothing" in msg or "empty" in msg


def test_empty_flat_binary(tmp_path):
    assert "empty" in load_err(write(tmp_path, "e.bin", b""))


@pytest.mark.parametrize("src", ["mov rax, rbx, rcx", "this is not x86", "jmp nowhere_label", "pop 5", ".byte 0x100"])
def test_bad_assembly(tmp_path, src):
    assert "assemble" in load_err(write(tmp_path, "bad.S", src + "\n"))


def test_assembly_not_utf8(tmp_path):
    assert "utf-8" in load_err(write(tmp_path, "latin.S", b"nop \xff\xfe\n"))


@pytest.mark.parametrize("name", ["guest.txt", "guest.exe", "guest"])
def test_unknown_extension(tmp_path, name):
    msg = load_err(write(tmp_path, name, b"\x90\x90"))
    assert "unknown image type" in msg and ".s" in msg


def test_flat_binary_too_big(tmp_path):
    msg = load_err(write(tmp_path, "big.bin", bytes(RAM - 0x100000 + 1)))
    assert "do not fit" in msg or "guest ram" in msg


GOOD = assemble(hc_exit(42), 0x200000)


@pytest.mark.parametrize("cut", [4, 20, 63, 64 + 30])
def test_truncated_elf(tmp_path, cut):
    data = elf64([(PT_LOAD, 0x200000, GOOD, len(GOOD))], 0x200000)[:cut]
    assert "elf" in load_err(write(tmp_path, "trunc.elf", data))


def test_truncated_elf_segment_body(tmp_path):
    data = elf64([(PT_LOAD, 0x200000, GOOD, len(GOOD))], 0x200000)
    load_err(write(tmp_path, "short.elf", data[:-4]))


@pytest.mark.parametrize("machine", [EM_386, EM_AARCH64])
def test_elf_for_another_machine(tmp_path, machine):
    data = elf64([(PT_LOAD, 0x200000, GOOD, len(GOOD))], 0x200000, machine=machine)
    assert "x86-64" in load_err(write(tmp_path, "other.elf", data))


def test_elf32(tmp_path):
    hdr = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8) + struct.pack("<HHIIIIIHHHHHH", 2, EM_386, 1, 0x200000,
                                                                     52, 0, 0, 52, 32, 0, 40, 0, 0)
    msg = load_err(write(tmp_path, "e32.elf", hdr))
    assert "elf64" in msg or "x86-64" in msg or "elf" in msg


def test_elf_without_pt_load(tmp_path):
    data = elf64([(PT_NOTE, 0x200000, b"abcd", 4)], 0x200000)
    assert "pt_load" in load_err(write(tmp_path, "noload.elf", data))


@pytest.mark.parametrize("addr", [0x0, 0x1000, RAM - 4, RAM + 0x1000])
def test_elf_segment_outside_ram(tmp_path, addr):
    data = elf64([(PT_LOAD, addr, GOOD, len(GOOD))], addr)
    assert "outside guest ram" in load_err(write(tmp_path, "out.elf", data))


def test_machine_load_raises_image_error(tmp_path):
    m = new_machine(RAM)
    with pytest.raises(ImageError):
        m.load(str(write(tmp_path, "bad.S", "not an instruction\n")))


# ============================================================ good images
def test_minimal_elf64_loads_and_runs(tmp_path):
    entry = 0x200000
    code = assemble(hc_exit(42), entry)
    p = write(tmp_path, "min.elf", elf64([(PT_LOAD, entry, code, len(code))], entry))
    img = load_image(p, 16 << 20)
    assert img.entry == entry and img.segments == [(entry, code)] and img.kind == "elf"
    m = new_machine(4 << 20)
    m.load(str(p))
    assert m.guest.vmcb.RIP == entry
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == 42


def test_elf64_with_data_and_bss(tmp_path):
    """Two PT_LOADs: code, and data with p_memsz > p_filesz (zero-filled .bss)."""
    entry, data_at = 0x200000, 0x210000
    code = assemble(f"mov rbx, {data_at:#x}\nmov edi, [rbx]\nadd edi, [rbx+4]\nadd edi, [rbx+8]\n"
                    f"xor eax, eax\n.byte 0x0f,0x01,0xd9", entry)
    data = struct.pack("<II", 1000, 234)
    m = new_machine(4 << 20)
    # dirty the .bss area first: the loader must zero it
    m.guest.write_phys(data_at + 8, b"\xff" * 8)
    p = write(tmp_path, "two.elf", elf64([(PT_LOAD, entry, code, len(code)),
                                          (PT_LOAD, data_at, data, 0x20)], entry))
    m.load(str(p))
    assert m.guest.read_phys(data_at, 0x20) == data + bytes(0x18)
    r = m.run(timeout=5)
    assert r.exit_code == 1234


def test_elf_is_recognised_by_magic_whatever_the_extension(tmp_path):
    entry = 0x200000
    code = assemble(hc_exit(7), entry)
    p = write(tmp_path, "kernel.bin", elf64([(PT_LOAD, entry, code, len(code))], entry))
    assert load_image(p, 16 << 20).kind == "elf"


def test_flat_binary_loads_at_1mib(tmp_path):
    code = assemble(hc_exit(9), 0x100000)
    p = write(tmp_path, "flat.bin", code)
    img = load_image(p, RAM)
    assert (img.entry, img.segments, img.kind) == (0x100000, [(0x100000, code)], "flat")
    m = new_machine(RAM)
    m.load(str(p))
    assert m.run(timeout=5).exit_code == 9


def test_asm_extension_and_comments(tmp_path):
    src = "# a comment\nmov edi, 5 # trailing\nxor eax, eax // c++ style\n.byte 0x0f,0x01,0xd9\n"
    p = write(tmp_path, "g.asm", src)
    m = new_machine(RAM)
    m.load(str(p))
    assert m.run(timeout=5).exit_code == 5


@pytest.mark.parametrize("line,out", [
    ("mov eax, 1 # c", "mov eax, 1"),
    ("mov eax, 1 // c", "mov eax, 1"),
    ('.ascii "a#b" # c', '.ascii "a#b"'),
    ('.ascii "x//y"', '.ascii "x//y"'),
    (".byte '#' # c", ".byte '#'"),
    ("nop", "nop"),
    ("# whole line", ""),
])
def test_strip_comment(line, out):
    assert strip_comment(line) == out


def test_entry_state(tmp_path):
    """The documented entry state (loader docstring): CS 0x08 / DS 0x10 selectors,
    CR3 0x2000, RSP 0x90000, RFLAGS 0x2, long mode with paging."""
    m = new_machine(RAM)
    m.load(str(write(tmp_path, "s.S", "xor eax, eax\nmov ax, cs\nmov r8, rax\nmov ax, ds\nmov r9, rax\n"
                                      "mov r10, cr3\nmov r11, rsp\n" + hc_exit(0))))
    v = m.guest.vmcb
    assert (v.RIP, v.RSP, v.RFLAGS, v.CR3, v.CPL) == (0x100000, 0x90000, 0x2, 0x2000, 0)
    assert v.CR0 & 0x8000_0001 == 0x8000_0001 and v.CR4 & 0x20 and v.EFER & 0x500 == 0x500
    r = m.run(timeout=5)
    assert (r.regs["r8"], r.regs["r9"], r.regs["r10"], r.regs["r11"]) == (0x08, 0x10, 0x2000, 0x90000)


def test_keystone_crash_is_a_clear_error(tmp_path):
    """LLVM inside keystone aborts the process on a high-byte register next to a
    REX prefix; the loader assembles in a child and reports it."""
    from sandbox.hypervisor.loader import ImageError, load_image
    p = tmp_path / "bad.S"
    p.write_text("mov dh, byte ptr [r12]\n")
    with pytest.raises(ImageError, match="keystone crashed"):
        load_image(p, 2 << 20)


def test_assembly_in_a_threaded_process_does_not_fork(tmp_path):
    """A process with other threads (Ray's gRPC threads, a host application's) must
    not fork: a lock held by another thread stays held in the child forever.  With a
    thread running, the loader assembles in a fresh interpreter -- same bytes, and a
    keystone abort is still a clear error."""
    import threading
    from sandbox.hypervisor.loader import ImageError, assemble
    quiet = assemble("cpuid\nmov rax, 0x1234\nvmmcall\n")
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    forks = []
    real_fork = os.fork
    os.fork = lambda: forks.append(1) or real_fork()      # noqa: E731
    try:
        assert assemble("cpuid\nmov rax, 0x1234\nvmmcall\n") == quiet
        with pytest.raises(ImageError, match="keystone crashed"):
            assemble("mov dh, byte ptr [r12]\n")
    finally:
        os.fork = real_fork
        stop.set()
        t.join()
    assert forks == []


def test_guest_physical_and_virtual_copies_span_pages_exactly():
    """write_phys/read_phys and write_virt/read_virt go page by page through the
    mappings: a multi-megabyte blob at an unaligned address (a kernel image) comes
    back byte for byte, whatever buffer type it was given as."""
    import os

    from sandbox import Machine
    m = Machine(dram=48 << 20, ram=16 << 20)
    m.guest.setup_long_mode(0x100000)
    blob = os.urandom((3 << 20) + 123)
    for data in (blob, bytearray(blob), memoryview(blob)):
        m.guest.write_phys(0x400000 + 5, data)
        assert m.guest.read_phys(0x400000 + 5, len(blob)) == blob
    assert m.guest.read_phys(0x400000 + 5, 0) == b""
    small = os.urandom(3 * 4096)
    m.write_virt(0x600000 - 7, small)                       # through the guest's own tables
    assert m.read_virt(0x600000 - 7, len(small)) == small
