"""Acknowledged seqs above the WAL cursor, kept as ranges (sans-IO, no locking).

Job: the shipper acknowledges whole batches -- hundreds of consecutive seqs at once, batches of
different subjects in any order. Holding each seq in a set made an ack cost a set insert, a
bisect and a probe per record (5 us/record measured, 60 % of the Rack's CPU during a drain with
the record reads). `AckRanges` holds the same information as sorted, disjoint, non-adjacent
closed ranges `[lo, hi]`, so acknowledging a range is O(log r + merged ranges) whatever its
length, with r the number of ranges (one per gap in the acknowledgements: a handful).

Contract: `add(lo, hi)` merges a range in (overlapping or adjacent ranges become one);
`first()` is the lowest range or None; `pop_first()` removes it; `trim_through(seq)` forgets
every seq <= seq; `ranges()` lists them. A range may cover seqs that do not exist in the log
(damaged, dropped, never written): the Wal only asks whether the next *existing* seq is
acknowledged, so such seqs are harmless and need no bookkeeping. The Wal (fluxrig/wal/log.py)
owns the locking; nothing here does I/O.

`AckIndex` is the Wal's side of it, a mixin of fluxrig.wal.log.Wal: `ack`, `ack_range`,
`ack_many` and the index queries behind them, on the Wal's in-memory index (`_segments`,
`_bases`: the seqs that exist), its `_acked` AckRanges and `_cursor`, all under the Wal's short
`_lock`. The cursor is the highest seq such that every *existing* record up to it is
acknowledged: seqs that no longer exist (damaged, dropped, refused while the Wal was failed)
never hold it back. It is made durable by `Wal.persist_cursor`.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

__all__ = ["AckRanges", "AckIndex", "contiguous_runs"]


class AckRanges:
    """Sorted disjoint closed ranges of acknowledged seqs (see the module docstring)."""

    __slots__ = ("_lo", "_hi")

    def __init__(self):
        self._lo: list[int] = []
        self._hi: list[int] = []

    def __len__(self) -> int:
        return len(self._lo)

    def __bool__(self) -> bool:
        return bool(self._lo)

    def add(self, lo: int, hi: int) -> None:
        """Merge [lo, hi] in (lo <= hi)."""
        los, his = self._lo, self._hi
        # ranges ending at lo - 1 or later and starting at hi + 1 or earlier touch [lo, hi]
        i = bisect_left(his, lo - 1)
        j = bisect_right(los, hi + 1)
        if i == j:  # touches nothing: a new range (the common case is an append at the end)
            los.insert(i, lo)
            his.insert(i, hi)
            return
        new_lo = min(lo, los[i])
        new_hi = max(hi, his[j - 1])
        los[i:j] = [new_lo]
        his[i:j] = [new_hi]

    def first(self):
        """(lo, hi) of the lowest range, or None."""
        if not self._lo:
            return None
        return self._lo[0], self._hi[0]

    def pop_first(self) -> None:
        del self._lo[0]
        del self._hi[0]

    def trim_through(self, seq: int) -> None:
        """Forget every acknowledged seq <= `seq`."""
        los, his = self._lo, self._hi
        k = bisect_right(his, seq)
        if k:
            del los[:k]
            del his[:k]
        if los and los[0] <= seq:
            los[0] = seq + 1

    def clear(self) -> None:
        self._lo.clear()
        self._hi.clear()

    def ranges(self) -> list:
        """[(lo, hi), ...] in order."""
        return list(zip(self._lo, self._hi))

    def __contains__(self, seq: int) -> bool:
        k = bisect_right(self._lo, seq) - 1
        return k >= 0 and seq <= self._hi[k]

    def __repr__(self) -> str:
        return f"<AckRanges {self.ranges()}>"


def contiguous_runs(seqs) -> list:
    """[(lo, hi), ...] covering exactly the distinct seqs given, in ascending order.

    A slice of consecutive ascending seqs (what the shipper acks) is recognised by comparing it
    with a range at C speed, without a Python loop per seq."""
    if not isinstance(seqs, list):
        seqs = list(seqs)
    n = len(seqs)
    if not n:
        return []
    a, b = seqs[0], seqs[-1]
    if b - a == n - 1 and (n <= 2 or seqs == list(range(a, b + 1))):
        return [(a, b)]
    runs = []
    it = iter(sorted(set(seqs)))
    lo = hi = next(it)
    for s in it:
        if s == hi + 1:
            hi = s
        else:
            runs.append((lo, hi))
            lo = hi = s
    runs.append((lo, hi))
    return runs


class AckIndex:
    """Mixin: `ack`, `ack_range`, `ack_many`, and the index queries behind them."""

    def _exists(self, seq: int) -> bool:
        i = bisect_right(self._bases, seq) - 1
        if i < 0:
            return False
        seqs = self._segments[i].seqs
        k = bisect_left(seqs, seq)
        return k < len(seqs) and seqs[k] == seq

    def _next_existing(self, seq: int):
        i = max(bisect_right(self._bases, seq) - 1, 0)
        for seg in self._segments[i:]:
            k = bisect_right(seg.seqs, seq)
            if k < len(seg.seqs):
                return seg.seqs[k]
        return None

    def _prev_existing(self, seq: int):
        i = bisect_right(self._bases, seq) - 1
        while i >= 0:
            seqs = self._segments[i].seqs
            k = bisect_right(seqs, seq)
            if k:
                return seqs[k - 1]
            i -= 1
        return None

    def _count_existing(self, lo: int, hi: int) -> int:
        n = 0
        i = max(bisect_right(self._bases, lo) - 1, 0)
        segments = self._segments
        while i < len(segments) and segments[i].base <= hi:
            seqs = segments[i].seqs
            n += bisect_right(seqs, hi) - bisect_left(seqs, lo)
            i += 1
        return n

    def ack(self, seq: int) -> int:
        """Mark one committed record acknowledged upstream; returns the cursor. Acks for seqs
        at or below the cursor, not yet committed, or not existing are ignored (and counted)."""
        with self._lock:
            self._ack_range_locked(seq, seq)
            return self._cursor

    def ack_range(self, first: int, last: int) -> int:
        """ack() of every seq in [first, last] at once (O(log n) whatever the length: what the
        shipper does with a batch); returns the cursor. Seqs of the range that ack() would
        ignore are ignored and counted the same way."""
        with self._lock:
            if first <= last:
                self._ack_range_locked(first, last)
            return self._cursor

    def ack_many(self, seqs) -> int:
        """ack() of each seq given, in any order; consecutive runs cost one range each."""
        with self._lock:
            for lo, hi in contiguous_runs(seqs):
                self._ack_range_locked(lo, hi)
            return self._cursor

    def _ack_range_locked(self, first: int, last: int) -> None:
        lo = max(first, self._cursor + 1)
        hi = min(last, self._committed)
        existing = self._count_existing(lo, hi) if lo <= hi else 0
        if existing < last - first + 1:
            self._m["acks_ignored"] += last - first + 1 - existing
        if not existing:
            return
        acked = self._acked
        acked.add(lo, hi)
        # The cursor moves over the next existing seq while it lies in the lowest range; a
        # range holding no existing seq above the cursor (only gaps) is dropped.
        cursor = self._cursor
        while acked:
            n = self._next_existing(cursor)
            if n is None:
                acked.clear()
                break
            a, b = acked.first()
            if n < a:
                break
            acked.pop_first()
            if n <= b:
                cursor = self._prev_existing(b)
        self._cursor = cursor

    def _unacked_locked(self) -> int:
        n = 0
        for seg in self._segments:
            n += len(seg.seqs) - bisect_right(seg.seqs, self._cursor)
        for lo, hi in self._acked.ranges():
            n -= self._count_existing(lo, hi)
        return n
