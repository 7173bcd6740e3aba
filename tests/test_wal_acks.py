"""Range acknowledgements (fluxrig.wal.acks, Wal.ack_range / ack_many): the ranges themselves,
the cursor against a per-seq model over a log with gaps (damaged records), and the cursor's
persistence, segment deletion and the size cap when acks come in ranges, across reopen."""

from __future__ import annotations

import itertools
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxrig.wal import Wal
from fluxrig.wal.acks import AckRanges, contiguous_runs
from fluxrig.wal.layout import segment_name
from fluxrig.wal.log import MIN_SEGMENT_BYTES


def body(i: int, size: int = 40) -> bytes:
    return b"%06d" % i + b"x" * size


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), max_size=40))
def test_ack_ranges_hold_exactly_the_union(adds):
    r = AckRanges()
    model: set[int] = set()
    for lo, span in adds:
        r.add(lo, lo + span)
        model.update(range(lo, lo + span + 1))
    got = r.ranges()
    assert all(a <= b for a, b in got)
    assert all(b1 + 1 < a2 for (_a1, b1), (a2, _b2) in zip(got, got[1:]))  # disjoint, not adjacent
    assert {s for a, b in got for s in range(a, b + 1)} == model
    assert all((s in r) == (s in model) for s in range(-1, 72))
    r.trim_through(30)
    assert {s for a, b in r.ranges() for s in range(a, b + 1)} == {s for s in model if s > 30}


@given(st.lists(st.integers(1, 50), max_size=30))
def test_contiguous_runs_cover_the_distinct_seqs(seqs):
    runs = contiguous_runs(seqs)
    assert [s for a, b in runs for s in range(a, b + 1)] == sorted(set(seqs))
    assert all(b1 + 1 < a2 for (_a1, b1), (a2, _b2) in zip(runs, runs[1:]))


def test_contiguous_runs_fast_path_and_iterables():
    assert contiguous_runs(list(range(5, 133))) == [(5, 132)]
    assert contiguous_runs(range(3, 4)) == [(3, 3)]
    assert contiguous_runs(iter([4, 5, 6])) == [(4, 6)]
    assert contiguous_runs([1, 3, 2]) == [(1, 3)]  # same ends and length, not in order
    assert contiguous_runs([1, 1, 3]) == [(1, 1), (3, 3)]  # length matches, not contiguous


# -- the cursor against a model ----------------------------------------------------------------

N_RECORDS = 60
DAMAGED = (7, 8, 30, 45)  # seqs whose records are damaged on disk: they do not exist after open


@pytest.fixture(scope="module")
def gapped_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gapped")
    with Wal(d, fsync="never", max_size_bytes=None) as w:
        for i in range(1, N_RECORDS + 1):
            w.stage(body(i))
        w.commit()
        where = {s: w.locate(s) for s in DAMAGED}
    for _seq, (name, off) in where.items():
        with open(d / name, "r+b") as fh:
            fh.seek(off + 12)
            b = fh.read(1)
            fh.seek(off + 12)
            fh.write(bytes([b[0] ^ 0xFF]))
    return d


def model_cursor(existing: list, acked: set, start: int) -> int:
    cursor = start
    for s in existing:
        if s <= cursor:
            continue
        if s not in acked:
            break
        cursor = s
    return cursor


_copies = itertools.count()
ops = st.lists(
    st.one_of(
        st.tuples(st.just("one"), st.integers(0, N_RECORDS + 3)),
        st.tuples(st.just("range"), st.integers(0, N_RECORDS + 3), st.integers(-1, 20)),
        st.tuples(st.just("many"), st.lists(st.integers(0, N_RECORDS + 3), max_size=12)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_cursor_matches_the_per_seq_model(gapped_dir, tmp_path, ops):
    d = tmp_path / f"w{next(_copies)}"
    shutil.copytree(gapped_dir, d)
    with Wal(d, fsync="never", max_size_bytes=None) as w:
        existing = [r.seq for r in w.read_from(1, 10_000)]
        assert not set(DAMAGED) & set(existing) and len(existing) == N_RECORDS - len(DAMAGED)
        acked: set[int] = set()
        ignored = 0
        for op in ops:
            if op[0] == "one":
                seqs = [op[1]]
                w.ack(op[1])
            elif op[0] == "range":
                seqs = list(range(op[1], op[1] + op[2] + 1))
                w.ack_range(op[1], op[1] + op[2])
            else:
                seqs = op[1]
                w.ack_many(op[1])
            # a run of consecutive seqs is one acknowledgement: its seqs at or below the
            # cursor as it stood before the run, or not existing, are ignored and counted
            for lo, hi in contiguous_runs(seqs):
                cursor_before = model_cursor(existing, acked, 0)
                for s in range(lo, hi + 1):
                    if s <= cursor_before or s not in existing:
                        ignored += 1
                    else:
                        acked.add(s)
            assert w.cursor == model_cursor(existing, acked, 0), op
        m = w.metrics()
        assert m["acks_ignored"] == ignored
        assert m["unacked_records"] == len([s for s in existing if s > w.cursor and s not in acked])


# -- persistence, deletion, cap, reopen --------------------------------------------------------


def seg_files(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".seg"))


def test_range_acks_persist_delete_segments_and_survive_reopen(tmp_path):
    pad = b"p" * 2000
    with Wal(tmp_path, fsync="never", segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None) as w:
        for i in range(200):
            w.stage(pad + b"%d" % i)
            w.commit()
        assert len(seg_files(tmp_path)) >= 4
        second_base = int(seg_files(tmp_path)[1][4:20], 16)
        third_base = int(seg_files(tmp_path)[2][4:20], 16)
        # a range ending one short of the first segment's end deletes nothing
        assert w.ack_range(1, second_base - 2) == second_base - 2
        w.persist_cursor()
        assert seg_files(tmp_path)[0] == segment_name(1)
        # out of order: the later range first, the cursor waits for the gap
        assert w.ack_range(second_base, third_base + 3) == second_base - 2
        assert w.ack_many([second_base - 1]) == third_base + 3
        assert w.persisted_cursor == second_base - 2  # not yet written
    # close persisted it; the first two segments are fully acknowledged and gone
    assert seg_files(tmp_path)[0] == segment_name(third_base)
    with Wal(tmp_path, fsync="never", segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None) as w:
        assert w.cursor == third_base + 3
        assert w.read_from(w.cursor + 1, 1)[0].seq == third_base + 4  # first unacknowledged
        w.ack_range(third_base + 4, 10_000)  # past committed: only what exists counts
        assert w.cursor == 200
        assert w.metrics()["unacked_records"] == 0


def test_unpersisted_range_ack_is_lost_by_a_crash_never_ahead(tmp_path):
    w = Wal(tmp_path, fsync="never", max_size_bytes=None)
    for i in range(50):
        w.stage(body(i))
    w.commit()
    w.ack_range(1, 20)
    w.persist_cursor()
    w.ack_range(21, 40)
    # a crash: no close(), the lock and descriptors are dropped with the process
    w._release_files()
    with Wal(tmp_path, fsync="never", max_size_bytes=None) as w2:
        assert w2.cursor == 20  # stale (re-sent and deduplicated upstream), never ahead
        assert [r.seq for r in w2.read_from(w2.cursor + 1, 3)] == [21, 22, 23]


def test_size_cap_counts_only_unacked_records_of_ranges(tmp_path):
    pad = b"q" * 4000
    cap = 4 * MIN_SEGMENT_BYTES
    with Wal(tmp_path, fsync="never", max_size_bytes=cap) as w:
        for _i in range(40):
            w.stage(pad)
            w.commit()
        per_seg = int(seg_files(tmp_path)[1][4:20], 16) - 1  # records in the first segment
        # ack the second half of the first segment and a range reaching into the next one
        w.ack_range(per_seg // 2 + 1, per_seg + 3)
        while w.metrics()["dropped_segments"] == 0:
            w.stage(pad)
            w.commit()
        m = w.metrics()
        assert m["dropped_records"] == per_seg // 2  # the acked half is not counted as lost
        # the acks that reached into the surviving segment still count there
        assert w.ack_range(per_seg + 4, per_seg + 4) == per_seg + 4
