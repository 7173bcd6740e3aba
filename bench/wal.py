"""WAL append throughput under each fsync policy, beside a raw write + fdatasync loop.

Every figure comes from the same run, the same directory and the same 256-byte bodies:

* raw_fsync_per_s       one os.write of a 270-byte record then os.fdatasync, in a loop: what
                        the disk gives one synchronous writer (the call the WAL itself uses).
* always_appends_per_s  AsyncWal, fsync=always, --concurrency tasks each awaiting append() in
                        a loop: an append resolves only after an fdatasync covering it; appends
                        that arrive during an fsync share the next one (group commit).
                        always_serial_appends_per_s is the same with one appender.
* batch_appends_per_s   AsyncWal, fsync=batch (--window-ms, default 50): a producer stages
                        records with append_nowait() as fast as it can, yielding to the loop
                        every 500; counted once the last future (durable) resolved.
* never_appends_per_s   the same producer with fsync=never (acknowledged when written).
* commit_p50_ms / commit_p99_ms (always_, never_): --concurrency tasks each awaiting append()
                        in a loop; the latency of every awaited append (stage to resolved).
* read_from_us_per_record  Wal.read_from over --micro-records committed records (256-byte
                        bodies) in steps of --read-step, in the calling thread (as the pump does).
* ack_us_per_record     Wal.ack_many over the same records in slices of --ack-slice, in order;
                        ack_shuffled_us_per_record acks the slices in a scrambled order (batches
                        of different subjects are acknowledged out of order).

Each phase runs --seconds (default 2) of producing and is counted until every record produced
is acknowledged. `backend` says whether CRC-32C ran compiled ("cython") or pure.

    python bench/wal.py            # table
    python bench/wal.py --json     # one JSON object
    python bench/wal.py --dir /var/lib/fluxrig/bench   # measure the disk the Rack will use

The default directory is a fresh one under the current directory (not /tmp, often tmpfs, where
fsync is free); `fs` reports the filesystem type it is on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit  # noqa: E402

from fluxrig.wal import AsyncWal, Wal, WalFull  # noqa: E402
from fluxrig.wal.crc32c import BACKEND  # noqa: E402
from fluxrig.wal.log import _datasync  # noqa: E402

RECORD_BYTES = 256
CHUNK = 500


def fs_type(path: str) -> str:
    """Filesystem type of the mount holding `path` (from /proc/mounts; '?' elsewhere)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) > len(best):
                        best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def raw_fsync(d: str, seconds: float) -> float:
    record = os.urandom(RECORD_BYTES + 14)
    fd = os.open(os.path.join(d, "raw.bin"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            os.write(fd, record)
            _datasync(fd)
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        os.close(fd)


def _pct(values: list, q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def awaiting_appenders(d: str, seconds: float, concurrency: int, **opts) -> tuple[float, float, list]:
    bodies = [os.urandom(RECORD_BYTES) for _ in range(64)]
    latencies: list[float] = []
    async with await AsyncWal.open(d, max_size_bytes=None, **opts) as wal:
        stop = False
        count = 0
        clock = time.perf_counter

        async def appender(k: int) -> None:
            nonlocal count
            i = k
            while not stop:
                t = clock()
                await wal.append(bodies[i & 63])
                latencies.append(clock() - t)
                i += 1
                count += 1

        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(appender(k)) for k in range(concurrency)]
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
        fsyncs = wal.metrics()["fsyncs"]
    return count / elapsed, fsyncs / elapsed, latencies


def read_ack_micro(d: str, records: int, read_step: int, ack_slice: int) -> dict:
    """us/record of Wal.read_from and Wal.ack_many over `records` committed records."""
    import random

    bodies = [os.urandom(RECORD_BYTES) for _ in range(64)]
    out = {}
    with Wal(d, fsync="never", max_size_bytes=None) as wal:
        for i in range(records):
            wal.stage(bodies[i & 63])
            if i % 1000 == 999:
                wal.commit()
        wal.commit()
        best = None
        for _ in range(3):
            seq, n = 1, 0
            t0 = time.perf_counter()
            while True:
                got = wal.read_from(seq, read_step)
                if not got:
                    break
                n += len(got)
                seq = got[-1].seq + 1
            dt = time.perf_counter() - t0
            if n != records:
                raise SystemExit(f"benchmark broken: read {n} of {records}")
            best = dt if best is None else min(best, dt)
        out["read_from_us_per_record"] = round(best / records * 1e6, 3)
        slices = [list(range(a, min(a + ack_slice, records + 1))) for a in range(1, records + 1, ack_slice)]
        t0 = time.perf_counter()
        for s in slices:
            wal.ack_many(s)
        out["ack_us_per_record"] = round((time.perf_counter() - t0) / records * 1e6, 3)
        if wal.cursor != records:
            raise SystemExit(f"benchmark broken: cursor {wal.cursor} after acking {records}")
    shutil.rmtree(d)
    os.makedirs(d)
    with Wal(d, fsync="never", max_size_bytes=None) as wal:
        for i in range(records):
            wal.stage(bodies[i & 63])
            if i % 1000 == 999:
                wal.commit()
        wal.commit()
        # windows of 16 slices acked in a shuffled order: the cursor waits on the first of each
        rng = random.Random(11)
        order = []
        for w in range(0, len(slices), 16):
            group = slices[w : w + 16]
            rng.shuffle(group)
            order.extend(group)
        t0 = time.perf_counter()
        for s in order:
            wal.ack_many(s)
        out["ack_shuffled_us_per_record"] = round((time.perf_counter() - t0) / records * 1e6, 3)
        if wal.cursor != records:
            raise SystemExit(f"benchmark broken: cursor {wal.cursor} after acking {records} shuffled")
    return out


async def producer(d: str, seconds: float, **opts) -> float:
    bodies = [os.urandom(RECORD_BYTES) for _ in range(64)]
    async with await AsyncWal.open(d, max_size_bytes=None, **opts) as wal:
        lasts = []  # futures resolve in seq order: the last of each chunk stands for it
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fut = None
            for i in range(CHUNK):
                try:
                    fut = wal.append_nowait(bodies[i & 63])
                except WalFull:  # the writer is behind: wait for its commit (backpressure)
                    await wal.flush()
                    fut = wal.append_nowait(bodies[i & 63])
            lasts.append(fut)
            n += CHUNK
            await asyncio.sleep(0)
        await asyncio.gather(*lasts)
        elapsed = time.perf_counter() - t0
        if wal.committed_seq != n:
            raise SystemExit(f"benchmark broken: committed {wal.committed_seq} of {n}")
    return n / elapsed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--seconds", type=float, default=2.0, help="producing time per phase")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent appenders for fsync=always")
    ap.add_argument("--window-ms", type=float, default=50.0, help="batch window for fsync=batch")
    ap.add_argument("--dir", default=None, help="directory to measure in (default: a fresh one under .)")
    ap.add_argument("--micro-records", type=int, default=100_000, help="records for the read_from/ack figures")
    ap.add_argument("--read-step", type=int, default=256, help="records per read_from call")
    ap.add_argument("--ack-slice", type=int, default=128, help="records per ack_many call (the pump's ACK_SLICE)")
    ap.add_argument("--only", choices=("all", "micro", "commit"), default="all", help="run only some phases")
    args = ap.parse_args(argv)
    base = args.dir or tempfile.mkdtemp(prefix=".walbench-", dir=os.getcwd())
    os.makedirs(base, exist_ok=True)

    def fresh(name: str) -> str:
        path = os.path.join(base, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    result: dict = {}
    try:
        if args.only in ("all", "micro"):
            result.update(read_ack_micro(fresh("micro"), args.micro_records, args.read_step, args.ack_slice))
        if args.only in ("all", "commit"):
            for policy in ("always", "never"):
                rate, _f, lat = asyncio.run(
                    awaiting_appenders(fresh("lat-" + policy), args.seconds, args.concurrency, fsync=policy)
                )
                result[f"{policy}_commit_p50_ms"] = round(_pct(lat, 0.50) * 1000, 3)
                result[f"{policy}_commit_p99_ms"] = round(_pct(lat, 0.99) * 1000, 3)
                result[f"{policy}_concurrent_appends_per_s"] = round(rate)
        if args.only == "all":
            raw = raw_fsync(fresh("raw"), args.seconds)
            always, always_fsyncs, _lat = asyncio.run(
                awaiting_appenders(fresh("always"), args.seconds, args.concurrency, fsync="always")
            )
            serial, _f, serial_lat = asyncio.run(awaiting_appenders(fresh("serial"), args.seconds, 1, fsync="always"))
            batch = asyncio.run(producer(fresh("batch"), args.seconds, fsync="batch", batch_window_ms=args.window_ms))
            never = asyncio.run(producer(fresh("never"), args.seconds, fsync="never"))
            result.update(
                {
                    "batch_appends_per_s": round(batch),
                    "always_appends_per_s": round(always),
                    "never_appends_per_s": round(never),
                    "raw_fsync_per_s": round(raw),
                    "always_serial_appends_per_s": round(serial),
                    "always_serial_commit_p50_ms": round(_pct(serial_lat, 0.5) * 1000, 3),
                    "always_fsyncs_per_s": round(always_fsyncs),
                    "batch_vs_raw_fsync": round(batch / raw, 1) if raw else None,
                }
            )
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
        else:
            for name in ("raw", "always", "serial", "batch", "never", "micro", "lat-always", "lat-never"):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    result.update(
        {
            "backend": BACKEND,
            "always_concurrency": args.concurrency,
            "batch_window_ms": args.window_ms,
            "record_body_bytes": RECORD_BYTES,
            "seconds_per_phase": args.seconds,
            "micro_records": args.micro_records,
            "read_step": args.read_step,
            "ack_slice": args.ack_slice,
            "sync_call": _datasync.__name__,
            "fs": fs_type(base),
        }
    )
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
