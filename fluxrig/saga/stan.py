"""STANs (DE 11) and RRNs (DE 37) the switch originates for its reversals (issue 16).

Several Racks of a group (issue 17) switch for the same acquirers and issuers, so the STANs
they originate must never collide: each conductor draws from its own `saf.stan_range: [lo, hi]`
(default the whole 000001-999999), cycling inside it. The ranges of a group's members are the
operator's to make disjoint (a scenario projection gives each member its own); a range is
checked at load (1 <= lo <= hi <= 999999, at least MIN_RANGE_SIZE wide).

A restart must not hand out again a STAN that the last run already used (the issuer would take
the new reversal for a repeat of the old one). The journal keeps the STANs of open reversals
only; answered ones are acknowledged and gone. So the counter reserves STANs in blocks of
`block`: before the first STAN of a block is used, the block's end is written (0600, atomic,
fsync'd) to `<saga dir>/stan.json`; a restarted counter starts after the reserved block. A
crash costs at most one block of unused STANs, and one small write per `block` reversals is
all the disk work.

RRN: a reversal carries the original's DE 37 when it has one (the issuer matches on it). When
the original has none and the route copies DE 37, the switch originates one: `YDDDHH` (last
digit of the year, day of the year, hour, UTC) + the reversal's new STAN, 12 digits, so two
Racks with disjoint STAN ranges never originate the same RRN either.
"""

from __future__ import annotations

import datetime
import json
import logging

from ..errors import ConfigError
from ..fileutil import write_private_atomic

__all__ = ["StanCounter", "check_range", "originated_rrn", "STAN_MAX", "MIN_RANGE_SIZE", "STAN_BLOCK", "STAN_FILE"]

log = logging.getLogger("fluxrig.saga")

STAN_MAX = 999_999
MIN_RANGE_SIZE = 100  # a smaller range would cycle within one issuer's duplicate window
STAN_BLOCK = 1000
STAN_FILE = "stan.json"


def check_range(value, key: str = "saf.stan_range") -> tuple[int, int]:
    """(lo, hi) from a config value [lo, hi]; ConfigError naming `key` otherwise."""
    if value is None:
        return 1, STAN_MAX
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ConfigError(f"must be [first, last], two integers, not {value!r}", key=key)
    lo, hi = int(value[0]), int(value[1])
    if not 1 <= lo <= hi <= STAN_MAX:
        raise ConfigError(f"must lie within 1..{STAN_MAX} with first <= last, not [{lo}, {hi}]", key=key)
    if hi - lo + 1 < MIN_RANGE_SIZE:
        raise ConfigError(f"holds {hi - lo + 1} STANs; at least {MIN_RANGE_SIZE}", key=key)
    return lo, hi


def originated_rrn(now: datetime.datetime, stan: int) -> str:
    """YDDDHH + STAN (12 digits), UTC."""
    t = now.astimezone(datetime.UTC)
    return f"{t.year % 10}{t.timetuple().tm_yday:03d}{t.hour:02d}{stan % 1_000_000:06d}"


class StanCounter:
    """STANs in [lo, hi], cycling, reserved on disk in blocks (see the module docstring)."""

    __slots__ = ("lo", "hi", "block", "path", "_last", "_reserved", "reservations")

    def __init__(self, path: str, lo: int = 1, hi: int = STAN_MAX, *, block: int = STAN_BLOCK, seen: int = 0):
        """`seen`: the highest STAN found in the journal (a journal older than the file)."""
        self.lo, self.hi, self.block, self.path = lo, hi, max(1, block), path
        self.reservations = 0
        last = self._load()
        if last is None and lo <= seen <= hi:
            last = seen
        # The next STAN follows `last`; nothing is reserved yet in this run.
        self._last = last if last is not None else hi
        self._reserved = self._last

    def _load(self) -> int | None:
        try:
            with open(self.path, encoding="utf-8") as fh:
                doc = json.loads(fh.read(4096))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("%s unreadable (%s): STANs restart at the top of the range %d-%d", self.path, exc,
                      self.lo, self.hi)  # fmt: skip
            return None
        if not isinstance(doc, dict) or [doc.get("lo"), doc.get("hi")] != [self.lo, self.hi]:
            return None  # another range: start afresh in the new one
        reserved = doc.get("reserved")
        return reserved if isinstance(reserved, int) and self.lo <= reserved <= self.hi else None

    def _after(self, stan: int) -> int:
        return self.lo if stan >= self.hi else stan + 1

    def _reserve(self) -> None:
        """Write the end of the next block before its first STAN is used."""
        end = self._last
        for _ in range(self.block - 1):
            end = self._after(end)
        end = self._after(end)
        doc = {"lo": self.lo, "hi": self.hi, "reserved": end}
        write_private_atomic(self.path, json.dumps(doc).encode())
        self._reserved = end
        self.reservations += 1

    def next(self) -> int:
        """The next STAN. Raises OSError when its block cannot be reserved on disk."""
        if self._last == self._reserved:
            self._reserve()
        self._last = self._after(self._last)
        return self._last
