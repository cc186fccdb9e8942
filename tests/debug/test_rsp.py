"""The RSP framing layer against the gdb manual ("Overview", "Packet
Acknowledgment", "Interrupts" in the Remote Protocol appendix).

Expected checksums are the ones gdb 13 itself put on these packets (read
from its ``set debug remote 1`` log) or computed in the test by the manual's
rule: the byte sum of the packet data modulo 256."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from sandbox.debug import rsp
from sandbox.debug.rsp import Ack, BadPacket, Interrupt, Nack, Packet, PacketParser


# packets as gdb sent them (its own checksums)
GDB_PACKETS = [b"$vCont?#49", b"$qfThreadInfo#bb", b"$qsThreadInfo#c8", b"$D#44",
               b"$P0=0500000000000000#c2", b"$Z1,100014,1#3a", b"$z4,100800,4#63", b"$vCont;c#a8",
               b"$qRcmd,68656c70#fc", b"$X100001,0:#10"]


@pytest.mark.parametrize("pkt", GDB_PACKETS)
def test_frame_reproduces_gdbs_checksums(pkt):
    data = pkt[1:pkt.index(b"#")]
    assert rsp.frame(data) == pkt
    assert PacketParser().feed(pkt) == [Packet(data)]


def test_checksum_is_the_byte_sum_mod_256():
    data = bytes(range(0x40, 0x7B)) * 3
    assert rsp.checksum(data) == sum(data) % 256
    assert rsp.frame(b"") == b"$#00"
    assert rsp.frame("OK") == b"$OK#9a"          # 0x4f + 0x4b = 0x9a


def test_frame_refuses_raw_frame_characters():
    for bad in (b"a$b", b"a#b"):
        with pytest.raises(rsp.RspError):
            rsp.frame(bad)


@pytest.mark.parametrize("byte, wire", [(0x23, b"}\x03"), (0x24, b"}\x04"), (0x7D, b"}]"), (0x2A, b"}\x0a")])
def test_escape_each_special_byte(byte, wire):
    # the manual: "0x7d would be transmitted as the two bytes 0x7d 0x5d"
    assert rsp.escape(bytes([byte])) == wire
    assert rsp.unescape(wire) == bytes([byte])


def test_escape_leaves_other_bytes_alone():
    plain = bytes(b for b in range(256) if b not in (0x23, 0x24, 0x7D, 0x2A))
    assert rsp.escape(plain) == plain
    assert rsp.unescape(plain) == plain


@given(st.binary(max_size=512))
def test_escape_round_trip_and_no_frame_bytes(data):
    wire = rsp.escape(data)
    assert rsp.unescape(wire) == data
    assert b"#" not in wire and b"$" not in wire and b"*" not in wire
    # an escaped payload can always be framed and parsed back
    assert PacketParser().feed(rsp.frame(b"X0,0:" + wire)) == [Packet(b"X0,0:" + wire)]


def test_unescape_dangling_escape_is_an_error():
    with pytest.raises(rsp.RspError, match="dangling"):
        rsp.unescape(b"ab}")


def test_parser_byte_by_byte():
    p = PacketParser()
    events = []
    for b in b"+$g#67-\x03$m100000,4#ee":
        events += p.feed(bytes([b]))
    assert events == [Ack(), Packet(b"g"), Nack(), Interrupt(), Packet(b"m100000,4")]
    assert rsp.checksum(b"m100000,4") == sum(b"m100000,4") % 256 == 0xEE


def test_interrupt_byte_inside_a_packet_is_data():
    data = b"X100000,3:\x03\x01\x02"
    assert PacketParser().feed(rsp.frame(data)) == [Packet(data)]


def test_bad_checksum():
    (ev,) = PacketParser().feed(b"$g#68")
    assert isinstance(ev, BadPacket) and ev.data == b"g" and "computed 67" in ev.reason


def test_non_hex_checksum():
    (ev,) = PacketParser().feed(b"$g#zz")
    assert isinstance(ev, BadPacket) and "not two hex digits" in ev.reason


def test_upper_case_checksum_accepted():
    assert PacketParser().feed(b"$qfThreadInfo#BB") == [Packet(b"qfThreadInfo")]


def test_new_packet_before_end_abandons_the_old_one():
    events = PacketParser().feed(b"$qSupp$g#67")
    assert isinstance(events[0], BadPacket) and events[0].data == b"qSupp"
    assert events[1] == Packet(b"g")


def test_noise_between_packets_is_ignored():
    assert PacketParser().feed(b"\r\nhello $g#67 junk") == [Packet(b"g")]


def test_oversized_packet_is_dropped():
    p = PacketParser(max_packet=8)
    data = b"m" + b"0" * 20
    (ev,) = p.feed(rsp.frame(data))
    assert isinstance(ev, BadPacket) and "longer than 8" in ev.reason
    assert p.feed(b"$g#67") == [Packet(b"g")]          # and the parser recovers


def test_checksum_split_across_feeds():
    p = PacketParser()
    assert p.feed(b"$g#6") == []
    assert p.feed(b"7+") == [Packet(b"g"), Ack()]


def test_hex_helpers():
    assert rsp.le_hex(0x1122334455667788, 8) == "8877665544332211"
    assert rsp.le_hex(-1, 4) == "ffffffff"
    assert rsp.le_unhex("8877665544332211") == 0x1122334455667788
    assert rsp.hex_encode("help") == "68656c70"
    assert rsp.hex_decode("68656c70") == b"help"
    assert rsp.parse_hex_int("100010") == 0x100010
    for bad in ("", "0x10", "12g"):
        with pytest.raises(rsp.RspError):
            rsp.parse_hex_int(bad)
    with pytest.raises(rsp.RspError):
        rsp.hex_decode("abc")
