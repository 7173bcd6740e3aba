"""The WAL on a full disk, for real: a small tmpfs (tests/smallfs.py), ENOSPC from the kernel.

What must hold: an append the WAL acknowledged is never lost; one that failed is never
written later (no ghost); the Wal heals by itself once space returns (no restart), logging
one ERROR per change of state, not one per refused append; opening on a full disk raises a
typed error; a disk full of acknowledged segments frees itself even when the cursor file
cannot be written. Every test fails on the code before healing existed (the Wal stayed failed).
"""

from __future__ import annotations

import asyncio
import logging
import os

import pytest
from smallfs import fill, free_bytes, small_fs

from fluxrig.wal import AsyncWal, Wal, WalFailed
from fluxrig.wal.errors import WalOpenFailed
from fluxrig.wal.log import MIN_SEGMENT_BYTES

pytestmark = pytest.mark.timeout(60)

BODY = 1000


def body(i: int) -> bytes:
    return (b"%08d" % i) * (BODY // 8)


def fill_wal(wal: Wal, start: int = 0, limit: int = 100_000) -> tuple[list[int], WalFailed]:
    """Append until the disk refuses; returns (accepted record numbers, the failure)."""
    accepted = []
    for i in range(start, start + limit):
        try:
            wal.append(body(i))
        except WalFailed as exc:
            return accepted, exc
        accepted.append(i)
    raise AssertionError("the disk never filled")


def read_all(directory) -> list[bytes]:
    with Wal(directory, readonly=True) as ro:
        out, seq = [], 1
        while True:
            got = ro.read_from(seq, 1000)
            if not got:
                return [r.payload for r in out]
            out += got
            seq = got[-1].seq + 1


def test_wal_heals_once_space_returns_and_keeps_exactly_what_it_acknowledged(tmp_path):
    with small_fs(tmp_path / "fs", "1m") as fs:
        ballast = fill(fs, leave=300 * 1024)
        d = os.path.join(fs, "wal")
        wal = Wal(d, fsync="always", segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None)
        accepted, failure = fill_wal(wal)
        assert failure.op == "write" and failure.errno == 28 and accepted
        assert wal.metrics()["failed"] and wal.metrics()["failures"] == 1
        with pytest.raises(WalFailed):
            wal.append(b"refused while failed")
        assert wal.heal() is False  # still full: stays failed, says why
        assert wal.heal_error
        os.unlink(ballast)
        assert wal.heal() is True
        m = wal.metrics()
        assert not m["failed"] and m["heals"] == 1 and m["refused_records"] >= 2
        more = list(range(1_000_000, 1_000_050))
        for i in more:
            wal.append(body(i))
        wal.close()
        assert read_all(d) == [body(i) for i in accepted + more]  # nothing lost, no ghost, in order
        # and it reopens normally, seqs still growing
        with Wal(d, fsync="always", max_size_bytes=None) as again:
            seq = again.append(b"after reopen")
            assert seq > m["next_seq"]


def test_open_on_a_full_disk_raises_a_typed_error_then_opens_once_freed(tmp_path):
    with small_fs(tmp_path / "fs", "256k") as fs:
        ballast = fill(fs)
        d = os.path.join(fs, "wal")
        with pytest.raises(WalOpenFailed) as info:
            Wal(d, fsync="always")
        assert info.value.errno == 28 and "free space" in str(info.value)
        assert not isinstance(info.value, OSError)
        os.unlink(ballast)
        with Wal(d, fsync="always") as wal:
            assert wal.append(b"x") >= 1


def test_cursor_refused_for_lack_of_space_still_frees_acknowledged_segments(tmp_path):
    with small_fs(tmp_path / "fs", "1m") as fs:
        d = os.path.join(fs, "wal")
        wal = Wal(d, fsync="always", segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None)
        accepted, _failure = fill_wal(wal)
        assert free_bytes(fs) < 64 * 1024
        # Everything committed is acknowledged upstream, but not even 20 bytes of cursor fit.
        wal.ack_range(1, wal.committed_seq)
        with pytest.raises(WalFailed) as info:
            wal.persist_cursor()
        assert info.value.op == "cursor"
        m = wal.metrics()
        assert m["emergency_deleted_segments"] > 0 and m["cursor_failures"] == 1
        assert free_bytes(fs) > 256 * 1024  # the shipped segments are gone
        assert wal.heal() is True
        seq = wal.append(b"after")
        assert wal.persist_cursor() is True
        wal.close()
        assert read_all(d)[-1] == b"after"
        assert seq > len(accepted)


async def test_async_wal_one_error_per_state_change_heals_by_itself(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="fluxrig.wal")
    with small_fs(tmp_path / "fs", "1m") as fs:
        ballast = fill(fs, leave=300 * 1024)
        d = os.path.join(fs, "wal")
        wal = await AsyncWal.open(d, fsync="always", segment_max_bytes=MIN_SEGMENT_BYTES, max_size_bytes=None,
                                  heal_interval=0.05)  # fmt: skip
        try:
            accepted, refused, i = [], 0, 0
            while refused < 200:
                try:
                    await wal.append(body(i))
                    accepted.append(i)
                except WalFailed:
                    refused += 1
                i += 1
            assert not wal.healthy and wal.metrics()["failed"]
            # The failure is logged from the loop once the writer thread's outcome lands there,
            # which on a loaded box can be after the refused appends have returned.
            for _ in range(100):
                if any(r.levelno == logging.ERROR for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1 and "failed" in errors[0].getMessage(), [r.getMessage() for r in errors]
            assert await wal.wait_healthy(0.3) is False  # the disk is still full
            committed = wal.committed_seq
            os.unlink(ballast)
            assert await wal.wait_healthy(5.0) is True
            # healthy is set by the writer thread; the "healed" line comes from the loop's callback
            for _ in range(100):
                errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
                if len(errors) >= 2:
                    break
                await asyncio.sleep(0.01)
            assert len(errors) == 2 and "healed" in errors[1], errors
            more = list(range(10**6, 10**6 + 100))
            futs = [wal.append_nowait(body(k)) for k in more]
            await asyncio.gather(*futs)
            assert wal.committed_seq > committed
            m = wal.metrics()
            assert m["heals"] == 1 and m["refused_records"] >= 200 and m["healthy"]
        finally:
            await wal.close()
        assert read_all(d) == [body(k) for k in accepted + more]
