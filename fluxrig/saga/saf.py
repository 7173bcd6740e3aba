"""Store and forward of owed reversals: the journal's events and the per-destination scheduler
(sans-IO: no clock, no files; the caller passes `now`, a monotonic time in seconds).

A **saga** is one owed reversal, from the moment it is owed to its final state: `answered`
(the issuer replied 0410/0430), `parked` (given up after `max_attempts` failed answers, or after
`expire_after` of life, or by an operator), with its whole trail.

The journal is a sequence of events (CBOR maps in a WAL, see fluxrig.saga.store):

    {"e": "owe", "id", "queue", "route", "mti", "fields", "cause", "trace", "rrn", "wall"}
    {"e": "try", "id", "n", "age", "leg", "wall"}    written (fsync'd) BEFORE attempt n is sent
    {"e": "end", "id", "how", "code", "why", "wall"}  how: answered | parked | handed
    {"e": "open", "route", "leg", "mti", "fields", "trace"}  a request written to an issuer leg
    {"e": "close", "s": <seq of its open>}                 its reply reached the switch in time

A request whose outcome matters (a reversible MTI on a route with reversals) is journaled
`open` before it is sent to the issuer and `close`d before its reply goes to the acquirer; an
`owe` names the ticket it replaces (`"ticket": seq`). A ticket still open after a crash is a
request whose reply the switch never processed: the restarted conductor owes its reversal.

`fold()` replays them: a saga with no `end` is resumed at attempt `n + 1` (a repeat, 0401/0421:
attempt n may have reached the issuer before the crash), so no first attempt is ever sent
twice and no owed reversal is lost. A saga's age is counted in run time (`age` at each try plus
the time since), never from the wall clock, so a clock that jumps from 1970 to today at boot
neither expires nor keeps a saga by mistake.

The scheduler (`SafQueue`, one per destination leg) keeps up to `window` reversals in flight;
one that gets no answer is repeated after 1 s, 2 s, 4 s ... capped at `backoff_cap`; one the
issuer keeps refusing (a format error, say) is parked after `max_attempts` without holding up
the others: a waiting reversal never occupies the window, so a poison record delays nobody.
Waiting reversals leave in order of when they are due, then of age.
"""

from __future__ import annotations

import heapq
import itertools

__all__ = [
    "EV_OWE",
    "EV_TRY",
    "EV_END",
    "EV_OPEN",
    "EV_CLOSE",
    "Folded",
    "ANSWERED",
    "PARKED",
    "HANDED",
    "Saga",
    "fold",
    "backoff",
    "SafQueue",
    "DEFAULT_WINDOW",
    "DEFAULT_BACKOFF_INITIAL_S",
    "DEFAULT_BACKOFF_CAP_S",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_EXPIRE_AFTER_S",
]

EV_OWE, EV_TRY, EV_END, EV_OPEN, EV_CLOSE = "owe", "try", "end", "open", "close"
ANSWERED, PARKED = "answered", "parked"
#: Ended here because another member of the group took the saga over (fluxrig.saga.mirror).
HANDED = "handed"

DEFAULT_WINDOW = 32
DEFAULT_BACKOFF_INITIAL_S = 1.0
DEFAULT_BACKOFF_CAP_S = 60.0
DEFAULT_MAX_ATTEMPTS = 10  # refused answers (format error ...) before a reversal is parked
DEFAULT_EXPIRE_AFTER_S = 24 * 3600.0


def backoff(attempt: int, initial: float = DEFAULT_BACKOFF_INITIAL_S, cap: float = DEFAULT_BACKOFF_CAP_S) -> float:
    """Seconds to wait for an answer to attempt `attempt` (1-based) before repeating it."""
    return min(cap, initial * (2 ** min(max(attempt - 1, 0), 30)))


class Saga:
    """One owed reversal and its trail (the journal events that concern it, with their seqs)."""

    __slots__ = (
        "id", "queue", "route", "mti", "fields", "cause", "trace", "rrn", "created_wall",
        "attempts", "refusals", "age_base", "since", "next_at", "in_flight", "final", "trail", "seqs", "order",
        "sending",
    )  # fmt: skip

    def __init__(self, event: dict, seq: int | None = None):
        self.id = event["id"]
        self.queue = event["queue"]
        self.route = event.get("route", "")
        self.mti = event["mti"]
        self.fields = dict(event["fields"])
        self.cause = event.get("cause", "")
        self.trace = event.get("trace", "")
        self.rrn = event.get("rrn", "")
        self.created_wall = event.get("wall", 0.0)
        self.attempts = 0
        self.refusals = 0
        self.age_base = 0.0  # run time lived before `since`
        self.since: float | None = None  # monotonic time the age clock (re)started
        self.next_at = 0.0
        self.in_flight = False
        self.sending = False  # taken by due(), its attempt not yet durable and sent (sent/unsend)
        self.final: str | None = None
        self.trail: list[dict] = [event]
        self.seqs: list[int] = [] if seq is None else [seq]
        self.order = 0

    @property
    def stan(self) -> str:
        return self.fields.get("11", "")

    def wire_mti(self) -> str:
        """The MTI of the next attempt: the repeat MTI once one attempt may have been sent."""
        return self.mti if self.attempts == 0 else self.mti[:3] + "1"

    def age(self, now: float) -> float:
        return self.age_base + (0.0 if self.since is None else max(0.0, now - self.since))

    def summary(self, now: float | None = None) -> dict:
        out = {
            "id": self.id,
            "queue": self.queue,
            "route": self.route,
            "mti": self.mti,
            "stan": self.stan,
            "cause": self.cause,
            "trace": self.trace,
            "rrn": self.rrn,
            "attempts": self.attempts,
            "refusals": self.refusals,
            "in_flight": self.in_flight,
            "state": self.final or ("in_flight" if self.in_flight else "waiting"),
            "original": self.fields.get("90", ""),
        }
        if now is not None:
            out["age_s"] = round(self.age(now), 3)
        return out


class Folded:
    """What a journal replay gives: open sagas by id, requests still open (seq -> event),
    seqs to acknowledge (finished sagas, closed tickets), the highest reversal STAN seen."""

    __slots__ = ("sagas", "tickets", "finished", "top_stan")

    def __init__(self):
        self.sagas: dict[str, Saga] = {}
        self.tickets: dict[int, dict] = {}
        self.finished: list[int] = []
        self.top_stan = 0


def fold(events) -> Folded:
    """Replay `(seq, event)` pairs in seq order. An event for an unknown saga (its `owe`
    acknowledged and gone) is acknowledged; unknown kinds are left alone."""
    out = Folded()
    sagas, tickets, finished = out.sagas, out.tickets, out.finished
    for seq, ev in events:
        kind = ev.get("e")
        sid = ev.get("id")
        if kind == EV_OPEN:
            tickets[seq] = ev
            continue
        if kind == EV_CLOSE:
            opened = ev.get("s")
            if tickets.pop(opened, None) is not None:
                finished.append(opened)
            finished.append(seq)
            continue
        if kind == EV_OWE:
            s = Saga(ev, seq)
            sagas[sid] = s
            stan = s.stan
            if stan.isdigit():
                out.top_stan = max(out.top_stan, int(stan))
            opened = ev.get("ticket")
            if opened is not None and tickets.pop(opened, None) is not None:
                finished.append(opened)
            continue
        s = sagas.get(sid)
        if s is None:
            finished.append(seq)
            continue
        s.seqs.append(seq)
        s.trail.append(ev)
        if kind == EV_TRY:
            s.attempts = max(s.attempts, int(ev.get("n", 0)))
            s.age_base = max(s.age_base, float(ev.get("age", 0.0)))
        elif kind == EV_END:
            s.final = ev.get("how", PARKED)
            finished.extend(s.seqs)
            del sagas[sid]
    return out


class SafQueue:
    """The sagas owed to one destination leg, and which of them to send now."""

    def __init__(
        self,
        name: str,
        *,
        window: int = DEFAULT_WINDOW,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL_S,
        backoff_cap: float = DEFAULT_BACKOFF_CAP_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        expire_after: float = DEFAULT_EXPIRE_AFTER_S,
    ):
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self.name = name
        self.window = window
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.max_attempts = max_attempts
        self.expire_after = expire_after
        self.sagas: dict[str, Saga] = {}  # every open saga of this queue
        self._heap: list = []  # (next_at, order, id) of waiting sagas; stale entries skipped
        self.in_flight: dict[str, Saga] = {}
        self._order = itertools.count()
        self.stats = {"sent": 0, "repeats": 0, "answered": 0, "refused": 0, "parked": 0, "expired": 0}

    def __len__(self) -> int:
        return len(self.sagas)

    def add(self, saga: Saga, now: float, due_at: float | None = None) -> None:
        """A new saga (or one recovered from the journal): due at `due_at` (default now)."""
        saga.order = next(self._order)
        saga.since = now
        saga.in_flight = False
        self.sagas[saga.id] = saga
        self._wait(saga, now if due_at is None else due_at)

    def _wait(self, saga: Saga, at: float) -> None:
        saga.in_flight = False
        saga.next_at = at
        heapq.heappush(self._heap, (at, saga.order, saga.id))

    def due(self, now: float) -> list[Saga]:
        """Sagas to send now, oldest due first, at most the free part of the window. Each is
        marked in flight (call `sent()` once its attempt is durable, or `unsend()`)."""
        room = self.window - len(self.in_flight)
        out = []
        heap = self._heap
        while room > 0 and heap and heap[0][0] <= now:
            at, _order, sid = heapq.heappop(heap)
            s = self.sagas.get(sid)
            if s is None or s.in_flight or s.next_at != at:
                continue  # answered, parked, or rescheduled since
            s.in_flight = True
            s.sending = True
            self.in_flight[sid] = s
            out.append(s)
            room -= 1
        return out

    def next_due(self) -> float | None:
        """When the earliest waiting saga is due (None: nothing waits)."""
        heap = self._heap
        while heap:
            at, _order, sid = heap[0]
            s = self.sagas.get(sid)
            if s is None or s.in_flight or s.next_at != at:
                heapq.heappop(heap)
                continue
            return at
        return None

    def sent(self, saga: Saga, now: float) -> None:
        """Attempt `saga.attempts + 1` is on its way: wait `backoff` for its answer."""
        saga.sending = False
        saga.attempts += 1
        self.stats["sent"] += 1
        if saga.attempts > 1:
            self.stats["repeats"] += 1
        saga.next_at = now + backoff(saga.attempts, self.backoff_initial, self.backoff_cap)

    def unsend(self, saga: Saga, now: float, retry_in: float | None = 0.0) -> None:
        """The attempt could not be sent (journal refused: `retry_in` seconds from now), or not
        now (no leg up: `retry_in=None` keeps its place, so the queue's order of age survives
        an issuer that is away)."""
        saga.sending = False
        self.in_flight.pop(saga.id, None)
        if saga.id in self.sagas:
            self._wait(saga, saga.next_at if retry_in is None else now + retry_in)

    def unanswered(self, now: float) -> list[Saga]:
        """In-flight sagas whose answer is overdue: back to waiting, due now (a repeat). One whose
        attempt is still on its way to the disk (`sending`) is not overdue."""
        late = [s for s in self.in_flight.values() if s.next_at <= now and not s.sending]
        for s in late:
            del self.in_flight[s.id]
            self._wait(s, now)
        return late

    def answered(self, sid: str) -> Saga | None:
        s = self.sagas.pop(sid, None)
        if s is not None:
            self.in_flight.pop(sid, None)
            s.in_flight = False
            s.final = ANSWERED
            self.stats["answered"] += 1
        return s

    def refused(self, sid: str, now: float) -> bool:
        """The issuer answered with a refusal (format error ...): True when the saga is now
        owed a park (max_attempts reached), else it waits its back-off like an unanswered one."""
        s = self.sagas.get(sid)
        if s is None:
            return False
        s.refusals += 1
        self.stats["refused"] += 1
        self.in_flight.pop(sid, None)
        if s.refusals >= self.max_attempts:
            return True
        self._wait(s, max(s.next_at, now))
        return False

    def expired(self, now: float) -> list[Saga]:
        """Waiting sagas older than `expire_after` of run time (to be parked)."""
        return [s for s in self.sagas.values() if not s.in_flight and s.age(now) >= self.expire_after]

    def remove(self, sid: str) -> Saga | None:
        s = self.sagas.pop(sid, None)
        if s is not None:
            self.in_flight.pop(sid, None)
            s.in_flight = False
        return s

    def oldest_age(self, now: float) -> float:
        return max((s.age(now) for s in self.sagas.values()), default=0.0)

    def metrics(self, now: float) -> dict:
        return {
            "depth": len(self.sagas),
            "in_flight": len(self.in_flight),
            "oldest_age_s": round(self.oldest_age(now), 3),
            **self.stats,
        }
