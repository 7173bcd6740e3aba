"""The saga mirror of one group conductor: its journal's sagas copied to the group's stream, a
lease on them, and the claim of a silent member's sagas (issue 17 item 4). The asyncio adapter
around fluxrig.saga.mirror_wire (the messages and the replay rule are there).

Owner side. The saga store (fluxrig.saga.store) hands every saga event (`owe`, `try`, `end`)
here once it is fsync'd (`follow`). One task publishes them, in journal order and in batches,
on `flux.saf.<group>.<gear>.<rack>`; every publish names the subject's last seq it knows
(`Nats-Expected-Last-Subject-Sequence`), so a claim written meanwhile makes the next one fail
instead of interleaving. An `owe`'s future resolves only once its batch is acknowledged by
the stream, or after `owe_wait` (the conductor declines to the acquirer after it): a member
killed right after owing has shared the reversal already, unless its bus was down or slow
(then the reversal is in its own journal only, resumed when it restarts: counted `late`).
With nothing to publish the owner beats every BEAT_S (its lease). Every CHECKPOINT_MESSAGES
messages or CHECKPOINT_S with news it publishes a checkpoint with `Nats-Rollup: sub`: the
subject then holds its open sagas and nothing older, so a claim reads little. The checkpoint is
the fold of what this task published (not the conductor's memory), so it never drops a saga
it already shared. A checkpoint above MAX_MESSAGE_BYTES (thousands of open sagas: an issuer
down for a while) goes in parts on the subject's two part slots (mirror_wire `cpref`): the
parts of the new one first, each rolled up on its own subject, in the slot the current
checkpoint does not use, then the `cpref` naming them with the subject's rollup; so the
subject stays compact whatever is owed, and a claimer reads the parts the last `cpref` names.
Only past MAX_CHECKPOINT_PARTS is it not published (WARNING): the subject keeps its history.

Claimer side. Every CHECK_S it lists the gear's subjects in the group's stream and watches the
other members' last seqs (mirror_wire.Lease, monotonic clock). A subject that stood still
LEASE_S and is not settled is claimed: read whole, replayed, its events opened with this
member's seal (the group's members must share `saf.key_file`: a claimer whose key does not
open the card numbers refuses the claim, ERROR, and leaves it to one that can), `claim`
written with the subject's last seq as the expected one (a silent owner that wakes up, or
another survivor first, makes it fail: nothing taken), the sagas handed to `adopt` (which
journals them in this member's own journal, fsync, at their attempt counts), then `adopted`.

Back from the dead. At start, and whenever a publish fails on the expected seq, the owner
reads its subject's last message. An `adopted` by another member: every saga it journaled at or
below `upto` is handed over (`hand_over`: ended here as `handed`, never sent again from here)
and the owner publishes on from there. A bare `claim`: a claimer is adopting; the owner waits
up to LEASE_S for its `adopted`, and takes its subject back with a checkpoint if none comes.

Requests in flight (`share_tickets`, the conductor's default in a group). The journal's
tickets are shared too, strictly: a request is written to its issuer only once its `open` is
in the stream, an approval reaches its acquirer only once its `close` is (each within
`owe_wait`, batched with the other members' traffic). So a survivor that claims a dead
member finds every request that member had sent and not answered, and reverses it, and never
one whose approval was delivered. When the stream does not take a ticket event in time (the
bus is down or slow) the future raises MirrorUnavailable: the request is declined unsent, the
approval is declined and reversed from here; the event stays queued and reaches the stream
when the bus is back (the Rack's balancer health says 503 for the group meanwhile). What it
costs: every reversible transaction waits for two stream acknowledgements. A member cut off
from the Snake for longer than the lease while it still runs is claimed: its shared
requests are reversed by the claimer, and those it declined are reversed by it too (a
duplicate reversal, which the issuer answers as such), never a reversal of a delivered
approval. Without `share_tickets` only owed reversals are shared, and a request a dead member
had sent is reversed when that member restarts (its own journal).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..aiotools import cancel_and_wait
from ..errors import FluxError
from . import mirror_wire as W
from .saf import EV_CLOSE, EV_OPEN, EV_OWE, fold

__all__ = [
    "SagaMirror",
    "JsSafBus",
    "Claimed",
    "MirrorUnavailable",
    "CHECKPOINT_MESSAGES",
    "CHECKPOINT_S",
    "DEFAULT_OWE_WAIT_S",
]

log = logging.getLogger("fluxrig.saga.mirror")

CHECKPOINT_MESSAGES = 200
CHECKPOINT_S = 60.0
DEFAULT_OWE_WAIT_S = 0.5
PUBLISH_TIMEOUT_S = 5.0
RETRY_S = 0.5
DOWN_POLL_S = 0.05  # a bus back up is noticed at once: the first requests after it wait for it
MAX_CLAIM_MESSAGES = 200_000  # a claim reads at most this many messages of a subject
WRONG_LAST_SEQUENCE = 10071  # JetStream err_code: Nats-Expected-Last-Subject-Sequence did not hold
H_EXPECTED = "Nats-Expected-Last-Subject-Sequence"
H_MSG_ID = "Nats-Msg-Id"
H_ROLLUP = "Nats-Rollup"


class Claimed(Exception):
    """A publish found another writer's message last on our subject."""


class MirrorUnavailable(FluxError):
    """A ticket event (`seq` in the journal, fsync'd) is not in the group's stream in time:
    the request is not sent, the approval not delivered (the conductor declines instead)."""

    def __init__(self, seq: int, why: str):
        self.seq = seq
        super().__init__(f"the group's saga stream did not take journal event {seq}: {why}; "
                         "check the Rack's link to the Snake (fluxrig status)")  # fmt: skip


class JsSafBus:
    """The four JetStream calls the mirror makes, over nats-py (`get_js()`: the current
    JetStreamContext or None while the bus is down)."""

    def __init__(self, get_js, stream: str):
        self.get_js = get_js
        self.stream = stream

    def usable(self) -> bool:
        return self.get_js() is not None

    def _js(self):
        js = self.get_js()
        if js is None:
            raise ConnectionError("the Snake session is down")
        return js

    async def publish(self, subject: str, payload: bytes, headers: dict) -> int:
        """Stream seq of the stored message; Claimed when the expected last seq did not hold."""
        import nats.js.errors

        try:
            ack = await self._js().publish(subject, payload, timeout=PUBLISH_TIMEOUT_S, headers=headers)
        except nats.js.errors.APIError as exc:
            if getattr(exc, "err_code", None) == WRONG_LAST_SEQUENCE:
                raise Claimed(str(exc)) from None
            raise
        return ack.seq

    async def last(self, subject: str):
        """(stream seq, payload, headers) of the subject's last message, or None."""
        import nats.js.errors

        try:
            m = await self._js().get_msg(self.stream, subject=subject, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        return m.seq, m.data or b"", m.headers or {}

    async def next(self, subject: str, from_seq: int):
        """(stream seq, payload) of the subject's first message at or after `from_seq`, or None."""
        import nats.js.errors

        try:
            m = await self._js().get_msg(self.stream, seq=from_seq, subject=subject, direct=True, next=True)
        except nats.js.errors.NotFoundError:
            return None
        return m.seq, m.data or b""

    async def subjects(self, pattern: str) -> list[str]:
        info = await self._js().stream_info(self.stream, subjects_filter=pattern)
        return sorted((info.state.subjects or {}) if info.state else {})


class SagaMirror:
    """See the module docstring. `adopt(sagas: dict, tickets: dict, by_rack) -> awaitable int`,
    `hand_over(upto, by) -> awaitable int` and `state() -> (open Sagas, open tickets)` are the conductor's
    sagas' (fluxrig.saga.orchestrator.Reversals)."""

    def __init__(self, bus, group: str, gear: str, rack: str, seal, adopt, hand_over, state, *,
                 owe_wait: float = DEFAULT_OWE_WAIT_S, lease_s: float = W.LEASE_S, beat_s: float = W.BEAT_S,
                 check_s: float = W.CHECK_S, checkpoint_messages: int = CHECKPOINT_MESSAGES,
                 checkpoint_s: float = CHECKPOINT_S, share_tickets: bool = False,
                 max_message_bytes: int = W.MAX_MESSAGE_BYTES):  # fmt: skip
        from ..wire import subjects as S

        self.bus = bus
        self.group, self.gear, self.rack = group, gear, rack
        self.subject = S.saf_subject(group, gear, rack)
        self.pattern = S.saf_subjects(group, gear)
        self.seal = seal
        self._adopt, self._hand_over, self._state = adopt, hand_over, state
        self.owe_wait, self.beat_s, self.check_s = owe_wait, beat_s, check_s
        self.share_tickets = share_tickets
        self.checkpoint_messages, self.checkpoint_s = checkpoint_messages, checkpoint_s
        self.lease = W.Lease(lease_s)
        self.max_message_bytes = max_message_bytes
        self._cp_slot = 1  # the part slot of the last cpref (the next one writes the other)
        self._slot_parts = [0, 0]  # parts written in each slot this run (stale ones are blanked)
        self._buffer: list[tuple[int, dict, list]] = []  # (seq, sealed event, waiters)
        self._wake = asyncio.Event()
        self._published: list[tuple[int, dict]] = []  # what the subject holds from us since the checkpoint
        self._since_cp = 0
        self._since_cp_bytes = 0
        self._cp_bytes = 0  # size of the last checkpoint
        self._cp_at = 0.0
        self._cp_too_big_warned = False
        self._last = None  # the subject's last stream seq as we know it (None: not read yet)
        self._last_pub = 0.0
        self._settled: dict[str, int] = {}  # subject -> last seq at which it was settled (adopted)
        self._tasks: list[asyncio.Task] = []
        self._reconciled = asyncio.Event()
        self.stats = dict.fromkeys(("published", "events", "beats", "checkpoints", "late", "errors", "claims",
                                    "adopted", "handed_over", "claims_lost", "claims_refused", "skipped", "unshared",
                                    "tickets_claimed", "checkpoint_parts"), 0)  # fmt: skip
        self.last_error = ""

    # -- the store's side ----------------------------------------------------------------------
    def follow(self, durable: asyncio.Future, sealed: dict, wait: bool = True) -> asyncio.Future:
        """The future the store hands its caller for `sealed` (`durable`: its journal seq once
        fsync'd). Saga events are shared: an `owe` (when `wait`) resolves once the stream has
        it or after owe_wait, whichever first. Tickets (`open`/`close`) are shared only with
        `share_tickets`, and then strictly: the future raises MirrorUnavailable (the event is
        on disk here and still queued for the stream) unless the stream has it within
        owe_wait, so the conductor neither sends a request nor delivers an approval that a
        survivor could not see (see the module docstring)."""
        kind = sealed.get("e")
        ticket = kind in (EV_OPEN, EV_CLOSE)
        if ticket and not self.share_tickets:
            return durable
        wait = wait and kind in (EV_OWE, EV_OPEN, EV_CLOSE)
        loop = asyncio.get_running_loop()
        out = loop.create_future()

        def on_durable(f: asyncio.Future) -> None:
            if f.cancelled():
                out.cancel()
                return
            exc = f.exception()
            if exc is not None:
                if not out.done():
                    out.set_exception(exc)
                return
            seq = f.result()
            waiters = []
            if wait and self.bus.usable():
                waiters.append(out)
                loop.call_later(self.owe_wait, self._late, out, seq, ticket)
            elif wait and ticket:
                self.stats["unshared"] += 1
                out.set_exception(MirrorUnavailable(seq, "the Snake session is down"))
            elif not out.done():
                out.set_result(seq)
            self._buffer.append((seq, sealed, waiters))
            self._wake.set()

        durable.add_done_callback(on_durable)
        return out

    def _late(self, fut: asyncio.Future, seq: int, strict: bool) -> None:
        if fut.done():
            return
        if strict:
            self.stats["unshared"] += 1
            fut.set_exception(MirrorUnavailable(seq, f"no acknowledgement within {self.owe_wait:g}s"))
        else:
            self.stats["late"] += 1
            fut.set_result(seq)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._publisher(), name=f"saga-mirror:{self.gear}"),
                           loop.create_task(self._watcher(), name=f"saga-claims:{self.gear}")]  # fmt: skip

    def rebind(self, adopt, share_tickets: bool, owe_wait: float) -> None:
        """A rebuilt conductor (hot reload) takes this mirror over: claims adopt into it, and
        its settings hold from the next event on."""
        if self.share_tickets and not share_tickets:
            # Requests whose replies will no longer be shared must not stay open on the subject
            # (a claimer would reverse them): the next checkpoint, published now, drops them.
            self._since_cp, self._since_cp_bytes = self.checkpoint_messages, self._cp_bytes
            self._wake.set()
        self._adopt, self.share_tickets, self.owe_wait = adopt, share_tickets, owe_wait

    async def reconciled(self, timeout: float) -> bool:
        """Wait (at most `timeout`) until the owner has read its subject once and handed over
        what another member adopted meanwhile: the conductor sends nothing before that."""
        try:
            await asyncio.wait_for(self._reconciled.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            await cancel_and_wait(t)
        for _, _, waiters in self._buffer:
            for w in waiters:
                if not w.done():
                    w.cancel()

    def metrics(self) -> dict:
        return {f"mirror_{k}": v for k, v in self.stats.items()} | {"mirror_backlog": len(self._buffer)}

    # -- owner ---------------------------------------------------------------------------------
    async def _publisher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.beat_s / 2)
            except TimeoutError:
                pass
            self._wake.clear()
            if not self.bus.usable():
                self._release_all()
                await asyncio.sleep(DOWN_POLL_S)
                continue
            try:
                if self._last is None:
                    await self._reconcile()
                while self._buffer:
                    await self._publish_batch()
                now = loop.time()
                if self._checkpoint_due(now):
                    await self._checkpoint(now)
                elif now - self._last_pub >= self.beat_s:
                    await self._publish(W.encode(W.KIND_BEAT), f"beat-{time.time_ns()}")
                    self.stats["beats"] += 1
            except asyncio.CancelledError:
                raise
            except Claimed:
                self._last = None  # read what was written and reconcile at the next round
                self._wake.set()
            except Exception as exc:  # noqa: BLE001 (the bus: retried; the journal holds the events)
                self.stats["errors"] += 1
                text = f"{type(exc).__name__}: {exc}"[:300]
                if text != self.last_error:
                    log.warning("%s: saga mirror on %s: %s (retrying)", self.gear, self.subject, text)
                self.last_error = text
                await asyncio.sleep(RETRY_S)
                self._wake.set()

    def _release_all(self) -> None:
        for seq, ev, waiters in self._buffer:
            for w in waiters:
                self._late(w, seq, ev.get("e") in (EV_OPEN, EV_CLOSE))
            waiters.clear()

    async def _publish(self, payload: bytes, msg_id: str, rollup: bool = False) -> int:
        headers = {H_EXPECTED: str(self._last or 0), H_MSG_ID: f"{self.rack}.{self.gear}.{msg_id}"}
        if rollup:
            headers[H_ROLLUP] = "sub"
        seq = await self.bus.publish(self.subject, payload, headers)
        self._last = seq
        self._last_pub = asyncio.get_running_loop().time()
        self._since_cp += 1
        self._since_cp_bytes += len(payload)
        self.stats["published"] += 1
        return seq

    async def _publish_batch(self) -> None:
        batch, size = [], 0
        for seq, ev, waiters in self._buffer:
            n = len(W.encode(W.KIND_EVENTS, [(seq, ev)]))
            if batch and size + n > self.max_message_bytes:
                break
            batch.append((seq, ev, waiters))
            size += n
        pairs = [(seq, ev) for seq, ev, _ in batch]
        await self._publish(W.encode(W.KIND_EVENTS, pairs), f"ev-{pairs[0][0]}-{pairs[-1][0]}")
        del self._buffer[: len(batch)]
        self._published.extend(pairs)
        self.stats["events"] += len(pairs)
        for seq, _, waiters in batch:
            for w in waiters:
                if not w.done():
                    w.set_result(seq)

    def _checkpoint_due(self, now: float) -> bool:
        # Amortized: a rollup restates the open state, so it waits until at least that much
        # was published since the last one (a big SAF backlog is not re-sent every 200 messages).
        if self._since_cp >= self.checkpoint_messages and self._since_cp_bytes >= self._cp_bytes:
            return True
        return bool(self._published) and now - self._cp_at >= self.checkpoint_s

    async def _checkpoint(self, now: float) -> None:
        folded = fold(self._published)
        pairs = W.checkpoint_events(folded.sagas.values(), folded.tickets if self.share_tickets else {})
        payload = W.encode(W.KIND_CHECKPOINT, pairs)
        self._cp_at = now
        if len(payload) > self.max_message_bytes:
            ref = f"{self.rack}-{time.time_ns()}"
            parts = W.split_events(pairs, self.max_message_bytes, ref)
            if parts is None:
                if not self._cp_too_big_warned:
                    log.warning("%s: saga mirror checkpoint of %d open reversals is %d bytes (more than %d parts "
                                "of %d): not published; %s keeps its history and a claim reads it all", self.gear,
                                len(folded.sagas), len(payload), W.MAX_CHECKPOINT_PARTS, self.max_message_bytes,
                                self.subject)  # fmt: skip
                    self._cp_too_big_warned = True
                self._published = pairs  # folds to the same state: memory stays bounded by what is open
                self._since_cp = self._since_cp_bytes = 0
                self._cp_bytes = len(payload)
                return
            await self._publish_parted(ref, parts)
        else:
            await self._publish(payload, f"cp-{time.time_ns()}", rollup=True)
        self._cp_too_big_warned = False
        self._published = pairs
        self._since_cp = self._since_cp_bytes = 0
        self._cp_bytes = len(payload)
        self.stats["checkpoints"] += 1

    async def _publish_parted(self, ref: str, parts: list) -> None:
        """A checkpoint in parts (module docstring): the parts in the slot the current cpref
        does not name, parts this run left there before blanked, then the cpref."""
        from ..wire import subjects as S

        slot = 1 - self._cp_slot
        for i in range(max(len(parts), self._slot_parts[slot])):
            chunk = parts[i] if i < len(parts) else []
            await self.bus.publish(S.saf_checkpoint_part(self.subject, slot, i),
                                   W.encode(W.KIND_CHECKPOINT_PART, chunk, ref=ref, index=i),
                                   {H_ROLLUP: "sub", H_MSG_ID: f"{self.rack}.{self.gear}.cpp-{ref}-{i}"})  # fmt: skip
        self._slot_parts[slot] = len(parts)
        await self._publish(W.encode(W.KIND_CHECKPOINT_REF, ref=ref, slot=slot, parts=len(parts)), f"cpref-{ref}",
                            rollup=True)  # fmt: skip
        self._cp_slot = slot
        self.stats["checkpoint_parts"] += len(parts)

    async def _read_parts(self, subject: str, ref: W.MirrorMessage) -> list | None:
        """The events of checkpoint `ref` of `subject` from its parts, or None when a part is
        not there or not of that checkpoint."""
        from ..wire import subjects as S

        events: list = []
        for i in range(ref.parts):
            last = await self.bus.last(S.saf_checkpoint_part(subject, ref.slot, i))
            if last is None:
                return None
            try:
                part = W.decode(last[1], last[0])
            except W.MirrorMessageError:
                return None
            if part.kind != W.KIND_CHECKPOINT_PART or part.ref != ref.ref or part.index != i:
                return None
            events.extend(part.events)
        return events

    async def _reconcile(self) -> None:
        """Learn the subject's last seq; hand over what an adoption took (module docstring)."""
        deadline = asyncio.get_running_loop().time() + self.lease.lease_s
        first = await self.bus.next(self.subject, 1)  # the last rollup: a cpref names the slot in use
        if first is not None:
            try:
                m = W.decode(first[1], first[0])
                if m.kind == W.KIND_CHECKPOINT_REF:
                    self._cp_slot = m.slot
            except W.MirrorMessageError:
                pass
        while True:
            last = await self.bus.last(self.subject)
            if last is None:
                self._last = 0
                if not self._reconciled.is_set():
                    self._restate()
                self._reconciled.set()
                return
            seq, payload, _ = last
            try:
                m = W.decode(payload, seq)
            except W.MirrorMessageError as exc:
                log.error("%s: %s", self.gear, exc)
                m = W.MirrorMessage(W.KIND_BEAT, seq=seq)
            if m.kind == W.KIND_ADOPTED and m.by != self.rack:
                n = await self._hand_over(m.upto, m.by)
                self.stats["handed_over"] += n
                log.warning("%s: %s took over the owed reversals journaled here up to seq %d while this Rack "
                            "was away: %d handed over, not sent from here", self.gear, m.by, m.upto, n)  # fmt: skip
                # What it adopted is no longer ours to checkpoint.
                self._published = [p for p in self._published if p[0] > m.upto]
            elif m.kind == W.KIND_CLAIM and m.by != self.rack and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(self.check_s / 4)  # its claimer is adopting: wait for `adopted`
                continue
            self._last = seq
            if not self._reconciled.is_set():
                self._restate()
            if m.kind == W.KIND_CLAIM and m.by != self.rack:
                log.warning("%s: %s claimed this Rack's reversals and never adopted them: taken back",
                            self.gear, m.by)  # fmt: skip
                self._since_cp = self.checkpoint_messages  # a checkpoint now restates what is ours
            self._reconciled.set()
            return

    def _restate(self) -> None:
        """This run's first word on the subject restates the journal's open sagas (a
        checkpoint): what the previous run published is not in memory here, and a rollup built
        from this run's events alone would erase it."""
        sagas, tickets = self._state()
        self._published = [(q, self.seal.seal(ev) if "fields" in ev else ev)
                           for q, ev in W.checkpoint_events(sagas, tickets)]  # fmt: skip
        self._since_cp = self.checkpoint_messages

    # -- claimer -------------------------------------------------------------------------------
    async def _watcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.check_s)
            if not self.bus.usable():
                continue
            try:
                for subject in await self.bus.subjects(self.pattern):
                    if subject == self.subject:
                        continue
                    last = await self.bus.last(subject)
                    if last is not None:
                        self.lease.observe(subject, last[0], loop.time())
                for subject in self.lease.expired(loop.time()):
                    if self._settled.get(subject) == self.lease.last_seq(subject):
                        continue
                    await self._claim(subject)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (looked at again at the next round)
                self.stats["errors"] += 1
                log.warning("%s: watching the group's saga mirrors: %s: %s", self.gear, type(exc).__name__, exc)

    async def _read_all(self, subject: str) -> list:
        out, seq = [], 1
        while len(out) < MAX_CLAIM_MESSAGES:
            got = await self.bus.next(subject, seq)
            if got is None:
                return out
            seq, payload = got
            try:
                out.append(W.decode(payload, seq))
            except W.MirrorMessageError as exc:
                log.error("%s: %s: %s (skipped)", self.gear, subject, exc)
                out.append(exc)
            seq += 1
        log.error("%s: %s holds more than %d messages: the claim reads the first %d only",
                  self.gear, subject, MAX_CLAIM_MESSAGES, MAX_CLAIM_MESSAGES)  # fmt: skip
        return out

    async def _claim(self, subject: str) -> None:
        owner = subject.rsplit(".", 1)[-1]
        messages = await self._read_all(subject)
        replayed = W.replay(messages)
        if replayed.missing is not None:
            ref = replayed.missing
            events = await self._read_parts(subject, ref)
            if events is None:
                self.stats["claims_refused"] += 1
                log.error("%s: the checkpoint %s of silent member %s names %d parts in slot %d that are not all "
                          "there: its owed reversals are NOT claimed (they stay in its own journal); retried "
                          "after another lease", self.gear, ref.ref, owner, ref.parts, ref.slot)  # fmt: skip
                self.lease.forget(subject)
                return
            replayed = W.replay(messages, {ref.ref: events})
        self.stats["skipped"] += replayed.skipped
        if replayed.settled:
            self._settled[subject] = replayed.last_seq
            return
        unopened_before = self.seal.unopened
        events = [(seq, self.seal.open(ev)) for seq, ev in replayed.events]
        if self.seal.unopened > unopened_before:
            self.stats["claims_refused"] += 1
            log.error("%s: the owed reversals of silent member %s do NOT open with this Rack's saga key "
                      "(%s): the group's members must share saf.key_file; left for a member that can",
                      self.gear, owner, self.seal.path)  # fmt: skip
            self.lease.forget(subject)
            return
        folded = fold(events)
        upto = max(replayed.top_seq, replayed.claimed_upto)
        try:
            claim_seq = await self.bus.publish(subject, W.encode(W.KIND_CLAIM, by=self.rack, upto=upto),
                                               {H_EXPECTED: str(replayed.last_seq)})  # fmt: skip
        except Claimed:
            self.stats["claims_lost"] += 1
            log.info("%s: %s moved while being claimed (back, or claimed by another member)", self.gear, owner)
            return
        self.stats["claims"] += 1
        log.warning("%s: member %s silent for %.0f s: claiming its %d owed reversals and %d requests in flight",
                    self.gear, owner, self.lease.lease_s, len(folded.sagas), len(folded.tickets))  # fmt: skip
        n = await self._adopt(folded.sagas, folded.tickets, owner)
        self.stats["adopted"] += n
        self.stats["tickets_claimed"] += len(folded.tickets)
        try:
            seq = await self.bus.publish(subject, W.encode(W.KIND_ADOPTED, by=self.rack, upto=upto, sagas=n),
                                         {H_EXPECTED: str(claim_seq)})  # fmt: skip
            self._settled[subject] = seq
        except Claimed:
            log.warning("%s: %s wrote again while its reversals were being adopted: both may send them "
                        "(repeats: the issuer answers the second as a duplicate)", self.gear, owner)  # fmt: skip
