"""Leases in JetStream KV: a duty (offline sweep, re-signing, retention, roll-out) run by one
Mixer node at a time, taken over within `ttl` + one poll after its holder dies.

Job. `Lease(bucket, duty, holder, ttl)` keeps trying to hold key `<duty>` of the leases bucket
(kv.py). Holding means: this node wrote the key and it has not expired.

Contract.
- Acquire is `create()` with a per-message TTL (`Nats-TTL`, nats-server >= 2.11): it succeeds
  only while nobody holds the key. The server ages the value out `ttl` after its last write,
  so a holder that dies (SIGKILL, power, a partition that cuts it from the quorum) loses the
  key by the server's clock, not by anyone's wall clock.
- The holder renews every `ttl / RENEW_FRACTION` with `update(revision)`: the fencing token is
  the revision of its own last successful write (etcd's lease argument; institutional.md §1.2:
  a stale revision never wins). A renewal that conflicts or fails means the lease is lost *now*
  (`held` goes False before any other node can have it: it had `ttl` left at the last renewal
  and we stop at the first failure), and `on_lost` is called.
- `held` is True only while the last renewal is younger than `ttl * SAFE_FRACTION` (a paused
  process that wakes after its lease expired does not act on a stale belief); `check()` renews
  at once and raises LeaseLost when the lease is gone: call it right before a write that must
  come from the holder only.
- `run()` is the loop (a task); `stop()` releases the key (delete by revision) so the next
  node takes over at once on a clean shutdown.

Raises: LeaseLost (FluxError).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from fluxrig.aiotools import cancel_and_wait
from fluxrig.errors import FluxError

from .kv import Bucket, StateConflict, StateUnavailable

__all__ = ["Lease", "LeaseLost", "DEFAULT_LEASE_TTL_S", "RENEW_FRACTION", "SAFE_FRACTION", "MIN_LEASE_TTL_S"]

log = logging.getLogger("fluxrig.mixer.lease")

DEFAULT_LEASE_TTL_S = 3.0  # takeover within ttl + ttl/RENEW_FRACTION: 4 s, inside issue 14's 5 s
MIN_LEASE_TTL_S = 1.0  # Nats-TTL has one-second resolution
RENEW_FRACTION = 3  # renew three times per ttl: two renewals may fail before the key ages out
SAFE_FRACTION = 0.8  # act only while the last renewal is younger than 80 % of ttl


class LeaseLost(FluxError):
    """This node does not hold lease `duty` (any more): the write it guards must not happen."""

    def __init__(self, duty: str, holder: str | None = None):
        self.duty, self.holder = duty, holder
        super().__init__(f"lease {duty!r} is not held by this node" + (f" (held by {holder})" if holder else ""))


class Lease:
    def __init__(
        self,
        bucket: Bucket,
        duty: str,
        holder: str,
        ttl: float = DEFAULT_LEASE_TTL_S,
        on_acquired: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ):
        if ttl < MIN_LEASE_TTL_S:
            raise FluxError(f"lease ttl {ttl} s is below the minimum of {MIN_LEASE_TTL_S} s")
        self.bucket = bucket
        self.duty = duty
        self.holder = holder
        self.ttl = float(ttl)
        self.on_acquired = on_acquired
        self.on_lost = on_lost
        self.revision = 0  # fencing token: the revision of our last successful write
        self.term = 0  # how many times this node acquired it
        self._renewed = 0.0  # monotonic time of the last successful write
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one write at a time: two renewals naming one revision would fence each other
        self.acquired_at: float | None = None

    @property
    def held(self) -> bool:
        return self.revision > 0 and time.monotonic() - self._renewed < self.ttl * SAFE_FRACTION

    def _value(self) -> dict:
        return {"holder": self.holder, "term": self.term, "ttl": self.ttl, "at": time.time()}

    async def try_acquire(self) -> bool:
        async with self._lock:
            if self.revision > 0:
                return True
            return await self._acquire()

    async def _acquire(self) -> bool:
        try:
            self.term += 1
            rev = await self.bucket.create(self.duty, self._value(), msg_ttl=self.ttl)
        except StateConflict:
            self.term -= 1
            return False
        except StateUnavailable as exc:
            self.term -= 1
            log.debug("lease %s: %s", self.duty, exc)
            return False
        self.revision, self._renewed, self.acquired_at = rev, time.monotonic(), time.time()
        log.info("lease %s acquired by %s (revision %d)", self.duty, self.holder, rev)
        if self.on_acquired is not None:
            self.on_acquired()
        return True

    async def renew(self) -> bool:
        async with self._lock:
            return await self._renew()

    async def _renew(self) -> bool:
        if self.revision <= 0:
            return False
        try:
            rev = await self.bucket.update(self.duty, self._value(), self.revision, msg_ttl=self.ttl)
        except (StateConflict, StateUnavailable) as exc:
            self._lose(str(exc))
            return False
        self.revision, self._renewed = rev, time.monotonic()
        return True

    def _lose(self, why: str) -> None:
        if self.revision <= 0:
            return
        self.revision = 0
        log.warning("lease %s lost by %s: %s", self.duty, self.holder, why)
        if self.on_lost is not None:
            self.on_lost()

    async def check(self) -> int:
        """Renew now; the fencing revision when still held, else LeaseLost."""
        if not self.held or not await self.renew():
            raise LeaseLost(self.duty, await self.current_holder())
        return self.revision

    async def current_holder(self) -> str | None:
        try:
            cur = await self.bucket.get(self.duty)
        except StateUnavailable:
            return None
        return cur.value.get("holder") if cur is not None else None

    async def run(self) -> None:
        period = self.ttl / RENEW_FRACTION
        while True:
            try:
                if self.revision > 0:
                    if time.monotonic() - self._renewed >= self.ttl:  # we were paused past expiry
                        self._lose("not renewed within its ttl (the process was paused?)")
                    else:
                        await self.renew()
                if self.revision <= 0:
                    await self.try_acquire()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the loop die: a lost lease is retried
                log.error("lease %s loop: %s", self.duty, exc)
            await asyncio.sleep(period / 2 if self.revision <= 0 else period)

    def start(self) -> asyncio.Task:
        self._task = asyncio.get_running_loop().create_task(self.run(), name=f"lease-{self.duty}")
        return self._task

    async def stop(self, release: bool = True) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if release and self.revision > 0:
            try:
                await self.bucket.delete(self.duty, self.revision)
                log.info("lease %s released by %s", self.duty, self.holder)
            except Exception as exc:
                log.debug("lease %s release: %s", self.duty, exc)
            self.revision = 0
