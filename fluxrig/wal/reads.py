"""The read path of a Wal: committed records by seq, from the in-memory index, off the
write path's locks.

`ReadPath` is a mixin of fluxrig.wal.log.Wal (it uses the Wal's index: `_segments`, `_bases`,
`_lock`; and its own `_read_lock` over one read descriptor per segment). `read_from` plans
under the short index lock, then reads with `os.pread` outside it, so a read never waits on a
commit's write or fsync, and decodes through fluxrig.wal.layout.decode_indexed (length,
CRC-32C, `[seq, body]` with the expected seq; no rescan). A record whose bytes changed on
disk since recovery is left out, counted (`read_lost_records`), logged at ERROR and forgotten
from the index so it cannot hold the cursor back.
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_left, bisect_right

from fluxrig.wal.layout import decode_indexed

__all__ = ["ReadPath", "DEFAULT_READ_MAX_BYTES"]

log = logging.getLogger("fluxrig.wal")

#: One read_from() call returns at most about this many bytes of records (at least one record).
DEFAULT_READ_MAX_BYTES = 4 * 1024 * 1024


class ReadPath:
    """Mixin: `read_from`, `locate` (see the module docstring)."""

    def read_from(self, seq: int, max_n: int, max_bytes: int = DEFAULT_READ_MAX_BYTES) -> list:
        """Up to `max_n` committed records with seq >= `seq`, in order, as WalRecord(seq,
        payload). Seqs may have gaps (damage, size cap). At most about `max_bytes` of records
        are read per call, but always at least one when one exists. A record whose bytes
        changed on disk since recovery (length, CRC, payload) is left out and forgotten."""
        plan = []
        with self._lock:
            if max_n <= 0 or not self._segments:
                return []
            budget = max_bytes
            i = max(bisect_right(self._bases, seq) - 1, 0)
            for seg in self._segments[i:]:
                seqs, offsets = seg.seqs, seg.offsets
                k = bisect_left(seqs, seq)
                j = min(len(seqs), k + max_n)
                if k >= j:
                    continue
                start = offsets[k]
                stop = offsets[j] if j < len(seqs) else seg.size
                cut = stop - start > budget
                if cut:  # records must stay contiguous: a cut segment ends this read
                    floor = k + 1 if not plan else k
                    j = max(floor, bisect_right(offsets, start + budget, k, j) - 1)
                    if j == k:
                        break
                    stop = offsets[j] if j < len(seqs) else seg.size
                plan.append((seg, start, stop, offsets[k:j], seqs[k:j]))
                max_n -= j - k
                budget -= stop - start
                if cut or max_n <= 0 or budget <= 0:
                    break
            gone = self._segments_gone
        out = []
        with self._read_lock:
            if gone != self._read_fds_gone:
                self._prune_read_fds()
            for seg, start, stop, offsets, seqs in plan:
                fd = self._read_fds.get(seg.path)
                if fd is None:
                    try:
                        fd = os.open(seg.path, os.O_RDONLY)
                    except FileNotFoundError:
                        continue  # deleted meanwhile: acknowledged or dropped by the cap
                    self._read_fds[seg.path] = fd
                data = os.pread(fd, stop - start, start)
                got, lost = decode_indexed(data, start, offsets, seqs, self.record_type)
                out += got
                if lost:
                    self._forget_unreadable(seg, lost)
        return out

    def _prune_read_fds(self) -> None:
        # Under _read_lock: close the read descriptors of segments deleted since the last read
        # (one open per segment, not per read; an unlinked segment's data stays readable
        # through its descriptor until then, as it did through a racing open before).
        with self._lock:
            live = {seg.path for seg in self._segments}
            self._read_fds_gone = self._segments_gone
        for path in [p for p in self._read_fds if p not in live]:
            fd = self._read_fds.pop(path)
            try:
                os.close(fd)
            except OSError:
                pass

    def locate(self, seq: int):
        """(segment file name, byte offset) of a committed record, or None."""
        with self._lock:
            i = bisect_right(self._bases, seq) - 1
            if i < 0:
                return None
            seg = self._segments[i]
            k = bisect_left(seg.seqs, seq)
            if k < len(seg.seqs) and seg.seqs[k] == seq:
                return os.path.basename(seg.path), seg.offsets[k]
            return None

    def _forget_unreadable(self, seg, lost: list) -> None:
        # Bytes changed on disk since recovery: drop the lost seqs from the index so the
        # cursor is not held back by records nobody can ever ship. Never silent: counted and
        # logged (one line per read that lost records, with the first few seqs).
        n = 0
        with self._lock:
            for seq in lost:
                k = bisect_left(seg.seqs, seq)
                if k < len(seg.seqs) and seg.seqs[k] == seq:
                    del seg.seqs[k]
                    del seg.offsets[k]
                    self._m["read_lost_records"] += 1
                    n += 1
        if n:
            log.error(
                "WAL %s: %d record(s) in %s changed on disk since recovery and cannot be read (seqs %s); "
                "dropped and counted in read_lost_records",
                self.directory, n, os.path.basename(seg.path), ", ".join(map(str, lost[:5])),
            )  # fmt: skip
