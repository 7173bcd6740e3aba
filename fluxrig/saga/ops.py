"""Operator verbs on the reversals of a RUNNING Rack: list, show, retry, park (issue 16 item 4).

The Mixer's signed `saf` command (fluxrig.ctrl, verb `saf`, args `op`/`saga`/`gear`) reaches the
Rack's kill switch, which calls `Rack.saf()`, which calls `answer()` here with the Rack's gears.
The answer is a plain dict (fluxrig.wire.messages.SafAnswer carries it back on the request's
reply subject):

    {"ok": bool, "detail": str, "rows": [summary, ...], "total": int, "saga": {...} | None}

- `list`: every open reversal of every conductor (or of `gear`), oldest first, then the parked
  ones (`state: parked`), at most `max_rows` rows; `total` counts them all.
- `show`: one reversal in full (its fields and trail, the trail cut to its first event and its
  last `max_trail - 1`), open or parked.
- `retry`: an open reversal waiting its back-off is sent at once (one in flight: its answer is
  awaited first); a parked one is refused: parked reversals are settled by hand.
- `park`: an open reversal is parked with `why`; the answer comes once it is durable
  (parked.jsonl fsync'd, its `end` event journaled).

Every PAN (fields 2 and 34, in the fields and in the trail) is masked in what leaves the Rack:
`masked()` is the one masking helper, also used by `fluxrig saf show` on the box.
"""

from __future__ import annotations

import asyncio
import time

from ..iso8583.masking import mask_pan
from ..wire.vocab import SafOp
from .store import read_parked

__all__ = ["answer", "masked", "conductors", "MAX_ROWS", "MAX_TRAIL", "PAN_FIELDS"]

MAX_ROWS = 200  # rows of one `list` answer (the reply is one NATS message)
MAX_TRAIL = 100  # trail events of one `show` answer
PAN_FIELDS = ("2", "34")


def masked(doc):
    """`doc` with every PAN (field 2 or 34 of any `fields` map, the trail's included) masked."""
    if isinstance(doc, list):
        return [masked(v) for v in doc]
    if not isinstance(doc, dict):
        return doc
    out = {k: masked(v) for k, v in doc.items()}
    fields = out.get("fields")
    if isinstance(fields, dict):
        out["fields"] = {k: _mask(v) if k in PAN_FIELDS else v for k, v in fields.items()}
    return out


def _mask(value) -> str:
    """A PAN in clear (in memory) or as sealed on disk ({"sealed", "masked"}: fluxrig/saga/seal.py)."""
    if isinstance(value, dict):
        return str(value.get("masked") or "(sealed)")
    return mask_pan(str(value))


def conductors(gears: dict, gear: str = "") -> dict:
    """name -> Reversals of every running gear that owes reversals (or only `gear`)."""
    out = {}
    for name, g in gears.items():
        rev = getattr(g, "reversals", None)
        if rev is not None and (not gear or name == gear):
            out[name] = rev
    return out


def _cut_trail(trail: list, max_trail: int) -> tuple[list, int]:
    if len(trail) <= max_trail:
        return list(trail), 0
    return [trail[0], *trail[-(max_trail - 1) :]], len(trail) - max_trail


def _full(gear: str, doc: dict, trail: list, max_trail: int) -> dict:
    cut, omitted = _cut_trail(trail, max_trail)
    out = masked({"gear": gear, **doc, "trail": cut})
    if omitted:
        out["trail_omitted"] = omitted
    return out


async def _parked(revs: dict) -> list[tuple[str, dict]]:
    out = []
    for name, rev in revs.items():
        docs = await asyncio.to_thread(read_parked, rev.store.directory)
        out.extend((name, d) for d in docs)
    return out


async def answer(
    gears: dict,
    op: str,
    saga: str = "",
    gear: str = "",
    why: str = "",
    *,
    max_rows: int = MAX_ROWS,
    max_trail: int = MAX_TRAIL,
) -> dict:
    """Carry out one operator verb on the running conductors (see the module docstring)."""
    revs = conductors(gears, gear)
    if not revs:
        where = f"no conductor gear {gear!r} with reversals" if gear else "no conductor gear with reversals"
        return {"ok": False, "detail": f"{where} runs on this Rack", "rows": [], "total": 0, "saga": None}
    now = time.monotonic()
    if op == SafOp.LIST:
        rows = [
            {"gear": name, **s.summary(now)}
            for name, rev in revs.items()
            for q in rev.queues.values()
            for s in q.sagas.values()
        ]
        rows.sort(key=lambda r: -r.get("age_s", 0.0))
        parked = [
            {"gear": name, **{k: v for k, v in d.items() if k not in ("fields", "trail")}}
            for name, d in await _parked(revs)
        ]
        total = len(rows) + len(parked)
        rows = (rows + parked)[:max_rows]
        detail = f"{total} reversal(s)" + (f", first {max_rows} shown" if total > max_rows else "")
        return {"ok": True, "detail": detail, "rows": masked(rows), "total": total, "saga": None}
    for name, rev in revs.items():
        hit = rev.find(saga)
        if hit is None:
            continue
        _q, s = hit
        if op == SafOp.SHOW:
            doc = _full(name, {**s.summary(now), "fields": s.fields}, s.trail, max_trail)
            return {"ok": True, "detail": f"open reversal on {name}", "rows": [], "total": 1, "saga": doc}
        if op == SafOp.RETRY:
            busy = s.in_flight
            rev.retry_now(saga)
            detail = "in flight: its answer is awaited first" if busy else "due now (sent at once when a leg is up)"
            return {"ok": True, "detail": f"{saga} {detail}", "rows": [], "total": 1, "saga": None}
        await rev.park(saga, why or "parked by an operator through the Mixer")
        return {"ok": True, "detail": f"{saga} parked (durable)", "rows": [], "total": 1, "saga": None}
    for name, d in await _parked(revs):
        if d.get("id") != saga:
            continue
        if op == SafOp.SHOW:
            doc = _full(name, {k: v for k, v in d.items() if k != "trail"}, d.get("trail") or [], max_trail)
            return {"ok": True, "detail": f"parked reversal on {name}", "rows": [], "total": 1, "saga": doc}
        if op == SafOp.PARK:
            return {"ok": True, "detail": f"{saga} is already parked", "rows": [], "total": 1, "saga": None}
        return {
            "ok": False,
            "detail": f"{saga} is parked; parked reversals are settled by hand",
            "rows": [],
            "total": 1,
            "saga": None,
        }
    return {"ok": False, "detail": f"no reversal {saga} on this Rack", "rows": [], "total": 0, "saga": None}
