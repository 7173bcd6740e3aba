"""Time-based serial framers (fluxrig.framing.serial), with explicit `now` values: no sleeping."""

from __future__ import annotations

import pytest

from fluxrig.errors import FrameTooLarge
from fluxrig.framing import BadFrame, CrcMismatch, EncodeError, PayloadTooLarge
from fluxrig.framing.serial import (
    MODBUS_MAX_ADU,
    IdleGapFramer,
    ModbusRtuFramer,
    char_time,
    crc16_modbus,
    modbus_gap,
)


def test_char_time_counts_start_data_parity_stop_bits():
    assert char_time(9600) == pytest.approx(10 / 9600)
    assert char_time(9600, 8, "E", 1) == pytest.approx(11 / 9600)
    assert char_time(19200, 7, "O", 2) == pytest.approx(11 / 19200)
    assert char_time(1200, 8, "N", 1.5) == pytest.approx(10.5 / 1200)
    assert char_time(9600, 8, "none") == pytest.approx(10 / 9600)  # pyserial's PARITY_NONE is "N"
    with pytest.raises(ValueError):
        char_time(0)
    with pytest.raises(ValueError):
        char_time(9600, 8, "X")


def test_modbus_gap_is_3_5_chars_or_fixed_above_19200():
    assert modbus_gap(9600, 8, "E", 1) == pytest.approx(3.5 * 11 / 9600)
    assert modbus_gap(19200, 8, "E", 1) == pytest.approx(3.5 * 11 / 19200)
    assert modbus_gap(38400) == 0.00175
    assert modbus_gap(115200) == 0.00175


@pytest.mark.parametrize(
    "frame,crc",
    [
        ("01 03 00 00 00 0A", "C5 CD"),
        ("11 03 00 6B 00 03", "76 87"),  # the Modbus over serial line spec's example
        ("01 04 00 00 00 01", "31 CA"),
    ],
)
def test_crc16_modbus_golden(frame, crc):
    data = bytes.fromhex(frame)
    assert crc16_modbus(data).to_bytes(2, "little") == bytes.fromhex(crc)
    assert ModbusRtuFramer(9600).encode(data) == data + bytes.fromhex(crc)


def test_crc16_modbus_check_value():
    assert crc16_modbus(b"123456789") == 0x4B37  # CRC-16/MODBUS catalogue check
    assert crc16_modbus(b"") == 0xFFFF


def test_idle_gap_timing():
    fr = IdleGapFramer(0.010)
    assert fr.timed is True
    assert fr.deadline() is None
    assert fr.feed(b"ab", 100.000) == []
    assert fr.deadline() == pytest.approx(100.010)
    assert fr.poll(100.005) == []
    assert fr.feed(b"c", 100.008) == []  # 8 ms < 10 ms: same frame
    assert fr.deadline() == pytest.approx(100.018)
    assert fr.buffered == 3
    assert fr.poll(100.018) == [b"abc"]
    assert fr.deadline() is None and fr.buffered == 0
    assert fr.poll(200.0) == []


def test_idle_gap_feed_returns_the_frame_completed_before_the_new_data():
    fr = IdleGapFramer(0.010)
    assert fr.feed(b"first", 1.0) == []
    assert fr.feed(b"second", 1.5) == [b"first"]  # poll was never called: the gap still counts
    assert fr.buffered == 6
    assert fr.feed(b"", 1.7) == [b"second"]
    assert fr.feed(b"tail", 2.0) == []
    assert fr.flush() == [b"tail"]
    assert fr.flush() == []


def test_idle_gap_for_line():
    fr = IdleGapFramer.for_line(9600, 8, "N", 1, gap_chars=3.5)
    assert fr.gap == pytest.approx(3.5 * 10 / 9600)
    with pytest.raises(ValueError):
        IdleGapFramer(0)


def test_idle_gap_oversize_is_fatal_until_reset():
    fr = IdleGapFramer(0.010, max_frame_bytes=8)
    assert fr.feed(b"ok", 0.0) == []
    with pytest.raises(FrameTooLarge) as info:
        fr.feed(b"123456789", 1.0)
    exc = info.value
    assert exc.frames == [b"ok"] and exc.size == 9 and exc.limit == 8 and exc.offset == 2
    with pytest.raises(FrameTooLarge):
        fr.poll(5.0)
    fr.reset()
    assert fr.feed(b"x", 6.0) == [] and fr.poll(7.0) == [b"x"]


def test_idle_gap_encode():
    fr = IdleGapFramer(0.01, max_frame_bytes=4)
    assert fr.encode(b"abcd") == b"abcd"
    with pytest.raises(PayloadTooLarge):
        fr.encode(b"abcde")
    with pytest.raises(EncodeError):
        fr.encode(b"")


REQUEST = bytes.fromhex("01 03 00 00 00 0A C5 CD")
REPLY = bytes.fromhex("11 03 00 6B 00 03 76 87")


def test_modbus_frames_are_checked_and_stripped():
    fr = ModbusRtuFramer(9600)  # t3.5 ~ 4 ms at 8E1
    assert fr.gap == pytest.approx(3.5 * 11 / 9600)
    assert fr.max_frame_bytes == MODBUS_MAX_ADU
    assert fr.feed(REQUEST[:3], 0.000) == []
    assert fr.feed(REQUEST[3:], 0.002) == []  # 2 ms: inside the frame
    assert fr.poll(0.0061) == [REQUEST[:-2]]
    keep = ModbusRtuFramer(9600, keep_crc=True)
    keep.feed(REPLY, 0.0)
    assert keep.poll(1.0) == [REPLY]


def test_modbus_bad_crc_keeps_later_frames():
    fr = ModbusRtuFramer(115200)
    assert fr.gap == 0.00175
    bad = REQUEST[:-1] + b"\x00"
    assert fr.feed(bad, 10.0) == []
    with pytest.raises(CrcMismatch) as info:
        fr.feed(REPLY, 10.1)  # completes the bad frame; the reply that came with it is kept
    exc = info.value
    assert exc.expected == 0xCDC5 and exc.actual == 0x00C5
    assert exc.frame == bad and exc.offset == 0 and exc.frames == []
    assert isinstance(exc, BadFrame) and exc.recoverable
    assert "0xCDC5" in str(exc)
    assert fr.buffered == len(REPLY)
    assert fr.poll(10.2) == [REPLY[:-2]]


def test_modbus_short_frame_is_a_bad_frame():
    fr = ModbusRtuFramer(9600)
    fr.feed(b"\x01\x03\x00", 0.0)
    with pytest.raises(BadFrame) as info:
        fr.poll(1.0)
    assert not isinstance(info.value, CrcMismatch)
    assert info.value.frame == b"\x01\x03\x00"
    fr.feed(REQUEST, 2.0)
    assert fr.poll(3.0) == [REQUEST[:-2]]


def test_modbus_encode_limits_and_gap_override():
    fr = ModbusRtuFramer(9600, gap=0.02)
    assert fr.gap == 0.02
    with pytest.raises(EncodeError):
        fr.encode(b"\x01")
    with pytest.raises(PayloadTooLarge):
        fr.encode(b"\x01" * 255)
    assert len(fr.encode(b"\x01" * 254)) == 256
