"""fluxrig_mixer.registry on a real DuckDB file: `transaction()` commits a block whole or not at
all, and the status changes built on it leave no half-written rows."""

from __future__ import annotations

import pytest
from fluxrig_mixer.registry import Database, Registry, transaction
from fluxrig_mixer.states import IllegalTransition


def _nkey() -> str:
    """A fresh Rack bus identity (its public NKey), as a Hello brings it."""
    from fluxrig.wire import identity

    return identity.public_key(identity.new_user_seed())


@pytest.fixture
def db(tmp_path):
    d = Database(str(tmp_path / "mixer.duckdb"))
    d.conn.execute("CREATE TABLE t(x INTEGER)")
    yield d
    d.close()


def _rows(db) -> list[int]:
    return [r[0] for r in db.conn.execute("SELECT x FROM t ORDER BY x").fetchall()]


def test_a_block_that_ends_is_committed(db):
    with db.transaction() as c:
        c.execute("INSERT INTO t VALUES (1)")
        c.execute("INSERT INTO t VALUES (2)")
    assert _rows(db) == [1, 2]


def test_a_block_that_raises_is_rolled_back_and_the_error_goes_on(db):
    with pytest.raises(ZeroDivisionError), transaction(db.conn) as c:
        c.execute("INSERT INTO t VALUES (1)")
        _ = 1 / 0
    assert _rows(db) == []
    with transaction(db.conn) as c:  # the connection is usable again: no transaction left open
        c.execute("INSERT INTO t VALUES (3)")
    assert _rows(db) == [3]


def test_a_thread_cursor_gets_its_own_transaction(db):
    import threading

    def write():
        with db.transaction() as c:  # not the owner thread: its own cursor
            assert c is not db.conn
            c.execute("INSERT INTO t VALUES (4)")

    t = threading.Thread(target=write)
    t.start()
    t.join(10)
    assert _rows(db) == [4]


def test_an_illegal_transition_writes_nothing(tmp_path):
    db = Database(str(tmp_path / "mixer.duckdb"))
    try:
        reg = Registry(db)
        rack = reg.create("edge-1", nkey=_nkey())
        with pytest.raises(IllegalTransition):
            reg.transition(rack.rack_id, "activate")  # pending racks are approved, not activated
        assert reg.get(rack.rack_id).status == "pending"
        assert [e["event"] for e in reg.events(rack.rack_id)] == ["enroll"]
        moved = reg.transition(rack.rack_id, "approve")
        assert moved.status == "active"
        assert [e["event"] for e in reg.events(rack.rack_id)] == ["approve", "enroll"]
        # The table in the file knows a rename too: the status stays (issue 13).
        assert reg.transition(rack.rack_id, "rename").status == "active"
        reg.transition(rack.rack_id, "remove")
        with pytest.raises(IllegalTransition):
            reg.transition(rack.rack_id, "rename")
    finally:
        db.close()
