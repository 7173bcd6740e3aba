"""Token buckets per sender for what Racks send the Mixer unasked: Hellos and heartbeats.

Job. Every Hello costs the Mixer a decode, a token check and possibly a registry write and a
Snake reload; every heartbeat a registry lookup and maybe a passport signature. A Rack gone
wrong (a loop without its sleep) or a holder of the bootstrap token can send thousands per
second and take the event loop from everyone else. These limiters decide, before any of that
work, whether a message is served or dropped.

Sans-IO: no clock of its own (the caller passes `now`, monotonic seconds), no asyncio, no
logging; `KeyedLimiter.allow(key, now)` is a few dict operations.

Contract.
  - `TokenBucket(rate, burst)`: starts full; `take(now)` spends one token if there is one.
  - `KeyedLimiter(rate, burst, max_keys)`: one bucket per key (a Rack name, a claimed Hello
    name), plus an optional `total` bucket every key shares, so a flood under ever-new names
    is bounded too. Least recently used keys are forgotten past `max_keys` (a forgotten key
    starts full again: memory stays bounded, an attacker gains at most one burst per eviction).
  - `refused` counts drops per limiter; `take_suppressed()` returns and resets the drops since
    the last call, for one summary log line ("N suppressed") instead of one per drop.
  - `guard_hello` / `guard_heartbeat` also drop a message larger than MAX_HELLO_BYTES /
    MAX_HEARTBEAT_BYTES before anything decodes it (counted, summarised in the log).
  - `limited(cb, limiter, key_of, clock)`: wraps an async message callback (nats-py's `cb`)
    so a refused message is dropped before `cb` runs; `key_of(msg)` names its sender.

Defaults. Heartbeats: a Rack beats once per `heartbeat_interval`; a reconnect may flush a few at
once. `heartbeat_limiter(interval)` allows 4 per interval sustained (at least 1/s) and a burst of
10. Hellos: a Rack retries every `enrollment_interval` (2 s): 1/s per claimed name, burst 5;
all Hellos together `enrollment.hello_rate` per node (HELLO_TOTAL_RATE, 200/s), burst twice
that: a little below what one node serves (bench/fleet.py, 2 cores: 326 enrollments/s with
2,500 Racks heartbeating, 0 heartbeat errors), so a flood is dropped before it costs any
work and a fleet re-enrolling after a Mixer restore is served as fast as the node can.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

__all__ = [
    "TokenBucket",
    "KeyedLimiter",
    "limited",
    "heartbeat_limiter",
    "hello_limiter",
    "HEARTBEAT_PER_INTERVAL",
    "HEARTBEAT_MIN_RATE",
    "HEARTBEAT_BURST",
    "HELLO_RATE",
    "HELLO_BURST",
    "HELLO_TOTAL_RATE",
    "HELLO_TOTAL_BURST",
    "MAX_KEYS",
    "DROP_LOG_EVERY_S",
    "MAX_HELLO_BYTES",
    "MAX_HEARTBEAT_BYTES",
    "guard_hello",
    "guard_heartbeat",
]

HEARTBEAT_PER_INTERVAL = 4.0
HEARTBEAT_MIN_RATE = 1.0
HEARTBEAT_BURST = 10.0
HELLO_RATE = 1.0
HELLO_BURST = 5.0
HELLO_TOTAL_RATE = 200.0
HELLO_TOTAL_BURST = 2 * HELLO_TOTAL_RATE
MAX_KEYS = 100_000


class TokenBucket:
    """`rate` tokens per second up to `burst`; starts full."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float = 0.0):
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1 (got {rate}, {burst})")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class KeyedLimiter:
    """One TokenBucket per key, an optional shared total, LRU-bounded (module docstring)."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        total_rate: float | None = None,
        total_burst: float | None = None,
        max_keys: int = MAX_KEYS,
    ):
        TokenBucket(rate, burst)  # validates
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._total = TokenBucket(total_rate, total_burst or total_rate) if total_rate else None
        self._total_started = False
        self.allowed = 0
        self.refused = 0
        self._suppressed = 0

    def allow(self, key: str, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        ok = bucket.take(now)
        if ok and self._total is not None:
            if not self._total_started:
                self._total.stamp, self._total_started = now, True
            if not self._total.take(now):
                bucket.tokens = min(bucket.burst, bucket.tokens + 1.0)  # not this sender's fault
                ok = False
        if ok:
            self.allowed += 1
        else:
            self.refused += 1
            self._suppressed += 1
        return ok

    def take_suppressed(self) -> int:
        """Drops since the last call (for one summary log line), and reset."""
        n, self._suppressed = self._suppressed, 0
        return n

    def __len__(self) -> int:
        return len(self._buckets)


def heartbeat_limiter(interval: float) -> KeyedLimiter:
    """Per Rack: HEARTBEAT_PER_INTERVAL beats per heartbeat interval (at least 1/s), burst 10."""
    rate = max(HEARTBEAT_MIN_RATE, HEARTBEAT_PER_INTERVAL / max(interval, 1e-3))
    return KeyedLimiter(rate, HEARTBEAT_BURST)


def hello_limiter(total_rate: float = HELLO_TOTAL_RATE) -> KeyedLimiter:
    """Per claimed name HELLO_RATE/HELLO_BURST; all Hellos together `total_rate`, burst twice that."""
    return KeyedLimiter(HELLO_RATE, HELLO_BURST, total_rate=total_rate, total_burst=2 * total_rate)


def limited(
    cb: Callable[[object], Awaitable[None]],
    limiter: KeyedLimiter,
    key_of: Callable[[object], str],
    clock: Callable[[], float],
    on_drop: Callable[[str, KeyedLimiter], None] | None = None,
) -> Callable[[object], Awaitable[None]]:
    """`cb` behind `limiter`: a message whose sender (`key_of(msg)`) is over its rate is dropped
    (no reply: the sender retries on its own schedule) and `on_drop(key, limiter)` is told."""

    async def guarded(msg) -> None:
        key = key_of(msg)
        if limiter.allow(key, clock()):
            await cb(msg)
        elif on_drop is not None:
            on_drop(key, limiter)

    return guarded


# -- the Mixer's two subscriptions (controller.attach wraps its callbacks with these) ----------

# One summary line per this many seconds while a sender is being dropped.
DROP_LOG_EVERY_S = 10.0


def _drop_reporter(what: str, clock: Callable[[], float], every: float = DROP_LOG_EVERY_S):
    import logging

    log = logging.getLogger("fluxrig.mixer.ratelimit")
    last = [float("-inf")]

    def on_drop(key: str, limiter: KeyedLimiter) -> None:
        now = clock()
        if now - last[0] >= every:
            last[0] = now
            log.warning(
                "%s rate limit: dropped %d in the last %.0fs (latest from %r; %d dropped in all)",
                what,
                limiter.take_suppressed(),
                every,
                key[:64],
                limiter.refused,
            )

    return on_drop


def _hello_key(msg) -> str:
    """The name a Hello claims (its host when it has none); malformed ones share one key."""
    from fluxrig.wire import messages as W

    try:
        hello = W.Hello.decode(msg.data)
    except Exception:  # a malformed Hello is refused by the handler; here it only needs a key
        return "<malformed>"
    return "name:" + (hello.name or hello.host or "")[:128]


# A Hello is a name, a host, labels, a token and a key (< 2 KiB in practice); a heartbeat
# carries the Rack's stats (a few KiB). Larger ones are dropped before they are decoded: the
# decode of a Hello happens before its token is checked.
MAX_HELLO_BYTES = 64 * 1024
MAX_HEARTBEAT_BYTES = 1024 * 1024


def _size_capped(cb, limit: int, what: str, clock: Callable[[], float]):
    report = _drop_reporter(f"{what} size", clock)
    counter = KeyedLimiter(1.0, 1.0)  # only its counters: every oversized message is refused

    async def capped(msg) -> None:
        if len(msg.data) > limit:
            counter.refused += 1
            counter._suppressed += 1
            report(f"<{len(msg.data)} bytes > {limit}>", counter)
            return
        await cb(msg)

    capped.oversized = counter
    return capped


def guard_hello(cb, clock: Callable[[], float] | None = None, total_rate: float = HELLO_TOTAL_RATE):
    """controller._on_hello behind a size cap (MAX_HELLO_BYTES) and hello_limiter(total_rate);
    the limiter is `.limiter` on the result."""
    import time

    clock = clock or time.monotonic
    limiter = hello_limiter(total_rate)
    guarded = _size_capped(
        limited(cb, limiter, _hello_key, clock, _drop_reporter("hello", clock)), MAX_HELLO_BYTES, "hello", clock
    )
    guarded.limiter = limiter
    return guarded


def guard_heartbeat(cb, interval: float, clock: Callable[[], float] | None = None):
    """controller._on_heartbeat behind heartbeat_limiter(interval), keyed by the subject's Rack
    (the Snake lets a Rack publish only its own heartbeat subject, so the key is the sender)."""
    import time

    from fluxrig.wire import subjects as S

    clock = clock or time.monotonic
    limiter = heartbeat_limiter(interval)
    guarded = limited(
        cb, limiter, lambda msg: S.rack_of_subject(msg.subject) or "?", clock, _drop_reporter("heartbeat", clock)
    )
    guarded = _size_capped(guarded, MAX_HEARTBEAT_BYTES, "heartbeat", clock)
    guarded.limiter = limiter
    return guarded
