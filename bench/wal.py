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
from fluxrig.wal import AsyncWal, WalFull  # noqa: E402
from fluxrig.wal.checksum import BACKEND  # noqa: E402
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


async def awaiting_appenders(d: str, seconds: float, concurrency: int, **opts) -> tuple[float, float]:
    bodies = [os.urandom(RECORD_BYTES) for _ in range(64)]
    async with await AsyncWal.open(d, max_size_bytes=None, **opts) as wal:
        stop = False
        count = 0

        async def appender(k: int) -> None:
            nonlocal count
            i = k
            while not stop:
                await wal.append(bodies[i & 63])
                i += 1
                count += 1

        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(appender(k)) for k in range(concurrency)]
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
        fsyncs = wal.metrics()["fsyncs"]
    return count / elapsed, fsyncs / elapsed


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
    args = ap.parse_args(argv)
    base = args.dir or tempfile.mkdtemp(prefix=".walbench-", dir=os.getcwd())
    os.makedirs(base, exist_ok=True)

    def fresh(name: str) -> str:
        path = os.path.join(base, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    try:
        raw = raw_fsync(fresh("raw"), args.seconds)
        always, always_fsyncs = asyncio.run(
            awaiting_appenders(fresh("always"), args.seconds, args.concurrency, fsync="always")
        )
        serial, _ = asyncio.run(awaiting_appenders(fresh("serial"), args.seconds, 1, fsync="always"))
        batch = asyncio.run(producer(fresh("batch"), args.seconds, fsync="batch", batch_window_ms=args.window_ms))
        never = asyncio.run(producer(fresh("never"), args.seconds, fsync="never"))
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
        else:
            for name in ("raw", "always", "serial", "batch", "never"):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    result = {
        "batch_appends_per_s": round(batch),
        "always_appends_per_s": round(always),
        "never_appends_per_s": round(never),
        "raw_fsync_per_s": round(raw),
        "backend": BACKEND,
        "always_serial_appends_per_s": round(serial),
        "always_fsyncs_per_s": round(always_fsyncs),
        "always_concurrency": args.concurrency,
        "batch_window_ms": args.window_ms,
        "batch_vs_raw_fsync": round(batch / raw, 1) if raw else None,
        "record_body_bytes": RECORD_BYTES,
        "seconds_per_phase": args.seconds,
        "sync_call": _datasync.__name__,
        "fs": fs_type(base),
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
