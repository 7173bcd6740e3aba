"""`fluxrig scenario import|activate|list|active`: scenarios on the Mixer (its API).

`register_subcommands(scenario_subparsers)` is called by `fluxrig.cli.cmd_scenario` (which
owns `fluxrig scenario validate`) to add these under the same `scenario` command.
"""

from __future__ import annotations

import json
import sys

from .mixer_api import add_api_args, print_table, run_api_command

__all__ = ["register_subcommands"]

LIST_COLUMNS = [
    ("NAME", "name"),
    ("VERSION", "version"),
    ("ACTIVE", "active"),
    ("GEARS", "gears"),
    ("WIRES", "wires"),
    ("IMPORTED", "imported_at"),
]


def _print_problems(exc_detail) -> None:
    for p in (exc_detail or {}).get("problems", []) if isinstance(exc_detail, dict) else []:
        print(f"  {p['location']}: {p['message']}", file=sys.stderr)


def _import(client, args) -> int:
    from ..errors import MixerApiError

    try:
        with open(args.file, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        print(f"error: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    fmt = "toml" if args.file.endswith(".toml") else "yaml"
    try:
        out = client.post(
            "/api/v1/scenarios/import",
            text,
            {"dry_run": "true" if args.dry_run else None, "activate": "true" if args.activate else None, "format": fmt},
            f"application/{fmt}",
        )
    except MixerApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _print_problems(getattr(exc, "detail", None))
        return 2 if exc.status == 400 else (3 if exc.status == 0 else 1)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if args.dry_run:
        print(f"{args.file}: valid on the Mixer ({out.get('name')} {out.get('version')})")
        for w in out.get("warnings", []):
            print(f"  warning: {w['location']}: {w['message']}")
        return 0
    print(f"{out['status']}: {out['name']} {out['version']} ({out['gears']} gears, {out['wires']} wires)")
    for r in out.get("activated", []) or []:
        print(f"  reload sent to {r['rack']}: {', '.join(r['gears']) or '(no gears)'}")
    return 0


def _activate(client, args) -> int:
    out = client.post(f"/api/v1/scenarios/{args.scenario}/activate")
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"activated {out['name']} {out['version']}")
    for r in out.get("racks", []):
        print(f"  reload sent to {r['rack']}: {', '.join(r['gears']) or '(no gears)'}")
    if not out.get("racks"):
        print("  no active Rack yet; Racks receive it when approved")
    return 0


def _list(client, args) -> int:
    rows = client.get("/api/v1/scenarios", name=args.name)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print_table(rows, LIST_COLUMNS)
    return 0


def _active(client, args) -> int:
    out = client.get("/api/v1/scenarios/active")
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"active: {out['name']} {out['version']}")
    print_table(
        out["racks"],
        [
            ("RACK", "rack"),
            ("STATUS", "status"),
            ("TARGET", "target"),
            ("RUNNING", "version"),
            ("APPLY", "apply_state"),
            ("REASON", "reason"),
        ],
    )
    return 0


def _leaf(sub, name, help_, fn, description=None):
    p = sub.add_parser(name, help=help_, description=description or help_)
    add_api_args(p)
    p.set_defaults(func=lambda args: run_api_command(fn, args))
    return p


def register_subcommands(ssub) -> None:
    p = _leaf(
        ssub,
        "import",
        "upload a scenario to the Mixer (validated there with the Rack's validator)",
        _import,
        "Upload FILE (YAML, or TOML by extension) to the Mixer. It is validated, stored by content "
        "digest and versioned. --activate also sends each Rack its part.",
    )
    p.add_argument("file")
    p.add_argument("-n", "--dry-run", action="store_true", help="validate only, store nothing")
    p.add_argument("--activate", action="store_true", help="activate it right after the import")
    p = _leaf(
        ssub,
        "activate",
        "make a stored scenario the active one and signal every Rack to reload",
        _activate,
        "SCENARIO is a name (latest import), name@version, or a digest prefix.",
    )
    p.add_argument("scenario")
    p = _leaf(ssub, "list", "scenarios stored on the Mixer, newest first", _list)
    p.add_argument("--name", help="only versions of this scenario")
    _leaf(ssub, "active", "the active scenario and each Rack's apply state", _active)
