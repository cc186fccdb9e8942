"""Multiboot (version 1) kernels: ELF32 images started the way GRUB or
QEMU's ``-kernel`` starts them.

This is the format of the kvm-unit-tests x86 binaries (``x86/*.flat``).  A
multiboot kernel carries a header in its first 8 KiB (magic 0x1BADB002,
flags, checksum; Multiboot Specification 0.6.96 §3.1.1) and is entered in
32-bit protected mode (§3.2, "Machine state"):

* EAX = 0x2BADB002, EBX = the guest-physical address of the multiboot
  information structure (§3.3);
* CS a 32-bit read/execute code segment, DS/ES/SS 32-bit read/write data
  segments, all with base 0 and limit 4 GiB (the loader's GDT at 0x1000:
  selector 0x08 code, 0x10 data);
* CR0.PE = 1, CR0.PG = 0, EFLAGS.IF = 0, EFER.LME = 0 (legacy mode, no paging):
  a guest-virtual address is the guest-physical one;
* ESP is left to the kernel (it is set to 0x7C00 here), no IDT.

The information structure gives ``mem_lower``/``mem_upper`` (flag bit 0), the
command line (bit 2: the kernel's path, a space, then the arguments, as QEMU's
``-kernel``/``-append`` build it), a memory map (bit 6) and the loader's name (bit 9); no
boot modules.  It sits in low memory at 0x9000, below the 640 KiB line and
outside every segment the kernel loads.

The kernel switches to long mode itself, under the hypervisor's VMCB and
nested page tables like any other guest.
"""
from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..svm.vmcb import Segment
from .image import GDT_BASE, Image, ImageError

if TYPE_CHECKING:
    from .machine import Machine

HEADER_MAGIC = 0x1BADB002
BOOT_MAGIC = 0x2BADB002            # EAX at entry
HEADER_SEARCH = 8192               # the header lies in the first 8 KiB, 32-bit aligned

# header flags this loader honours (bits 0-15 are "must understand", §3.1.2)
HF_PAGE_ALIGN = 1 << 0             # modules page-aligned: there are no modules
HF_MEMORY_INFO = 1 << 1            # mem_* fields: always given
HF_VIDEO_MODE = 1 << 2
HF_AOUT_KLUDGE = 1 << 16

# information structure flags (§3.3)
MBI_MEM = 1 << 0
MBI_CMDLINE = 1 << 2
MBI_MODS = 1 << 3
MBI_MMAP = 1 << 6
MBI_LOADER_NAME = 1 << 9

#: where the loader puts the information structure and what it points at
MBI_BASE = 0x9000
MBI_MMAP_AT = MBI_BASE + 0x80
MBI_NAME_AT = MBI_BASE + 0x100
MBI_CMDLINE_AT = MBI_BASE + 0x200
MBI_END = 0x10000                  # the loader's low area ends here; segments must start above it
CMDLINE_MAX = MBI_END - MBI_CMDLINE_AT - 1
LOADER_NAME = b"amdv-sandbox\x00"
LOW_MEM_END = 0x9FC00              # conventional memory, as a PC BIOS reports it (639 KiB)
HIGH_MEM = 0x100000
ENTRY_ESP = 0x7C00

#: the loader's GDT for a multiboot entry: null, flat 32-bit code, flat 32-bit data,
#: and the 64-bit code descriptor the long-mode loader uses
GDT32 = (0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF, 0x00AF9B000000FFFF)
CS32_SEL, DS32_SEL = 0x08, 0x10
#: VMCB attribute words (APM Table 15-... "segment attributes": type, S, DPL, P, AVL, L, D/B, G)
CS32_ATTRIB = 0xC9B                # code exec/read accessed, S, P, D, G
DS32_ATTRIB = 0xC93                # data read/write accessed, S, P, B, G


def find_header(data: bytes) -> tuple[int, int] | None:
    """(offset, flags) of a valid multiboot header in ``data``, or None."""
    end = min(len(data), HEADER_SEARCH) - 12
    for off in range(0, end + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off, flags
    return None


def is_multiboot(path: str | Path) -> bool:
    """True when ``path`` is an ELF32 file with a multiboot header (the CLI's
    cheap probe to pick the platform and memory sizes before loading)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SEARCH)
    except OSError:
        return False
    return head[:4] == b"\x7fELF" and len(head) > 4 and head[4] == 1 and find_header(head) is not None


def load_multiboot(p: Path, data: bytes, ram_size: int) -> Image:
    """Parse an ELF32 multiboot kernel into an :class:`Image` (kind ``multiboot``)."""
    hdr = find_header(data)
    if hdr is None:
        raise ImageError(f"{p}: ELF32 file without a multiboot header (only multiboot kernels are "
                         "loaded from ELF32 files)")
    _, flags = hdr
    if flags & HF_AOUT_KLUDGE:
        raise ImageError(f"{p}: multiboot header asks for the a.out address fields (flag 16); "
                         "only ELF kernels are supported")
    unknown = flags & 0xFFFF & ~(HF_PAGE_ALIGN | HF_MEMORY_INFO)
    if unknown:
        what = "video mode information (flag 2)" if unknown & HF_VIDEO_MODE else f"flags {unknown:#x}"
        raise ImageError(f"{p}: multiboot header requires {what}, which this loader does not provide")
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf["e_machine"] not in ("EM_386", "EM_X86_64"):
            raise ImageError(f"{p}: multiboot ELF32 file for {elf['e_machine']}, not x86")
        segs = []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            addr = seg["p_paddr"]
            body = seg.data() + bytes(max(0, seg["p_memsz"] - seg["p_filesz"]))
            if addr < MBI_END or addr + len(body) > ram_size:
                raise ImageError(f"{p}: PT_LOAD at {addr:#x}+{len(body):#x} does not fit in guest RAM "
                                 f"[{MBI_END:#x}, {ram_size:#x}) (use a larger --ram)")
            segs.append((addr, body))
        if not segs:
            raise ImageError(f"{p}: ELF file has no PT_LOAD segments")
        entry = elf["e_entry"]
    except (ELFError, ValueError, KeyError, IndexError, struct.error) as e:
        raise ImageError(f"{p}: malformed or truncated ELF file ({e})") from None
    if not any(a <= entry < a + len(b) for a, b in segs):
        raise ImageError(f"{p}: entry point {entry:#x} is outside the loaded segments")
    return Image(str(p), segs, entry, "multiboot")


def info_structure(ram_size: int, cmdline: bytes) -> list[tuple[int, bytes]]:
    """The multiboot information structure and what it points at, as
    (guest-physical address, bytes) pieces (Multiboot Specification §3.3)."""
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, typ) for base, length, typ in (
        (0, LOW_MEM_END, 1),                          # conventional memory
        (LOW_MEM_END, 0xA0000 - LOW_MEM_END, 2),      # EBDA, reserved
        (0xF0000, 0x10000, 2),                        # BIOS area, reserved
        (HIGH_MEM, ram_size - HIGH_MEM, 1)))
    mbi = bytearray(0x58)
    struct.pack_into("<IIIII", mbi, 0, MBI_MEM | MBI_CMDLINE | MBI_MMAP | MBI_LOADER_NAME,
                     LOW_MEM_END >> 10, (ram_size - HIGH_MEM) >> 10, 0xFFFFFFFF, MBI_CMDLINE_AT)
    struct.pack_into("<II", mbi, 44, len(mmap), MBI_MMAP_AT)
    struct.pack_into("<I", mbi, 64, MBI_NAME_AT)
    return [(MBI_BASE, bytes(mbi)), (MBI_MMAP_AT, mmap), (MBI_NAME_AT, LOADER_NAME),
            (MBI_CMDLINE_AT, cmdline + b"\x00")]


def boot(m: "Machine", image: Image, cmdline: str = "") -> None:
    """Load ``image`` into the machine's current guest and set its VMCB (and
    EBX, which lives in the processor) to the multiboot machine state."""
    if m.shadow is not None:
        raise ImageError(f"{image.path}: a multiboot kernel starts with paging off, which the shadow "
                         "MMU does not model; use nested paging")
    guest = m.guest
    # the kernel's path is the first word, as QEMU's multiboot loader (and GRUB) pass it:
    # kvm-unit-tests takes it as argv[0]
    raw = f"{image.path} {cmdline}".encode("utf-8")
    if len(raw) > CMDLINE_MAX or b"\x00" in raw:
        raise ImageError(f"{image.path}: the command line must be at most {CMDLINE_MAX} bytes without NUL")
    for gpa, data in image.segments:
        guest.write_phys(gpa, data)
    guest.write_phys(GDT_BASE, struct.pack(f"<{len(GDT32)}Q", *GDT32))
    for gpa, data in info_structure(guest.ram_size, raw):
        guest.write_phys(gpa, data)
    v = guest.vmcb
    v.set_seg("CS", Segment(CS32_SEL, CS32_ATTRIB, 0xFFFFFFFF, 0))
    for s in ("SS", "DS", "ES"):
        v.set_seg(s, Segment(DS32_SEL, DS32_ATTRIB, 0xFFFFFFFF, 0))
    v.set_seg("GDTR", Segment(0, 0, len(GDT32) * 8 - 1, GDT_BASE))
    v.set_seg("IDTR", Segment(0, 0, 0, 0))
    v.CR0 = 0x0000_0011          # PE ET; PG = 0
    v.CR3 = 0
    v.CR4 = 0
    v.EFER = 0x1000              # SVME only: legacy protected mode
    v.RFLAGS = 0x2
    v.RIP = image.entry
    v.RSP = ENTRY_ESP
    v.RAX = BOOT_MAGIC
    v.CPL = 0
    v.DR6 = 0xFFFF0FF0
    v.DR7 = 0x400
    m.regs.rbx = MBI_BASE
    if getattr(m, "platform", None) is not None and hasattr(m.platform, "set_cmdline"):
        m.platform.set_cmdline(cmdline)          # fw_cfg's copy of the command line
