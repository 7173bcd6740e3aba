"""`fluxrig inspect-wal DIR`: look inside a Rack's write-ahead log without changing it.

Opens the WAL read-only (no lock taken, nothing truncated or deleted, so it is safe beside a
running Rack, which may still be writing its tail), runs the same recovery scan a Rack runs at
start, and prints:

* stdout: one JSON object per record, in seq order:
  `{"seq", "segment", "offset", "bytes", "payload"}` where `payload` is the record body decoded
  as CBOR and rendered as JSON; byte strings inside it appear as `{"$b64": "<standard base64>"}`,
  CBOR tags as `{"$tag": N, "value": ...}`, anything else JSON lacks as its repr string. A body
  that is not CBOR is given as `"payload": null, "payload_b64": "...", "payload_error": "..."`.
  `--raw` gives every body as `payload_b64` without decoding.
* stderr: one JSON line `{"recovery": {...}, "cursor", "committed_seq", "wal_id", ...}` with the
  recovery summary (what a Rack opening this WAL now would truncate, skip and count).

`--parked` lists instead the records parked beside the WAL (fluxrig/wal/parked.py: what the
Rack could never send or deliver, kept for an operator): one JSON line per file
`{"file", "key", "reason", "bytes", "parked_at", "info", "payload"}` (`info`: where a received
message came from, its subject, stream sequence, message id and why it was parked, when the
Rack wrote one; payload decoded as above when it is CBOR, else `payload_b64`); exit 0 (none
parked: nothing printed).

Exit code 0 when no damage was found, 1 when the summary reports torn bytes, corrupt records or
damaged headers (the WAL is still usable: a Rack repairs it on open), 2 when DIR is not a WAL.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import sys

import cbor2

from fluxrig.errors import FluxError
from fluxrig.wal.log import Wal

__all__ = ["register", "inspect_wal", "to_json", "list_parked_records"]

_BATCH = 1000


def to_json(value):
    """A JSON-ready rendering of a decoded CBOR value (see the module docstring)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {k if isinstance(k, str) else json.dumps(to_json(k)): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, cbor2.CBORTag):
        return {"$tag": value.tag, "value": to_json(value.value)}
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    return repr(value)


def _record_line(wal: Wal, rec, raw: bool) -> dict:
    where = wal.locate(rec.seq) or (None, None)
    line = {"seq": rec.seq, "segment": where[0], "offset": where[1], "bytes": len(rec.payload)}
    if not raw:
        try:
            line["payload"] = to_json(cbor2.loads(rec.payload))
            return line
        except Exception as exc:  # any decoding failure is reported, never fatal
            line["payload"] = None
            line["payload_error"] = f"{type(exc).__name__}: {exc}"
    line["payload_b64"] = base64.b64encode(rec.payload).decode("ascii")
    return line


def inspect_wal(directory: str, start: int = 0, limit: int | None = None, raw: bool = False, out=None, err=None) -> int:
    """Dump records from seq `start` (at most `limit`) and the recovery summary; exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        wal = Wal(directory, readonly=True, max_size_bytes=None)
    except (FluxError, OSError) as exc:
        print(json.dumps({"error": str(exc)}), file=err)
        return 2
    if wal.recovery.segments == 0:
        wal.close()
        print(json.dumps({"error": f"no WAL segment files (wal-*.seg) in {directory}"}), file=err)
        return 2
    try:
        left = limit if limit is not None else float("inf")
        seq = start
        while left > 0:
            batch = wal.read_from(seq, int(min(left, _BATCH)))
            if not batch:
                break
            for rec in batch:
                out.write(json.dumps(_record_line(wal, rec, raw), ensure_ascii=False) + "\n")
            left -= len(batch)
            seq = batch[-1].seq + 1
        r = wal.recovery
        summary = {
            "recovery": r.as_dict(),
            "cursor": wal.cursor,
            "committed_seq": wal.committed_seq,
            "wal_id": wal.wal_id_hex,
            "unacked_records": wal.metrics()["unacked_records"],
        }
        print(json.dumps(summary), file=err)
        damaged = r.torn_bytes_truncated or r.corrupt_records_skipped or r.headers_damaged or r.segments_repaired
        return 1 if damaged else 0
    finally:
        wal.close()


def list_parked_records(directory: str, raw: bool = False, out=None) -> int:
    """Print the parked records of a WAL directory as JSON lines; exit code (always 0)."""
    from fluxrig.wal.parked import list_parked

    out = out or sys.stdout
    for entry in list_parked(directory):
        with open(entry["file"], "rb") as fh:
            data = fh.read()
        line = dict(entry)
        if not raw:
            try:
                line["payload"] = to_json(cbor2.loads(data))
            except Exception as exc:
                line["payload"] = None
                line["payload_error"] = f"{type(exc).__name__}: {exc}"
        if raw or line.get("payload") is None:
            line["payload_b64"] = base64.b64encode(data).decode("ascii")
        print(json.dumps(line), file=out)
    return 0


def _cmd_inspect(args) -> int:
    if args.parked:
        return list_parked_records(args.dir, args.raw)
    start = args.start
    if args.unacked:
        try:
            with Wal(args.dir, readonly=True, max_size_bytes=None) as w:
                start = max(start, w.cursor + 1)
        except (FluxError, OSError) as exc:
            print(json.dumps({"error": str(exc)}), file=sys.stderr)
            return 2
    return inspect_wal(args.dir, start, args.limit, args.raw)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect-wal",
        help="dump a write-ahead log as JSON lines and print its recovery summary",
        description=(
            "Read a Rack's WAL directory (e.g. ./data/wal) without changing it: records go to stdout "
            'as JSON lines {seq, segment, offset, bytes, payload} (byte strings as {"$b64": ...}); '
            "the recovery summary (torn bytes, corrupt records, cursor) goes to stderr as one JSON "
            "line. Safe while the Rack runs. Exit 0 = clean, 1 = damage found (a Rack repairs it "
            "on open), 2 = not a WAL directory."
        ),
    )
    p.add_argument("dir", help="WAL directory, e.g. ./data/wal")
    p.add_argument(
        "--from", dest="start", type=int, default=0, metavar="SEQ", help="first seq to show (default: the oldest)"
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="show at most N records (0 = summary only)")
    p.add_argument("--unacked", action="store_true", help="start after the acknowledged cursor")
    p.add_argument("--raw", action="store_true", help="give bodies as base64 (payload_b64) without decoding")
    p.add_argument(
        "--parked",
        action="store_true",
        help="list the records parked beside this WAL (never sendable or deliverable, kept for you to inspect)",
    )
    p.set_defaults(func=_cmd_inspect)
