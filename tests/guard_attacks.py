"""Attack clients for test_mixer_guard.py, run in their own (niced) process.

    python guard_attacks.py slow <port> <connections>   dribble request heads on N connections
    python guard_attacks.py big <port> <bytes>          POST a body of <bytes> without credentials

Prints one JSON object: for `slow` the counts of how each connection ended, for `big` the first
bytes the server answered."""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def _slow_header_client(port: int, results: dict) -> None:
    """Open a connection and dribble a request head one byte at a time, forever."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        results["refused"] += 1
        return
    head = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    t0 = time.monotonic()
    try:
        for i in range(len(head)):
            writer.write(head[i : i + 1])
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(1024), 0.25)
            except TimeoutError:
                continue
            if data.startswith(b"HTTP/1.1 503"):
                results["busy"] += 1
            elif data.startswith(b"HTTP/1.1 408"):
                results["timed_out"] += 1
                results["held_s"] = max(results["held_s"], time.monotonic() - t0)
            else:
                results["other"] += 1
            return
        results["survived"] += 1
    except (ConnectionError, OSError):
        results["reset"] += 1
        results["held_s"] = max(results["held_s"], time.monotonic() - t0)
    finally:
        writer.close()


async def _big_unauthenticated_body(port: int, size: int) -> bytes:
    """POST `size` bytes without credentials (from 127.0.0.3); what the server answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.3", 0))
    writer.write(
        b"POST /api/v1/scenarios/import?dry_run=true HTTP/1.1\r\nHost: x\r\nContent-Type: application/yaml\r\n"
        b"Content-Length: %d\r\n\r\n" % size
    )
    answer = asyncio.get_running_loop().create_task(reader.read(4096))
    chunk = b"x" * (1024 * 1024)
    sent = 0
    try:
        while sent < size and not answer.done():
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 10)
            sent += len(chunk)
    except (ConnectionError, OSError, TimeoutError):
        pass  # the server closed the connection on us: the answer was sent before
    try:
        return await asyncio.wait_for(answer, 30)
    except (ConnectionError, OSError):
        return b""
    finally:
        writer.close()


async def main(argv: list[str]) -> int:
    mode, port, n = argv[0], int(argv[1]), int(argv[2])
    if mode == "slow":
        results = {"refused": 0, "busy": 0, "timed_out": 0, "other": 0, "survived": 0, "reset": 0, "held_s": 0.0}
        await asyncio.gather(*(_slow_header_client(port, results) for _ in range(n)))
    else:
        results = {"response": (await _big_unauthenticated_body(port, n)).decode("latin-1")}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
