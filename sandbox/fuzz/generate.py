"""Case generators: random bytes, grammar-based streams over :data:`table.TABLE`,
self-modifying sequences, corpus mutation, and random VMCB configurations.

All randomness flows from one :class:`random.Random`, so a campaign seed
reproduces every case.
"""
from __future__ import annotations

import random

from .case import CODE_BASE, CODE_WINDOW, DATA_BASE, Case, VmcbConfig
from .table import LEGACY, TABLE, Bits, Uniform, draw_filler, below, filler, pick

#: the EXIT hypercall (xor eax, eax; xor edi, edi; VMMCALL) that ends a well-formed case
TERMINATOR = b"\x31\xc0\x31\xff\x0f\x01\xd9"
PAGE = 0x1000

INTERESTING_PORTS = (0x20, 0x60, 0x61, 0x64, 0x70, 0x71, 0x7F, 0x80, 0xF8, 0xFF, 0x1F0, 0x3F8, 0x3FD, 0x7FF,
                     0xCF8, 0xCFC, 0xFFFE, 0xFFFF)
INTERESTING_MSRS = (0x10, 0x1B, 0x174, 0x175, 0x176, 0x277, 0xC000_0080, 0xC000_0081, 0xC000_0082,
                    0xC000_0100, 0xC000_0101, 0xC000_0102, 0xC000_0103, 0xC001_0117, 0xC001_0131, 0x1FFF,
                    0xC000_1FFF, 0xC001_1FFF)
MSR_VALUES = INTERESTING_MSRS + (0x2000, 0x4000_0000, 0xC000_2000, 0xC001_2000, 0xFFFF_FFFF)
NPT_TARGETS = (DATA_BASE, CODE_BASE, CODE_BASE + PAGE, 0x8F000, 0x2000)


#: ``random_regs``'s candidates before the values drawn for each case
_RAX = (0, 1, 7, 0x8000_0000, 0x4000_0000, DATA_BASE)
_RCX = MSR_VALUES + (0, 1, 3, 0x10000)
#: data-page pointers for ``below(0x100)``
_DATA_PTRS = tuple(DATA_BASE + 8 * i for i in range(0x100))


def random_regs(rng: random.Random) -> dict[str, int]:
    bits = rng.getrandbits
    regs = {}
    for n in ("rbx", "rsi", "rdi", "rbp"):
        i = bits(9)                                  # below(0x100)
        while i >= 0x100:
            i = bits(9)
        regs[n] = _DATA_PTRS[i]
    v = bits(64)
    i = bits(3)                                      # pick of _RAX and v
    while i >= 7:
        i = bits(3)
    regs["rax"] = _RAX[i] if i < 6 else v
    v = bits(32)
    i = bits(5)                                      # pick of _RCX and v
    while i >= 28:
        i = bits(5)
    regs["rcx"] = _RCX[i] if i < 27 else v
    v16, v64 = bits(16), bits(64)
    i = bits(5)                                      # pick of the ports, v16 and v64
    while i >= 20:
        i = bits(5)
    regs["rdx"] = INTERESTING_PORTS[i] if i < 18 else (v16 if i == 18 else v64)
    return regs


#: the intercept bits ``random_config`` draws, each with its probability, in draw order
_CR_BITS = tuple(1 << (base + n) for n in (0, 3, 4, 8) for base in (0, 16))          # CR reads and writes
_DR_BITS = tuple(1 << (base + n) for n in range(8) for base in (0, 16))              # DR reads and writes
_EXCP_BITS = tuple(1 << v for v in range(32))                                        # exception bitmap
_MISC1_BITS = tuple(1 << b for b in range(5, 31))      # misc1 (external events 0-4 left clear)
_MISC2_BITS = tuple(1 << b for b in range(1, 15))


def random_config(rng: random.Random) -> VmcbConfig:
    """Random intercept vectors, IOPM/MSRPM bits, exception bitmap, nested permissions."""
    r = rng.random
    w = [0] * 6
    w[0] = sum([m for m in _CR_BITS if r() < 0.3])
    w[1] = sum([m for m in _DR_BITS if r() < 0.15])
    w[2] = sum([m for m in _EXCP_BITS if r() < 0.12])
    w[3] = sum([m for m in _MISC1_BITS if r() < 0.45])
    if r() < 0.9:
        w[3] |= 1 << 31                              # SHUTDOWN
    w[4] = sum([m for m in _MISC2_BITS if r() < 0.45])
    if r() < 0.98:
        w[4] |= 1                                    # VMRUN (clear: VMEXIT_INVALID, APM §15.5.1)
    if r() < 0.7:
        w[4] |= 1 << 1                               # VMMCALL: the terminator's exit
    if r() < 0.5:
        w[5] |= 1 << 2                               # INVPCID
    ports: set[int] = set()
    for _ in range(below(rng, 8)):
        p = pick(rng, INTERESTING_PORTS + (below(rng, 0x10000),))
        ports.add(min(0x10002, p + pick(rng, (0, 0, 1, 2, 3))))
    if r() < 0.1:
        ports.update(range(0x10000, 0x10003))
    msrs = []
    for _ in range(below(rng, 6)):
        m = pick(rng, INTERESTING_MSRS)
        msrs.append((m, r() < 0.6, r() < 0.6))
    npt = []
    if r() < 0.12:
        g = pick(rng, NPT_TARGETS)
        npt.append((g, r() < 0.8, r() < 0.5, r() < 0.7))
    return VmcbConfig(w, sorted(ports), msrs, npt)


#: per template: its fixed bytes (None: drawn by its ``draw``), its prefixes as one-byte
#: strings with ``below(len)``'s bit count, and whether a REX prefix may precede it
_SENSITIVE = tuple((t.draw if isinstance(t.draw, bytes) else None, t.draw, tuple(bytes([p]) for p in t.prefixes),
                    len(t.prefixes), len(t.prefixes).bit_length(), t.rex) for t in TABLE)
_N_TABLE, _K_TABLE = len(TABLE), len(TABLE).bit_length()
_PREFIX_COUNT = (0, 0, 0, 1, 1, 2, 3)
_REX = tuple(bytes([0x40 | i]) for i in range(16))


def sensitive(rng: random.Random) -> bytes:
    """A table instruction with its prefixes."""
    return _sensitive(rng.getrandbits, rng.random)


def _sensitive(bits: Bits, rand: Uniform) -> bytes:
    """:func:`sensitive` from the generator's bound methods.  The draws: the
    template (``pick(TABLE)``), its encoding, then up to three of its legacy
    prefixes (how many: ``pick((0, 0, 0, 1, 1, 2, 3))``) and, where REX is
    legal, one REX prefix a quarter of the time (``below(16)``)."""
    i = bits(_K_TABLE)
    while i >= _N_TABLE:
        i = bits(_K_TABLE)
    body, draw, prefixes, n, k, rex = _SENSITIVE[i]
    if body is None:
        body = draw(bits, rand)
    pre = b""
    if n:
        c = bits(3)                                  # pick(_PREFIX_COUNT)
        while c == 7:
            c = bits(3)
        for _ in range(_PREFIX_COUNT[c]):
            j = bits(k)                              # pick(t.prefixes)
            while j >= n:
                j = bits(k)
            pre += prefixes[j]
    if rex and rand() < 0.25:
        j = bits(5)                                  # below(16)
        while j >= 16:
            j = bits(5)
        pre += _REX[j]
    return pre + body if pre else body


def _place(rng: random.Random, code: bytes, straddle_at: int | None = None) -> int:
    """An offset in the code window: random alignment, or chosen so the byte at
    ``straddle_at`` in ``code`` lands just before the page boundary."""
    room = CODE_WINDOW - len(code)
    if room < 0:
        raise ValueError("case too large for the code window")
    if straddle_at is not None and rng.random() < 0.5:
        off = PAGE - straddle_at - rng.randrange(1, 4)
        if 0 <= off <= room:
            return off
    return rng.randrange(0, room + 1)


def gen_random_bytes(rng: random.Random, n: int = 64) -> Case:
    code = rng.randbytes(rng.randrange(1, n * 3)) + TERMINATOR
    return Case(code, _place(rng, code), random_config(rng), random_regs(rng), "random-bytes")


def gen_grammar(rng: random.Random, n: int = 64) -> Case:
    parts: list[bytes] = []
    straddle = None
    bits, r = rng.getrandbits, rng.random
    for i in range(n):
        if r() < 0.3:
            if straddle is None and r() < 0.2:
                straddle = sum(map(len, parts)) + 1
            parts.append(_sensitive(bits, r))
        else:
            parts.append(draw_filler(bits, r))
    code = b"".join(parts) + TERMINATOR
    return Case(code, _place(rng, code, straddle), random_config(rng), random_regs(rng), "grammar")


def _smc_jump(rng: random.Random) -> bytes:
    """``mov rax, imm64; lea rdi, [rip+target]; mov [rdi], rax; jmp target; target: 8 x NOP``."""
    body = sensitive(rng)[:8]
    imm = body.ljust(8, b"\x90")
    # lea's disp32 is relative to the next instruction: mov [rdi], rax (3) + jmp (2) -> target
    return b"\x48\xb8" + imm + b"\x48\x8d\x3d" + (5).to_bytes(4, "little") + b"\x48\x89\x07" + b"\xeb\x00" + b"\x90" * 8


SLED = 32
STORE_WIDTHS = (1, 2, 4, 8, 8, 8, 16, "movsb")


def _store(width: int, disp: int, chunk: bytes) -> bytes:
    """Store ``chunk`` (``width`` bytes) at [rdi + disp32] (clobbers RAX, RDX, XMM0, XMM1)."""
    d = disp.to_bytes(4, "little", signed=True)
    v = int.from_bytes(chunk, "little")
    if width == 1:
        return b"\xb0" + chunk + b"\x88\x87" + d                               # mov al, ib; mov [rdi+d], al
    if width == 2:
        return b"\x66\xb8" + chunk + b"\x66\x89\x87" + d                       # mov ax, iw; mov [rdi+d], ax
    if width == 4:
        return b"\xb8" + chunk + b"\x89\x87" + d                               # mov eax, id; mov [rdi+d], eax
    if width == 8:
        return b"\x48\xb8" + chunk + b"\x48\x89\x87" + d                       # mov rax, iq; mov [rdi+d], rax
    # movq xmm0, rax; movq xmm1, rdx; punpcklqdq xmm0, xmm1; movdqu [rdi+d], xmm0
    return (b"\x48\xb8" + (v & (2**64 - 1)).to_bytes(8, "little") + b"\x48\xba" + (v >> 64).to_bytes(8, "little")
            + b"\x66\x48\x0f\x6e\xc0\x66\x48\x0f\x6e\xca\x66\x0f\x6c\xc1\xf3\x0f\x7f\x87" + d)


def _smc_patch(rng: random.Random) -> bytes:
    """Patch an armed instruction into the code just ahead of the running block
    and run on into it (issue 10's stale-code escape):

    ``jmp +8; 8 bytes no block holds; lea rdi, [those bytes]``; a decoy store of
    NOPs over NOPs there; the instruction's bytes stored into a NOP sled ahead
    with stores of one width (1 .. 16 bytes, or ``rep movsb`` from the data
    page) starting at an odd offset, possibly before the instruction's first
    byte; then (usually) no branch: the sled runs in the same translated block."""
    insn = sensitive(rng)
    k = rng.randrange(0, SLED - len(insn) - 15)                # the instruction starts at sled + k
    width = rng.choice(STORE_WIDTHS)
    w = 1 if width == "movsb" else width
    pre = rng.randrange(0, min(w, k + 1))
    payload = b"\x90" * pre + insn
    payload += b"\x90" * (-len(payload) % w)
    head = b"\xeb\x08" + b"\x90" * 8 + b"\x48\x8d\x3d" + (-15).to_bytes(4, "little", signed=True)
    dw = rng.choice((2, 4, 8))
    body = _store(dw, rng.randrange(0, 8 - dw + 1), b"\x90" * dw)        # the decoy: same bytes
    stores = []
    if width == "movsb":
        n = len(payload)
        src = b"".join(b"\x48\xb8" + payload[i:i + 8].ljust(8, b"\x90") + b"\x48\x89\x86"
                       + i.to_bytes(4, "little") for i in range(0, n, 8))            # mov rax, iq; mov [rsi+i], rax
        stores.append(b"\x48\xbe" + DATA_BASE.to_bytes(8, "little") + src)          # mov rsi, DATA_BASE
        stores.append(b"\x48\x8d\xbf" + b"@DISP" + b"\xb9" + n.to_bytes(4, "little") + b"\xf3\xa4")
    else:
        for i in range(0, len(payload), w):
            stores.append((i, payload[i:i + w]))
    jump = rng.random() < 0.2
    # the sled's offset from RDI: the head's scratch and LEA, the decoy, the stores, a jump
    size = 8 + 7 + len(body) + len(b"\xeb\x00" if jump else b"")
    for st in stores:
        size += len(st) if isinstance(st, bytes) else len(_store(w, 0, st[1]))
    sled_at = size + (k - pre)                                  # where the stores begin, from RDI
    for st in stores:
        if isinstance(st, bytes):
            body += st.replace(b"@DISP", sled_at.to_bytes(4, "little"))
        else:
            body += _store(w, sled_at + st[0], st[1])
    if jump:
        body += b"\xeb\x00"
    return head + body + b"\x90" * SLED


def gen_smc(rng: random.Random, n: int = 64) -> Case:
    """Write a sensitive instruction into the code stream and run it: patched
    ahead of the running block (:func:`_smc_patch`), or stored and jumped to."""
    parts: list[bytes] = [filler(rng) for _ in range(rng.randrange(0, n // 2))]
    parts.append(_smc_patch(rng) if rng.random() < 0.8 else _smc_jump(rng))
    parts += [filler(rng) for _ in range(rng.randrange(0, n // 2))]
    code = b"".join(parts) + TERMINATOR
    return Case(code, _place(rng, code), random_config(rng), random_regs(rng), "self-modifying")


def mutate(rng: random.Random, base: Case) -> Case:
    """Byte flips, insertions of table instructions, splices, and config tweaks."""
    code = bytearray(base.code)
    for _ in range(rng.randrange(1, 5)):
        r = rng.random()
        if r < 0.3 and code:
            code[rng.randrange(len(code))] ^= 1 << rng.randrange(8)
        elif r < 0.6:
            at = rng.randrange(len(code) + 1)
            code[at:at] = sensitive(rng)
        elif r < 0.75 and code:
            at = rng.randrange(len(code))
            code[at:at] = bytes([rng.choice(LEGACY)])
        elif r < 0.85 and len(code) > 2:
            a = rng.randrange(len(code) - 1)
            del code[a:a + rng.randrange(1, min(8, len(code) - a) + 1)]
        else:
            code[rng.randrange(len(code) + 1):] = b""
            code += TERMINATOR
    code = bytes(code[:CODE_WINDOW - 1]) or TERMINATOR
    cfg = base.config
    if rng.random() < 0.3:
        cfg = random_config(rng)
    else:
        words = list(cfg.intercepts)
        for _ in range(rng.randrange(0, 3)):
            b = rng.randrange(6 * 32)
            words[b >> 5] ^= 1 << (b & 31)
        cfg = VmcbConfig(words, list(cfg.iopm), list(cfg.msrpm), list(cfg.npt))
    regs = dict(base.regs) if rng.random() < 0.7 else random_regs(rng)
    off = base.offset if base.offset + len(code) <= CODE_WINDOW and rng.random() < 0.7 else _place(rng, code)
    return Case(code, off, cfg, regs, "mutation")


GENERATORS = {"grammar": gen_grammar, "random-bytes": gen_random_bytes, "self-modifying": gen_smc}
WEIGHTS = (("grammar", 0.55), ("random-bytes", 0.15), ("self-modifying", 0.1), ("mutation", 0.2))


def next_case(rng: random.Random, corpus: list[Case], n: int = 64) -> Case:
    r = rng.random()
    acc = 0.0
    for name, w in WEIGHTS:
        acc += w
        if r < acc:
            if name == "mutation":
                if corpus:
                    return mutate(rng, rng.choice(corpus))
                name = "grammar"
            return GENERATORS[name](rng, n)
    return gen_grammar(rng, n)
