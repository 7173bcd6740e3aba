"""The saga mirror's wire format and its two decisions, sans-IO: what a mirror subject says
about its member's owed reversals, and when that member's lease has run out.

Job (issue 17 item 4: owed reversals outlive their Rack). Each member of a Rack group mirrors
the saga journal of each of its conductors (fluxrig.saga.store) onto one subject of its
group's stream, `flux.saf.<group>.<gear>.<rack>` (fluxrig.wire.subjects.saf_subject). A survivor
that sees a member's subject stand still for a lease reads it, folds it with the journal's own
`fold()`, and takes the open sagas over. Messages, each one CBOR map `{"v": 1, "k": kind, ...}`:

    ev       {"ev": [[seq, event], ...]}   journal events in journal order (sealed as on disk:
                                          card numbers open only with the group's saga key)
    cp       {"ev": [[seq, event], ...]}   a checkpoint: the events that fold to the member's
                                          state now (each open saga's `owe` and last `try`);
                                          published with `Nats-Rollup: sub`, so the subject
                                          keeps it and what follows, nothing older
    cpref    {"ref": id, "slot": 0|1, "parts": n}  a checkpoint too big for one message: its
                                          events are in n `cpp` parts on the subjects
                                          saf_checkpoint_part(subject, slot, i), each
                                          published with a rollup of its own, before this
                                          (with `Nats-Rollup: sub` too). The owner alternates
                                          the slot, so the parts the current `cpref` names
                                          stand while the next checkpoint's are written: an
                                          owner killed in between leaves the old one whole
    cpp      {"ref": id, "i": i, "ev": [...]}  part i of checkpoint `ref` (on a part subject)
    beat     {}                            the member is alive and has nothing new
    claim    {"by": rack, "upto": seq}     a survivor is taking the sagas journaled at or below
                                          `upto` (journal seq of the last event it folded)
    adopted  {"by": rack, "upto": seq, "sagas": n}  ... and has them in its own journal

Every publish on a subject, the owner's and a claimer's alike, carries
`Nats-Expected-Last-Subject-Sequence` (the subject's last stream seq as its writer knows it):
a claim lands only on a subject nobody wrote to since the claimer read it (its owner is
silent, no other survivor got there first), and an owner that was merely cut off learns at
its next publish that it was claimed (`ClaimedError` from the adapter) instead of racing the
claimer. `replay(messages)` is the reader's whole rule:

* the state starts at the last checkpoint (or the subject's first message) and takes every
  `ev` after it; a `cpref`'s events are its parts, which the reader fetches and hands to
  `replay` (`Replayed.missing` names the `cpref` whose parts it still needs);
* an `adopted` removes from it what its `upto` covers: those sagas belong to the claimer
  now, whatever the owner journals later; only newer ones are the owner's;
* the subject is **settled** when its last message is `adopted` (nothing left to take) and
  **claimable** otherwise: a `claim` never followed by `adopted` is a claimer that died
  between the two, and the next survivor takes the same sagas again.

`Lease` watches the other members' subjects by their last stream seq, against a monotonic
clock of the watcher's own (no wall clock: a member whose clock says 1970 neither expires
nor keeps a lease by mistake): a subject whose last seq has not moved for `lease_s` is
expired. An owner beats every BEAT_S when it has nothing else to say, so a live member's
subject moves at least that often; a member is claimed at most CHECK_S + LEASE_S (+ the
claim itself) after its last word, inside the issue's 30 s.
"""

from __future__ import annotations

import cbor2

from ..errors import FluxError

__all__ = [
    "VERSION",
    "KIND_EVENTS",
    "KIND_CHECKPOINT",
    "KIND_BEAT",
    "KIND_CLAIM",
    "KIND_ADOPTED",
    "KIND_CHECKPOINT_REF",
    "KIND_CHECKPOINT_PART",
    "MAX_CHECKPOINT_PARTS",
    "split_events",
    "LEASE_S",
    "BEAT_S",
    "CHECK_S",
    "MAX_MESSAGE_BYTES",
    "MirrorMessageError",
    "MirrorMessage",
    "Replayed",
    "encode",
    "decode",
    "replay",
    "checkpoint_events",
    "Lease",
]

VERSION = 1
KIND_EVENTS, KIND_CHECKPOINT, KIND_BEAT, KIND_CLAIM, KIND_ADOPTED = "ev", "cp", "beat", "claim", "adopted"
KIND_CHECKPOINT_REF, KIND_CHECKPOINT_PART = "cpref", "cpp"
KINDS = frozenset((KIND_EVENTS, KIND_CHECKPOINT, KIND_BEAT, KIND_CLAIM, KIND_ADOPTED, KIND_CHECKPOINT_REF,
                   KIND_CHECKPOINT_PART))  # fmt: skip
_WITH_EVENTS = (KIND_EVENTS, KIND_CHECKPOINT, KIND_CHECKPOINT_PART)
#: Silence after which a member's sagas may be claimed (its subject has not moved).
LEASE_S = 15.0
#: An owner with nothing to publish says so this often (well inside the lease).
BEAT_S = 3.0
#: How often a member looks at the others' subjects.
CHECK_S = 2.0
#: Largest mirror message (NATS' default max_payload is 1 MiB; headers and slack below it).
MAX_MESSAGE_BYTES = 900 * 1024
#: Parts of one checkpoint at most (about 230 MB of open sagas at the default message size):
#: past it the checkpoint is not published, the subject keeps its history (WARNING).
MAX_CHECKPOINT_PARTS = 256


class MirrorMessageError(FluxError):
    """A message on a mirror subject is not one this version understands (`offset`: its
    stream seq): it is skipped, counted and logged, never folded."""

    def __init__(self, message: str, seq: int | None = None):
        super().__init__(message)
        self.seq = seq


class MirrorMessage:
    __slots__ = ("kind", "events", "by", "upto", "seq", "ref", "slot", "parts", "index")

    def __init__(self, kind: str, events=(), by: str = "", upto: int = 0, seq: int = 0, ref: str = "",
                 slot: int = 0, parts: int = 0, index: int = 0):  # fmt: skip
        self.kind = kind
        self.events = list(events)
        self.by = by
        self.upto = upto
        self.ref, self.slot, self.parts, self.index = ref, slot, parts, index
        self.seq = seq  # the stream seq it was read at (0 before it is stored)


def encode(kind: str, events=(), by: str = "", upto: int = 0, sagas: int | None = None, ref: str = "",
           slot: int = 0, parts: int = 0, index: int = 0) -> bytes:  # fmt: skip
    if kind not in KINDS:
        raise ValueError(f"unknown mirror message kind {kind!r}")
    doc: dict = {"v": VERSION, "k": kind}
    if kind in _WITH_EVENTS:
        doc["ev"] = [[int(seq), ev] for seq, ev in events]
    if kind == KIND_CHECKPOINT_REF:
        doc["ref"], doc["slot"], doc["parts"] = ref, int(slot), int(parts)
    if kind == KIND_CHECKPOINT_PART:
        doc["ref"], doc["i"] = ref, int(index)
    if kind in (KIND_CLAIM, KIND_ADOPTED):
        doc["by"], doc["upto"] = by, int(upto)
        if sagas is not None:
            doc["sagas"] = int(sagas)
    return cbor2.dumps(doc)


def decode(payload: bytes, seq: int = 0) -> MirrorMessage:
    """The message in `payload` (read at stream seq `seq`); MirrorMessageError naming what is wrong."""
    if len(payload) > MAX_MESSAGE_BYTES + 64 * 1024:
        raise MirrorMessageError(f"mirror message at seq {seq}: {len(payload)} bytes, above the limit", seq)
    try:
        doc = cbor2.loads(payload)
    except Exception as exc:  # noqa: BLE001 (cbor2 raises several types for bad input)
        raise MirrorMessageError(f"mirror message at seq {seq}: not CBOR ({exc})", seq) from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION or doc.get("k") not in KINDS:
        raise MirrorMessageError(f"mirror message at seq {seq}: not a version {VERSION} mirror message", seq)
    kind = doc["k"]
    events = []
    if kind in _WITH_EVENTS:
        raw = doc.get("ev")
        if not isinstance(raw, list):
            raise MirrorMessageError(f"mirror message at seq {seq}: key 'ev' is not a list", seq)
        for i, pair in enumerate(raw):
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int)
                    and isinstance(pair[1], dict)):  # fmt: skip
                raise MirrorMessageError(f"mirror message at seq {seq}: ev[{i}] is not [seq, event]", seq)
            events.append((pair[0], pair[1]))
    by, upto = "", 0
    if kind in (KIND_CLAIM, KIND_ADOPTED):
        by, upto = doc.get("by"), doc.get("upto")
        if not isinstance(by, str) or not by or not isinstance(upto, int) or upto < 0:
            raise MirrorMessageError(f"mirror message at seq {seq}: a {kind} needs 'by' and 'upto'", seq)
    ref, slot, parts, index = "", 0, 0, 0
    if kind in (KIND_CHECKPOINT_REF, KIND_CHECKPOINT_PART):
        ref = doc.get("ref")
        if not isinstance(ref, str) or not ref:
            raise MirrorMessageError(f"mirror message at seq {seq}: a {kind} needs 'ref'", seq)
    if kind == KIND_CHECKPOINT_REF:
        slot, parts = doc.get("slot"), doc.get("parts")
        if slot not in (0, 1) or not isinstance(parts, int) or not 1 <= parts <= MAX_CHECKPOINT_PARTS:
            raise MirrorMessageError(f"mirror message at seq {seq}: a cpref needs 'slot' 0 or 1 and 'parts' "
                                     f"1..{MAX_CHECKPOINT_PARTS}", seq)  # fmt: skip
    if kind == KIND_CHECKPOINT_PART:
        index = doc.get("i")
        if not isinstance(index, int) or not 0 <= index < MAX_CHECKPOINT_PARTS:
            raise MirrorMessageError(f"mirror message at seq {seq}: a cpp needs 'i' 0..{MAX_CHECKPOINT_PARTS - 1}",
                                     seq)  # fmt: skip
    return MirrorMessage(kind, events, by, upto, seq, ref, slot, parts, index)


class Replayed:
    """What a mirror subject says (see `replay`)."""

    __slots__ = ("events", "last_kind", "last_seq", "claimed_upto", "claimed_by", "top_seq", "skipped", "missing")

    def __init__(self):
        self.events: list[tuple[int, dict]] = []  # the owner's, in journal order, to fold
        self.last_kind = ""
        self.last_seq = 0  # stream seq of the subject's last message
        self.claimed_upto = 0  # the highest `upto` of an adoption
        self.claimed_by = ""
        self.top_seq = 0  # the highest journal seq seen
        self.skipped = 0  # undecodable messages
        self.missing: MirrorMessage | None = None  # the cpref the state starts at, its parts not given

    @property
    def settled(self) -> bool:
        return self.last_kind == KIND_ADOPTED


def replay(messages, parts: dict[str, list] | None = None) -> Replayed:
    """Fold `messages` (MirrorMessage or MirrorMessageError, in stream order). Only an
    `adopted` cuts: a `claim` without one is a claimer at work (the subject just moved, so
    the lease starts again) or one that died before adopting (the lease runs out, and the
    next survivor takes the same sagas). `parts`: {cpref ref: its events, in order}, read from
    the part subjects; when the state starts at a cpref not in it, `missing` names it and
    the events are not complete (replay again with its parts)."""
    out = Replayed()
    events: list[tuple[int, dict]] = []
    for m in messages:
        if isinstance(m, MirrorMessageError):
            out.skipped += 1
            out.last_seq = max(out.last_seq, m.seq or 0)
            continue
        out.last_seq, out.last_kind = m.seq, m.kind
        if m.kind == KIND_CHECKPOINT_REF:
            got = (parts or {}).get(m.ref)
            out.missing = m if got is None else None
            events = [p for p in got or () if p[0] > out.claimed_upto]
            for seq, _ in got or ():
                out.top_seq = max(out.top_seq, seq)
        elif m.kind == KIND_CHECKPOINT:
            out.missing = None
            events = [p for p in m.events if p[0] > out.claimed_upto]
        elif m.kind == KIND_EVENTS:
            events.extend(p for p in m.events if p[0] > out.claimed_upto)
        elif m.kind == KIND_ADOPTED and m.upto >= out.claimed_upto:
            out.claimed_upto, out.claimed_by = m.upto, m.by
            events = [p for p in events if p[0] > out.claimed_upto]
        for seq, _ in m.events:
            out.top_seq = max(out.top_seq, seq)
    out.events = events
    return out


def split_events(pairs: list[tuple[int, dict]], max_bytes: int, ref: str) -> list[list[tuple[int, dict]]] | None:
    """`pairs` cut, in order, into the parts of checkpoint `ref`, each encoding as a `cpp` of at
    most `max_bytes`; None when one pair alone is larger or more than MAX_CHECKPOINT_PARTS
    would be needed (the checkpoint is then not published)."""
    # + the CBOR length of the list, which grows with its count (at most 9 bytes)
    overhead = len(encode(KIND_CHECKPOINT_PART, [], ref=ref, index=MAX_CHECKPOINT_PARTS - 1)) + 8
    out: list[list[tuple[int, dict]]] = []
    chunk: list[tuple[int, dict]] = []
    size = overhead
    for pair in pairs:
        n = len(cbor2.dumps([int(pair[0]), pair[1]]))
        if overhead + n > max_bytes:
            return None
        if chunk and size + n > max_bytes:
            out.append(chunk)
            chunk, size = [], overhead
        chunk.append(pair)
        size += n
    if chunk or not out:
        out.append(chunk)
    return out if len(out) <= MAX_CHECKPOINT_PARTS else None


def checkpoint_events(sagas, tickets: dict[int, dict]) -> list[tuple[int, dict]]:
    """The events that fold to this state: each open saga's `owe` and its last `try` (the
    attempt count and age a resumed saga needs), each open ticket's `open`; journal order."""
    out: list[tuple[int, dict]] = []
    for saga in sagas:
        if not saga.seqs:
            continue
        out.append((saga.seqs[0], saga.trail[0]))
        last_try = None
        for seq, ev in zip(saga.seqs[1:], saga.trail[1:], strict=False):
            if ev.get("e") == "try":
                last_try = (seq, ev)
        if last_try is not None:
            out.append(last_try)
    out.extend(tickets.items())
    out.sort(key=lambda p: p[0])
    return out


class Lease:
    """The other members' subjects and since when each has stood still (watcher's clock)."""

    def __init__(self, lease_s: float = LEASE_S):
        self.lease_s = lease_s
        self._seen: dict[str, tuple[int, float]] = {}  # subject -> (last stream seq, since)

    def observe(self, subject: str, last_seq: int, now: float) -> None:
        was = self._seen.get(subject)
        if was is None or was[0] != last_seq:
            self._seen[subject] = (last_seq, now)

    def last_seq(self, subject: str) -> int | None:
        was = self._seen.get(subject)
        return None if was is None else was[0]

    def still_for(self, subject: str, now: float) -> float:
        was = self._seen.get(subject)
        return 0.0 if was is None else now - was[1]

    def expired(self, now: float) -> list[str]:
        """Subjects that have not moved for the lease, oldest silence first."""
        out = [(since, s) for s, (_, since) in self._seen.items() if now - since >= self.lease_s]
        return [s for _, s in sorted(out)]

    def forget(self, subject: str) -> None:
        self._seen.pop(subject, None)

    def subjects(self) -> list[str]:
        return sorted(self._seen)
