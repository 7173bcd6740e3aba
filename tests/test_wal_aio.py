"""AsyncWal (fluxrig.wal.aio): futures resolve when durable per policy, group commit shares
fsyncs between concurrent appenders, the cursor is persisted off the loop, close() commits,
backpressure and failure reach the callers. Real files, a real event loop."""

from __future__ import annotations

import asyncio
import os
import time

import cbor2
import pytest

from fluxrig.wal import AsyncWal, Wal, WalFailed, WalRecord


def rec(i: int) -> bytes:
    return cbor2.dumps({"i": i, "pad": b"p" * 200})


async def test_always_group_commit(tmp_path):
    async with await AsyncWal.open(tmp_path, fsync="always") as wal:

        async def appender(k):
            return [await wal.append(rec(k * 1000 + j)) for j in range(20)]

        results = await asyncio.gather(*(appender(k) for k in range(50)))
        seqs = sorted(s for r in results for s in r)
        assert seqs == list(range(1, 1001))
        m = wal.metrics()
        # every append was acknowledged after an fsync, but they shared them
        assert m["committed_seq"] == 1000
        assert 1 <= m["fsyncs"] < 1000 / 2
        assert m["inflight_appends"] == 0


async def test_batch_policy_acknowledges_after_the_window(tmp_path):
    async with await AsyncWal.open(tmp_path, fsync="batch", batch_window_ms=40) as wal:
        t0 = time.monotonic()
        futs = [wal.append_nowait(rec(i)) for i in range(500)]
        assert wal.committed_seq == 0  # nothing acknowledged before the batch fsync
        seqs = await asyncio.gather(*futs)
        elapsed = time.monotonic() - t0
        assert seqs == list(range(1, 501))
        assert elapsed >= 0.03  # waited for the window (lower bound only)
        assert wal.metrics()["fsyncs"] <= 2


async def test_never_policy_resolves_without_fsync(tmp_path):
    async with await AsyncWal.open(tmp_path, fsync="never") as wal:
        seqs = await asyncio.gather(*(wal.append(rec(i)) for i in range(100)))
        assert sorted(seqs) == list(range(1, 101))
        assert wal.metrics()["fsyncs"] == 0


async def test_read_ack_and_cursor_persisted_off_loop(tmp_path):
    async with await AsyncWal.open(tmp_path, fsync="batch", batch_window_ms=5, cursor_sync_ms=10) as wal:
        for i in range(30):
            wal.append_nowait(rec(i))
        await wal.flush()
        got = await wal.read_from(1, 10)
        assert [r.seq for r in got] == list(range(1, 11))
        assert isinstance(got[0], WalRecord) and got[0].decode()["i"] == 0
        for r in got:
            wal.ack(r.seq)
        assert wal.cursor == 10
        for _ in range(100):
            if wal.wal.persisted_cursor == 10:
                break
            await asyncio.sleep(0.01)
        assert wal.wal.persisted_cursor == 10
        wal.ack_many(range(11, 21))
    with Wal(tmp_path) as w:
        assert w.cursor == 20  # close() persisted the rest


async def test_close_commits_what_is_staged(tmp_path):
    wal = await AsyncWal.open(tmp_path, fsync="batch", batch_window_ms=100)
    futs = [wal.append_nowait(rec(i)) for i in range(10)]
    await wal.close()  # does not wait out the window
    assert [f.result() for f in futs] == list(range(1, 11))
    with Wal(tmp_path) as w:
        assert w.recovery.records_ok == 10


async def test_wait_committed(tmp_path):
    async with await AsyncWal.open(tmp_path, fsync="batch", batch_window_ms=10) as wal:
        assert await wal.wait_committed(0, timeout=0.05) is False
        waiter = asyncio.ensure_future(wal.wait_committed(0, timeout=5))
        await asyncio.sleep(0)
        wal.append_nowait(rec(1))
        assert await waiter is True


async def test_append_waits_out_backpressure(tmp_path):
    async with await AsyncWal.open(tmp_path, fsync="batch", batch_window_ms=5, max_pending_bytes=2000) as wal:
        seqs = await asyncio.gather(*(wal.append(rec(i)) for i in range(100)))
        assert sorted(seqs) == list(range(1, 101))
        assert wal.metrics()["wal_full"] > 0


async def test_failed_commit_fails_the_futures(tmp_path):
    async with await AsyncWal.open(tmp_path, fsync="always") as wal:
        await wal.append(rec(0))
        os.close(wal.wal._fd)  # a real EBADF on the next write
        futs = [wal.append_nowait(rec(i)) for i in range(5)]
        for f in futs:
            with pytest.raises(WalFailed):
                await f
        with pytest.raises(WalFailed):
            wal.append_nowait(rec(9))
        wal.wal._fd = None
    with Wal(tmp_path) as w:
        assert w.recovery.records_ok == 1


async def test_batch_window_is_cut_short_by_a_burst(tmp_path):
    async with await AsyncWal.open(tmp_path, fsync="batch", max_pending_bytes=20000) as wal:
        wal.wal.batch_window = 30.0  # a window no test would wait out
        futs = [wal.append_nowait(rec(i)) for i in range(40)]  # ~9 KB: under half the limit
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in futs)
        futs += [wal.append_nowait(rec(i)) for i in range(40, 50)]  # crosses half: commit now
        done, _ = await asyncio.wait(futs, timeout=10)
        assert len(done) == 50 and wal.metrics()["wal_full"] == 0


async def test_one_writer_callback_per_group_and_cancelled_appender(tmp_path):
    async with await AsyncWal.open(tmp_path, fsync="always") as wal:
        groups = 0
        done = wal._group_done

        def counting(outcome):
            nonlocal groups
            groups += 1
            done(outcome)

        wal._group_done = counting
        tasks = [asyncio.ensure_future(wal.append(rec(i))) for i in range(64)]
        await asyncio.sleep(0)
        tasks[5].cancel()  # one appender gives up: the others' group is not disturbed
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[5], asyncio.CancelledError)
        assert sorted(r for r in results if isinstance(r, int)) == [s for s in range(1, 65) if s != 6]
        assert groups == wal.metrics()["commits"] <= 4  # one loop callback per group commit
        assert await wal.flush() == 64  # the cancelled record was still written
    with Wal(tmp_path) as w:
        assert w.recovery.records_ok == 64


async def test_append_then_calls_back_per_record_in_order_and_with_the_failure(tmp_path):
    """append_then: one call per record from its group's commit (seq, None), a failing callback
    does not stop the others, a failed commit calls back (None, WalFailed)."""
    calls = []

    def cb(arg, seq, exc):
        calls.append((arg, seq, exc))
        if arg == 3:
            raise RuntimeError("a caller's bug")

    async with await AsyncWal.open(tmp_path, fsync="always") as wal:
        seqs = [wal.append_then(rec(i), cb, i) for i in range(6)]
        await wal.flush()
        assert [(a, s) for a, s, _e in calls] == list(zip(range(6), seqs, strict=True))
        assert all(e is None for _a, _s, e in calls)
        os.close(wal.wal._fd)  # a real EBADF on the next write
        calls.clear()
        wal.append_then(rec(9), cb, 9)
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.01)
        ((arg, seq, exc),) = calls
        assert arg == 9 and seq is None and isinstance(exc, WalFailed)
        wal.wal._fd = None
    with Wal(tmp_path) as w:
        assert w.recovery.records_ok == 6
