"""The Mixer's time as a Rack knows it: signed time stamps, the clock offset, and whether a clock is plausible.

Why. A Rack's own clock is not to be trusted: an ARM gateway without RTC boots at 1970, a
box drifts, someone sets it by hand. Signed control commands carry the Mixer's `issued_at` /
`expires_at`, so their freshness must be judged against the Mixer's clock, not the Rack's.

How. Every heartbeat carries a fresh random `challenge` (CHALLENGE_BYTES); the Mixer answers
with a time stamp signed by its cluster key through the one envelope (fluxrig/wire/envelope.py,
context TIME_SIGNING_CONTEXT) over `{v, rack_id, challenge, now, mixer_pub}`. The Rack checks
the key against its pins, its own rack id and the challenge it is waiting for (so a captured
stamp cannot be replayed to wind its notion of time back), and anchors the Mixer's time to its
monotonic clock at the round trip's midpoint:

    mixer_now() = stamp.now + (monotonic() - (sent + received) / 2)

The error is at most rtt/2 plus the drift of the local oscillator since then
(MAX_DRIFT_PPM); `judge()` returns the time to judge a command by and the window that absorbs
that error. Before the first stamp (or with none accepted) it falls back to the local clock
with the wide LOCAL_WINDOW_S, the behaviour before time sync existed.

`clock_plausible(now)`: a clock before CLOCK_FLOOR (a date this build cannot predate) is in
the distant past: "unknown", never used to call a passport expired (fluxrig/passport.py
reports; the Rack runs its last verified passport whatever the clock says).

`relax_tls_time_check(ctx)`: such a clock cannot judge certificate dates either (every
certificate looks "not yet valid"), so a Rack booting at 1970 could never reach the Mixer to
learn the time. Only then, and loudly logged, the TLS context skips the validity dates
(OpenSSL X509_V_FLAG_NO_CHECK_TIME); the chain, the pinned CA and the host name are still
checked. With a plausible clock nothing changes.

Sans-IO apart from reading the clocks (both injectable).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from .errors import RemoteProtocolError
from .wire.envelope import EnvelopeErrors, open_envelope, sign_envelope

__all__ = [
    "TIME_SIGNING_CONTEXT",
    "TIME_FORMAT",
    "CHALLENGE_BYTES",
    "MAX_TIME_STAMP_BYTES",
    "CLOCK_FLOOR",
    "SYNCED_WINDOW_S",
    "LOCAL_WINDOW_S",
    "MAX_DRIFT_PPM",
    "MAX_SYNC_RTT_S",
    "ClockSource",
    "TimeStampRefused",
    "MixerClock",
    "Judgement",
    "sign_time",
    "verify_time",
    "clock_plausible",
    "relax_tls_time_check",
    "X509_V_FLAG_NO_CHECK_TIME",
]

TIME_FORMAT = 1
TIME_SIGNING_CONTEXT = b"fluxrig/time/v1\x00"
CHALLENGE_BYTES = 16
MAX_TIME_STAMP_BYTES = 1024
# 2025-01-01T00:00:00Z: no clock showing an earlier date runs this build; such a clock is unset.
CLOCK_FLOOR = 1735689600.0
# Freshness windows: with the Mixer's time known, only the measurement error remains (plus
# this margin for processing); on the local clock alone, the wide window used before time sync.
SYNCED_WINDOW_S = 30.0
LOCAL_WINDOW_S = 300.0
# A cheap crystal drifts well under 100 ppm; twice that, so the bound is never optimistic.
MAX_DRIFT_PPM = 200.0
# A round trip slower than this measures nothing useful (the heartbeat timeout is 5 s).
MAX_SYNC_RTT_S = 5.0
# Challenges sent and not yet answered (one heartbeat is in flight at a time; a few spare).
PENDING_CHALLENGES = 4
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (ssl.VerifyFlags has no name for it).
X509_V_FLAG_NO_CHECK_TIME = 0x200000

log = logging.getLogger("fluxrig.timesync")


class ClockSource(StrEnum):
    """What a Rack judges time by: the Mixer's (synced), its own plausible clock, or none."""

    MIXER = "mixer"
    LOCAL = "local"
    UNKNOWN = "unknown"


class TimeStampRefused(RemoteProtocolError):
    """A signed time stamp did not verify; `reason` is malformed, unsigned, pin, signature,
    rack, challenge or rtt, `key` the payload key at fault."""

    def __init__(self, message: str, reason: str = "malformed", key: str | None = None):
        self.reason = reason
        self.key = key
        super().__init__(f"time stamp refused ({reason}): {message}" + (f" (key {key!r})" if key else ""))


_ERRORS = EnvelopeErrors(
    malformed=lambda message, key=None: TimeStampRefused(message, "malformed", key),
    unsigned=lambda message: TimeStampRefused(message, "unsigned"),
    not_pinned=lambda presented, pinned: TimeStampRefused(
        f"signed by key {presented[:16]}..., which is not pinned", "pin", "mixer_pub"
    ),
    forged=lambda message: TimeStampRefused(message, "signature"),
)


def sign_time(key, rack_id: str, challenge: bytes, now: float | None = None) -> bytes:
    """The Mixer's signed time stamp answering `challenge` from `rack_id` (key: ClusterKey)."""
    body = {
        "v": TIME_FORMAT,
        "rack_id": rack_id,
        "challenge": bytes(challenge),
        "now": float(time.time() if now is None else now),
        "mixer_pub": key.public_key,
    }
    return sign_envelope(key.sign, TIME_SIGNING_CONTEXT, body)


def verify_time(data, pinned: Sequence[bytes], rack_id: str, challenge: bytes) -> float:
    """The Mixer's time in a stamp for `rack_id` answering `challenge`; TimeStampRefused else."""
    env = open_envelope(data, max_bytes=MAX_TIME_STAMP_BYTES, errors=_ERRORS)
    body = env.body
    if body.get("v") != TIME_FORMAT:
        raise TimeStampRefused(f"unsupported format {body.get('v')!r}", "malformed", "v")
    now = body.get("now")
    if not isinstance(now, (int, float)) or isinstance(now, bool) or not now > 0:
        raise TimeStampRefused("not a positive number", "malformed", "now")
    env.verify(list(pinned), TIME_SIGNING_CONTEXT, errors=_ERRORS)  # never trusted on first use
    if body.get("rack_id") != rack_id:
        raise TimeStampRefused(f"for rack {body.get('rack_id')!r}, this is {rack_id!r}", "rack", "rack_id")
    if body.get("challenge") != challenge:
        raise TimeStampRefused("answers another challenge (replayed?)", "challenge", "challenge")
    return float(now)


def clock_plausible(now: float, floor: float = CLOCK_FLOOR) -> bool:
    """False for a clock in the distant past (before `floor`): unset, not merely skewed."""
    return now >= floor


def relax_tls_time_check(ctx, now: float | None = None) -> bool:
    """On a Rack whose clock is unset, let `ctx` (ssl.SSLContext) skip certificate dates; True
    when it did (logged at WARNING). See the module docstring."""
    now = time.time() if now is None else now
    if clock_plausible(now):
        return False
    ctx.verify_flags = ctx.verify_flags | X509_V_FLAG_NO_CHECK_TIME
    log.warning("this Rack's clock is unset (%s, before %s): TLS certificate dates are not checked until it is "
                "(the chain, CA and host name still are)", time.strftime("%Y-%m-%d", time.gmtime(now)),
                time.strftime("%Y-%m-%d", time.gmtime(CLOCK_FLOOR)))  # fmt: skip
    return True


@dataclass(frozen=True, slots=True)
class Judgement:
    """The time to judge a signed object by, the error window around it, and its source."""

    now: float
    window: float
    source: ClockSource


class MixerClock:
    """The Mixer's time learned from signed heartbeat replies (see the module docstring)."""

    def __init__(
        self,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        synced_window: float = SYNCED_WINDOW_S,
        local_window: float = LOCAL_WINDOW_S,
        max_rtt: float = MAX_SYNC_RTT_S,
        max_drift_ppm: float = MAX_DRIFT_PPM,
    ):
        self.monotonic = monotonic
        self.wall = wall
        self.synced_window = synced_window
        self.local_window = local_window
        self.max_rtt = max_rtt
        self.max_drift_ppm = max_drift_ppm
        self._pending: OrderedDict[bytes, float] = OrderedDict()  # challenge -> monotonic sent
        self._anchor: tuple[float, float] | None = None  # (mixer time, monotonic midpoint)
        self.rtt = 0.0
        self.samples = 0
        self.refused = 0
        self.refused_by: dict[str, int] = {}
        self.last_error = ""
        self._logged_reason = ""  # one WARNING per change of state, not per heartbeat

    # -- the exchange ----------------------------------------------------------------------------

    def new_challenge(self) -> bytes:
        """A fresh challenge for the next heartbeat (remembered with its send time)."""
        challenge = os.urandom(CHALLENGE_BYTES)
        self._pending[challenge] = self.monotonic()
        while len(self._pending) > PENDING_CHALLENGES:
            self._pending.popitem(last=False)
        return challenge

    def observe(self, data: bytes | None, pins: Callable[[], Sequence[bytes]] | Sequence[bytes], rack_id) -> bool:
        """Take the stamp of a heartbeat reply; True when it moved the clock. Never raises:
        a refused stamp is counted (refused_by) and leaves the clock as it was."""
        if not data:
            return False
        received = self.monotonic()
        try:
            if not rack_id:
                raise TimeStampRefused("this Rack has no passport yet", "rack")
            keys = list(pins() if callable(pins) else pins)
            env = open_envelope(data, max_bytes=MAX_TIME_STAMP_BYTES, errors=_ERRORS)
            challenge = env.body.get("challenge")
            sent = self._pending.get(challenge) if isinstance(challenge, bytes) else None
            if sent is None:
                raise TimeStampRefused("answers no challenge this Rack sent (replayed?)", "challenge", "challenge")
            mixer_now = verify_time(data, keys, rack_id, challenge)
            rtt = received - sent
            if rtt > self.max_rtt:
                raise TimeStampRefused(f"round trip {rtt:.1f}s exceeds {self.max_rtt:.1f}s", "rtt")
        except Exception as exc:  # a refused stamp never breaks the heartbeat
            reason = getattr(exc, "reason", "malformed")
            self.refused += 1
            self.refused_by[reason] = self.refused_by.get(reason, 0) + 1
            self.last_error = str(exc)[:200]
            if reason != self._logged_reason:
                self._logged_reason = reason
                log.warning("the Mixer's time stamp was refused (%s): commands are judged by %s; %s", reason,
                            "the last accepted stamp" if self.synced else "this Rack's own clock", exc)  # fmt: skip
            return False
        del self._pending[challenge]
        self._anchor = (mixer_now, (sent + received) / 2)
        self.rtt = max(0.0, rtt)
        self.samples += 1
        if self.samples == 1 or self._logged_reason:
            self._logged_reason = ""
            log.info("synced to the Mixer's time: offset %+.3fs (round trip %.1f ms)", self.offset(), rtt * 1000)
        return True

    # -- reading it --------------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._anchor is not None

    def mixer_now(self) -> float | None:
        """The Mixer's time now, or None before the first accepted stamp."""
        if self._anchor is None:
            return None
        mixer_t, mid = self._anchor
        return mixer_t + (self.monotonic() - mid)

    def error_bound(self) -> float:
        """How far mixer_now() may be off: half the round trip plus the drift since."""
        if self._anchor is None:
            return float("inf")
        age = max(0.0, self.monotonic() - self._anchor[1])
        return self.rtt / 2 + age * self.max_drift_ppm * 1e-6

    def offset(self) -> float | None:
        """Mixer time minus this Rack's wall clock (s), or None before the first stamp."""
        now = self.mixer_now()
        return None if now is None else now - self.wall()

    def judge(self) -> Judgement:
        """The time to judge a command's freshness by and the window absorbing its error."""
        now = self.mixer_now()
        if now is not None:
            return Judgement(now, self.synced_window + self.error_bound(), ClockSource.MIXER)
        wall = self.wall()
        return Judgement(wall, self.local_window, ClockSource.LOCAL if clock_plausible(wall) else ClockSource.UNKNOWN)

    def best_now(self) -> tuple[float | None, ClockSource]:
        """The best time this Rack knows: the Mixer's, else a plausible local clock, else None."""
        j = self.judge()
        return (None, j.source) if j.source is ClockSource.UNKNOWN else (j.now, j.source)

    def status(self) -> dict:
        """For the heartbeat and `fluxrig status`: small."""
        offset = self.offset()
        j = self.judge()
        return {
            "source": str(j.source),
            "offset_s": round(offset, 3) if offset is not None else None,
            "error_s": round(self.error_bound(), 3) if self.synced else None,
            "rtt_ms": round(self.rtt * 1000, 1) if self.synced else None,
            "samples": self.samples,
            "refused": self.refused,
            "refused_by": dict(self.refused_by),
        }
