"""Guaranteed-lane consumers: one durable JetStream consumer per Rack, kept in step with the
active scenario.

Job. A Rack pulls every guaranteed wire that ends on it through one durable consumer,
`in-<rack>` on stream `flux-msg` (fluxrig.agent.subjects.rack_consumer; the Rack's bus user may
only fetch from, read and ack that consumer: fluxrig_mixer.snake.rack_permissions). The Rack
cannot create it; the Mixer does, here:

* `inbound_subjects(doc, rack, labels)`: the source subjects of the wires into `rack` that
  cross the bus: wires from another Rack (the projection's `x-remote-wires` with direction
  `in`) and wires on the Rack marked `lane: guaranteed` (`flux.msg.<rack>.<gear>.<port>`).
* `LaneConsumers.sync()`: for every registered Rack (any status but removed, so a Rack approved
  later finds its backlog waiting) create or update `in-<rack>` with `filter_subjects` = those
  subjects; delete `in-*` consumers no Rack needs any more. Called when a scenario is
  activated (before the Racks are told), and every `interval` seconds as a reconcile (a
  failed sync, a Snake that lost its store).

Consumer settings: explicit ack; `ack_wait` (default 30 s) before an unacknowledged message
is redelivered; `max_ack_pending` bounds what one Rack holds unacknowledged (its backpressure
towards the stream); unlimited deliveries (the lane never gives a message up). A new consumer
starts at the active scenario's activation time (deliver by start time), not at the start of
the stream: messages of an earlier activation that a deleted consumer had already delivered
are never replayed, while a message published after the activation is delivered even when
the consumer is created late (Snake down at activation). An existing consumer keeps its
position; only its filter and limits are updated (nats-server >= 2.10: several filters).

Stream `flux-msg` itself (file storage, duplicate window for the Racks' dedup ids) is created
by fluxrig_mixer.app.ensure_streams.
"""

from __future__ import annotations

import asyncio
import datetime
import logging

from fluxrig.agent import subjects as S

from .scenarios import _ep, project

__all__ = ["inbound_subjects", "wanted_consumers", "LaneConsumers", "CONSUMER_PREFIX",
           "DEFAULT_ACK_WAIT_S", "DEFAULT_MAX_ACK_PENDING", "RECONCILE_INTERVAL_S"]

log = logging.getLogger("fluxrig.mixer.lanes")

CONSUMER_PREFIX = "in-"
DEFAULT_ACK_WAIT_S = 30.0
DEFAULT_MAX_ACK_PENDING = 4096
RECONCILE_INTERVAL_S = 10.0
API_TIMEOUT_S = 5.0


def inbound_subjects(doc: dict, rack: str, labels: dict | None = None) -> list[str]:
    """Sorted source subjects of the bus wires into `rack` (see the module docstring)."""
    proj = project(doc, rack, labels)
    out = set()
    for entry in proj.get("x-remote-wires") or []:
        if entry.get("direction") == "in" and entry.get("subject"):
            out.add(entry["subject"])
    for w in proj.get("wires") or []:
        if isinstance(w, dict) and w.get("lane") == "guaranteed":
            fr, fg, fp = _ep(w.get("from", ""))
            src_rack = fr or rack
            if S.RACK_NAME_RE.match(src_rack):
                out.add(S.msg(src_rack, fg, fp))
    return sorted(out)


def wanted_consumers(doc: dict | None, racks) -> dict[str, list[str]]:
    """consumer name -> filter subjects, for `racks` (RackRow-like: name, labels, status)."""
    if not doc:
        return {}
    out = {}
    for r in racks:
        if r.status == "removed":
            continue
        subjects = inbound_subjects(doc, r.name, r.labels)
        if subjects:
            out[S.rack_consumer(r.name)] = subjects
    return out


def _filters(config) -> list[str]:
    if config.filter_subjects:
        return sorted(config.filter_subjects)
    return [config.filter_subject] if config.filter_subject else []


class LaneConsumers:
    """Creates, updates and deletes the `in-<rack>` consumers (see the module docstring)."""

    def __init__(self, js, registry, scenarios, *, ack_wait: float = DEFAULT_ACK_WAIT_S,
                 max_ack_pending: int = DEFAULT_MAX_ACK_PENDING, interval: float = RECONCILE_INTERVAL_S):
        self.js = js
        self.registry = registry
        self.scenarios = scenarios
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self.interval = interval
        self.stats = {"syncs": 0, "created": 0, "updated": 0, "deleted": 0, "failures": 0}
        self.last_error = ""
        self.current: dict[str, list[str]] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._reconcile(), name="lane-consumers")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    async def _reconcile(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                pass  # counted and logged by sync(); tried again next interval
            await asyncio.sleep(self.interval)

    def _start_time(self) -> datetime.datetime:
        history = self.scenarios.history(1)
        if history:
            try:
                return datetime.datetime.fromisoformat(history[0]["ts"])
            except (KeyError, ValueError):
                pass
        return datetime.datetime.now(datetime.timezone.utc)

    async def sync(self) -> dict[str, list[str]]:
        """Make the consumers match the active scenario; returns consumer -> subjects.
        Raises what JetStream raises (after counting it)."""
        async with self._lock:
            try:
                return await self._sync()
            except Exception as exc:
                self.stats["failures"] += 1
                text = f"{type(exc).__name__}: {exc}"[:500]
                if text != self.last_error:
                    log.error("guaranteed-lane consumers not in step with the scenario: %s", text)
                self.last_error = text
                raise

    async def _sync(self) -> dict[str, list[str]]:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        active = self.scenarios.active()
        wanted = wanted_consumers(active.doc if active else None, self.registry.list())
        existing = {c.name: c for c in await self.js.consumers_info(S.STREAM_MSG)
                    if c.name and c.name.startswith(CONSUMER_PREFIX)}
        for name, subjects in wanted.items():
            have = existing.get(name)
            if have is None:
                config = ConsumerConfig(
                    name=name, durable_name=name,
                    description=f"guaranteed lane into rack {name[len(CONSUMER_PREFIX):]} (fluxrig-mixer)",
                    deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=self._start_time(),
                    ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait, max_deliver=-1,
                    max_ack_pending=self.max_ack_pending, filter_subjects=subjects,
                )
                await self.js.add_consumer(S.STREAM_MSG, config, timeout=API_TIMEOUT_S)
                self.stats["created"] += 1
                log.info("guaranteed lane: consumer %s created for %s", name, ", ".join(subjects))
                continue
            cfg = have.config
            if (_filters(cfg) == subjects and cfg.max_ack_pending == self.max_ack_pending
                    and abs((cfg.ack_wait or 0) - self.ack_wait) < 1e-3):
                continue
            config = cfg.evolve(filter_subject=None, filter_subjects=subjects, ack_wait=self.ack_wait,
                                max_ack_pending=self.max_ack_pending)
            if config.name is None:
                config.name = name
            await self.js.add_consumer(S.STREAM_MSG, config, timeout=API_TIMEOUT_S)
            self.stats["updated"] += 1
            log.info("guaranteed lane: consumer %s now filters %s", name, ", ".join(subjects))
        for name in existing:
            if name not in wanted:
                await self.js.delete_consumer(S.STREAM_MSG, name)
                self.stats["deleted"] += 1
                log.info("guaranteed lane: consumer %s deleted (no wire into that rack)", name)
        self.stats["syncs"] += 1
        self.current = wanted
        self.last_error = ""
        return wanted
