"""Pipeline throughput: 268-byte length-prefixed frames through io_tcp -> map -> io_tcp
(the Rack, its own process) against a raw asyncio echo server (its own process), with the
client in this process. Both servers use the same event loop kind (uvloop when installed,
as `fluxrig run` does; `--loop asyncio` forces the stock loop).

Prints {"pipelined_msgs_per_s", "pipelined_ratio", "sequential_rtt_per_s", "sequential_ratio",
...}: ratios are ours / raw echo measured in the same run. Targets (2-core box):
pipelined_ratio >= 0.5, sequential_ratio >= 0.6.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PY, backend, emit, free_port, spawn, stop, wait_port  # noqa: E402

FRAME = 268
SCENARIO = """
meta: {{name: bench-pipeline, version: '1'}}
gears:
  - name: gw
    type: io_tcp
    config: {{mode: server, bind: "127.0.0.1:{port}", framing: length_prefix2, max_connections: 64}}
  - name: xf
    type: map
    config:
      ops:
        - {{set: meta.bench.conn, value: "{{{{ meta.conn.id }}}}"}}
        - {{set: raw, value: "{{{{ raw | upper }}}}"}}
wires:
  - {{from: gw.out, to: xf.in}}
  - {{from: xf.out, to: gw.in}}
"""


class Client(asyncio.Protocol):
    """Counts length-prefixed replies; keeps `window` requests in flight."""

    def __init__(self, frame: bytes, window: int):
        self.frame = frame
        self.window = window
        self.buf = bytearray()
        self.replies = 0
        self.stop = False
        self.transport = None
        self.waiter: asyncio.Future | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        buf = self.buf
        buf += data
        n = 0
        pos = 0
        while len(buf) - pos >= 2:
            size = int.from_bytes(buf[pos : pos + 2], "big")
            if len(buf) - pos - 2 < size:
                break
            pos += 2 + size
            n += 1
        del buf[:pos]
        if n:
            self.replies += n
            if self.window and not self.stop:
                self.transport.write(self.frame * n)
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)


async def measure(port: int, seconds: float, window: int) -> float:
    loop = asyncio.get_running_loop()
    body = b"a" * FRAME
    frame = len(body).to_bytes(2, "big") + body
    transport, proto = await loop.create_connection(lambda: Client(frame, window), "127.0.0.1", port)
    # warm-up
    await _run(proto, transport, frame, 0.3, window)
    replies, elapsed = await _run(proto, transport, frame, seconds, window)
    transport.close()
    return replies / elapsed


async def _run(proto: Client, transport, frame: bytes, seconds: float, window: int):
    loop = asyncio.get_running_loop()
    proto.replies = 0
    proto.stop = False
    t0 = loop.time()
    end = t0 + seconds
    if window:
        transport.write(frame * window)
        while loop.time() < end:
            await asyncio.sleep(0.05)
        proto.stop = True
        done_at = proto.replies
        elapsed = loop.time() - t0
        # let the in-flight window come back so the next phase starts clean
        deadline = loop.time() + 5
        while loop.time() < deadline:
            before = proto.replies
            await asyncio.sleep(0.05)
            if proto.replies == before:
                break
        return done_at, elapsed
    while loop.time() < end:
        proto.waiter = loop.create_future()
        transport.write(frame)
        await proto.waiter
    return proto.replies, loop.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--seconds", type=float, default=3.0, help="measurement time per phase (default 3)")
    ap.add_argument("--window", type=int, default=100, help="requests in flight when pipelined (default 100)")
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="event loop of both servers")
    args = ap.parse_args(argv)
    loop_kind = args.loop
    if loop_kind == "auto":
        try:
            import uvloop  # noqa: F401

            loop_kind = "uvloop"
        except ImportError:
            loop_kind = "asyncio"

    env = dict(os.environ)
    tmp = tempfile.mkdtemp(prefix="fluxrig-bench-")
    env["FLUXRIG_BASE_STATE_DIR"] = tmp
    env["FLUXRIG_LOGGING_LEVEL"] = "warning"
    rack_port, raw_port = free_port(), free_port()
    scenario = os.path.join(tmp, "pipeline.yaml")
    with open(scenario, "w") as fh:
        fh.write(SCENARIO.format(port=rack_port))
    if loop_kind == "asyncio":
        # fluxrig run picks uvloop when importable; hide it from the Rack for a like-for-like run
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [os.path.join(os.path.dirname(__file__), "_no_uvloop"), env.get("PYTHONPATH", "")])
        )
    rack = spawn([PY, "-m", "fluxrig.cli.main", "run", "--scenario", scenario], env)
    raw = spawn(
        [PY, os.path.join(os.path.dirname(os.path.abspath(__file__)), "raw_echo_server.py"), str(raw_port), loop_kind]
    )
    try:
        wait_port(rack_port)
        wait_port(raw_port)

        async def run_all():
            raw_pipe = await measure(raw_port, args.seconds, args.window)
            ours_pipe = await measure(rack_port, args.seconds, args.window)
            raw_seq = await measure(raw_port, args.seconds, 0)
            ours_seq = await measure(rack_port, args.seconds, 0)
            return raw_pipe, ours_pipe, raw_seq, ours_seq

        raw_pipe, ours_pipe, raw_seq, ours_seq = asyncio.run(run_all())
    finally:
        stop(rack)
        stop(raw)
    emit(
        {
            "pipelined_msgs_per_s": round(ours_pipe),
            "pipelined_ratio": round(ours_pipe / raw_pipe, 3),
            "sequential_rtt_per_s": round(ours_seq),
            "sequential_ratio": round(ours_seq / raw_seq, 3),
            "raw_pipelined_msgs_per_s": round(raw_pipe),
            "raw_sequential_rtt_per_s": round(raw_seq),
            "frame_bytes": FRAME,
            "window": args.window,
            "loop": loop_kind,
            "backend": backend(),
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
