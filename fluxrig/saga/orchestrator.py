"""Reversals owed by a switch, from owing to answered or parked: the conductor's saga engine.

The conductor (fluxrig.gears.conductor) tells it when a reversal is owed (`owe`), hands it the
replies of the reversal family (`on_reply`), and gives it three callables: `emit(port, msg)`,
`up(port)` (is that leg's link up) and `pick(route, port)` (the route's failover choice when
the original leg is down). Everything else is here:

- **Durable before anyone is told**: `owe()` returns once the `owe` events are fsync'd; the
  conductor declines to the acquirer only after that.
- **Store and forward**: one `SafQueue` per destination leg; the pump sends what is due on the
  leg that carried the original when it is up (affinity), else on the route's failover choice,
  and never when no leg is up (an attempt not sent is not counted). Each attempt's `try` event
  is fsync'd before the message leaves, so after a crash the next one is a repeat (0401/0421).
- **Ends**: an 0410/0430 answer (any response code but `refusal_codes`) ends the saga; a refusal
  (format error ...) counts towards `max_attempts`; `expire_after` of run time parks it. Parked
  sagas are written whole to `parked.jsonl` and raise a WARNING event.
- **Bounded**: at most `max_owed` open sagas; beyond that a new reversal is refused with an
  ERROR and the `refused_full` counter, never dropped silently.

Every step is logged with the saga id, trace id and RRN as telemetry attributes, and each saga
that ends (answered or parked) is one `reversal` trace span from owed to its end, on the trace
of the transaction it reverses (fluxrig.telemetry.record_span: the Mixer's traces and console).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time
from collections import deque

from ..aiotools import cancel_all_and_wait
from ..ids import uuid7
from ..msg import FluxMsg
from ..telemetry import record_span
from ..wire import meta as M
from .reversal import NEVER_COPIED, ReversalPolicy, build_reversal, is_reversal_class
from .saf import (
    ANSWERED,
    DEFAULT_BACKOFF_CAP_S,
    DEFAULT_BACKOFF_INITIAL_S,
    DEFAULT_EXPIRE_AFTER_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_WINDOW,
    EV_CLOSE,
    EV_OPEN,
    EV_OWE,
    EV_TRY,
    HANDED,
    PARKED,
    SafQueue,
    Saga,
)
from .stan import STAN_FILE, STAN_MAX, StanCounter
from .store import SagaStore, end_event, take_requests

__all__ = ["Reversals", "SagaSettings", "OwedReversal", "DEFAULT_MAX_OWED", "DEFAULT_REFUSAL_CODES", "SPAN_NAME"]

log = logging.getLogger("fluxrig.saga")

DEFAULT_MAX_OWED = 100_000
# Codes meaning "the issuer could not take this reversal" rather than "done": format error,
# invalid transaction, system malfunction. Any other answer ends the saga.
DEFAULT_REFUSAL_CODES = ("30", "12", "96")
PUMP_PERIOD_S = 0.01
EXPIRY_PERIOD_S = 1.0  # expiry walks every open saga: once a second, not every pump round
REQUESTS_PERIOD_S = 0.5  # how often the operator's request directory is looked at
STOP_ENDS_S = 5.0  # how long stop() waits for answered/parked ends to reach the journal
FIELD = "iso8583"


class SagaSettings:
    __slots__ = (
        "window", "backoff_initial", "backoff_cap", "max_attempts", "expire_after", "max_owed", "refusal_codes",
        "stan_range",
    )  # fmt: skip

    def __init__(
        self,
        window: int = DEFAULT_WINDOW,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL_S,
        backoff_cap: float = DEFAULT_BACKOFF_CAP_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        expire_after: float = DEFAULT_EXPIRE_AFTER_S,
        max_owed: int = DEFAULT_MAX_OWED,
        refusal_codes=DEFAULT_REFUSAL_CODES,
        stan_range: tuple[int, int] = (1, STAN_MAX),
    ):
        self.window = window
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.max_attempts = max_attempts
        self.expire_after = expire_after
        self.max_owed = max_owed
        self.refusal_codes = frozenset(refusal_codes)
        self.stan_range = (int(stan_range[0]), int(stan_range[1]))  # checked by stan.check_range


class OwedReversal:
    """What the conductor knows when a reversal becomes owed; `ticket` the seq of the request's
    `open` event, when it was journaled."""

    __slots__ = ("route", "policy", "request", "leg", "cause", "ticket")

    def __init__(self, route: str, policy: ReversalPolicy, request: FluxMsg, leg: str, cause: str, ticket=None):
        self.route = route
        self.policy = policy
        self.request = request
        self.leg = leg
        self.cause = cause
        self.ticket = ticket


def _open_event(route: str, leg: str, request: FluxMsg, keep) -> dict:
    fields = _fields(request)
    return {
        "e": EV_OPEN,
        "route": route,
        "leg": leg,
        "mti": request.meta.get(M.ISO_MTI, ""),
        # Never track data, PIN blocks or ICC data: a reversal does not carry them.
        "fields": {k: v for k, v in fields.items() if k not in NEVER_COPIED}
        if keep is None
        else {k: fields[k] for k in keep if k in fields},
        "trace": request.trace,
    }


def _fields(msg: FluxMsg) -> dict:
    iso = msg.data.get(FIELD)
    fields = iso.get("field") if isinstance(iso, dict) else None
    return fields if isinstance(fields, dict) else {}


SPAN_NAME = "reversal"  # the trace span of one saga, owed to answered or parked


def _attrs(saga: Saga, step: str, **more) -> dict:
    return {"flux_attrs": {"saga": saga.id, "rrn": saga.rrn, "step": step, **more}, "flux_trace": saga.trace}


class Reversals:
    """The sagas of one conductor gear."""

    def __init__(self, gear: str, store: SagaStore, settings: SagaSettings, emit, up, pick, reply_key):
        self.gear = gear
        self.store = store
        self.settings = settings
        self._emit = emit
        self._up = up
        self._pick = pick
        self._reply_key = reply_key  # (mti, fields) -> correlation key of the answer
        self.queues: dict[str, SafQueue] = {}
        self._by_key: dict[tuple, tuple[str, str]] = {}  # answer key -> (queue, saga id)
        self._stans = self._stan_counter(settings)
        self._pump: asyncio.Task | None = None
        self._wake = asyncio.Event()
        # Attempts staged by the pump, in order: (queue, saga, leg, try event, its future). The
        # sender sends each once its `try` is durable, so a round never waits on the disk and
        # the next rounds' attempts share the running fsync's successor (group commit).
        self._outbox: deque = deque()
        self._outbox_ready = asyncio.Event()
        self._sender: asyncio.Task | None = None
        # Ends being journaled (answered, parked): stop() waits for them before it closes the
        # journal, else an operator's park would be in parked.jsonl and still open on disk.
        self._ending: set[asyncio.Task] = set()
        self._expiry_due = 0.0
        self.stats = {"owed": 0, "refused_full": 0, "parked": 0, "answered": 0, "late_answers": 0, "recovered": 0,
                      "adopted": 0, "handed_over": 0}  # fmt: skip
        now = time.monotonic()
        for saga in sorted(store.recovered.values(), key=lambda s: s.created_wall):
            self._queue(saga.queue).add(saga, now)
            self._index(saga)
            self.stats["recovered"] += 1
        if store.recovered:
            log.warning("%s: %d owed reversals recovered from the journal", gear, len(store.recovered))

    def _stan_counter(self, settings: SagaSettings) -> StanCounter:
        lo, hi = settings.stan_range
        return StanCounter(os.path.join(self.store.directory, STAN_FILE), lo, hi, seen=self.store.top_stan)

    def rebind(self, settings: SagaSettings, emit, up, pick, reply_key) -> None:
        """A rebuilt conductor takes these sagas over (see ConductorGear.handover_from)."""
        if settings.stan_range != self.settings.stan_range:
            self._stans = self._stan_counter(settings)
            log.warning("%s: reversal STANs now drawn from %d-%d", self.gear, *settings.stan_range)
        self.settings, self._emit, self._up, self._pick, self._reply_key = settings, emit, up, pick, reply_key
        for q in self.queues.values():
            q.window, q.max_attempts, q.expire_after = settings.window, settings.max_attempts, settings.expire_after
            q.backoff_initial, q.backoff_cap = settings.backoff_initial, settings.backoff_cap

    # -- queues ----------------------------------------------------------------------------------
    def _queue(self, name: str) -> SafQueue:
        q = self.queues.get(name)
        if q is None:
            s = self.settings
            q = self.queues[name] = SafQueue(
                name,
                window=s.window,
                backoff_initial=s.backoff_initial,
                backoff_cap=s.backoff_cap,
                max_attempts=s.max_attempts,
                expire_after=s.expire_after,
            )
        return q

    def _index(self, saga: Saga) -> None:
        self._by_key[self._reply_key(saga.mti, saga.fields)] = (saga.queue, saga.id)

    def open_count(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def _next_stan(self) -> int:
        """The next STAN of this conductor's range (its block reserved on disk first)."""
        return self._stans.next()

    # -- owing -----------------------------------------------------------------------------------
    async def owe(self, owed: list[OwedReversal]) -> list[Saga]:
        """Make the reversals durable (one group commit) and queue them; the sagas returned are
        on disk. Refused ones (queue full, journal failed) are logged ERROR and counted."""
        wall = time.time()
        now_dt = datetime.datetime.now(datetime.UTC)
        staged = []
        for o in owed:
            if self.open_count() + len(staged) >= self.settings.max_owed:
                self.stats["refused_full"] += 1
                log.error(
                    "%s: reversal for STAN %s NOT owed: %d reversals already open (conductor max_owed); "
                    "the acquirer was declined, the issuer may hold an approval: reconcile by hand",
                    self.gear,
                    _fields(o.request).get("11", "?"),
                    self.settings.max_owed,
                )
                continue
            fields = _fields(o.request)
            original_mti = o.request.meta.get(M.ISO_MTI) or fields.get("0", "")
            try:
                stan = self._next_stan()
            except OSError as exc:
                self.stats["refused_full"] += 1
                log.error("%s: reversal for STAN %s NOT owed: no STAN could be reserved on disk: %s",
                          self.gear, fields.get("11", "?"), exc)  # fmt: skip
                continue
            rev = build_reversal(o.policy, original_mti, fields, stan, o.cause, now_dt)
            mti = rev.pop("0")
            event = {
                "e": EV_OWE,
                "id": uuid7().hex(),
                "queue": o.leg,
                "route": o.route,
                "mti": mti,
                "fields": rev,
                "cause": o.cause,
                "trace": o.request.trace,
                "rrn": rev.get("37", ""),
                "wall": wall,
            }
            if o.ticket is not None:
                event["ticket"] = o.ticket
            try:
                staged.append((event, self.store.append_nowait(event)))
            except Exception as exc:  # noqa: BLE001 (WalFailed, WalFull ...: said, counted)
                self.stats["refused_full"] += 1
                log.error(
                    "%s: reversal for STAN %s NOT owed: the saga journal refused it: %s",
                    self.gear,
                    fields.get("11"),
                    exc,
                )
        out = []
        for event, fut in staged:
            try:
                seq = await fut
            except Exception as exc:  # noqa: BLE001
                self.stats["refused_full"] += 1
                log.error("%s: reversal %s NOT durable: %s", self.gear, event["id"], exc)
                continue
            if "ticket" in event:
                self.store.ack([event["ticket"]])
            saga = Saga(event, seq)
            self._queue(saga.queue).add(saga, time.monotonic())
            self._index(saga)
            self.stats["owed"] += 1
            log.info(
                "%s: reversal %s owed (%s) for original STAN %s on %s, new STAN %s",
                self.gear, saga.id, saga.cause, saga.fields.get("90", "")[4:10], saga.queue, saga.stan,
                extra=_attrs(saga, "owe", cause=saga.cause),
            )  # fmt: skip
            out.append(saga)
        if out and self._pump is not None:
            # First attempts at once (staged now, sent by the sender once durable), not at the
            # pump's next wake-up: the deadline-to-first-attempt time is one fsync, not two hops.
            try:
                self._stage_due(time.monotonic(), expiry=False)
            except Exception:  # noqa: BLE001 (the pump's next round does it)
                log.exception("%s: first attempts not staged at once", self.gear)
            self._wake.set()
        return out

    # -- tickets: requests whose reply the switch must see -------------------------------------
    def stage_ticket(self, route: str, leg: str, request: FluxMsg, keep=None) -> asyncio.Future:
        """Journal a request about to be written to `leg`; the future gives the event's seq once
        fsync'd. `keep`: the fields its reversal needs (ReversalPolicy.journal_fields; default
        all but track data, PIN blocks and ICC data). Raises the journal's errors (WalFailed ...)
        synchronously."""
        return self.store.append_nowait(_open_event(route, leg, request, keep))

    def stage_ticket_then(self, route: str, leg: str, request: FluxMsg, keep, fn, arg) -> None:
        """stage_ticket with a callback: `fn(arg, seq, error)` once durable (no future or
        task per request: SagaStore.append_then). Raises the journal's errors synchronously."""
        self.store.append_then(_open_event(route, leg, request, keep), fn, arg)

    async def close_ticket(self, opened: int, strict: bool = True) -> None:
        """The request's reply reached the switch in time: nothing is owed (fsync'd before the
        acquirer hears it, so a crash cannot turn a delivered approval into a reversal; with a
        group mirror sharing tickets and `strict`, in the group's stream too, else it raises
        MirrorUnavailable: fluxrig.saga.mirror). Not `strict`: a request never sent, or one
        whose reversal another covers: the group learns it whenever the stream takes it."""
        try:
            seq = await self.store.append({"e": EV_CLOSE, "s": opened}, wait=strict)
        except Exception as exc:
            seq = getattr(exc, "seq", None)  # MirrorUnavailable: on disk all the same
            if seq is not None:
                self.store.ack([opened, seq])
            raise
        self.store.ack([opened, seq])

    def close_ticket_then(self, opened: int, fn, arg) -> None:
        """close_ticket (strict) with a callback: `fn(arg, error)` once closed, error None when
        it is. Raises the journal's errors (WalFull too) synchronously."""
        self.store.append_then({"e": EV_CLOSE, "s": opened}, self._closed, (opened, fn, arg))

    def _closed(self, job: tuple, seq: int | None, exc: BaseException | None) -> None:
        opened, fn, arg = job
        if seq is None:
            seq = getattr(exc, "seq", None)  # MirrorUnavailable: on disk all the same
        if seq is not None:
            self.store.ack([opened, seq])
        fn(arg, exc)

    def recovered_tickets(self) -> dict[int, dict]:
        """Requests journaled open by the previous run and never closed nor owed."""
        tickets, self.store.open_tickets = self.store.open_tickets, {}
        return tickets

    # -- answers ---------------------------------------------------------------------------------
    def on_reply(self, msg: FluxMsg) -> bool:
        """True when `msg` is the answer to one of our reversals (consumed here)."""
        mti = msg.meta.get(M.ISO_MTI, "")
        if not is_reversal_class(mti) or int(mti[2]) % 2 == 0:
            return False
        fields = _fields(msg)
        key = self._reply_key(mti, fields)
        hit = self._by_key.get(key)
        if hit is None:
            return False
        qname, sid = hit
        q = self.queues.get(qname)
        saga = q.sagas.get(sid) if q else None
        if saga is None:
            del self._by_key[key]
            self.stats["late_answers"] += 1
            return True
        code = str(fields.get("39", ""))
        now = time.monotonic()
        if code in self.settings.refusal_codes:
            log.warning(
                "%s: reversal %s refused by the issuer (39=%s), attempt %d",
                self.gear, sid, code, saga.attempts, extra=_attrs(saga, "refused", code=code),
            )  # fmt: skip
            if q.refused(sid, now):
                self._spawn_park(q, saga, f"refused {saga.refusals} times (last 39={code})", code)
            return True
        q.answered(sid)
        self._wake.set()  # a place in the window is free
        self._by_key.pop(key, None)
        self.stats["answered"] += 1
        ev = end_event(sid, ANSWERED, time.time(), code=code)
        saga.trail.append(ev)
        log.info(
            "%s: reversal %s answered (%s 39=%s) after %d attempt(s)",
            self.gear, sid, mti, code, saga.attempts, extra=_attrs(saga, "answered", code=code),
        )  # fmt: skip
        self._span(saga, ANSWERED, code=code)
        self._end(self._finish(saga, ev))
        return True

    def _span(self, saga: Saga, outcome: str, **more) -> None:
        attrs = {"gear": self.gear, "saga": saga.id, "rrn": saga.rrn, "stan": saga.stan, "mti": saga.mti,
                 "cause": saga.cause, "route": saga.route, "attempts": saga.attempts, "outcome": outcome, **more}  # fmt: skip
        end = time.time_ns()
        start = int(saga.created_wall * 1e9) if saga.created_wall else end
        record_span(SPAN_NAME, attrs, min(start, end), end, outcome == ANSWERED, saga.trace)

    async def _finish(self, saga: Saga, ev: dict) -> None:
        try:
            saga.seqs.append(await self.store.append(ev))
            self.store.finished(saga)
        except Exception as exc:  # noqa: BLE001 (the saga is answered; a replay repeats it once more)
            log.error("%s: end of reversal %s not journaled: %s (a restart repeats it once)", self.gear, saga.id, exc)

    def _spawn_park(self, q: SafQueue, saga: Saga, why: str, code: str = "") -> asyncio.Task:
        q.remove(saga.id)
        self._by_key.pop(self._reply_key(saga.mti, saga.fields), None)
        return self._end(self._park(saga, why, code))

    def _end(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)
        return task

    async def _park(self, saga: Saga, why: str, code: str = "") -> None:
        now = time.monotonic()
        ev = end_event(saga.id, PARKED, time.time(), code=code, why=why)
        self.stats["parked"] += 1
        log.warning(
            "%s: reversal %s PARKED after %d attempt(s): %s; `fluxrig saf show %s` has its trail",
            self.gear, saga.id, saga.attempts, why, saga.id, extra=_attrs(saga, "parked", why=why),
        )  # fmt: skip
        self._span(saga, PARKED, code=code, why=why)
        try:
            await self.store.park(saga, ev, now)
        except Exception as exc:  # noqa: BLE001 (kept open in the journal: a restart resumes it)
            log.error("%s: parking reversal %s failed: %s; it stays owed", self.gear, saga.id, exc)

    # -- operator verbs --------------------------------------------------------------------------
    def find(self, sid: str) -> tuple[SafQueue, Saga] | None:
        for q in self.queues.values():
            s = q.sagas.get(sid)
            if s is not None:
                return q, s
        return None

    def retry_now(self, sid: str) -> bool:
        hit = self.find(sid)
        if hit is None:
            return False
        q, s = hit
        if not s.in_flight:
            q.unsend(s, time.monotonic())
            self._wake.set()
        return True

    def park_now(self, sid: str, why: str = "parked by an operator") -> bool:
        hit = self.find(sid)
        if hit is None:
            return False
        self._spawn_park(hit[0], hit[1], why)
        return True

    async def park(self, sid: str, why: str = "parked by an operator") -> bool:
        """Park `sid` and return once that is durable (False: no such open reversal)."""
        hit = self.find(sid)
        if hit is None:
            return False
        await self._spawn_park(hit[0], hit[1], why)
        return True

    # -- a group's members (issue 17 item 4: fluxrig.saga.mirror) -------------------------------
    def open_sagas(self) -> list[Saga]:
        return [s for q in self.queues.values() for s in q.sagas.values()]

    def open_state(self) -> tuple[list[Saga], dict[int, dict]]:
        """What this journal owes now: open sagas, and requests recovered open (not yet owed)."""
        return self.open_sagas(), dict(self.store.open_tickets)

    async def adopt(self, sagas: dict[str, Saga], owner: str) -> int:
        """Journal the open sagas of a silent member `owner` here, at their attempt counts and
        ages, and queue them; returns how many were taken. Affinity: a saga keeps its leg (the
        members run one scenario, so that port is this member's own connection to the same
        host); when that leg is down here, the route's failover choice carries it (`_leg_for`),
        and with no leg of the route up it waits, counted in its queue, like any other."""
        wall, now = time.time(), time.monotonic()
        staged = []
        for saga in sorted(sagas.values(), key=lambda s: s.created_wall):
            if self.find(saga.id) is not None:
                continue  # already ours (a claim repeated after a lost `adopted`)
            owe = {k: v for k, v in saga.trail[0].items() if k != "ticket"}  # its ticket was the owner's
            owe["from"] = owner
            events = [owe]
            if saga.attempts:
                events.append({"e": EV_TRY, "id": saga.id, "n": saga.attempts, "age": round(saga.age_base, 3),
                               "leg": saga.queue, "wall": wall})  # fmt: skip
            try:
                staged.append((saga, events, [self.store.append_nowait(ev) for ev in events]))
            except Exception as exc:  # noqa: BLE001 (WalFailed ...: left on the owner's subject)
                log.error("%s: reversal %s of %s NOT adopted: the saga journal refused it: %s",
                          self.gear, saga.id, owner, exc)  # fmt: skip
        taken = 0
        for saga, events, futs in staged:
            try:
                seqs = [await f for f in futs]
            except Exception as exc:  # noqa: BLE001
                log.error("%s: reversal %s of %s NOT adopted: %s", self.gear, saga.id, owner, exc)
                continue
            mine = Saga(events[0], seqs[0])
            mine.attempts, mine.age_base = saga.attempts, saga.age_base
            if len(events) > 1:
                mine.seqs.append(seqs[1])
                mine.trail.append(events[1])
            self._queue(mine.queue).add(mine, now)
            self._index(mine)
            taken += 1
            log.info("%s: reversal %s adopted from %s at attempt %d (original STAN %s, on %s)",
                     self.gear, mine.id, owner, mine.attempts, mine.fields.get("90", "")[4:10], mine.queue,
                     extra=_attrs(mine, "adopted", owner=owner))  # fmt: skip
        self.stats["adopted"] += taken
        self._wake.set()
        return taken

    async def hand_over(self, upto: int, by: str) -> int:
        """Another member adopted the sagas this journal owed at or below seq `upto` while this
        Rack was away: end them here (`handed`), never to be sent from here again; requests
        recovered open at or below it are that member's to reverse, not ours."""
        theirs = [seq for seq in self.store.open_tickets if seq <= upto]
        for seq in theirs:
            del self.store.open_tickets[seq]
        if theirs:
            self.store.ack(theirs)
        handed = []
        for q in list(self.queues.values()):
            for saga in list(q.sagas.values()):
                if saga.seqs and saga.seqs[0] <= upto:
                    q.remove(saga.id)
                    self._by_key.pop(self._reply_key(saga.mti, saga.fields), None)
                    handed.append(saga)
        for saga in handed:
            ev = end_event(saga.id, HANDED, time.time(), why=f"taken over by {by}")
            saga.trail.append(ev)
            saga.final = HANDED
            try:
                saga.seqs.append(await self.store.append(ev))
                self.store.finished(saga)
            except Exception as exc:  # noqa: BLE001 (a restart hands it over again: same claim)
                log.error("%s: hand-over of reversal %s not journaled: %s", self.gear, saga.id, exc)
        self.stats["handed_over"] += len(handed)
        return len(handed) + len(theirs)

    # -- the pump --------------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sender is None:
            self._sender = loop.create_task(self._send_loop(), name=f"saga-send:{self.gear}")
        if self._pump is None:
            self._pump = loop.create_task(self._run(), name=f"saga:{self.gear}")

    def _operator_requests(self) -> None:
        for req in take_requests(self.store.directory):
            verb, sid = req["verb"], req["id"]
            done = (
                self.retry_now(sid)
                if verb == "retry"
                else self.park_now(sid, req.get("why") or "parked by an operator")
            )
            (log.warning if done else log.error)(
                "%s: operator %s of reversal %s: %s", self.gear, verb, sid, "done" if done else "no such open reversal"
            )

    async def _run(self) -> None:
        last_requests = 0.0
        while True:
            if time.monotonic() - last_requests >= REQUESTS_PERIOD_S:
                last_requests = time.monotonic()
                try:
                    self._operator_requests()
                except OSError as exc:
                    log.error("%s: operator requests unreadable: %s", self.gear, exc)
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 (one bad round must not stop every reversal)
                log.exception("%s: reversal pump round failed", self.gear)
            # Next round: at once when an answer freed the window or a debt arrived, else when
            # the earliest waiting reversal is due (within 10 ms .. 100 ms).
            due = [at for q in self.queues.values() if (at := q.next_due()) is not None]
            now = time.monotonic()
            pause = min([PUMP_PERIOD_S * 10] + [max(PUMP_PERIOD_S, at - now) for at in due])
            if not self._wake.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), pause)
                except TimeoutError:
                    pass
            self._wake.clear()
            await asyncio.sleep(0)

    def _leg_for(self, saga: Saga) -> str | None:
        if self._up(saga.queue):
            return saga.queue
        return self._pick(saga.route, saga.queue)

    async def _round(self) -> None:
        now = time.monotonic()
        check_expiry = now >= self._expiry_due
        if check_expiry:
            self._expiry_due = now + EXPIRY_PERIOD_S
        self._stage_due(now, check_expiry)

    def _stage_due(self, now: float, expiry: bool) -> None:
        """Journal (stage) the attempts due now within each window and hand them to the sender."""
        box = self._outbox
        staged = len(box)
        for q in list(self.queues.values()):
            q.unanswered(now)
            for saga in q.expired(now) if expiry else ():
                self._spawn_park(q, saga, f"expired after {q.expire_after:g}s of run time", "")
            due = q.due(now)
            for i, saga in enumerate(due):
                leg = self._leg_for(saga)
                if leg is None:  # no leg up: not an attempt; the queue keeps its order
                    for waiting in due[i:]:
                        q.unsend(waiting, now, retry_in=None)
                    break
                n = saga.attempts + 1
                event = {
                    "e": EV_TRY,
                    "id": saga.id,
                    "n": n,
                    "age": round(saga.age(now), 3),
                    "leg": leg,
                    "wall": time.time(),
                }
                try:
                    fut = self.store.append_nowait(event)
                except Exception as exc:  # noqa: BLE001
                    log.error("%s: attempt %d of reversal %s not journaled: %s", self.gear, n, saga.id, exc)
                    q.unsend(saga, now, retry_in=1.0)
                    continue
                box.append((q, saga, leg, event, fut))
        if len(box) > staged:
            self._outbox_ready.set()

    async def _send_loop(self) -> None:
        """Send each staged attempt, in the order staged, once its `try` is on disk."""
        box = self._outbox
        while True:
            if not box:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            q, saga, leg, event, fut = box.popleft()
            try:
                saga.seqs.append(await fut)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.error("%s: attempt of reversal %s not durable: %s", self.gear, saga.id, exc)
                q.unsend(saga, time.monotonic(), retry_in=1.0)
                continue
            saga.trail.append(event)
            if q.sagas.get(saga.id) is not saga:  # parked meanwhile: its try is journaled, nothing sent
                saga.sending = False
                continue
            try:
                await self._send(q, saga, leg)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 (one bad send must not stop the others)
                log.exception("%s: reversal %s attempt not sent", self.gear, saga.id)

    async def _send(self, q: SafQueue, saga: Saga, leg: str) -> None:
        mti = saga.wire_mti()
        q.sent(saga, time.monotonic())
        msg = FluxMsg(trace=saga.trace, meta={M.ISO_MTI: mti, M.ISO_MTI_CLASS: mti[:2]})
        msg.data = {FIELD: {"field": {**saga.fields, "0": mti}}}
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s: reversal %s attempt %d (%s) on %s",
                self.gear, saga.id, saga.attempts, mti, leg, extra=_attrs(saga, "attempt", attempt=saga.attempts, leg=leg),
            )  # fmt: skip
        try:
            await self._emit(leg, msg)
        except Exception as exc:  # noqa: BLE001 (counted as sent: its answer is awaited, then repeated)
            log.warning(
                "%s: reversal %s attempt %d not delivered to %s: %s", self.gear, saga.id, saga.attempts, leg, exc
            )

    async def stop(self) -> None:
        await cancel_all_and_wait([self._pump, self._sender])
        self._pump = self._sender = None
        if self._ending:
            _done, late = await asyncio.wait(set(self._ending), timeout=STOP_ENDS_S)
            if late:
                log.error("%s: %d reversal ends not journaled within %gs of stop; a restart resumes them",
                          self.gear, len(late), STOP_ENDS_S)  # fmt: skip
                await cancel_all_and_wait(list(late))
        await self.store.close()

    def metrics(self) -> dict:
        now = time.monotonic()
        m = {f"saf_{k}": v for k, v in self.stats.items()}
        m["saf_open"] = self.open_count()
        # The STANs this conductor originates: the Mixer checks a group's members never share one.
        m["saf_stan_lo"], m["saf_stan_hi"] = self.settings.stan_range
        for name, q in self.queues.items():
            for k, v in q.metrics(now).items():
                m[f"saf.{name}.{k}"] = v
        return m

    def list(self) -> list[dict]:
        now = time.monotonic()
        return [s.summary(now) for q in self.queues.values() for s in q.sagas.values()]
