"""`fluxrig saf list|show|retry|park`: the reversals a Rack's switch owes (store and forward).

Reads each conductor's saga journal (`<state_dir>/saga/<gear>`, or `--dir`) read-only, so it is
safe beside a running Rack. `retry` and `park` leave a request in the journal's `requests/`
directory: the running conductor takes it within a second (a stopped one at its next start)
and logs what it did. PANs are masked in everything printed.

With `--rack NAME` the same verbs go through the Mixer API to a joined Rack instead (a signed
`saf` command the Rack verifies like a kill; see mixer/fluxrig_mixer/saf.py), with the usual
--api-url/--api-token-file; retry and park are recorded in the Mixer's audit trail. Exit 3
when the Mixer is unreachable.
"""

from __future__ import annotations

import json
import os
import sys
from urllib.parse import quote

from ..saga.ops import masked as _masked
from ..saga.store import post_request, read_journal, read_parked
from .common import config_or_report
from .mixer_api import add_api_args, run_api_command

__all__ = ["register", "saga_dirs"]


def saga_dirs(args) -> list[str] | None:
    if args.dir:
        return [args.dir]
    config = config_or_report(args.config)
    if config is None:
        return None
    root = os.path.join(config.base.state_dir, "saga")
    try:
        return [os.path.join(root, n) for n in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, n))]
    except FileNotFoundError:
        return []


def _rows(dirs: list[str], parked: bool):
    for d in dirs:
        gear = os.path.basename(d)
        if parked:
            for doc in read_parked(d):
                yield gear, d, doc
            continue
        for s in read_journal(d).sagas.values():
            yield gear, d, {**s.summary(), "fields": s.fields, "trail": s.trail}


def _remote(client, args) -> int:
    """The verbs through the Mixer API, for the joined Rack `args.rack`."""
    base = f"/api/v1/racks/{quote(args.rack, safe='')}/saf"
    params = {"gear": args.gear or None, "wait": args.wait}
    if args.action == "list":
        out = client.get(base, state="parked" if args.parked else "open", **params)
        for row in out.get("rows") or []:
            print(json.dumps(row, sort_keys=True))
        if out.get("total", 0) > len(out.get("rows") or []):
            print(f"({out.get('detail')})", file=sys.stderr)
        return 0
    path = f"{base}/{quote(args.id, safe='')}"
    if args.action == "show":
        print(json.dumps(client.get(path, **params), indent=2, sort_keys=True, default=str))
        return 0
    body = {"reason": args.why or "operator request", "wait": args.wait}
    out = client.post(f"{path}/{args.action}", body)
    print(f"rack {out.get('rack')}: {(out.get('answer') or {}).get('detail', out.get('status'))}")
    return 0


def _cmd(args) -> int:
    if args.rack:
        if args.action != "list" and not args.id:
            print(f"fluxrig saf {args.action}: give the reversal id (see `fluxrig saf list --rack R`)", file=sys.stderr)
            return 2
        return run_api_command(_remote, args)
    dirs = saga_dirs(args)
    if dirs is None:
        return 2
    if args.action == "list":
        for gear, _d, doc in _rows(dirs, args.parked):
            row = {k: v for k, v in doc.items() if k not in ("fields", "trail")}
            print(json.dumps({"gear": gear, **row}, sort_keys=True))
        return 0
    if not args.id:
        print(f"fluxrig saf {args.action}: give the reversal id (see `fluxrig saf list`)", file=sys.stderr)
        return 2
    hits = [(g, d, doc) for parked in (False, True) for g, d, doc in _rows(dirs, parked) if doc.get("id") == args.id]
    if not hits:
        print(
            f"fluxrig saf {args.action}: no reversal {args.id} in {', '.join(dirs) or 'no saga journal'}",
            file=sys.stderr,
        )
        return 1
    gear, d, doc = hits[0]
    if args.action == "show":
        print(json.dumps({"gear": gear, **_masked(doc)}, indent=2, sort_keys=True, default=str))
        return 0
    if doc.get("state") == "parked" and args.action == "park":
        print(f"reversal {args.id} is already parked", file=sys.stderr)
        return 0
    if doc.get("state") == "parked":
        print(f"fluxrig saf retry: {args.id} is parked; parked reversals are settled by hand", file=sys.stderr)
        return 1
    path = post_request(d, args.action, args.id, args.why or "")
    print(f"{args.action} of {args.id} requested ({path}); the Rack's log says when it is done")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "saf",
        help="list, show, retry or park the reversals a switch owes (store and forward)",
        description=(
            "The reversals this Rack's conductor gears owe their issuers, from their saga journals "
            "(read-only, safe while the Rack runs). `list` prints one JSON line per open reversal "
            "(--parked: the parked ones), `show ID` one in full with its trail (PAN masked), `retry ID` "
            "sends it again now, `park ID` gives up on it (kept in parked.jsonl for settlement by hand). "
            "With --rack NAME the verbs go through the Mixer API to that joined Rack (signed, audited). "
            "Exit 0 = done, 1 = no such reversal (or refused by the Mixer), 2 = bad arguments or "
            "configuration, 3 = Mixer unreachable."
        ),
    )
    p.add_argument("action", choices=("list", "show", "retry", "park"))
    p.add_argument("id", nargs="?", help="reversal id (from `list`)")
    p.add_argument("-c", "--config", help="the Rack's fluxrig.toml (its base.state_dir holds saga/<gear>/)")
    p.add_argument("--dir", help="one saga journal directory instead (e.g. /var/lib/fluxrig/saga/switch)")
    p.add_argument("--parked", action="store_true", help="list the parked reversals instead of the open ones")
    p.add_argument("--why", help="reason recorded with a park")
    p.add_argument("--rack", help="a joined Rack's name: ask it through the Mixer API instead of reading local files")
    p.add_argument("--gear", help="with --rack: only this conductor gear")
    p.add_argument(
        "--wait", type=float, default=5.0, help="with --rack: seconds to wait for the Rack's answer (default 5)"
    )
    add_api_args(p)
    p.set_defaults(func=_cmd)
