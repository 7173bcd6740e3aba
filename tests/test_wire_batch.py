"""fluxrig.wire.batch: the guaranteed lane's batch format (round trips, limits, malformed input
with the offset of the item at fault, whole / cut / with trailing bytes)."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxrig.errors import LocalProtocolError, RemoteProtocolError
from fluxrig.msg import FluxMsg
from fluxrig.wire.batch import (
    LANE_BATCH_VERSION,
    MAX_BATCH_BYTES,
    MAX_RECORD_ID_LEN,
    LaneBatchError,
    LaneBatchLimit,
    batch_msg_id,
    decode_lane_batch,
    encode_lane_batch,
    is_lane_batch,
    record_overhead,
)


def records(n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        m = FluxMsg(raw=b"payload %d" % i)
        m.hop(b"g" * 16, b"p" * 16)
        out.append((f"{m.id.hex()}-1-flux.msg.edge.gen.out", m.to_cbor()))
    return out


def test_round_trip_keeps_order_and_bytes():
    recs = records(300)
    data = encode_lane_batch(recs)
    assert is_lane_batch(data)
    assert decode_lane_batch(data) == recs
    assert cbor2.loads(data)[0] == LANE_BATCH_VERSION
    # The byte estimate the pump adds up is never below the real cost of a record.
    one = len(encode_lane_batch(recs[:1])) - len(cbor2.dumps([LANE_BATCH_VERSION]))
    assert one <= len(recs[0][1]) + record_overhead(recs[0][0])


def test_a_single_fluxmsg_is_not_a_batch():
    ((_rid, body),) = records(1)
    assert not is_lane_batch(body) and not is_lane_batch(b"")
    with pytest.raises(LaneBatchError, match="CBOR array") as exc:
        decode_lane_batch(body)
    assert exc.value.offset == 0


@given(st.lists(st.tuples(st.text(min_size=1, max_size=40), st.binary(max_size=200)), min_size=1, max_size=50))
def test_round_trip_any_records(recs):
    recs = [(rid, body) for rid, body in recs if len(rid.encode()) <= MAX_RECORD_ID_LEN]
    if recs:
        assert decode_lane_batch(encode_lane_batch(recs)) == recs


def test_encode_refuses_what_a_receiver_would_refuse():
    with pytest.raises(LaneBatchLimit) as exc:
        encode_lane_batch([])
    assert isinstance(exc.value, LocalProtocolError)
    with pytest.raises(LaneBatchLimit, match="record count 3 exceeds 2"):
        encode_lane_batch(records(3), max_records=2)
    with pytest.raises(LaneBatchLimit, match="size in bytes") as exc:
        encode_lane_batch([("a", b"x" * MAX_BATCH_BYTES)])
    assert exc.value.limit == MAX_BATCH_BYTES


@pytest.mark.parametrize(
    "bad, index, what",
    [
        (["id", b"x", b"extra"], 1, "a record is"),
        ([b"id", b"x"], 1, "a record is"),
        (["id", "text"], 1, "a record is"),
        (["", b"x"], 1, "a record is"),
        (["i" * (MAX_RECORD_ID_LEN + 1), b"x"], 1, "a record is"),
        ("not a pair", 1, "a record is"),
    ],
)
def test_a_malformed_record_is_named_with_its_index_and_offset(bad, index, what):
    good = records(2)
    data = cbor2.dumps([LANE_BATCH_VERSION, good[0], bad, good[1]])
    with pytest.raises(LaneBatchError, match=what) as exc:
        decode_lane_batch(data)
    err = exc.value
    assert isinstance(err, RemoteProtocolError) and err.index == index
    # array head (1 byte) + version (1 byte) + the first record
    assert err.offset == 2 + len(cbor2.dumps(list(good[0])))
    assert data[err.offset :].startswith(cbor2.dumps(bad))


def test_version_and_shape_errors():
    with pytest.raises(LaneBatchError, match="version 2") as exc:
        decode_lane_batch(cbor2.dumps([2, *records(1)]))
    assert exc.value.offset == 1 and exc.value.index is None
    with pytest.raises(LaneBatchError, match="version 'x'"):
        decode_lane_batch(cbor2.dumps(["x"]))
    with pytest.raises(LaneBatchError, match="empty array"):
        decode_lane_batch(cbor2.dumps([]))
    with pytest.raises(LaneBatchError, match="5 records") as exc:
        decode_lane_batch(encode_lane_batch(records(5)), max_records=4)
    assert exc.value.limit == 4


def test_trailing_bytes_are_refused_with_their_offset():
    data = encode_lane_batch(records(3))
    with pytest.raises(LaneBatchError, match="3 trailing bytes") as exc:
        decode_lane_batch(data + b"\x00\x01\x02")
    assert exc.value.offset == len(data)


def test_every_cut_of_a_batch_is_refused_never_misread():
    recs = records(4)
    data = encode_lane_batch(recs)
    for n in range(len(data)):
        with pytest.raises(LaneBatchError) as exc:
            decode_lane_batch(data[:n])
        assert exc.value.offset is not None and 0 <= exc.value.offset <= n


def test_a_cut_inside_a_record_names_that_record():
    recs = records(4)
    data = encode_lane_batch(recs)
    start = len(encode_lane_batch(recs[:2]))  # the array head is one byte for 3 and for 5 items
    with pytest.raises(LaneBatchError) as exc:
        decode_lane_batch(data[: start + 5])
    assert exc.value.index == 2 and exc.value.offset == start


def test_batch_ids_name_their_records():
    assert batch_msg_id("ab12", 5, 9, 3) == "L-ab12-5-9-3"
    assert batch_msg_id("ab12", 5, 9, 3) != batch_msg_id("ab12", 5, 9, 4)
