"""Guest images and the documented entry state.

Formats: ``.S`` / ``.asm`` (Intel-syntax assembly, assembled by keystone at
load), ``.bin`` (a flat binary), and freestanding ELF64 (``PT_LOAD``
segments at their physical addresses, entry at ``e_entry``).

Entry state (what every image can rely on):

* 64-bit long mode, CPL 0: CS = 0x08 (64-bit code), SS = DS = ES = 0x10;
  the loader's GDT sits at guest-physical 0x1000.
* Identity page tables for guest-physical [0, RAM) with 4 KiB pages,
  supervisor read/write/execute, rooted at CR3 = 0x2000; CR0.PG/PE/WP,
  CR4.PAE, EFER.LME/LMA/NXE set.
* RIP = the entry point (0x100000 for ``.S``/``.bin``), RSP = 0x90000,
  RFLAGS = 0x2, IDTR limit 0 (no IDT until the guest loads one).
"""
from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from keystone import KS_ARCH_X86, KS_MODE_64, Ks, KsError

from .image import LOAD_BASE, Image, ImageError
from .multiboot import load_multiboot



def strip_comment(line: str) -> str:
    """Drop a ``#`` or ``//`` comment, leaving quoted strings intact."""
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "#" or line.startswith("//", i):
            return line[:i].rstrip()
        i += 1
    return line


def _keystone(text: str, base: int) -> bytes:
    enc, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm(text, base)
    return bytes(enc or b"")


def _keystone_isolated(text: str, base: int) -> tuple[str, bytes | str]:
    """Keystone in a child process: some inputs (a high-byte register next to a
    REX prefix, ``mov dh, [r12]``) make LLVM inside keystone abort the whole
    process, which a loader must turn into an error, not a crash.  The child is
    forked when this process has a single thread; a process with others (Ray's
    gRPC threads, a host application's) could leave a lock held in a forked
    child forever, so there a fresh interpreter does it."""
    if _single_threaded():
        return _keystone_forked(text, base)
    return _keystone_spawned(text, base)


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _keystone_forked(text: str, base: int) -> tuple[str, bytes | str]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # child: assemble, report, leave at once
        os.close(r)
        try:
            try:
                out = ("ok", _keystone(text, base))
            except KsError as e:
                out = ("error", str(e))
            with os.fdopen(w, "wb") as f:
                pickle.dump(out, f)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        why = f"signal {signal.Signals(sig).name}" if sig else f"status {os.waitstatus_to_exitcode(status)}"
        return ("crash", why)
    return pickle.loads(data)


_CHILD = """\
import pickle, sys
from keystone import KS_ARCH_X86, KS_MODE_64, Ks, KsError
text, base = pickle.load(sys.stdin.buffer)
try:
    enc, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm(text, base)
    out = ("ok", bytes(enc or b""))
except KsError as e:
    out = ("error", str(e))
pickle.dump(out, sys.stdout.buffer)
"""


def _keystone_spawned(text: str, base: int) -> tuple[str, bytes | str]:
    p = subprocess.run([sys.executable, "-c", _CHILD], input=pickle.dumps((text, base)),
                       capture_output=True, check=False)
    if p.returncode != 0 or not p.stdout:
        why = (f"signal {signal.Signals(-p.returncode).name}" if p.returncode < 0
               else f"status {p.returncode}")
        return ("crash", why)
    return pickle.loads(p.stdout)


def assemble(source: str, base: int = LOAD_BASE, name: str = "<asm>") -> bytes:
    text = "\n".join(strip_comment(line) for line in source.splitlines())
    if hasattr(os, "fork"):
        res = _keystone_isolated(text, base)
        if res[0] == "crash":
            raise ImageError(f"{name}: keystone crashed assembling it ({res[1]}); an instruction it "
                             "cannot encode, e.g. AH/BH/CH/DH with a REX register such as R8-R15") from None
        if res[0] == "error":
            raise ImageError(f"{name}: keystone cannot assemble it: {res[1]}") from None
        enc = res[1]
    else:
        try:
            enc = _keystone(text, base)
        except KsError as e:
            raise ImageError(f"{name}: keystone cannot assemble it: {e}") from None
    if not enc:
        raise ImageError(f"{name}: assembles to nothing")
    return enc


def load_image(path: str | Path, ram_size: int) -> Image:
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    if p.is_dir():
        raise ImageError(f"{p}: is a directory, not a guest image")
    data = p.read_bytes()
    suffix = p.suffix.lower()
    if data[:4] == b"\x7fELF":
        if data[4:5] == b"\x01":                  # ELFCLASS32: a multiboot kernel
            return load_multiboot(p, data, ram_size)
        return _load_elf(p, data, ram_size)
    if suffix in (".s", ".asm"):
        try:
            src = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ImageError(f"{p}: assembly source is not UTF-8 text") from None
        blob = assemble(src, LOAD_BASE, str(p))
        kind = "asm"
    elif suffix in (".bin", ".img", ".raw"):
        blob = data
        kind = "flat"
    else:
        raise ImageError(f"{p}: unknown image type {suffix or '(none)'}; expected .S, .asm, .bin or an ELF64 file")
    if not blob:
        raise ImageError(f"{p}: image is empty")
    if LOAD_BASE + len(blob) > ram_size:
        raise ImageError(f"{p}: {len(blob)} bytes do not fit in guest RAM at {LOAD_BASE:#x}")
    return Image(str(p), [(LOAD_BASE, blob)], LOAD_BASE, kind)


def _load_elf(p: Path, data: bytes, ram_size: int) -> Image:
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise ImageError(f"{p}: not an x86-64 ELF64 file ({elf['e_machine']}, ELF{elf.elfclass})")
        if elf["e_type"] != "ET_EXEC" or any(seg["p_type"] in ("PT_INTERP", "PT_DYNAMIC")
                                             for seg in elf.iter_segments()):
            raise ImageError(f"{p}: a {elf['e_type']} (PIE, shared or dynamically linked) ELF file; only static, "
                             "non-PIE ELF64 executables (ET_EXEC, linked at their guest-physical address) are supported")
        segs = []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            addr = seg["p_paddr"] or seg["p_vaddr"]
            size = max(seg["p_memsz"], seg["p_filesz"])
            if addr < 0x10000 or addr + size > ram_size:          # before any of it is allocated
                raise ImageError(f"{p}: PT_LOAD at {addr:#x}+{size:#x} is outside guest RAM "
                                 f"[0x10000, {ram_size:#x})")
            if seg["p_offset"] + seg["p_filesz"] > len(data):
                raise ImageError(f"{p}: PT_LOAD at {addr:#x} needs file bytes {seg['p_offset']:#x}+"
                                 f"{seg['p_filesz']:#x}, past the end of the {len(data)}-byte file (truncated?)")
            body = seg.data() + bytes(max(0, seg["p_memsz"] - seg["p_filesz"]))
            segs.append((addr, body))
        if not segs:
            raise ImageError(f"{p}: ELF file has no PT_LOAD segments")
        entry = elf["e_entry"]
    except (ELFError, ValueError, KeyError, IndexError) as e:
        raise ImageError(f"{p}: malformed or truncated ELF file ({e})") from None
    return Image(str(p), segs, entry, "elf")
