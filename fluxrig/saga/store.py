"""The saga journal on disk: a WAL of saga events (fsync on every commit) and a file of parked
sagas. The thin asyncio adapter around fluxrig.saga.saf's events.

Layout under the conductor's saga directory (default `<state_dir>/saga/<gear>`):

    journal/    a fluxrig WAL (fsync "always", no size cap: an owed reversal is never dropped
                to make room; the conductor's `max_owed` refuses new ones loudly instead)
    parked.jsonl  one JSON object per parked saga: its summary and whole trail, fsync'd
                before the saga's journal records are acknowledged
    saga.key    (unless the conductor names another key file) the key card numbers are
                sealed with: no PAN is on disk in clear, in the journal or in parked.jsonl
                (fluxrig/saga/seal.py); bytes values are written as hex in parked.jsonl
    requests/   operator requests (`fluxrig saf retry|park`), one JSON file each, taken by the
                running conductor within a second (or at its next start) and then removed;
                the directory is 0700 like the rest: whoever may write here may run the Rack

`open()` recovers the journal and folds it (see `saf.fold`): the open sagas come back with
their attempt counts; the records of finished sagas are acknowledged again (acknowledgements
above the WAL's persisted cursor do not survive a crash, the `end` events do).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from functools import partial

from ..wal import FSYNC_ALWAYS, AsyncWal, WalFull
from .saf import EV_END, PARKED, Folded, Saga, fold
from .seal import KEY_FILE, FieldSeal

__all__ = [
    "SagaStore",
    "end_event",
    "post_request",
    "take_requests",
    "REQUESTS_DIR",
    "VERBS",
    "read_parked",
    "read_journal",
    "JOURNAL_DIR",
    "PARKED_FILE",
]

log = logging.getLogger("fluxrig.saga")

JOURNAL_DIR = "journal"
PARKED_FILE = "parked.jsonl"
REQUESTS_DIR = "requests"
VERBS = ("retry", "park")
READ_BATCH = 1000


def _events(wal) -> list:
    """Every record above the acknowledged cursor, decoded; undecodable ones are skipped with
    an ERROR (the journal's CRC already rejects torn or rotten bytes)."""
    out = []
    seq = wal.cursor + 1
    while True:
        batch = wal.read_from(seq, READ_BATCH)
        if not batch:
            return out
        for rec in batch:
            try:
                ev = rec.decode()
            except Exception as exc:  # noqa: BLE001 (a foreign record must not stop recovery)
                log.error(
                    "saga journal %s: record %d is not a saga event (%s); left in place", wal.directory, rec.seq, exc
                )
                continue
            if isinstance(ev, dict):
                out.append((rec.seq, ev))
        seq = batch[-1].seq + 1


def read_journal(directory: str) -> Folded:
    """The journal folded, without locking it (for `fluxrig saf list` beside a running Rack):
    open sagas, requests still open, the highest STAN."""
    from ..wal import Wal

    path = os.path.join(directory, JOURNAL_DIR)
    if not os.path.isdir(path):
        return Folded()
    wal = Wal(path, readonly=True, max_size_bytes=None)
    try:
        return fold(_events(wal))
    finally:
        wal.close()


def read_parked(directory: str) -> list[dict]:
    path = os.path.join(directory, PARKED_FILE)
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        continue  # a torn last line after a crash
    except FileNotFoundError:
        pass
    return out


def _jsonable(value):
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class SagaStore:
    """The journal of one conductor. `append()` returns once the event is on disk."""

    def __init__(self, directory: str, wal: AsyncWal, seal: FieldSeal):
        self.directory = directory
        self.wal = wal
        self.seal = seal
        self.recovered: dict[str, Saga] = {}
        self.open_tickets: dict[int, dict] = {}
        self.top_stan = 0
        self._acks: list[int] = []  # acks of this loop iteration (ack)
        #: The group's saga mirror (fluxrig.saga.mirror), when the conductor shares its sagas.
        self.mirror = None

    @classmethod
    async def open(cls, directory: str, key_file: str = "") -> SagaStore:
        """Recover the journal in `directory`; PANs are sealed with the key in `key_file`
        (default `<directory>/saga.key`), created when absent."""
        os.makedirs(directory, mode=0o700, exist_ok=True)
        seal = FieldSeal.load(key_file or os.path.join(directory, KEY_FILE))
        wal = await AsyncWal.open(os.path.join(directory, JOURNAL_DIR), fsync=FSYNC_ALWAYS, max_size_bytes=None)
        self = cls(directory, wal, seal)
        loop = asyncio.get_running_loop()
        events = [(seq, seal.open(ev)) for seq, ev in await loop.run_in_executor(None, _events, wal.wal)]
        if seal.unopened:
            log.error(
                "saga journal %s: %d sealed card numbers do not open with %s (key lost or replaced?): those "
                "reversals are sent without DE 2/34 (DE 90, STAN and RRN still identify the original)",
                directory,
                seal.unopened,
                seal.path,
            )
        folded = fold(events)
        self.recovered, self.open_tickets, self.top_stan = folded.sagas, folded.tickets, folded.top_stan
        if folded.finished:
            wal.ack_many(folded.finished)
        await self._end_parked()
        return self

    async def _end_parked(self) -> None:
        """A saga in parked.jsonl whose `end` never reached the journal (a crash or a stop between
        the two writes, see park()) was parked: end it now instead of resuming its reversal."""
        if not self.recovered:
            return
        loop = asyncio.get_running_loop()
        parked = {d.get("id") for d in await loop.run_in_executor(None, read_parked, self.directory)}
        for sid in [sid for sid in self.recovered if sid in parked]:
            saga = self.recovered.pop(sid)
            saga.final = PARKED
            ev = end_event(sid, PARKED, time.time(), why="parked before the last stop; its end journaled at start")
            saga.seqs.append(await self.append(ev))
            self.finished(saga)
            log.warning(
                "saga journal %s: reversal %s was parked before the last stop: not resumed", self.directory, sid
            )

    def append_nowait(self, event: dict, wait: bool = True) -> asyncio.Future:
        """Stage an event (its PANs sealed); the future gives its seq once fsync'd and, with a
        group mirror and `wait`, once the mirror's rule for its kind holds
        (fluxrig.saga.mirror.SagaMirror.follow: MirrorUnavailable for a ticket event the
        group's stream did not take in time). Raises the WAL's errors."""
        sealed = self.seal.seal(event) if "fields" in event else event
        durable = self.wal.append_nowait(sealed)
        mirror = self.mirror
        return durable if mirror is None else mirror.follow(durable, sealed, wait)

    def append_then(self, event: dict, fn, arg, wait: bool = True) -> None:
        """append_nowait with a callback instead of a future: `fn(arg, seq, error)` in the loop
        once the event is as durable as append_nowait's future would say (no task or future
        per event without a group mirror: the conductor's per-request path). Raises the WAL's
        errors (WalFull too) synchronously."""
        sealed = self.seal.seal(event) if "fields" in event else event
        mirror = self.mirror
        if mirror is None:
            self.wal.append_then(sealed, fn, arg)
            return
        mirror.follow(self.wal.append_nowait(sealed), sealed, wait).add_done_callback(partial(_then_done, fn, arg))

    async def append(self, event: dict, wait: bool = True) -> int:
        while True:
            try:
                fut = self.append_nowait(event, wait)
                break
            except WalFull:
                await asyncio.sleep(0.01)  # the writer is committing: room comes with it
        return await fut

    def ack(self, seqs) -> None:
        """Let records go. Batched: one index update per loop iteration for every ack made in
        it (a group commit closes many tickets at once; an update per ticket cost more than
        its close event). Memory only either way, so nothing is lost by the delay."""
        if not self._acks:
            asyncio.get_running_loop().call_soon(self._flush_acks)
        self._acks.extend(seqs)

    def _flush_acks(self) -> None:
        seqs, self._acks = self._acks, []
        if seqs:
            self.wal.ack_many(seqs)

    def finished(self, saga: Saga) -> None:
        """The saga's `end` event is durable: its records may go."""
        if saga.seqs:
            self.wal.ack_many(saga.seqs)

    async def park(self, saga: Saga, end_event: dict, now: float) -> None:
        """Write the parked saga (summary and trail) to parked.jsonl, then its `end` event, then
        let its journal records go. A crash between the two leaves it in the file and open in
        the journal: the next open() ends it there (_end_parked), it is never resumed."""
        saga.final = PARKED
        doc = {**saga.summary(now), "state": PARKED, "fields": saga.fields, "trail": saga.trail + [end_event]}
        line = json.dumps(_jsonable(self.seal.seal(doc)), sort_keys=True) + "\n"
        await asyncio.get_running_loop().run_in_executor(None, self._write_parked, line)
        seq = await self.append(end_event)
        saga.seqs.append(seq)
        self.finished(saga)

    def _write_parked(self, line: str) -> None:
        path = os.path.join(self.directory, PARKED_FILE)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def metrics(self) -> dict:
        m = self.wal.metrics()
        return {"journal_unacked": m.get("unacked_records", 0), "journal_bytes": m.get("size_bytes", 0)}

    async def close(self) -> None:
        self._flush_acks()
        await self.wal.close()


def _then_done(fn, arg, fut: asyncio.Future) -> None:
    if fut.cancelled():
        fn(arg, None, asyncio.CancelledError())
    elif fut.exception() is not None:
        fn(arg, None, fut.exception())
    else:
        fn(arg, fut.result(), None)


def end_event(saga_id: str, how: str, wall: float, code: str = "", why: str = "") -> dict:
    return {"e": EV_END, "id": saga_id, "how": how, "code": code, "why": why, "wall": wall}


def post_request(directory: str, verb: str, saga_id: str, why: str = "") -> str:
    """Leave an operator request for the conductor owning `directory`; returns its path."""
    if verb not in VERBS:
        raise ValueError(f"unknown verb {verb!r} (known: {', '.join(VERBS)})")
    reqs = os.path.join(directory, REQUESTS_DIR)
    os.makedirs(reqs, mode=0o700, exist_ok=True)
    name = f"{time.time_ns():020d}-{verb}-{saga_id[:64]}.json"
    tmp = os.path.join(reqs, "." + name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, json.dumps({"verb": verb, "id": saga_id, "why": why[:200]}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    path = os.path.join(reqs, name)
    os.rename(tmp, path)  # appears whole or not at all
    return path


def take_requests(directory: str, limit: int = 100) -> list[dict]:
    """Operator requests waiting in `directory`, oldest first, removed as they are taken."""
    reqs = os.path.join(directory, REQUESTS_DIR)
    try:
        names = sorted(n for n in os.listdir(reqs) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return []
    out = []
    for name in names[:limit]:
        path = os.path.join(reqs, name)
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.loads(fh.read(4096))
        except (OSError, ValueError) as exc:
            log.error("saga request %s unreadable (%s): removed", path, exc)
            doc = None
        try:
            os.unlink(path)
        except OSError:
            pass
        if isinstance(doc, dict) and doc.get("verb") in VERBS and isinstance(doc.get("id"), str):
            out.append(doc)
    return out
