"""One run of an idempotent job serves every caller that asked before it started.

Job. The Snake's users are re-rendered and reloaded (SIGHUP, then a probe that the new file
is in force) whenever a Rack enrolls or moves. One reload per Hello made enrollment serial at
the speed of nats-server's reload (3-5 Racks/s). `Coalesced(job)` is awaited by each caller:
a caller arriving while a run is under way waits for the next run, which starts when that one
ends and serves everyone who arrived meanwhile. So N concurrent callers cost at most two runs,
and every caller's change (already in the state `job` reads when it runs) is applied when its
await returns.

Contract: `await c()` returns the result of a run that started after the call, or raises
what that run raised. A cancelled caller does not cancel the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from fluxrig.aiotools import cancel_and_wait, retrieve_outcome

__all__ = ["Coalesced"]

T = TypeVar("T")


class Coalesced(Generic[T]):
    def __init__(self, job: Callable[[], Awaitable[T]]):
        self._job = job
        self._next: asyncio.Future | None = None  # the run not started yet, shared by its callers
        self._runner: asyncio.Task | None = None
        self.runs = 0

    async def __call__(self) -> T:
        loop = asyncio.get_running_loop()
        if self._next is None:
            self._next = loop.create_future()
            self._next.add_done_callback(retrieve_outcome)  # every caller may have gone (cancelled)
        fut = self._next
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run(), name="coalesced-run")
        return await asyncio.shield(fut)

    async def _run(self) -> None:
        while self._next is not None:
            fut, self._next = self._next, None
            self.runs += 1
            try:
                result = await self._job()
            except asyncio.CancelledError:
                fut.cancel()
                raise
            except Exception as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    async def close(self) -> None:
        await cancel_and_wait(self._runner)
