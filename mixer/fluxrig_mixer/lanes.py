"""Guaranteed-lane consumers: one durable JetStream consumer per Rack, kept in step with the
active scenario.

Job. A Rack pulls every guaranteed wire that ends on it through one durable consumer,
`in-<rack>` on stream `flux-msg` (fluxrig.wire.subjects.rack_consumer; the Rack's bus user may
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

Group consumers (issue 17, fluxrig_mixer.groups): the inputs of a Rack group's gears from
outside the group are not in the members' `in-<rack>` consumers but in one `grp-<group>`
consumer shared by the members (its own ack wait, back-off and bounded deliveries:
`group_policy`), created, updated and deleted here with the others.

Consumer settings: explicit ack; `ack_wait` (default 30 s) before an unacknowledged message
is redelivered; `max_ack_pending` bounds what one Rack holds unacknowledged (its backpressure
towards the stream); unlimited deliveries (the lane never gives a message up). A new consumer
starts at the active scenario's activation time (deliver by start time), not at the start of
the stream: messages of an earlier activation that a deleted consumer had already delivered
are never replayed, while a message published after the activation is delivered even when
the consumer is created late (Snake down at activation). An existing consumer keeps its
position; only its filter and limits are updated (nats-server >= 2.10: several filters).

Renames (issue 13). Every `in-<rack>` consumer carries the id of the Rack it feeds in its
metadata (RACK_ID_KEY). A sync that finds one whose Rack now has another name carries it over
(`_carry_over`): `in-<new>` is created from the stream seq after the old one's ack floor, with
its filter, and the old one is deleted, so what was sent to a receiving Rack while it was being
renamed (stopped, cut off) waits for it under its new name; nothing past the floor is skipped,
what was delivered and not acked comes again and the Rack's record LRU masks it. The carried
consumer keeps its filter (the Rack runs what it ran) until a scenario wires into the new name.

Removal and quotas (`LaneConsumers.purge()`, every `purge_interval` s, under the same lock as
`sync()` so a consumer being created is always seen). Stream `flux-msg` (fluxrig_mixer.streams:
limits retention, discard NEW, no age limit by default) never evicts; what is delivered is
removed here: per subject, the messages at or below the lowest ack floor of every consumer
whose filter matches that subject (any consumer on the stream counts, not only `in-*`), with one
`purge(subject, seq=floor + 1)`, batched (PURGE_MIN_SEQS, PURGE_MAX_DELAY_S) unless the
stream is half full or the subject half its quota. A message no consumer has acknowledged is never removed; a
subject no consumer matches ("orphan": its wire was removed) is kept, reported once at WARNING
and in `quota["orphans"]`, until a wire takes it or an operator purges it. The same pass reads
the stream's fill against its limits (stream bytes and messages, each subject's count against
`max_msgs_per_subject`): at QUOTA_ALERT_RATIO (80 %) one WARNING per subject or stream, at 100 %
one ERROR (its senders are being pushed back into their lane WAL), cleared below 70 % (INFO);
`quota` holds the current figures and alerts.

A purge can cost a given-back message its place in the queue: nats-server (2.10 to 2.15 at
least, `consumer.purge`) drops from a consumer's redelivery queue every entry below the
consumer's next sequence, though the message is still pending and was not purged. A message
a stopped or killed Rack NAKed (it waits in that queue for the next pull request) then comes
back only after ack_wait, behind newer ones. So a subject is not purged while a consumer of it
holds messages and no pull request waits on it (`num_ack_pending > 0`, `num_waiting == 0`:
its receiver is away, what it gave back sits in that queue), unless the stream or the
subject is over PURGE_EAGER_RATIO full: room then comes first (`stats["purges_deferred"]`).
Room never comes before a NAKed message, though: the Mixer follows JetStream's NAK advisories
and keeps, per consumer, the highest stream seq it NAKed; while that consumer's ack floor is
below it, a NAKed message may still wait in its redelivery queue, and no subject of that
consumer is purged, however full (`stats["purges_held_for_naks"]`). What this costs: the
acknowledged messages since that subject's last purge (at most PURGE_MIN_SEQS or
PURGE_MAX_DELAY_S of traffic) stay until the consumer acks past what it gave back; a full
quota meanwhile pushes the senders back into their lane WAL. An advisory missed (the Mixer
restarted, its connection was down) leaves the `num_ack_pending` rule above.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging

import nats.js.errors

from fluxrig.aiotools import cancel_and_wait, finish_within
from fluxrig.scenario.groups import group_labels
from fluxrig.wire import subjects as S
from fluxrig.wire.vocab import RackStatus

from .groups import GROUP_CONSUMER_PREFIX, GroupConsumerPolicy, group_inputs
from .scenarios import _ep, project
from .streams import QUOTA_ALERT_RATIO, QUOTA_CLEAR_RATIO

__all__ = [
    "inbound_subjects",
    "wanted_consumers",
    "LaneConsumers",
    "CONSUMER_PREFIX",
    "DEFAULT_ACK_WAIT_S",
    "DEFAULT_MAX_ACK_PENDING",
    "RECONCILE_INTERVAL_S",
    "PURGE_INTERVAL_S",
    "API_TIMEOUT_S",
    "subject_matches",
]

log = logging.getLogger("fluxrig.mixer.lanes")

CONSUMER_PREFIX = "in-"
DEFAULT_ACK_WAIT_S = 30.0
DEFAULT_MAX_ACK_PENDING = 4096
RECONCILE_INTERVAL_S = 10.0
#: How often delivered messages are removed and the quotas read (a stream at its cap makes
#: room within this after the receiver acked).
PURGE_INTERVAL_S = 2.0
#: A subject is purged once this many stream seqs were acknowledged past its last purge, or
#: PURGE_MAX_DELAY_S after it, or at once while the stream is over PURGE_EAGER_RATIO full:
#: purges stay few under a heavy flow (each is a stream operation at the Snake) and room is
#: made at once when it is needed.
PURGE_MIN_SEQS = 4096
PURGE_MAX_DELAY_S = 30.0
PURGE_EAGER_RATIO = 0.5
API_TIMEOUT_S = 5.0
#: Consumer metadata: the Rack (by id) an `in-<rack>` consumer feeds, so that a rename carries
#: it over to `in-<new name>` (`_carry_over`), and the consumer a carried one came from.
RACK_ID_KEY = "fluxrig_rack_id"
CARRIED_KEY = "fluxrig_carried_from"
#: Consumers whose NAKs are followed at most (one int each; more consumers than a Mixer serves).
MAX_NAK_TRACKED = 100_000


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` one or more trailing tokens."""
    p, t = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(t) > i
        if i >= len(t) or (tok != "*" and tok != t[i]):
            return False
    return len(p) == len(t)


def inbound_subjects(doc: dict, rack: str, labels: dict | None = None) -> list[str]:
    """Sorted source subjects of the bus wires into `rack` (see the module docstring)."""
    proj = project(doc, rack, labels)
    out = set()
    for entry in proj.get("x-remote-wires") or []:
        # A group input goes to the group's shared consumer, not the member's own (groups.py).
        if entry.get("direction") == "in" and entry.get("subject") and not entry.get("group"):
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
        if r.status == RackStatus.REMOVED:
            continue
        subjects = inbound_subjects(doc, r.name, r.labels)
        if subjects:
            out[S.rack_consumer(r.name)] = subjects
    for group, subjects in group_inputs(doc).items():  # issue 17: one consumer shared by the members
        out[S.group_consumer(group)] = subjects
    return out


def _filters(config) -> list[str]:
    if config.filter_subjects:
        return sorted(config.filter_subjects)
    return [config.filter_subject] if config.filter_subject else []


class LaneConsumers:
    """Creates, updates and deletes the `in-<rack>` consumers (see the module docstring)."""

    def __init__(
        self,
        js,
        registry,
        scenarios,
        *,
        ack_wait: float = DEFAULT_ACK_WAIT_S,
        max_ack_pending: int = DEFAULT_MAX_ACK_PENDING,
        interval: float = RECONCILE_INTERVAL_S,
        purge_interval: float = PURGE_INTERVAL_S,
        nc=None,
        replicas: int = 1,
    ):
        self.js = js
        self.nc = nc  # for the NAK advisories (None: only the num_ack_pending rule)
        self.replicas = replicas  # of the groups' saga mirror streams (streams.saf_stream_config)
        self._saf_streams: set[str] = set()
        self.registry = registry
        self.scenarios = scenarios
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self.interval = interval
        self.purge_interval = purge_interval
        self.group_policy = GroupConsumerPolicy()  # the `grp-<group>` consumers (groups.py)
        self.stats = {"syncs": 0, "created": 0, "updated": 0, "deleted": 0, "carried_over": 0, "failures": 0,
                      "purge_runs": 0, "purges": 0, "purges_deferred": 0, "purges_held_for_naks": 0,
                      "purge_failures": 0}  # fmt: skip
        self.last_error = ""
        self.last_purge_error = ""
        self.quota: dict = {}
        self._purged: dict[str, int] = {}  # subject -> highest stream seq purged through
        self._purged_at: dict[str, float] = {}  # subject -> loop time of its last purge
        self._alerts: dict[str, str] = {}  # "stream" or a subject -> "alert" | "full"
        self._orphans_warned: set[str] = set()
        self._stream_created = None
        self.current: dict[str, list[str]] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self.naked: dict[str, int] = {}  # consumer -> highest stream seq it NAKed (advisories)
        self._nak_sub = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._reconcile(), name="lane-consumers")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        sub, self._nak_sub = self._nak_sub, None
        if sub is not None:
            await finish_within(sub.unsubscribe(), 2.0, "unsubscribing the NAK advisories")

    async def follow_naks(self) -> None:
        """Subscribe to flux-msg's NAK advisories (see the module docstring); a failure is
        logged and leaves the num_ack_pending rule alone in force."""
        if self.nc is None or self._nak_sub is not None:
            return
        try:
            self._nak_sub = await self.nc.subscribe(S.js_nak_advisories(S.STREAM_MSG), cb=self._on_nak)
        except Exception as exc:
            log.warning("guaranteed lane: NAK advisories not followed (%s): a purge may cost a message given "
                        "back its place in the queue", exc)  # fmt: skip

    async def _on_nak(self, msg) -> None:
        try:
            event = json.loads(msg.data)
            name, seq = str(event["consumer"]), int(event["stream_seq"])
        except (ValueError, KeyError, TypeError):
            return
        if seq > self.naked.get(name, 0) and (name in self.naked or len(self.naked) < MAX_NAK_TRACKED):
            self.naked[name] = seq

    async def _reconcile(self) -> None:
        loop = asyncio.get_running_loop()
        next_sync = 0.0
        await self.follow_naks()
        while True:
            if loop.time() >= next_sync:
                next_sync = loop.time() + self.interval
                try:
                    await self.sync()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    pass  # counted and logged by sync(); tried again next interval
            try:
                await self.purge()
            except asyncio.CancelledError:
                raise
            except Exception:
                pass  # counted and logged by purge()
            await asyncio.sleep(max(0.01, min(self.purge_interval, next_sync - loop.time())))

    async def _carry_over(self, have, racks: dict, existing: dict, wanted: dict):
        """The consumer of a Rack that was renamed (its metadata names a Rack whose name is
        now another) goes on as `in-<new name>`: created from the stream seq after its ack
        floor, with its filter (the Rack runs what it ran until a scenario names it anew), then
        the old one is deleted. What the old one delivered and the Rack had not acked comes
        again (the Rack's record LRU masks what it processed); nothing after its floor is
        skipped. Returns the new consumer's info, or None when this is not a renamed one."""
        from nats.js.api import DeliverPolicy

        rack = racks.get((have.config.metadata or {}).get(RACK_ID_KEY, ""))
        if rack is None or have.name == S.rack_consumer(rack.name) or not have.name.startswith(CONSUMER_PREFIX):
            return None
        name = S.rack_consumer(rack.name)
        floor = int(have.ack_floor.stream_seq) if have.ack_floor else 0
        if name not in existing:
            config = self._rack_consumer(
                name,
                wanted.get(name) or _filters(have.config),
                f"guaranteed lane into rack {rack.name}, carried over from {have.name} (fluxrig-mixer)",
                {RACK_ID_KEY: rack.rack_id, CARRIED_KEY: have.name},
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=floor + 1,
            )
            await self.js.add_consumer(S.STREAM_MSG, config, timeout=API_TIMEOUT_S)
            self.stats["carried_over"] += 1
            log.info("guaranteed lane: consumer %s carried over to %s (rack %s renamed) from stream seq %d",
                     have.name, name, rack.rack_id, floor + 1)  # fmt: skip
        with contextlib.suppress(nats.js.errors.NotFoundError):  # another node carried it first
            await self.js.delete_consumer(S.STREAM_MSG, have.name)
            self.stats["deleted"] += 1
        return await self.js.consumer_info(S.STREAM_MSG, name)

    def _rack_consumer(self, name: str, subjects: list[str], description: str, metadata: dict | None, **start):
        """The config of an `in-<rack>` consumer; `start`: where it begins (deliver policy)."""
        from nats.js.api import AckPolicy, ConsumerConfig

        return ConsumerConfig(
            name=name,
            durable_name=name,
            description=description,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=-1,
            max_ack_pending=self.max_ack_pending,
            filter_subjects=subjects,
            metadata=metadata,
            **start,
        )

    def _start_time(self) -> datetime.datetime:
        history = self.scenarios.history(1)
        if history:
            try:
                return datetime.datetime.fromisoformat(history[0]["ts"])
            except (KeyError, ValueError):
                pass
        return datetime.datetime.now(datetime.UTC)

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
        from nats.js.api import DeliverPolicy

        active = self.scenarios.active()
        rows = self.registry.list()
        await self._ensure_saf_streams(active.doc if active else None)
        wanted = wanted_consumers(active.doc if active else None, rows)
        existing = {
            c.name: c
            for c in await self.js.consumers_info(S.STREAM_MSG)
            if c.name and c.name.startswith((CONSUMER_PREFIX, GROUP_CONSUMER_PREFIX))
        }
        racks = {r.rack_id: r for r in rows if r.status != RackStatus.REMOVED}
        owners = {S.rack_consumer(r.name): r.rack_id for r in racks.values()}
        for name in list(existing):
            carried = await self._carry_over(existing[name], racks, existing, wanted)
            if carried is not None:
                existing.pop(name)
                existing[carried.name] = carried
        carried_only = set()
        for name, have in existing.items():  # a carried consumer keeps its filter until wires name its rack
            if name not in wanted and name in owners and (have.config.metadata or {}).get(CARRIED_KEY):
                wanted[name] = _filters(have.config)
                carried_only.add(name)
        for name, subjects in wanted.items():
            have = existing.get(name)
            if name.startswith(GROUP_CONSUMER_PREFIX):
                await self._sync_group(name, subjects, have)
                continue
            # A name that comes back is a new identity (issue 12): a consumer older than the
            # last removal of that name belonged to the removed Rack and goes, with its backlog;
            # the new one starts no earlier than that removal.
            released = self.registry.name_released_at(name[len(CONSUMER_PREFIX) :])
            if have is not None and released is not None and have.created is not None and have.created < released:
                await self.js.delete_consumer(S.STREAM_MSG, name)
                self.stats["deleted"] += 1
                log.info("guaranteed lane: consumer %s deleted (it belonged to a removed rack of that name)", name)
                have = None
            if have is None:
                config = self._rack_consumer(
                    name,
                    subjects,
                    f"guaranteed lane into rack {name[len(CONSUMER_PREFIX) :]} (fluxrig-mixer)",
                    {RACK_ID_KEY: owners[name]} if name in owners else None,
                    deliver_policy=DeliverPolicy.BY_START_TIME,
                    opt_start_time=max(self._start_time(), released) if released else self._start_time(),
                )
                await self.js.add_consumer(S.STREAM_MSG, config, timeout=API_TIMEOUT_S)
                self.stats["created"] += 1
                log.info("guaranteed lane: consumer %s created for %s", name, ", ".join(subjects))
                continue
            cfg = have.config
            # the Rack it feeds, by id (a carried one keeps saying so until wires name its Rack)
            ours = {k: v for k, v in (cfg.metadata or {}).items() if not k.startswith("_nats")}  # the server's own
            metadata = {RACK_ID_KEY: owners[name]} if name in owners and name not in carried_only else ours
            if (
                _filters(cfg) == subjects
                and cfg.max_ack_pending == self.max_ack_pending
                and abs((cfg.ack_wait or 0) - self.ack_wait) < 1e-3
                and ours == metadata
            ):
                continue
            config = cfg.evolve(
                filter_subject=None,
                filter_subjects=subjects,
                ack_wait=self.ack_wait,
                max_ack_pending=self.max_ack_pending,
                metadata=metadata or None,
            )
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

    async def _ensure_saf_streams(self, doc: dict | None) -> None:
        """Each group of the active scenario has its saga mirror stream (issue 17 item 4). A
        group that leaves the scenario keeps its stream: owed reversals in it outlive a
        scenario change (max_age bounds it)."""
        from .streams import ensure_stream, saf_stream_config

        for group in sorted(group_labels(doc or {})):
            if group not in self._saf_streams:
                await ensure_stream(self.js, saf_stream_config(group, self.replicas))
                self._saf_streams.add(group)
                log.info("group %s: saga mirror stream %s ready", group, S.saf_stream(group))

    async def _sync_group(self, name: str, subjects: list[str], have) -> None:
        """Create or update a group's shared consumer (issue 17, fluxrig_mixer.groups)."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        p = self.group_policy
        if have is None:
            config = ConsumerConfig(
                name=name,
                durable_name=name,
                description=f"guaranteed lane into rack group {name[len(GROUP_CONSUMER_PREFIX) :]}, shared by "
                "its members (fluxrig-mixer)",
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=self._start_time(),
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=p.ack_wait,
                backoff=list(p.backoff) or None,
                max_deliver=p.max_deliver,
                max_ack_pending=p.max_ack_pending,
                filter_subjects=subjects,
            )
            await self.js.add_consumer(S.STREAM_MSG, config, timeout=API_TIMEOUT_S)
            self.stats["created"] += 1
            log.info("guaranteed lane: group consumer %s created for %s", name, ", ".join(subjects))
            return
        cfg = have.config
        same = (
            _filters(cfg) == subjects
            and cfg.max_ack_pending == p.max_ack_pending
            and cfg.max_deliver == p.max_deliver
            and abs((cfg.ack_wait or 0) - p.ack_wait) < 1e-3
            and [round(b, 3) for b in (cfg.backoff or [])] == [round(b, 3) for b in p.backoff]
        )
        if same:
            return
        config = cfg.evolve(filter_subject=None, filter_subjects=subjects, ack_wait=p.ack_wait,
                            backoff=list(p.backoff) or None, max_deliver=p.max_deliver,
                            max_ack_pending=p.max_ack_pending)  # fmt: skip
        if config.name is None:
            config.name = name
        await self.js.add_consumer(S.STREAM_MSG, config, timeout=API_TIMEOUT_S)
        self.stats["updated"] += 1
        log.info("guaranteed lane: group consumer %s now filters %s", name, ", ".join(subjects))

    # -- removal of what was delivered, and the quotas -------------------------------------

    async def purge(self) -> dict:
        """Remove what every consumer of each subject acknowledged; read the quotas. Returns
        `quota`. Raises what JetStream raises (after counting and logging it once)."""
        async with self._lock:
            try:
                return await self._purge()
            except Exception as exc:
                self.stats["purge_failures"] += 1
                text = f"{type(exc).__name__}: {exc}"[:500]
                if text != self.last_purge_error:
                    log.error("guaranteed lane: delivered messages not removed (flux-msg will fill up): %s", text)
                self.last_purge_error = text
                raise

    async def _purge(self) -> dict:
        info = await self.js.stream_info(S.STREAM_MSG, subjects_filter=S.msg_all())
        if info.created != self._stream_created:  # a new stream (a Snake that lost its store): seqs restart
            self._stream_created = info.created
            self._purged.clear()
            self._purged_at.clear()
        consumers = await self.js.consumers_info(S.STREAM_MSG)
        floors = []
        for c in consumers:
            pats = _filters(c.config) or [">"]
            away = bool(c.num_ack_pending) and not c.num_waiting  # see the module docstring
            ack = int(c.ack_floor.stream_seq) if c.ack_floor else 0
            naked = c.name in self.naked and self.naked[c.name] > ack  # a NAKed one may be queued
            if c.name in self.naked and not naked:
                del self.naked[c.name]  # acked past everything it gave back
            floors.append((pats, ack, away, naked))
        subjects = dict(info.state.subjects or {})
        cfg, st = info.config, info.state
        eager = bool(cfg.max_bytes and cfg.max_bytes > 0 and st.bytes >= cfg.max_bytes * PURGE_EAGER_RATIO)
        per_subject = cfg.max_msgs_per_subject or -1
        now = asyncio.get_running_loop().time()
        orphans = []
        purged_now = 0
        for subject in subjects:
            floor = None
            away = held = False
            for pats, ack, gone, naked in floors:
                if any(subject_matches(p, subject) for p in pats):
                    floor = ack if floor is None else min(floor, ack)
                    away = away or gone
                    held = held or naked
            if floor is None:
                orphans.append(subject)
                continue
            done = self._purged.get(subject, 0)
            if floor <= done:
                continue
            pressed = eager or (per_subject > 0 and subjects[subject] >= per_subject * PURGE_EAGER_RATIO)
            if not (
                pressed
                or floor - done >= PURGE_MIN_SEQS
                or now - self._purged_at.get(subject, 0.0) >= PURGE_MAX_DELAY_S
            ):
                continue
            if held:
                self.stats["purges_held_for_naks"] += 1
                continue
            if away and not pressed:
                self.stats["purges_deferred"] += 1
                continue
            await self.js.purge_stream(S.STREAM_MSG, subject=subject, seq=floor + 1)
            self._purged[subject] = floor
            self._purged_at[subject] = now
            self.stats["purges"] += 1
            purged_now += 1
        for gone in [s for s in self._purged if s not in subjects]:
            del self._purged[gone]
            self._purged_at.pop(gone, None)
        if purged_now:  # the quotas as they are after the removal
            info = await self.js.stream_info(S.STREAM_MSG, subjects_filter=S.msg_all())
        self._warn_orphans(orphans)
        self.quota = self._check_quota(info, orphans)
        self.stats["purge_runs"] += 1
        self.last_purge_error = ""
        return self.quota

    def _warn_orphans(self, orphans: list[str]) -> None:
        for subject in orphans:
            if subject not in self._orphans_warned and len(self._orphans_warned) < 10000:
                self._orphans_warned.add(subject)
                log.warning("guaranteed lane: messages on %s wait with no consumer (no wire into a Rack takes "
                            "them): kept until one does or an operator purges them", subject)  # fmt: skip
        self._orphans_warned &= set(orphans)

    def _check_quota(self, info, orphans: list[str]) -> dict:
        cfg, st = info.config, info.state
        per_subject = cfg.max_msgs_per_subject or -1
        fills = {}
        if cfg.max_bytes and cfg.max_bytes > 0:
            fills["stream"] = (st.bytes / cfg.max_bytes, f"{st.bytes} of {cfg.max_bytes} bytes")
        if cfg.max_msgs and cfg.max_msgs > 0:
            ratio = st.messages / cfg.max_msgs
            if ratio > fills.get("stream", (0.0, ""))[0]:
                fills["stream"] = (ratio, f"{st.messages} of {cfg.max_msgs} messages")
        if per_subject > 0:
            for subject, count in (st.subjects or {}).items():
                fills[subject] = (count / per_subject, f"{count} of {per_subject} messages")
        for key in [k for k in self._alerts if k not in fills]:
            del self._alerts[key]
        for key, (ratio, text) in fills.items():
            what = "flux-msg as a whole" if key == "stream" else f"source {key}"
            was = self._alerts.get(key)
            if ratio >= 1.0 and was != "full":
                self._alerts[key] = "full"
                log.error("guaranteed lane quota FULL for %s (%s): its senders are pushed back into their lane "
                          "WAL until the receiver consumes", what, text)  # fmt: skip
            elif QUOTA_ALERT_RATIO <= ratio < 1.0 and was is None:
                self._alerts[key] = "alert"
                log.warning("guaranteed lane quota %d%% used for %s (%s); at 100%% its senders are pushed back",
                            int(ratio * 100), what, text)  # fmt: skip
            elif ratio < QUOTA_CLEAR_RATIO and was is not None:
                del self._alerts[key]
                log.info("guaranteed lane quota back to %d%% for %s", int(ratio * 100), what)
        return {
            "stream_bytes": st.bytes,
            "stream_messages": st.messages,
            "max_bytes": cfg.max_bytes,
            "max_msgs_per_subject": per_subject,
            "max_age": cfg.max_age or 0,
            "fill": {k: round(v[0], 4) for k, v in fills.items() if k == "stream" or v[0] >= QUOTA_ALERT_RATIO},
            "alerts": dict(self._alerts),
            "orphans": sorted(orphans),
        }
