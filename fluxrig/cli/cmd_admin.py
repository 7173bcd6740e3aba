"""Operator commands against the Mixer API: `fluxrig admin racks ...`, `fluxrig logs`,
`fluxrig metrics`, `fluxrig admin topology`, and the kill switch: `fluxrig admin racks
kill|revive`, `fluxrig admin gears stop`, `fluxrig admin conn close`.

All of them take --api-url/--api-token (or FLUXRIG_API_URL/FLUXRIG_API_TOKEN) and --json.
Destructive actions (suspend, rename, remove, shutdown, kill, gear stop, connection close) ask for
confirmation unless -f/--force; an answer other than y/yes, or end of input, means no. Exit
codes: 0 done, 1 refused by the Mixer or by the Rack (message printed), 3 Mixer unreachable,
4 not confirmed, 5 kill switch command sent but the Rack did not confirm it in time.
"""

from __future__ import annotations

import json
import sys
from urllib.parse import quote

from ..textsafe import escape_text
from ..wire import subjects as S
from ..wire.vocab import ApplyState, LogLevel
from .mixer_api import add_api_args, print_table, run_api_command

__all__ = ["register"]

RACK_COLUMNS = [
    ("NAME", "name"),
    ("STATUS", "status"),
    ("SCENARIO", "scenario.version"),
    ("APPLY", "scenario.apply_state"),
    ("KILLED", "stats.ctrl.killed"),
    ("HOST", "host"),
    ("VERSION", "version"),
    ("LAST SEEN", "last_seen"),
    ("ID", "id"),
]


def _emit(args, data, columns=None) -> int:
    if args.json or columns is None:
        print(json.dumps(data, indent=2, default=str))
    else:
        print_table(data if isinstance(data, list) else [data], columns)
    return 0


def _confirm(args, action: str, rack: str, what: str = "") -> bool:
    if getattr(args, "force", False):
        return True
    try:
        answer = input(f"{action} {what + ' on ' if what else ''}rack {rack}? [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def _racks_list(client, args) -> int:
    rows = client.get("/api/v1/racks", status=args.status, include_removed="true" if args.all else None)
    return _emit(args, rows, RACK_COLUMNS)


def _racks_show(client, args) -> int:
    rack = client.get(f"/api/v1/racks/{args.rack}")
    if args.json:
        return _emit(args, rack)
    for key in ("name", "id", "status", "status_since", "host", "version", "bus_user", "first_seen", "last_seen"):
        print(f"{key:<13} {escape_text(rack.get(key))}")
    s = rack.get("scenario") or {}
    print(
        f"{'scenario':<13} {s.get('version') or '-'} ({s.get('apply_state')}{': ' + s['reason'] if s.get('reason') else ''})"
        f"{'; target ' + s['target'] if s.get('target') and s.get('target') != s.get('version') else ''}"
    )
    ks = (rack.get("stats") or {}).get("ctrl") or {}
    if ks:
        state = f"KILLED since {ks.get('since')}: {ks.get('reason') or '-'}" if ks.get("killed") else "not killed"
        stopped = f"; stopped gears {', '.join(ks['stopped_gears'])}" if ks.get("stopped_gears") else ""
        print(
            f"{'kill switch':<13} {state}{stopped} ({ks.get('accepted', 0)} accepted, "
            f"{ks.get('refused', 0)} refused {ks.get('refused_by') or ''}; kill-state serial {ks.get('serial', '-')})"
        )
        _print_time_state(ks)
    print("events:")
    print_table(
        rack.get("events") or [],
        [("TIME", "ts"), ("EVENT", "event"), ("FROM", "from"), ("TO", "to"), ("DETAIL", "detail")],
    )
    return 0


def _print_time_state(ks: dict) -> None:
    """The Rack's clock (whose time it judges commands by) and its passport's standing in time."""
    clock = ks.get("clock") or {}
    if clock:
        offset = clock.get("offset_s")
        detail = f"offset {offset:+.1f}s, error {clock.get('error_s')}s" if offset is not None else "not synced"
        print(f"{'clock':<13} {clock.get('source')} ({detail}; {clock.get('refused', 0)} time stamps refused)")
    p = ks.get("passport") or {}
    if p:
        left = p.get("expires_in_s")
        when = f", expires in {left / 86400:.1f} days" if isinstance(left, (int, float)) else ""
        print(f"{'passport':<13} serial {p.get('serial')}: {p.get('state')} by the {p.get('clock')} clock{when}")


def _action(verb: str, confirm: bool):
    def run(client, args) -> int:
        if verb == "rename" and (not S.RACK_NAME_RE.match(args.name) or len(args.name) > S.MAX_RACK_NAME):
            print(f"--name: invalid rack name {args.name!r}: use 1-{S.MAX_RACK_NAME} of a-z, 0-9, _ and -",
                  file=sys.stderr)  # fmt: skip
            return 2
        shown = f"{args.rack} to {args.name}" if verb == "rename" else args.rack
        if confirm and not _confirm(args, verb, shown):
            print("not confirmed; nothing done", file=sys.stderr)
            return 4
        if verb == "remove":
            out = client.delete(f"/api/v1/racks/{args.rack}")
        elif verb == "approve":
            out = client.post(f"/api/v1/racks/{args.rack}/approve", {"name": args.name} if args.name else {})
        elif verb == "rename":
            out = client.post(f"/api/v1/racks/{args.rack}/rename", {"name": args.name})
        elif verb == "shutdown":
            out = client.post(f"/api/v1/racks/{args.rack}/shutdown", {"reason": args.reason})
        elif verb == "log-level":
            out = client.post(f"/api/v1/racks/{args.rack}/log-level", {"level": args.level})
        else:
            out = client.post(f"/api/v1/racks/{args.rack}/{verb}")
        if args.json:
            return _emit(args, out)
        if "status" in out and "name" in out:
            print(f"rack {out['name']}: {out['status']}")
        else:
            print(json.dumps(out))
        return 0

    return run


EXIT_UNCONFIRMED = 5


def _command(verb: str, confirm: bool):
    """A kill switch command: the Mixer signs and sends it, then waits for the Rack's word."""

    def run(client, args) -> int:
        what = {"stop": f"gear {getattr(args, 'gear', '')}", "close": f"connection {getattr(args, 'conn_id', '')}"}
        if confirm and not _confirm(args, verb, args.rack, what.get(verb, "")):
            print("not confirmed; nothing done", file=sys.stderr)
            return 4
        body = {"reason": args.reason, "ttl": args.ttl, "wait": args.wait}
        rack = quote(args.rack, safe="")
        if verb == "stop":
            path = f"/api/v1/racks/{rack}/gears/{quote(args.gear, safe='')}/stop"
        elif verb == "close":
            path = f"/api/v1/racks/{rack}/connections/{quote(args.conn_id, safe='')}/close"
            body["gear"] = args.gear or ""
        else:
            path = f"/api/v1/racks/{rack}/{verb}"
        out = client.post(path, body)
        status = out.get("status")
        if args.json:
            _emit(args, out)
        else:
            cmd = out.get("command") or {}
            detail = (out.get("outcome") or {}).get("detail", "")
            if status == "sent":
                print(
                    f"rack {out.get('rack')}: {cmd.get('cmd')} sent, not confirmed within {args.wait:g}s "
                    f"(the Rack may be offline; the command stays valid for {args.ttl:g}s)"
                )
            else:
                print(f"rack {out.get('rack')}: {cmd.get('cmd')} {status}: {detail}")
        if status == ApplyState.APPLIED:
            return 0
        return EXIT_UNCONFIRMED if status == "sent" else 1

    return run


def _command_args(p, confirm: bool) -> None:
    p.add_argument("--reason", default="operator request", help="why (logged by the Rack, kept in the audit trail)")
    p.add_argument(
        "--ttl",
        type=float,
        default=60.0,
        help="seconds the signed command stays valid (default 60, at most 600): a Rack whose clock "
        "is ahead of the Mixer's by more refuses it as expired",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=5.0,
        help="seconds to wait for the Rack to confirm (default 5; 0 = send and return)",
    )
    if confirm:
        p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")


def _topology(client, args) -> int:
    topo = client.get("/api/v1/topology")
    if args.json:
        return _emit(args, topo)
    act = topo.get("active_scenario")
    print(f"mixer    {topo['mixer']['name']} {topo['mixer']['version']}  key {topo['mixer']['public_key']}")
    print(f"snake    {topo['snake']['url']}  running={topo['snake']['running']} restarts={topo['snake']['restarts']}")
    print(f"scenario {act['name'] + ' ' + act['version'] if act else '(none active)'}")
    print_table(
        topo["racks"], [("RACK", "name"), ("STATUS", "status"), ("APPLY", "scenario.apply_state"), ("GEARS", "gears")]
    )
    return 0


def _logs(client, args) -> int:
    rows = client.get(
        "/api/v1/telemetry/logs",
        since=args.since,
        until=args.until,
        rack=args.rack,
        min_level=args.min_level,
        q=args.query,
        limit=args.limit,
    )
    if args.json:
        return _emit(args, rows)
    for r in reversed(rows):  # oldest first, like a log file
        # One record, one line: a newline or ESC in a Rack's log body is shown escaped.
        level = escape_text(r.get("level") or r.get("severity"))
        print(
            f"{escape_text(r['timestamp'])} {escape_text(r['rack']):<12} {level:<5} {escape_text(r.get('body') or '')}"
        )
    if not rows:
        print("(no log records in the window; widen it with --since 7d)", file=sys.stderr)
    return 0


def _metrics(client, args) -> int:
    rows = client.get(
        "/api/v1/telemetry/metrics",
        name=args.name,
        rack=args.rack,
        since=args.since,
        until=args.until,
        bucket=args.bucket,
        limit=args.limit,
    )
    if args.json:
        return _emit(args, rows)
    if args.bucket:
        cols = [
            ("BUCKET", "bucket"),
            ("RACK", "rack"),
            ("NAME", "name"),
            ("COUNT", "count"),
            ("AVG", "avg"),
            ("MIN", "min"),
            ("MAX", "max"),
            ("LAST", "last"),
        ]
    else:
        cols = [
            ("TIME", "timestamp"),
            ("RACK", "rack"),
            ("NAME", "name"),
            ("TYPE", "type"),
            ("VALUE", "value"),
            ("UNIT", "unit"),
        ]
    print_table(rows, cols)
    return 0


def _leaf(sub, name, help_, fn, description=None):
    p = sub.add_parser(name, help=help_, description=description or help_)
    add_api_args(p)
    p.set_defaults(func=lambda args: run_api_command(fn, args))
    return p


def register(subparsers) -> None:
    admin = subparsers.add_parser(
        "admin",
        help="manage Racks through the Mixer API",
        description="Fleet administration through the Mixer control API (default http://127.0.0.1:8090).",
    )
    asub = admin.add_subparsers(dest="admin_command", metavar="SUBCOMMAND")
    admin.set_defaults(func=lambda a: (admin.print_help(), 2)[1])
    racks = asub.add_parser(
        "racks",
        help="list, approve, suspend, activate, rename, remove, shut down, kill, revive Racks",
        description="Rack registry operations. RACK is a rack name or id.",
    )
    rsub = racks.add_subparsers(dest="racks_command", metavar="ACTION")
    racks.set_defaults(func=lambda a: (racks.print_help(), 2)[1])

    p = _leaf(rsub, "list", "list Racks with status, scenario version and apply state", _racks_list)
    p.add_argument("--status", help="only this status (pending, active, offline, suspended, removed)")
    p.add_argument("--all", action="store_true", help="include removed Racks")
    p = _leaf(rsub, "show", "one Rack with its status history", _racks_show)
    p.add_argument("rack")
    p = _leaf(
        rsub,
        "approve",
        "approve a pending Rack (it becomes active and receives the active scenario)",
        _action("approve", False),
    )
    p.add_argument("rack")
    p.add_argument("--name", help="rename the Rack on approval")
    p = _leaf(
        rsub,
        "rename",
        "rename a Rack (pending, active, offline or suspended; its status stays)",
        _action("rename", True),
        "Rename a Rack. It gets a new signed passport with the new name and reconnects under it; a Rack "
        "offline now learns it when it comes back. Messages it queued in its guaranteed-lane WAL under the "
        "old name are sent under the new one. Scenarios place gears by Rack name: activate a scenario "
        "version that names the new name (the Rack keeps running what it runs until then). "
        "Example: fluxrig admin racks rename edge --name edge-2. Exit 1 when the name is invalid "
        "(a-z, 0-9, _ and -, at most 63), taken by another Rack, or the Rack is removed.",
    )
    p.add_argument("rack", help="rack name or id")
    p.add_argument("--name", required=True, help="the new name (a-z, 0-9, _ and -, at most 63)")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    for verb, help_, confirm in (
        ("suspend", "suspend a Rack: it keeps only heartbeat rights until activated", True),
        ("activate", "re-activate a suspended Rack", False),
        (
            "remove",
            "remove a Rack: its identity is denied for good (it stays out; a new Rack of that name is a new identity)",
            True,
        ),
        ("shutdown", "ask a Rack to drain and exit", True),
    ):
        p = _leaf(rsub, verb, help_, _action(verb, confirm))
        p.add_argument("rack")
        if confirm:
            p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
        if verb == "shutdown":
            p.add_argument("--reason", default="operator request", help="reason logged by the Rack")
    p = _leaf(rsub, "log-level", "change a Rack's log level at runtime", _action("log-level", False))
    p.add_argument("rack")
    p.add_argument("level", choices=[str(v) for v in LogLevel])
    p = _leaf(
        rsub,
        "kill",
        "kill switch: stop every gear of a Rack now and refuse new traffic, until revived",
        _command("kill", True),
        "Kill switch for a whole Rack. The Mixer signs the command; the Rack stops every gear (connections "
        "and listeners closed), runs none until revived, also across restarts, and keeps reporting. "
        "Exit 0 when the Rack confirmed, 1 when it refused, 5 when it did not answer in time.",
    )
    p.add_argument("rack", help="rack name or id")
    _command_args(p, True)
    p = _leaf(
        rsub, "revive", "undo a kill (and gear stops): the Rack runs its scenario again", _command("revive", False)
    )
    p.add_argument("rack", help="rack name or id")
    _command_args(p, False)

    gears = asub.add_parser("gears", help="kill switch for one gear", description="Gear operations on one Rack.")
    gsub = gears.add_subparsers(dest="gears_command", metavar="ACTION")
    gears.set_defaults(func=lambda a: (gears.print_help(), 2)[1])
    p = _leaf(
        gsub,
        "stop",
        "stop one gear of a Rack now (until `racks revive` or a Rack restart)",
        _command("stop", True),
        "Stop one gear: its sockets and connections close, messages to it are dropped and counted. It "
        "stays stopped across scenario reloads until `fluxrig admin racks revive RACK` or a Rack restart.",
    )
    p.add_argument("rack", help="rack name or id")
    p.add_argument("gear", help="gear name as in the scenario")
    _command_args(p, True)

    conn = asub.add_parser("conn", help="kill switch for one connection", description="Connection operations.")
    csub = conn.add_subparsers(dest="conn_command", metavar="ACTION")
    conn.set_defaults(func=lambda a: (conn.print_help(), 2)[1])
    p = _leaf(
        csub,
        "close",
        "close one connection on a Rack (its conn.id, as in logs and message metadata)",
        _command("close", True),
        "Close one TCP connection or serial link by its conn.id (meta conn.id of its messages, also in "
        "the Rack's logs). The peer may reconnect; to refuse it, stop the gear.",
    )
    p.add_argument("rack", help="rack name or id")
    p.add_argument("conn_id", help="the connection's conn.id")
    p.add_argument("--gear", help="the gear holding it (meta conn.gear); default: ask every gear")
    _command_args(p, True)
    _leaf(asub, "topology", "Mixer, Snake, active scenario and where each gear runs", _topology)

    logs = _leaf(
        subparsers,
        "logs",
        "query Rack logs stored by the Mixer",
        _logs,
        "Logs from DuckDB on the Mixer, oldest first. Times: ISO 8601 or a look-back like 15m, 24h, 7d.",
    )
    logs.add_argument("--rack", help="only this Rack")
    logs.add_argument("--since", help="start of the window (default 24h)")
    logs.add_argument("--until", help="end of the window")
    logs.add_argument("--min-level", help="threshold: trace, debug, info, warn, error, fatal")
    logs.add_argument("-q", "--query", help="case-insensitive text search in body and attributes")
    logs.add_argument("--limit", type=int, default=50, help="most recent N records (default 50)")

    met = _leaf(
        subparsers,
        "metrics",
        "query Rack metrics stored by the Mixer",
        _metrics,
        "Metrics from DuckDB on the Mixer, newest first; --bucket 1m aggregates per minute.",
    )
    met.add_argument("--name", help="metric name, or a prefix ending in *")
    met.add_argument("--rack", help="only this Rack")
    met.add_argument("--since", help="start of the window (default 24h)")
    met.add_argument("--until", help="end of the window")
    met.add_argument("--bucket", help="aggregate per time bucket, e.g. 10s, 1m, 1h")
    met.add_argument("--limit", type=int, default=50, help="at most N rows (default 50)")
