"""The framing layer of gdb's Remote Serial Protocol (RSP).

References are to the gdb manual, appendix "GDB Remote Serial Protocol"
(https://sourceware.org/gdb/current/onlinedocs/gdb.html/Remote-Protocol.html):

* **Packets** ("Overview"): ``$`` *packet-data* ``#`` *checksum*, where the
  checksum is the sum of the bytes of *packet-data* modulo 256, written as
  two lower-case hex digits. The checksum covers the data exactly as sent,
  escapes included.
* **Acknowledgements** ("Overview", "Packet Acknowledgment"): each side
  answers a packet with ``+`` (received, checksum good) or ``-`` (please
  retransmit), until the ``QStartNoAckMode`` exchange turns them off for
  the rest of the connection.
* **Binary data** ("Overview"): the bytes ``#`` (0x23), ``$`` (0x24),
  ``}`` (0x7d) and ``*`` (0x2a) inside binary data (``X`` packets, the
  ``qXfer`` replies) are sent as ``}`` followed by the byte XOR 0x20.
* **Run-length encoding** ("Overview"): only gdb decodes it, and a stub is
  never sent it, so this module neither emits nor decodes it; a ``*`` in
  binary data is always escaped.
* **Interrupts** ("Interrupts"): while the target runs, gdb sends a lone
  byte 0x03 (Ctrl-C) outside any packet to ask for a stop.
* **Hex encodings** ("Packets", "Standard Replies"): memory and register
  values are hex byte strings, registers in the target's byte order
  (little-endian on x86-64); ``E NN`` is an error reply and an empty
  packet means "not supported".

:class:`PacketParser` turns a byte stream into :class:`Packet`, :class:`Ack`,
:class:`Nack`, :class:`Interrupt` and :class:`BadPacket` events; it holds no
socket, so the framing is tested with crafted bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

PACKET_START = 0x24            # '$'
PACKET_END = 0x23              # '#'
ESCAPE = 0x7D                  # '}'
RLE = 0x2A                     # '*'
INTERRUPT = 0x03               # Ctrl-C from gdb while the target runs
ACK = b"+"
NACK = b"-"
#: bytes that binary data carries escaped (``}`` then the byte XOR 0x20)
ESCAPED = frozenset((PACKET_END, PACKET_START, ESCAPE, RLE))
#: the largest packet the parser accepts (data bytes); longer input is dropped
MAX_PACKET = 1 << 20

_HEX = frozenset(b"0123456789abcdefABCDEF")


class RspError(ValueError):
    """Malformed protocol data (bad hex, a dangling escape, a bad frame)."""


def checksum(data: bytes) -> int:
    """The packet checksum: the sum of the data bytes modulo 256."""
    return sum(data) & 0xFF


def frame(payload: bytes | str) -> bytes:
    """``$payload#xx``. Binary parts of ``payload`` must already be
    :func:`escape`\\ d; a raw ``$`` or ``#`` is refused (it would end the frame)."""
    if isinstance(payload, str):
        payload = payload.encode("latin-1")
    if b"$" in payload or b"#" in payload:
        raise RspError("packet data contains a raw '$' or '#'; escape binary data first")
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


def escape(data: bytes) -> bytes:
    """Binary data as sent in a packet: ``#``, ``$``, ``}`` and ``*`` become
    ``}`` followed by the byte XOR 0x20."""
    if not any(b in ESCAPED for b in data):
        return bytes(data)
    out = bytearray()
    for b in data:
        if b in ESCAPED:
            out += bytes((ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The inverse of :func:`escape` (what an ``X`` packet's data means)."""
    if ESCAPE not in data:
        return bytes(data)
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == ESCAPE:
            nxt = next(it, None)
            if nxt is None:
                raise RspError("binary data ends with a dangling escape byte '}'")
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def hex_encode(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return data.hex()


def hex_decode(text: bytes | str) -> bytes:
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise RspError(f"bad hex data {text[:40]!r}") from None


def parse_hex_int(text: bytes | str) -> int:
    """A big-endian hex number as packets write addresses and lengths."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if not text or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise RspError(f"bad hex number {text[:40]!r}")
    return int(text, 16)


def le_hex(value: int, size: int) -> str:
    """A register value as the ``g``/``p`` packets carry it: ``size`` bytes, little-endian."""
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little").hex()


def le_unhex(text: bytes | str) -> int:
    return int.from_bytes(hex_decode(text), "little")


# -- the incremental parser ------------------------------------------------------------
@dataclass(frozen=True)
class Packet:
    """A packet whose checksum matched; ``data`` is as sent (escapes kept)."""
    data: bytes


@dataclass(frozen=True)
class Ack:
    pass


@dataclass(frozen=True)
class Nack:
    pass


@dataclass(frozen=True)
class Interrupt:
    pass


@dataclass(frozen=True)
class BadPacket:
    """A frame that cannot be used: wrong checksum, non-hex checksum, too long."""
    data: bytes
    reason: str


Event = Packet | Ack | Nack | Interrupt | BadPacket


class PacketParser:
    """Feed it bytes as they arrive; it returns the protocol events they complete.

    Outside a packet, ``+`` is an :class:`Ack`, ``-`` a :class:`Nack`, 0x03 an
    :class:`Interrupt`, and anything else is noise (ignored). Inside a packet
    every byte up to ``#`` is data (a 0x03 there is binary data, not an
    interrupt); a ``$`` inside a packet abandons it and starts a new one.
    """

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._state = 0                # 0 idle, 1 data, 2/3 checksum digits
        self._data = bytearray()
        self._sum = bytearray()
        self._overflow = False

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        for b in chunk:
            st = self._state
            if st == 0:
                if b == PACKET_START:
                    self._start()
                elif b == 0x2B:
                    events.append(Ack())
                elif b == 0x2D:
                    events.append(Nack())
                elif b == INTERRUPT:
                    events.append(Interrupt())
            elif st == 1:
                if b == PACKET_END:
                    self._state = 2
                elif b == PACKET_START:
                    events.append(BadPacket(bytes(self._data[:64]), "a new packet started before '#'"))
                    self._start()
                elif len(self._data) >= self.max_packet:
                    self._overflow = True
                else:
                    self._data.append(b)
            else:
                self._sum.append(b)
                if st == 2:
                    self._state = 3
                else:
                    self._state = 0
                    events.append(self._finish())
        return events

    def _start(self) -> None:
        self._state = 1
        self._data.clear()
        self._sum.clear()
        self._overflow = False

    def _finish(self) -> Event:
        data = bytes(self._data)
        if self._overflow:
            return BadPacket(data[:64], f"packet longer than {self.max_packet} bytes")
        if not all(c in _HEX for c in self._sum):
            return BadPacket(data, f"checksum {bytes(self._sum)!r} is not two hex digits")
        got, want = int(self._sum, 16), checksum(data)
        if got != want:
            return BadPacket(data, f"checksum {got:02x}, computed {want:02x}")
        return Packet(data)
