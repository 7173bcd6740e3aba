import cbor2
import pytest

from fluxrig.errors import MessageError
from fluxrig.ids import uuid7
from fluxrig.msg import MAX_HOPS, MAX_PAYLOAD_SIZE, FluxMsg


def test_cbor_round_trip_keeps_every_field():
    m = FluxMsg(raw=b"\x00\xffabc", meta={"conn.id": "c1"}, data={"a": {"b": [1, 2, b"\x01"]}}, trace="abc", flags=1)
    m.hop(uuid7(), uuid7())
    m2 = FluxMsg.from_cbor(m.to_cbor())
    assert m2 == m
    assert m2.to_wire() == m.to_wire()


def test_wire_keys_are_the_go_originals():
    m = FluxMsg(raw=b"x")
    m.hop(b"g" * 16, b"p" * 16)
    doc = cbor2.loads(m.to_cbor())
    assert set(doc) == {"id", "ref_id", "trace", "src_id", "meta", "data", "flags", "raw", "path", "ts"}
    assert set(doc["path"][0]) == {"g", "p", "t"}
    assert isinstance(doc["id"], bytes) and len(doc["id"]) == 16


def test_uuid7_is_version_7_and_time_ordered():
    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(i[6] >> 4 == 7 and i[8] >> 6 == 0b10 for i in ids)


def test_uuid7_of_a_forked_child_never_shares_the_parents_tail():
    import os

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: ids made in the same millisecond as the parent's
        os.write(w, b"".join(uuid7() for _ in range(4)))
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(r, 64)
    os.close(r)
    os.close(w)
    mine = [uuid7() for _ in range(4)]
    theirs = [child[i : i + 16] for i in range(0, 64, 16)]
    assert not {t[8:] for t in theirs} & {m[8:] for m in mine}


def test_dotted_paths_create_and_read():
    m = FluxMsg()
    m.set("iso8583.field.11", "000123")
    assert m.get("iso8583.field.11") == "000123"
    assert m.data == {"iso8583": {"field": {"11": "000123"}}}
    assert m.get("data.iso8583.field.11") == "000123"
    assert m.get("missing.path", "d") == "d"
    m.set("meta.conn.id", "abc")
    assert m.meta["conn.id"] == "abc"
    assert m.delete("iso8583.field.11") == "000123"


def test_set_through_a_non_map_names_the_step():
    m = FluxMsg(data={"a": "text"})
    with pytest.raises(MessageError, match="'a' holds a str"):
        m.set("a.b", 1)


def test_binary_metadata_uses_hex_prefix():
    m = FluxMsg()
    m.set_meta("bin", b"\xff\x00")
    assert m.meta["bin"] == "hex:ff00"
    m.set_meta_bytes("hdr", b"ab")
    assert m.meta["hdr"] == "hex:6162"
    assert m.meta_bytes("hdr") == b"ab"
    m.set_meta("text", b"plain")
    assert m.meta["text"] == "plain"


def test_hop_limit():
    m = FluxMsg()
    for _ in range(MAX_HOPS):
        m.hop(b"g", b"p")
    with pytest.raises(MessageError, match="hops"):
        m.hop(b"g", b"p")


def test_size_limit():
    m = FluxMsg(raw=b"x" * (MAX_PAYLOAD_SIZE + 1))
    with pytest.raises(MessageError, match="exceeds the limit"):
        m.to_cbor()


def test_non_text_metadata_refused_on_the_wire():
    m = FluxMsg(meta={"k": 1})
    with pytest.raises(MessageError, match="must be text"):
        m.validate()


def test_copy_is_independent():
    m = FluxMsg(data={"a": {"b": 1}}, meta={"k": "v"})
    c = m.copy()
    c.set("a.b", 2)
    c.meta["k"] = "w"
    assert m.get("a.b") == 1 and m.meta["k"] == "v"


def test_garbage_cbor_is_a_message_error():
    with pytest.raises(MessageError):
        FluxMsg.from_cbor(b"\xff\xfe garbage")
    with pytest.raises(MessageError):
        FluxMsg.from_cbor(cbor2.dumps([1, 2]))


def test_configured_limits_apply():
    from fluxrig.msg import set_limits

    set_limits(3, 100)
    try:
        m = FluxMsg(raw=b"x" * 101)
        for _ in range(3):
            m.hop(b"g", b"p")
        with pytest.raises(MessageError, match="3 hops"):
            m.hop(b"g", b"p")
        with pytest.raises(MessageError, match="limit of 100"):
            m.to_cbor()
    finally:
        set_limits(MAX_HOPS, MAX_PAYLOAD_SIZE)


def test_copy_is_independent_all_the_way_down_and_keeps_other_types():
    import datetime

    when = datetime.datetime(2026, 12, 3)
    m = FluxMsg(data={"a": {"b": [1, {"c": b"x"}]}, "t": (1, [2]), "d": when, "deep": [[[[["x"]]]]]})
    c = m.copy()
    assert c.data == m.data
    c.data["a"]["b"][1]["c"] = b"y"
    c.data["a"]["b"].append(3)
    c.data["t"][1].append(9)  # a tuple goes through deepcopy: its list is not shared either
    c.data["deep"][0][0][0][0].append("y")
    assert m.data == {"a": {"b": [1, {"c": b"x"}]}, "t": (1, [2]), "d": when, "deep": [[[[["x"]]]]]}
    nested = cur = {}
    for _ in range(200):  # past the tree walk's depth: deepcopy takes over, still a copy
        cur["n"] = cur = {}
    assert FluxMsg(data=nested).copy().data == nested
