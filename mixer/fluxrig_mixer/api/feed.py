"""The console's live feed: fleet changes, one Rack's detail and the log tail, as server-sent events.

Job. A browser keeps one EventSource open per page; the Mixer pushes what changed, so a fleet
of 500 Racks costs the browser no polling. One `FleetFeed` per app looks at the registry's
in-memory cache every `console.feed_interval` while anyone listens (nothing runs when no one
does), turns each Rack into a compact row (`fleet_row`) and sends each subscriber only the
rows that changed and the ids that went away. The Rack detail and the log tail are per
subscriber (`rack_stream`, `log_stream`): the detail is the Rack's full public view sent when
it changes; the tail queries the telemetry store (in the thread pool) for rows newer than the
last one sent.

Contract.
  - SSE framing: `event: <name>`, `data: <one JSON line>`, a blank line; a comment line
    (`: ping`) every PING_EVERY_S keeps proxies from closing an idle stream. `retry:` tells
    the browser to reconnect after RETRY_MS; a reconnect starts again with a full snapshot.
  - Events: `fleet` (every row: on connect and after a subscriber fell behind), `racks`
    ({"changed": [rows], "gone": [ids]}), `rack` (one Rack's public view), `logs` ([rows],
    oldest first), `error` ({"error": ...}: a bad filter; the stream then ends).
  - A subscriber is a bounded queue (QUEUE_DEPTH); one that does not read is marked stale and
    gets a fresh `fleet` snapshot when it reads again, never an unbounded backlog.
  - At most MAX_STREAMS streams at once (503 past it): the request guard does not count
    them against api.max_requests, since a console holds one open all day.
  - `close()` (Mixer stop) ends every stream, so the API server can stop at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

from ..registry import RackRow

__all__ = [
    "FleetFeed",
    "fleet_row",
    "storage_failed",
    "sse",
    "rack_stream",
    "log_stream",
    "QUEUE_DEPTH",
    "EVENTS_PATH",
    "MAX_STREAMS",
    "PING_EVERY_S",
    "RETRY_MS",
    "TAIL_BATCH",
    "DEFAULT_FEED_INTERVAL_S",
]

log = logging.getLogger("fluxrig.mixer.feed")

QUEUE_DEPTH = 64
EVENTS_PATH = "/api/v1/events"
MAX_STREAMS = 200  # open event streams at once (the request guard does not count them)
PING_EVERY_S = 15.0
RETRY_MS = 2000
TAIL_BATCH = 200  # log rows per look at most
DEFAULT_FEED_INTERVAL_S = 1.0


def sse(event: str, data) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n".encode()


def _ts(v):
    return v.isoformat() if v is not None else None


def fleet_row(r: RackRow) -> dict:
    """What the fleet table shows of one Rack (no gear stats: those come with the Rack view)."""
    stats = r.stats or {}
    ctrl = stats.get("ctrl") or {}
    tel = stats.get("telemetry") or {}
    lanes = stats.get("lanes") or {}
    return {
        "id": r.rack_id,
        "name": r.name,
        "status": r.status,
        "host": r.host,
        "version": r.version,
        "labels": r.labels,
        "last_seen": _ts(r.last_seen),
        "status_since": _ts(r.status_since),
        "scenario": r.scenario_version,
        "target": r.target_version,
        "apply_state": r.apply_state,
        "apply_reason": r.apply_reason,
        "telemetry_backlog": tel.get("backlog"),
        "lane_backlog": lanes.get("backlog_records"),
        "killed": bool(ctrl.get("killed")),
        "kill_reason": ctrl.get("reason") or "",
        "stopped_gears": list(ctrl.get("stopped_gears") or []),
        "storage_failed": storage_failed(stats),
    }


def storage_failed(stats: dict | None) -> list[str]:
    """The Rack's WALs refusing writes right now (`telemetry`, `lanes`: a full disk), from its
    last heartbeat's stats (fluxrig.mixer_link.storage_stats)."""
    failed = ((stats or {}).get("storage") or {}).get("failed") or []
    return [str(w) for w in failed][:8] if isinstance(failed, list) else []


class _Subscriber:
    __slots__ = ("queue", "stale")

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue(QUEUE_DEPTH)
        self.stale = False


class FleetFeed:
    """Fleet rows diffed once per interval, fanned out to every subscriber."""

    def __init__(self, registry, interval: float = DEFAULT_FEED_INTERVAL_S):
        self.registry = registry
        self.interval = interval
        self.rows: dict[str, dict] = {}
        self._subs: set[_Subscriber] = set()
        self._task: asyncio.Task | None = None
        self.closed = asyncio.Event()
        self.ticks = 0

    def snapshot(self) -> list[dict]:
        self.rows = {r.rack_id: fleet_row(r) for r in self.registry.list()}
        return list(self.rows.values())

    def diff(self) -> tuple[list[dict], list[str]]:
        """(rows changed or new, ids gone) since the last look; remembers the new state."""
        now = {r.rack_id: fleet_row(r) for r in self.registry.list()}
        changed = [row for rid, row in now.items() if self.rows.get(rid) != row]
        gone = [rid for rid in self.rows if rid not in now]
        self.rows = now
        return changed, gone

    async def _run(self) -> None:
        try:
            while self._subs and not self.closed.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.closed.wait(), self.interval)
                if self.closed.is_set():
                    break
                self.ticks += 1
                changed, gone = self.diff()
                if not changed and not gone:
                    continue
                event = sse("racks", {"changed": changed, "gone": gone})
                for sub in list(self._subs):
                    try:
                        sub.queue.put_nowait(event)
                    except asyncio.QueueFull:
                        sub.stale = True
        except Exception:  # the feed must not die silently: log it, subscribers reconnect
            log.exception("console feed stopped")
        finally:
            self._task = None

    async def stream(self, extra: AsyncIterator[bytes] | None = None) -> AsyncIterator[bytes]:
        """The fleet event stream of one subscriber (plus `extra` events merged in)."""
        sub = _Subscriber()
        self._subs.add(sub)
        if self._task is None:
            if not self.rows:
                self.snapshot()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="console-feed")
        merged: asyncio.Task | None = None
        try:
            yield f"retry: {RETRY_MS}\n\n".encode()
            yield sse("fleet", self.snapshot() if len(self._subs) == 1 else list(self.rows.values()))
            if extra is not None:
                merged = asyncio.get_running_loop().create_task(_pump(extra, sub.queue))
            while not self.closed.is_set():
                getter = asyncio.ensure_future(sub.queue.get())
                closer = asyncio.ensure_future(self.closed.wait())
                done, _ = await asyncio.wait(
                    {getter, closer}, timeout=PING_EVERY_S, return_when=asyncio.FIRST_COMPLETED
                )
                closer.cancel()
                if getter not in done:
                    getter.cancel()
                    if self.closed.is_set():
                        break
                    yield b": ping\n\n"
                    continue
                item = getter.result()
                if item is None:  # the extra stream ended (e.g. a bad filter): end this one
                    break
                if sub.stale:
                    sub.stale = False
                    while not sub.queue.empty():
                        sub.queue.get_nowait()
                    yield sse("fleet", list(self.rows.values()))
                    continue
                yield item
        finally:
            self._subs.discard(sub)
            if merged is not None:
                merged.cancel()

    def close(self) -> None:
        self.closed.set()

    @property
    def subscribers(self) -> int:
        return len(self._subs)


async def _pump(source: AsyncIterator[bytes], queue: asyncio.Queue) -> None:
    try:
        async for item in source:
            await queue.put(item)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.debug("console stream source ended: %s", exc)
    await queue.put(None)


async def rack_stream(registry, rack_id: str, interval: float, closed: asyncio.Event) -> AsyncIterator[bytes]:
    """`rack` events: the Rack's public view (with stats and events) whenever it changes."""
    last = None
    while not closed.is_set():
        try:
            row = registry.get(rack_id, include_removed=True)
        except Exception as exc:
            yield sse("error", {"error": str(exc)})
            return
        view = row.public()
        if view != last:
            last = view
            view = dict(view)
            view["events"] = registry.events(row.rack_id, 50)
            yield sse("rack", view)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closed.wait(), interval)


async def log_stream(queries, filters: dict, interval: float, closed: asyncio.Event) -> AsyncIterator[bytes]:
    """`logs` events: rows newer than the last sent, oldest first. The first batch is the last
    `TAIL_BATCH` rows of the window the filters name."""
    seen: set = set()
    since = filters.pop("since", None) or "15m"
    first = True
    while not closed.is_set():
        try:
            rows = await asyncio.to_thread(queries.logs, since=since, limit=TAIL_BATCH, **filters)
        except Exception as exc:  # a wrong filter (QueryError names it): say so, end the stream
            yield sse("error", {"error": str(exc)})
            return
        fresh = [r for r in reversed(rows) if (r.get("rack"), r.get("id")) not in seen]
        if fresh or first:
            first = False
            for r in fresh:
                seen.add((r.get("rack"), r.get("id")))
            if fresh:
                since = fresh[-1]["timestamp"]  # inclusive: rows of that instant are filtered by `seen`
            if len(seen) > 50 * TAIL_BATCH:
                seen = {(r.get("rack"), r.get("id")) for r in fresh}
            yield sse("logs", fresh)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closed.wait(), interval)
