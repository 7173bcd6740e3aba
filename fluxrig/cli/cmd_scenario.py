"""`fluxrig scenario validate FILE` (and the Mixer-facing import/activate/list, when present)."""

from __future__ import annotations

import importlib
import json
import sys

from ..errors import ScenarioError

__all__ = ["register", "validate"]


def register(sub) -> None:
    p = sub.add_parser(
        "scenario",
        help="validate scenarios; import/activate them on a Mixer",
        description="Scenario tools. `validate` checks a file locally and lists every problem.",
    )
    ssub = p.add_subparsers(dest="scenario_command", metavar="SUBCOMMAND")
    v = ssub.add_parser(
        "validate",
        help="check a scenario file; exit 0 when valid, 2 with every problem listed",
        description="Validate a scenario (YAML, or TOML by extension) exactly as the Rack would before running it: "
        "meta.version, names, gear types, gear config against each gear's schema, endpoints and ports. "
        "${NAME} and ${NAME:-default} are expanded from the environment.",
    )
    v.add_argument("file", help="scenario file")
    v.add_argument("--json", action="store_true", help="print problems as JSON")
    v.set_defaults(func=validate)
    try:  # import/activate/list talk to the Mixer API; see cmd_scenario_api
        api = importlib.import_module("fluxrig.cli.cmd_scenario_api")
    except ModuleNotFoundError as exc:
        if exc.name != "fluxrig.cli.cmd_scenario_api":
            raise
    else:
        api.register_subcommands(ssub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def validate(args) -> int:
    from ..scenario import load_scenario

    try:
        scenario = load_scenario(args.file)
    except ScenarioError as exc:
        if args.json:
            print(
                json.dumps(
                    {"valid": False, "problems": [{"location": p.location, "message": p.message} for p in exc.problems]}
                )
            )
        else:
            print(f"{args.file}: {len(exc.problems)} problem(s)", file=sys.stderr)
            for p in exc.problems:
                print(f"  {p.location}: {p.message}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "valid": True,
                    "name": scenario.name,
                    "version": scenario.version,
                    "gears": len(scenario.gears),
                    "wires": len(scenario.wires),
                }
            )
        )
    else:
        print(
            f"{args.file}: valid ({scenario.name or '-'} {scenario.version}: "
            f"{len(scenario.gears)} gears, {len(scenario.wires)} wires)"
        )
    return 0
