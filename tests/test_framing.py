"""Stream framers (fluxrig.framing.core_py and its twin core_c), run against both backends: `py` and `c`.

Every framer is fed whole, one byte at a time and with trailing bytes; golden bytes pin the
ISO presets; limits and malformed prefixes raise their typed errors with the right offset.
"""

from __future__ import annotations

import pytest

import fluxrig.framing as F
from fluxrig.errors import FrameTooLarge, FramingError, LocalProtocolError, RemoteProtocolError
from fluxrig.framing import BadEscape, BadFrame, BadLengthPrefix, EncodeError, PayloadTooLarge

BACKENDS = ["py", "c"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "c" and F.BACKEND != "cython":
        pytest.skip("compiled twin not loaded (pure build or FLUXRIG_PURE_PYTHON=1)")
    return request.param


def cls(backend, name):
    return getattr(F, name + ("C" if backend == "c" else "Py"))


def framer(backend, name, *args, **kwargs):
    return cls(backend, name)(*args, **kwargs)


def feed_chunks(fr, chunks):
    """Feed chunks; collect frames and errors (recoverable ones continue with feed(b""))."""
    frames, errors = [], []
    for chunk in chunks:
        data = chunk
        while True:
            try:
                frames += fr.feed(data)
                break
            except BadFrame as exc:
                frames += exc.frames
                errors.append((type(exc).__name__, exc.offset))
                data = b""
            except FramingError as exc:
                frames += exc.frames
                errors.append((type(exc).__name__, exc.offset))
                return frames, errors
    return frames, errors


def three_ways(make, stream):
    """Whole, byte at a time, and whole with a trailing partial frame: same frames."""
    whole = feed_chunks(make(), [stream])
    bytewise = feed_chunks(make(), [stream[i : i + 1] for i in range(len(stream))])
    assert whole == bytewise
    return whole


# ---------------------------------------------------------------- delimiter


def test_backend_binding_is_one_of_the_two():
    assert F.DelimiterFramer in (F.DelimiterFramerPy, F.DelimiterFramerC)
    assert F.LengthPrefixFramer in (F.LengthPrefixFramerPy, F.LengthPrefixFramerC)
    if F.BACKEND == "cython":
        assert F.DelimiterFramer is F.DelimiterFramerC
    else:
        assert F.DelimiterFramer is F.DelimiterFramerPy and F.DelimiterFramerC is None


def test_newline_mode_strips_cr_lf_and_lf(backend):
    frames, errors = three_ways(lambda: framer(backend, "DelimiterFramer"), b"one\r\ntwo\n\nthree\r\n")
    assert frames == [b"one", b"two", b"", b"three"] and errors == []


def test_newline_mode_from_empty_delimiter_and_trailing_bytes(backend):
    fr = framer(backend, "DelimiterFramer", delimiter=b"")
    assert fr.feed(b"a\r\nb\npartial\r") == [b"a", b"b"]
    assert fr.buffered == len(b"partial\r")
    assert fr.feed(b"\n") == [b"partial"]
    assert fr.buffered == 0
    assert fr.feed(b"tail") == []
    assert fr.flush() == [b"tail"]
    assert fr.buffered == 0


def test_include_keeps_the_delimiter(backend):
    frames, _ = three_ways(lambda: framer(backend, "DelimiterFramer", include_delimiter=True), b"a\r\nb\n")
    assert frames == [b"a\r\n", b"b\n"]


def test_multibyte_delimiter_split_across_feeds(backend):
    make = lambda: framer(backend, "DelimiterFramer", delimiter=b"<END>")  # noqa: E731
    frames, _ = three_ways(make, b"alpha<END>be<EN>ta<END><END>x")
    assert frames == [b"alpha", b"be<EN>ta", b""]
    fr = make()
    assert fr.feed(b"abc<E") == [] and fr.feed(b"ND") == [] and fr.feed(b">z") == [b"abc"]
    assert fr.buffered == 1


def test_explicit_non_newline_delimiter_keeps_cr(backend):
    fr = framer(backend, "DelimiterFramer", delimiter=b"\x03")
    assert fr.feed(b"a\r\x03b\x03") == [b"a\r", b"b"]


def test_prefix_position(backend):
    make = lambda: framer(backend, "DelimiterFramer", delimiter=b"\x02", position="prefix")  # noqa: E731
    fr = make()
    assert fr.feed(b"noise\x02one\x02two\x02thr") == [b"one", b"two"]
    assert fr.discarded == 5
    assert fr.flush() == [b"thr"]
    frames, _ = three_ways(make, b"xx\x02a\x02\x02b\x02")
    assert frames == [b"a", b"", b"b"]
    fr = framer(backend, "DelimiterFramer", delimiter=b"##", position="prefix", include_delimiter=True)
    assert fr.feed(b"z#") == [] and fr.feed(b"#a##b#") == [b"##a"]
    assert fr.discarded == 1
    assert fr.flush() == [b"##b#"]


def test_delimiter_encode(backend):
    assert framer(backend, "DelimiterFramer").encode(b"abc") == b"abc"  # append off: pass-through
    suffix = framer(backend, "DelimiterFramer", append=True)
    assert suffix.encode(b"abc") == b"abc\n"
    assert suffix.encode(bytearray(b"x")) == b"x\n"
    prefix = framer(backend, "DelimiterFramer", delimiter=b"\x02", position="prefix", append=True)
    assert prefix.encode(b"abc") == b"\x02abc"
    with pytest.raises(EncodeError) as info:
        suffix.encode(b"two\nlines")
    assert isinstance(info.value, LocalProtocolError)
    small = framer(backend, "DelimiterFramer", append=True, max_frame_bytes=4)
    with pytest.raises(PayloadTooLarge):
        small.encode(b"12345")


def test_delimiter_oversize_detected_before_the_delimiter(backend):
    fr = framer(backend, "DelimiterFramer", max_frame_bytes=8)
    assert fr.feed(b"ok\n12345678") == [b"ok"]
    with pytest.raises(FrameTooLarge) as info:
        fr.feed(b"9")
    assert info.value.limit == 8 and info.value.size == 9 and info.value.offset == 3
    assert isinstance(info.value, RemoteProtocolError)
    # Fatal: it keeps raising until reset.
    with pytest.raises(FrameTooLarge):
        fr.feed(b"\n")
    fr.reset()
    assert fr.feed(b"fine\n") == [b"fine"]


def test_delimiter_oversize_in_one_chunk_keeps_earlier_frames(backend):
    fr = framer(backend, "DelimiterFramer", max_frame_bytes=4)
    with pytest.raises(FrameTooLarge) as info:
        fr.feed(b"a\nbb\ntoolong\nc\n")
    assert info.value.frames == [b"a", b"bb"]
    assert info.value.offset == 5 and info.value.size == 7


def test_exactly_at_the_limit_is_accepted(backend):
    fr = framer(backend, "DelimiterFramer", delimiter=b"<E>", max_frame_bytes=4)
    for byte in b"1234<E":
        assert fr.feed(bytes([byte])) == []
    assert fr.feed(b">") == [b"1234"]


def test_large_frame_in_many_chunks_is_linear(backend):
    # 1 MiB arriving in 4 KiB chunks: the search resumes, it does not rescan.
    fr = framer(backend, "DelimiterFramer")
    chunk = b"x" * 4096
    for _ in range(255):
        assert fr.feed(chunk) == []
    assert fr.feed(chunk[:-1] + b"\n") == [b"x" * (256 * 4096 - 1)]


# ---------------------------------------------------------------- length prefix

GOLDEN = [
    # (preset/framer kwargs, payload, wire bytes)
    (dict(kind="binary", size=2, endian="big"), b"hello", b"\x00\x05hello"),
    (dict(kind="binary", size=2, endian="little"), b"hello", b"\x05\x00hello"),
    (dict(kind="binary", size=4, endian="big"), b"hello", b"\x00\x00\x00\x05hello"),
    (dict(kind="binary", size=4, endian="little"), b"hello", b"\x05\x00\x00\x00hello"),
    (dict(kind="ascii4"), b"hello", b"0005hello"),
    (dict(kind="bcd2"), b"hello", b"\x00\x05hello"),
    (dict(kind="vap"), b"hello", b"\x00\x05\x00\x00hello"),
    (dict(kind="binary", size=2, endian="big", includes_header=True), b"hello", b"\x00\x07hello"),
    (dict(kind="binary", size=2, endian="little", includes_header=True), b"hi", b"\x04\x00hi"),
    (dict(kind="binary", size=4, endian="big", includes_header=True), b"hi", b"\x00\x00\x00\x06hi"),
    (dict(kind="ascii4", includes_header=True), b"hi", b"0006hi"),
    (dict(kind="bcd2", includes_header=True), b"hi", b"\x00\x04hi"),
    (dict(kind="vap", includes_header=True), b"hi", b"\x00\x06\x00\x00hi"),
    (dict(kind="binary", size=2, endian="big"), b"z" * 1234, b"\x04\xd2" + b"z" * 1234),
    (dict(kind="binary", size=2, endian="little"), b"z" * 258, b"\x02\x01" + b"z" * 258),
    (dict(kind="ascii4"), b"z" * 1234, b"1234" + b"z" * 1234),
    (dict(kind="bcd2"), b"z" * 1234, b"\x12\x34" + b"z" * 1234),
    (dict(kind="bcd2"), b"z" * 9999, b"\x99\x99" + b"z" * 9999),
    (dict(kind="vap"), b"z" * 300, b"\x01\x2c\x00\x00" + b"z" * 300),
]


@pytest.mark.parametrize("kwargs,payload,wire", GOLDEN, ids=[f"{g[0]}-{len(g[1])}" for g in GOLDEN])
def test_length_prefix_golden(backend, kwargs, payload, wire):
    make = lambda: framer(backend, "LengthPrefixFramer", **kwargs)  # noqa: E731
    assert make().encode(payload) == wire
    frames, errors = three_ways(make, wire * 3)
    assert frames == [payload] * 3 and errors == []
    fr = make()
    assert fr.feed(wire + wire[:3]) == [payload]
    assert fr.buffered == 3
    assert fr.feed(wire[3:]) == [payload]
    assert fr.buffered == 0


@pytest.mark.parametrize(
    "preset,wire",
    [
        ("len2_be", b"\x00\x03abc"),
        ("len2_le", b"\x03\x00abc"),
        ("len4_be", b"\x00\x00\x00\x03abc"),
        ("ascii4", b"0003abc"),
        ("bcd2", b"\x00\x03abc"),
        ("vap", b"\x00\x03\x00\x00abc"),
        ("length_prefix2", b"\x00\x03abc"),
        ("length_prefix4", b"\x00\x00\x00\x03abc"),
    ],
)
def test_iso_presets_by_name(backend, preset, wire):
    fr = F.make_framer({"framing": preset}, pure=backend == "py")
    assert type(fr) is cls(backend, "LengthPrefixFramer")
    assert fr.encode(b"abc") == wire
    assert fr.feed(wire) == [b"abc"]


def test_vap_reserved_bytes_ignored_on_read_kept_on_request(backend):
    fr = framer(backend, "LengthPrefixFramer", kind="vap")
    assert fr.feed(b"\x00\x02\x12\x34ok") == [b"ok"]
    keep = framer(backend, "LengthPrefixFramer", kind="vap", keep_header=True)
    assert keep.feed(b"\x00\x02\x12\x34ok") == [b"\x00\x02\x12\x34ok"]
    custom = framer(backend, "LengthPrefixFramer", kind="vap", reserved=b"\xab\xcd")
    assert custom.encode(b"ok") == b"\x00\x02\xab\xcdok"


@pytest.mark.parametrize(
    "kwargs,stream,offset,reason_part",
    [
        (dict(kind="ascii4"), b"0002ok00x1zz", 6, "not an ASCII digit"),
        (dict(kind="ascii4"), b"-001z", 0, "not an ASCII digit"),
        (dict(kind="bcd2"), b"\x00\x02ok\x0a\x01", 4, "not packed BCD"),
        (dict(kind="bcd2"), b"\xf0\x01", 0, "not packed BCD"),
        (dict(kind="binary", size=2), b"\x00\x00", 0, "body of 0"),
        (dict(kind="binary", size=2, includes_header=True), b"\x00\x02", 0, "body of 0"),
        (dict(kind="binary", size=2, includes_header=True), b"\x00\x03x\x00\x01", 3, "body of -1"),
        (dict(kind="binary", size=4, includes_header=True), b"\x00\x00\x00\x01", 0, "body of -3"),
        (dict(kind="vap", includes_header=True), b"\x00\x03\x00\x00", 0, "body of -1"),
    ],
)
def test_bad_prefix_names_the_offset(backend, kwargs, stream, offset, reason_part):
    make = lambda: framer(backend, "LengthPrefixFramer", **kwargs)  # noqa: E731
    frames, errors = three_ways(make, stream)
    assert errors == [("BadLengthPrefix", offset)]
    fr = make()
    with pytest.raises(BadLengthPrefix) as info:
        fr.feed(stream)
    exc = info.value
    assert exc.offset == offset and reason_part in exc.reason and exc.frames == frames
    assert exc.kind == kwargs["kind"] and len(exc.prefix) == fr.size
    with pytest.raises(BadLengthPrefix):  # fatal until reset
        fr.feed(b"")
    fr.reset()
    assert fr.buffered == 0


def test_zero_length_allowed_as_keepalive(backend):
    fr = framer(backend, "LengthPrefixFramer", allow_empty=True)
    assert fr.feed(b"\x00\x00\x00\x01a\x00\x00") == [b"", b"a", b""]
    assert fr.encode(b"") == b"\x00\x00"
    with pytest.raises(EncodeError):
        framer(backend, "LengthPrefixFramer").encode(b"")


def test_length_prefix_oversize_raised_at_the_prefix(backend):
    fr = framer(backend, "LengthPrefixFramer", size=4, max_frame_bytes=100)
    assert fr.feed(b"\x00\x00\x00\x02ok\x00\x00") == [b"ok"]
    with pytest.raises(FrameTooLarge) as info:
        fr.feed(b"\x00\x65")  # 101 announced, no body yet
    assert (info.value.size, info.value.limit, info.value.offset) == (101, 100, 6)


def test_default_limit_is_one_mebibyte(backend):
    assert F.DEFAULT_MAX_FRAME_BYTES == 1 << 20
    fr = framer(backend, "LengthPrefixFramer", size=4)
    assert fr.max_frame_bytes == 1 << 20
    with pytest.raises(FrameTooLarge):
        fr.feed((1 << 20 | 1).to_bytes(4, "big"))


def test_length_prefix_encode_limits(backend):
    two = framer(backend, "LengthPrefixFramer", size=2)
    assert two.max_payload == 0xFFFF
    two.encode(b"x" * 0xFFFF)
    with pytest.raises(PayloadTooLarge) as info:
        two.encode(b"x" * 0x10000)
    assert info.value.limit == 0xFFFF
    with pytest.raises(PayloadTooLarge):
        framer(backend, "LengthPrefixFramer", size=2, includes_header=True).encode(b"x" * 0xFFFE)
    with pytest.raises(PayloadTooLarge):
        framer(backend, "LengthPrefixFramer", kind="ascii4").encode(b"x" * 10000)
    with pytest.raises(PayloadTooLarge):
        framer(backend, "LengthPrefixFramer", size=4, max_frame_bytes=10).encode(b"x" * 11)


def test_length_prefix_accepts_bytearray_and_memoryview(backend):
    fr = framer(backend, "LengthPrefixFramer")
    assert fr.feed(bytearray(b"\x00\x01a")) == [b"a"]
    assert fr.feed(memoryview(b"\x00\x01b\x00")) == [b"b"]
    assert fr.feed(bytearray(b"\x01c")) == [b"c"]


def test_many_268_byte_frames_in_64k_chunks(backend):
    payload = bytes(range(256)) + b"0123456789ab"
    wire = framer(backend, "LengthPrefixFramer").encode(payload) * 1000
    fr = framer(backend, "LengthPrefixFramer")
    out = []
    for i in range(0, len(wire), 65536):
        out += fr.feed(wire[i : i + 65536])
    assert out == [payload] * 1000 and fr.buffered == 0


def test_bad_constructor_arguments(backend):
    with pytest.raises(ValueError):
        framer(backend, "LengthPrefixFramer", size=3)
    with pytest.raises(ValueError):
        framer(backend, "LengthPrefixFramer", kind="ebcdic4")
    with pytest.raises(ValueError):
        framer(backend, "LengthPrefixFramer", endian="middle")
    with pytest.raises(ValueError):
        framer(backend, "DelimiterFramer", position="infix")
    with pytest.raises(ValueError):
        framer(backend, "DelimiterFramer", max_frame_bytes=0)
    with pytest.raises(ValueError):
        framer(backend, "FixedFramer", 0)


# ---------------------------------------------------------------- fixed


def test_fixed(backend):
    make = lambda: framer(backend, "FixedFramer", 3)  # noqa: E731
    frames, _ = three_ways(make, b"abcdefgh")
    assert frames == [b"abc", b"def"]
    fr = make()
    assert fr.feed(b"abcdefgh") == [b"abc", b"def"] and fr.buffered == 2
    assert fr.encode(b"xyz") == b"xyz"
    with pytest.raises(EncodeError):
        fr.encode(b"xy")
    with pytest.raises(PayloadTooLarge):
        fr.encode(b"wxyz")
    assert framer(backend, "FixedFramer", 4, pad=b" ").encode(b"ab") == b"ab  "


# ---------------------------------------------------------------- SLIP


def test_slip_escapes_round_trip(backend):
    fr = framer(backend, "SlipFramer")
    payload = b"\xc0\xdb\xdc\xdd\x00\xdb\xc0"
    wire = fr.encode(payload)
    assert wire == b"\xc0\xdb\xdc\xdb\xdd\xdc\xdd\x00\xdb\xdd\xdb\xdc\xc0"
    frames, errors = three_ways(lambda: framer(backend, "SlipFramer"), wire * 2 + b"\xc0\xc0")
    assert frames == [payload, payload] and errors == []
    assert framer(backend, "SlipFramer", leading_end=False).encode(b"a") == b"a\xc0"


def test_slip_skips_empty_frames_and_keeps_trailing_bytes(backend):
    fr = framer(backend, "SlipFramer")
    assert fr.feed(b"\xc0\xc0\xc0one\xc0tw") == [b"one"]
    assert fr.buffered == 2
    assert fr.feed(b"o\xc0") == [b"two"]


def test_slip_bad_escape_drops_only_that_frame(backend):
    make = lambda: framer(backend, "SlipFramer")  # noqa: E731
    stream = b"ok\xc0b\xdbad\xc0after\xc0x\xdb\xc0last\xc0"
    frames, errors = three_ways(make, stream)
    assert frames == [b"ok", b"after", b"last"]
    assert errors == [("BadEscape", 3), ("BadEscape", 14)]
    fr = make()
    with pytest.raises(BadEscape) as info:
        fr.feed(stream)
    exc = info.value
    assert exc.frames == [b"ok"] and exc.frame == b"b\xdbad" and exc.offset == 3
    assert isinstance(exc, BadFrame) and exc.recoverable
    with pytest.raises(BadEscape) as info:
        fr.feed(b"")
    assert info.value.frames == [b"after"]
    assert fr.feed(b"") == [b"last"]


def test_slip_limits(backend):
    fr = framer(backend, "SlipFramer", max_frame_bytes=4)
    assert fr.feed(b"\xdb\xdc\xdb\xdc\xdb\xdc\xdb\xdc\xc0") == [b"\xc0" * 4]  # 8 raw, 4 decoded
    with pytest.raises(FrameTooLarge):
        framer(backend, "SlipFramer", max_frame_bytes=4).feed(b"12345\xc0")
    fr = framer(backend, "SlipFramer", max_frame_bytes=4)
    assert fr.feed(b"12345678") == []
    with pytest.raises(FrameTooLarge) as info:
        fr.feed(b"9")
    assert info.value.offset == 0
    with pytest.raises(EncodeError):
        framer(backend, "SlipFramer").encode(b"")


# ---------------------------------------------------------------- raw


def test_raw_passes_chunks_through(backend):
    fr = framer(backend, "RawFramer", max_frame_bytes=4)
    assert fr.feed(b"") == []
    assert fr.feed(b"abc") == [b"abc"]
    assert fr.feed(b"abcdefghij") == [b"abcd", b"efgh", b"ij"]
    assert fr.encode(b"\x00\xff") == b"\x00\xff" and fr.buffered == 0


def test_errors_are_shared_classes(backend):
    fr = framer(backend, "LengthPrefixFramer", kind="ascii4")
    with pytest.raises(F.BadLengthPrefix):
        fr.feed(b"abcd")
    assert F.BadLengthPrefix is BadLengthPrefix
