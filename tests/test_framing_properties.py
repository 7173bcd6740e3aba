"""Property tests of the stream framers (hypothesis).

1. Any split of a byte stream gives the same frames and the same errors (type and offset) as
   feeding it whole, and encode -> feed returns the payloads.
2. Differential: the compiled twin and the pure original agree on random and mutated input,
   chunk by chunk: frames, errors (type, offset, message, fields) and bytes buffered.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fluxrig.framing as F
from fluxrig.errors import FramingError
from fluxrig.framing import BadFrame

SMALL = 40  # a small max_frame_bytes, so the limits are hit often

CONFIGS = [
    {"framing": "delimiter"},
    {"framing": "delimiter", "delimiter_include": True},
    {"framing": "delimiter", "delimiter": "<E>", "max_frame_bytes": SMALL},
    {"framing": "delimiter", "delimiter": "\\x02", "delimiter_position": "prefix"},
    {
        "framing": "delimiter",
        "delimiter": "ab",
        "delimiter_position": "prefix",
        "delimiter_include": True,
        "max_frame_bytes": SMALL,
    },
    {"framing": "length_prefix", "length_size": 2},
    {"framing": "length_prefix", "length_size": 4, "length_endian": "little", "max_frame_bytes": SMALL},
    {"framing": "len2_be", "length_includes_header": True, "max_frame_bytes": SMALL},
    {"framing": "len2_le"},
    {"framing": "ascii4"},
    {"framing": "ascii4", "length_includes_header": True, "max_frame_bytes": SMALL},
    {"framing": "bcd2"},
    {"framing": "vap", "length_keep_header": True},
    {"framing": "len4_be", "length_allow_empty": True, "max_frame_bytes": SMALL},
    {"framing": "fixed", "fixed_size": 7},
    {"framing": "slip"},
    {"framing": "slip", "max_frame_bytes": 10},
]
IDS = [",".join(f"{k}={v}" for k, v in c.items()) for c in CONFIGS]

COMPILED = F.BACKEND == "cython"
needs_c = pytest.mark.skipif(not COMPILED, reason="compiled twin not loaded")


def run(fr, chunks):
    """Frames and errors of a chunked feed (recoverable errors continue with feed(b""))."""
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


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


def fits(config: dict, payload: bytes) -> bool:
    """Whether `payload` is something this framing can carry and give back unchanged."""
    fr = F.make_framer(config, pure=True)
    try:
        wire = fr.encode(payload)
    except (F.EncodeError, F.PayloadTooLarge):
        return False
    if config.get("length_keep_header") or config.get("delimiter_include"):
        return False
    return fr.feed(wire) + fr.flush() == [payload]


@st.composite
def stream_case(draw):
    config = draw(st.sampled_from(CONFIGS))
    if config["framing"] == "fixed":
        payloads = draw(st.lists(st.binary(min_size=7, max_size=7), max_size=8))
    else:
        payloads = draw(st.lists(st.binary(max_size=60), max_size=8))
    fr = F.make_framer(config, pure=True)
    wire = bytearray()
    for p in payloads:
        try:
            wire += fr.encode(p)
        except (F.EncodeError, F.PayloadTooLarge):
            pass
    # Mutate some of the time: garbage inserted, bytes flipped.
    if draw(st.booleans()):
        at = draw(st.integers(0, len(wire)))
        wire[at:at] = draw(st.binary(max_size=12))
    if wire and draw(st.booleans()):
        at = draw(st.integers(0, len(wire) - 1))
        wire[at] = draw(st.integers(0, 255))
    cuts = draw(st.lists(st.integers(0, 10_000), max_size=12))
    return config, bytes(wire), cuts


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream_case())
def test_any_split_gives_the_same_frames(case):
    config, wire, cuts = case
    for pure in (True, False) if COMPILED else (True,):
        whole = run(F.make_framer(config, pure=pure), [wire])
        assert run(F.make_framer(config, pure=pure), split(wire, cuts)) == whole
        assert run(F.make_framer(config, pure=pure), [wire[i : i + 1] for i in range(len(wire))]) == whole


@st.composite
def roundtrip_case(draw):
    config = draw(st.sampled_from([c for c in CONFIGS if not c.get("length_keep_header")]))
    if config["framing"] == "delimiter":
        config = {**config, "delimiter_append": True}
    size = 7 if config["framing"] == "fixed" else None
    payloads = draw(st.lists(st.binary(min_size=size or 0, max_size=size or 50), max_size=10))
    payloads = [p for p in payloads if fits(config, p)]
    cuts = draw(st.lists(st.integers(0, 10_000), max_size=10))
    return config, payloads, cuts


@settings(max_examples=300, deadline=None)
@given(roundtrip_case())
def test_encode_then_feed_returns_the_payloads(case):
    config, payloads, cuts = case
    for pure in (True, False) if COMPILED else (True,):
        fr = F.make_framer(config, pure=pure)
        wire = b"".join(fr.encode(p) for p in payloads)
        frames, errors = run(fr, split(wire, cuts))
        frames += fr.flush()
        assert errors == []
        assert frames == payloads


def describe(exc):
    fields = {k: v for k, v in vars(exc).items() if k != "frames"}
    return type(exc).__name__, str(exc), fields, exc.frames


def step_by_step(fr, chunks):
    """Everything observable after each chunk: frames or the error, and bytes buffered."""
    trace = []
    for chunk in chunks:
        try:
            out = ("frames", fr.feed(chunk))
        except FramingError as exc:
            out = ("error", describe(exc))
        trace.append((out, fr.buffered, getattr(fr, "discarded", None)))
    try:
        trace.append(("flush", fr.flush()))
    except FramingError as exc:
        trace.append(("flush-error", describe(exc)))
    return trace


@needs_c
@settings(max_examples=500, deadline=None)
@given(
    config=st.sampled_from(CONFIGS),
    data=st.one_of(
        st.binary(max_size=400),
        st.lists(
            st.sampled_from(
                [
                    b"\n",
                    b"\r\n",
                    b"<E>",
                    b"\x02",
                    b"ab",
                    b"\xc0",
                    b"\xdb",
                    b"\xdb\xdc",
                    b"\x00\x05",
                    b"0012",
                    b"\x00\x00",
                    b"\x99\x99",
                    b"hello",
                    b"\xff",
                ]
            ),
            max_size=60,
        ).map(b"".join),
    ),
    cuts=st.lists(st.integers(0, 10_000), max_size=16),
)
def test_compiled_and_pure_agree(config, data, cuts):
    chunks = split(data, cuts)
    pure = step_by_step(F.make_framer(config, pure=True), chunks)
    compiled = step_by_step(F.make_framer(config, pure=False), chunks)
    assert compiled == pure


@needs_c
@settings(max_examples=200, deadline=None)
@given(config=st.sampled_from(CONFIGS), payload=st.binary(max_size=80))
def test_compiled_and_pure_encode_agree(config, payload):
    def enc(pure):
        try:
            return F.make_framer(config, pure=pure).encode(payload)
        except Exception as exc:  # the same error class and fields, not just "an error"
            return type(exc).__name__, str(exc), exc.size, exc.limit

    assert enc(False) == enc(True)
