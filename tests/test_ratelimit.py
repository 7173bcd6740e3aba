"""Token buckets per sender (mixer/fluxrig_mixer/ratelimit.py), and the Mixer dropping a
heartbeat flood from one Rack while another Rack's heartbeats are still answered."""

from __future__ import annotations

import asyncio

import pytest
from fluxrig_mixer.ratelimit import (
    HEARTBEAT_BURST,
    KeyedLimiter,
    TokenBucket,
    guard_heartbeat,
    heartbeat_limiter,
    hello_limiter,
    limited,
)


def test_bucket_starts_full_and_refills():
    b = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(0.5)  # one token back after 0.5 s at 2/s
    assert not b.take(0.5)
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_keyed_limiter_is_per_sender_with_a_shared_total():
    lim = KeyedLimiter(1.0, 2, total_rate=10.0, total_burst=5)
    assert [lim.allow("a", 0.0) for _ in range(3)] == [True, True, False]
    assert lim.allow("b", 0.0) and lim.allow("b", 0.0)
    # total burst 5: four spent, one left, then the total refuses even a fresh sender
    assert lim.allow("c", 0.0)
    assert not lim.allow("d", 0.0)
    assert lim.refused == 2 and lim.allowed == 5
    assert lim.take_suppressed() == 2 and lim.take_suppressed() == 0
    # "d" was not charged for the total's refusal
    assert lim.allow("d", 1.0) and lim.allow("d", 1.0)


def test_keyed_limiter_forgets_least_recent_keys():
    lim = KeyedLimiter(1.0, 1, max_keys=3)
    for k in "abcd":
        lim.allow(k, 0.0)
    assert len(lim) == 3
    assert lim.allow("a", 0.0)  # forgotten, so it starts full again


def test_defaults_follow_the_heartbeat_interval():
    lim = heartbeat_limiter(0.2)
    assert lim.rate == pytest.approx(20.0) and lim.burst == HEARTBEAT_BURST
    assert heartbeat_limiter(30.0).rate == 1.0
    assert hello_limiter().allow("x", 0.0)


async def test_limited_drops_before_the_callback():
    seen, drops = [], []

    async def cb(msg):
        seen.append(msg)

    clock = iter([0.0] * 5).__next__
    wrapped = limited(cb, KeyedLimiter(1.0, 2), lambda m: m, clock, lambda k, lim: drops.append(k))
    for m in ("r1", "r1", "r1", "r2", "r1"):
        await wrapped(m)
    assert seen == ["r1", "r1", "r2"] and drops == ["r1", "r1"]


class _Msg:
    def __init__(self, subject, data=b""):
        self.subject = subject
        self.data = data


async def test_oversized_hello_dropped_before_decoding():
    from fluxrig_mixer.ratelimit import MAX_HELLO_BYTES, guard_hello

    served = []

    async def on_hello(msg):
        served.append(len(msg.data))

    g = guard_hello(on_hello, clock=lambda: 0.0)
    await g(_Msg("fluxrig.agent.hello", b"\xa0" * (MAX_HELLO_BYTES + 1)))
    await g(_Msg("fluxrig.agent.hello", b"\xa0"))  # malformed but small: the handler refuses it
    assert served == [1]
    assert g.oversized.refused == 1


async def test_guard_heartbeat_keys_by_the_subjects_rack():
    served = []

    async def on_heartbeat(msg):
        served.append(msg.subject)

    now = [0.0]
    g = guard_heartbeat(on_heartbeat, 30.0, clock=lambda: now[0])
    for _ in range(50):
        await g(_Msg("fluxrig.agent.heartbeat.flood"))
    await g(_Msg("fluxrig.agent.heartbeat.quiet"))
    assert served.count("fluxrig.agent.heartbeat.flood") == HEARTBEAT_BURST
    assert served[-1] == "fluxrig.agent.heartbeat.quiet"
    assert g.limiter.refused == 50 - HEARTBEAT_BURST
    await asyncio.sleep(0)
