"""`fluxrig keys ...`: look at passports and keys without a Mixer.

`fluxrig keys inspect FILE` verifies a passport (`rack.flux`) against the pinned Mixer key
(the `FILE.pub` pin beside it, or `--pin HEX`) and prints it with every secret masked. Exit
code 0 when it verifies, 1 when it does not (the contents are still printed, marked
UNVERIFIED, so an operator can see what was presented), 2 when the file is not a passport.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys

from ..errors import FluxError, KeyFileError, PassportError
from ..passport import decode_unverified, masked_payload, parse_public_key, verify_passport

__all__ = ["register", "inspect_passport", "main"]


def _when(ts) -> str:
    try:
        return _dt.datetime.fromtimestamp(float(ts), _dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(ts)


def inspect_passport(path: str, pins: list[bytes], full: bool = False) -> tuple[dict, str | None]:
    """(masked payload, None if it verifies else the reason). Raises PassportError when the
    file is not a passport at all."""
    with open(path, "rb") as fh:
        data = fh.read()
    body = decode_unverified(data, path)
    problem = None
    try:
        verify_passport(data, pins, path=path, check_expiry=True)
    except PassportError as exc:
        problem = f"{exc.reason}: {exc}"
    shown = masked_payload(body)
    scenario = body.get("scenario")
    if isinstance(scenario, dict) and not full:
        gears = scenario.get("gears") or []
        names = [g.get("name") for g in gears if isinstance(g, dict)]
        shown["scenario"] = {
            "meta": scenario.get("meta"),
            "gears": names,
            "wires": len(scenario.get("wires") or []),
        }
    return shown, problem


def _pins_for(path: str, pin_args: list[str]) -> list[bytes]:
    if pin_args:
        return [parse_public_key(p) for p in pin_args]
    pin_file = path + ".pub"
    if os.path.exists(pin_file):
        with open(pin_file) as fh:
            return [parse_public_key(ln) for ln in fh if ln.strip() and not ln.startswith("#")]
    return []


def _cmd_inspect(args) -> int:
    try:
        pins = _pins_for(args.file, args.pin or [])
        shown, problem = inspect_passport(args.file, pins, full=args.full)
    except FileNotFoundError:
        print(f"error: {args.file} does not exist", file=sys.stderr)
        return 2
    except (PassportError, KeyFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pin_note = "pinned key" if pins else "key named in the passport (no pin found: trust on first use)"
    if args.json:
        print(json.dumps({"verified": problem is None, "problem": problem, "payload": shown}, indent=2, default=str))
        return 0 if problem is None else 1
    status = f"VERIFIED against the {pin_note}" if problem is None else f"UNVERIFIED ({problem})"
    print(f"passport  {args.file}")
    print(f"signature {status}")
    for key in ("rack_id", "rack_name", "status", "serial", "scenario_version", "mixer_name", "mixer_pub"):
        print(f"{key:<17} {shown.get(key)}")
    bus = shown.get("bus") or {}
    print(f"{'bus.user':<17} {bus.get('user')}")
    print(f"{'bus.password':<17} {bus.get('password')}")
    print(f"{'issued_at':<17} {_when(shown.get('issued_at'))}")
    print(f"{'expires_at':<17} {_when(shown.get('expires_at'))}")
    print("scenario          " + json.dumps(shown.get("scenario"), default=str, indent=None if not args.full else 2))
    return 0 if problem is None else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "keys",
        help="inspect passports and Mixer keys",
        description="Passport and key tools that work offline (no Mixer needed).",
    )
    sub = p.add_subparsers(dest="keys_command", metavar="COMMAND")
    sub.required = True
    ins = sub.add_parser(
        "inspect",
        help="verify and print a passport with secrets masked",
        description=(
            "Verify a passport file (e.g. data/rack.flux) against the pinned Mixer key and print "
            "it with the bus password masked. The pin is FILE.pub beside the passport unless "
            "--pin is given. Exit 0 = verifies, 1 = does not verify, 2 = not a passport."
        ),
    )
    ins.add_argument("file", help="passport file, e.g. ./data/rack.flux")
    ins.add_argument("--pin", action="append", metavar="HEX", help="Mixer public key to verify against (repeatable)")
    ins.add_argument("--full", action="store_true", help="print the whole scenario projection, not a summary")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.set_defaults(func=_cmd_inspect)


def main(argv=None) -> int:  # pragma: no cover - convenience for running the module alone
    parser = argparse.ArgumentParser(prog="fluxrig")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FluxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
