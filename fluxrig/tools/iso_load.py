"""An ISO 8583 load generator: 0200/0800 requests with unique STANs, replies matched and timed.

Each connection keeps its share of `concurrency` requests in flight; `rate` (requests/s, 0 =
as fast as replies allow) paces the sends. A request is identified by its MTI class, STAN
(DE 11) and terminal (DE 41, one per connection); a reply must carry the response MTI and the
request's RRN (DE 37) when the request had one, else it counts as mismatched (a cross-wired
reply). Requests not answered within `timeout` count as timeouts.

`run_load(...)` returns a `LoadResult`; the CLI prints it (and live progress on stderr).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import asdict, dataclass, field

from ..framing.config import make_framer
from ..iso8583 import Iso8583DecodeError, load_spec

__all__ = ["LoadResult", "run_load", "build_request", "print_progress"]

STAN_SPACE = 999_999


@dataclass
class LoadResult:
    sent: int = 0
    answered: int = 0
    mismatched: int = 0
    timeouts: int = 0
    tps: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    duration_s: float = 0.0
    errors: int = 0
    # With run_load(keep=True): (terminal, STAN, DE 39) of each answered request, and the fields
    # of each request never answered (what an acquirer reverses after its timeout).
    answered_keys: list = field(default_factory=list, repr=False)
    unanswered: list = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("answered_keys", "unanswered"):
            if not d[k]:
                del d[k]
        return d


def build_request(mti: str, stan: int, terminal: str, rrn: str, amount: int = 10000) -> dict:
    """Fields of one test request (ISO 8583:1987 data elements)."""
    now = time.gmtime()
    fields = {0: mti, 7: time.strftime("%m%d%H%M%S", now), 11: "%06d" % stan, 41: terminal}
    if mti[1] != "8":
        fields.update(
            {
                2: "4111111111111111",
                3: "000000",
                4: "%012d" % amount,
                12: time.strftime("%H%M%S", now),
                13: time.strftime("%m%d", now),
                37: rrn,
                42: "FLUXRIGLOAD0001",
                49: "978",
            }
        )
    else:
        fields[70] = "301"
    return fields


def _pct(sorted_ms: list[float], p: float) -> float:
    if not sorted_ms:
        return 0.0
    return round(sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * p))], 3)


class _Conn(asyncio.Protocol):
    def __init__(self, gen: _Generator, index: int):
        self.gen = gen
        self.terminal = "LOAD%04d" % index
        self.framer = make_framer({"framing": gen.framing})
        self.outstanding: dict[str, tuple] = {}  # stan -> (t0, rrn, response mti, fields if kept)
        self.transport = None
        self.space = asyncio.Event()
        self.space.set()
        self.lost = False

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.lost = True
        self.space.set()

    def data_received(self, data):
        gen = self.gen
        try:
            frames = self.framer.feed(data)
        except Exception:
            gen.result.errors += 1
            self.transport.close()
            return
        now = time.perf_counter()
        for frame in frames:
            try:
                f = gen.spec.decode(frame)
            except Iso8583DecodeError:
                gen.result.mismatched += 1
                continue
            pending = self.outstanding.pop(f.get(11), None)
            if pending is None:
                gen.result.mismatched += 1
                continue
            t0, rrn, rmti, _fields = pending
            if f.get(0) != rmti or (rrn and f.get(37) not in (None, rrn)) or f.get(41, self.terminal) != self.terminal:
                gen.result.mismatched += 1
            else:
                gen.result.answered += 1
                gen.latencies.append((now - t0) * 1000)
                if gen.keep:
                    gen.result.answered_keys.append((self.terminal, f.get(11), f.get(39)))
        if len(self.outstanding) < gen.window:
            self.space.set()


class _Generator:
    def __init__(self, spec, framing, window, mix, timeout, keep=False):
        self.keep = keep
        self.spec = spec
        self.framing = framing
        self.window = window
        self.mix = mix
        self.timeout = timeout
        self.result = LoadResult()
        self.latencies: list[float] = []
        self.stan = random.randrange(STAN_SPACE)
        self.rrn = 0

    def next_request(self, conn: _Conn) -> tuple[bytes, str, str, str, dict]:
        self.stan = self.stan % STAN_SPACE + 1
        while "%06d" % self.stan in conn.outstanding:
            self.stan = self.stan % STAN_SPACE + 1
        self.rrn += 1
        mti = self.mix[self.rrn % len(self.mix)]
        rrn = "%012d" % self.rrn if mti[1] != "8" else ""
        fields = build_request(mti, self.stan, conn.terminal, rrn)
        body = self.spec.encode(fields)
        rmti = mti[:2] + str(int(mti[2]) + 1) + mti[3]
        return conn.framer.encode(body), "%06d" % self.stan, rrn, rmti, fields


async def _drive(conn: _Conn, gen: _Generator, end: float, interval: float, progress) -> None:
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while loop.time() < end and not conn.lost:
        if len(conn.outstanding) >= gen.window:
            conn.space.clear()
            try:
                await asyncio.wait_for(conn.space.wait(), max(0.001, end - loop.time()))
            except TimeoutError:
                break
            continue
        if interval:
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = max(next_at + interval, loop.time() - 1.0)  # never burst more than 1 s behind
        frame, stan, rrn, rmti, fields = gen.next_request(conn)
        conn.outstanding[stan] = (time.perf_counter(), rrn, rmti, fields if gen.keep else None)
        conn.transport.write(frame)
        gen.result.sent += 1
        if not interval and gen.result.sent % 64 == 0:
            await asyncio.sleep(0)  # let replies in


async def run_load(
    target: str,
    *,
    framing: str = "len2_be",
    rate: float = 0,
    concurrency: int = 100,
    duration: float = 10.0,
    connections: int = 1,
    spec: str = "moov:spec87ascii",
    mix: tuple[str, ...] = ("0200",) * 19 + ("0800",),
    timeout: float = 5.0,
    progress=None,
    ssl_context=None,
    server_hostname: str | None = None,
    keep: bool = False,
) -> LoadResult:
    """Run the load and return its figures. `progress(result)` is called about once a second.
    `ssl_context` (an ssl.SSLContext) dials the target over TLS, checking `server_hostname`.
    `keep`: also list what was answered and what was not (LoadResult.answered_keys/unanswered)."""
    host, _, port = target.rpartition(":")
    loop = asyncio.get_running_loop()
    gen = _Generator(load_spec(spec), framing, max(1, concurrency // connections), list(mix), timeout, keep)
    conns = []
    for i in range(connections):
        tls = {"ssl": ssl_context, "server_hostname": server_hostname} if ssl_context is not None else {}
        _t, c = await loop.create_connection(lambda i=i: _Conn(gen, i + 1), host or "127.0.0.1", int(port), **tls)
        conns.append(c)
    t0 = loop.time()
    end = t0 + duration
    interval = connections / rate if rate else 0.0
    tasks = [loop.create_task(_drive(c, gen, end, interval, progress)) for c in conns]

    async def report():
        while True:
            await asyncio.sleep(1.0)
            if progress:
                progress(gen.result, loop.time() - t0)

    reporter = loop.create_task(report())
    await asyncio.gather(*tasks)
    send_end = loop.time()
    grace = loop.time() + timeout
    while loop.time() < grace and any(c.outstanding for c in conns if not c.lost):
        await asyncio.sleep(0.01)
    reporter.cancel()
    for c in conns:
        gen.result.timeouts += len(c.outstanding)
        if keep:
            gen.result.unanswered += [p[3] for p in c.outstanding.values()]
        c.transport.close()
    r = gen.result
    r.duration_s = round(send_end - t0, 3)
    r.tps = round(r.answered / max(1e-9, send_end - t0), 1)
    lat = sorted(gen.latencies)
    r.p50_ms, r.p95_ms, r.p99_ms = _pct(lat, 0.50), _pct(lat, 0.95), _pct(lat, 0.99)
    r.max_ms = round(lat[-1], 3) if lat else 0.0
    return r


def print_progress(result: LoadResult, elapsed: float) -> None:
    sys.stderr.write(
        f"\r{elapsed:6.1f}s  sent {result.sent:>9}  answered {result.answered:>9}  "
        f"mismatched {result.mismatched}  tps {result.answered / max(elapsed, 1e-9):>9.0f}"
    )
    sys.stderr.flush()
