"""`fluxrig check`: pre-flight checks an operator runs before starting the service.

Exit codes (the service units' RestartPreventExitStatus=2 depends on them): 0 all pass; 2 the
input is wrong (the configuration or the scenario: fixing a file is the only cure, restarting
is not); 1 the host is not ready (a port taken, the state directory not writable: may clear).
No input, however malformed, ends in a traceback."""

from __future__ import annotations

import os
import socket
import tempfile

from ..config import load_config
from ..errors import FluxError
from ..net.tcp import parse_hostport
from ..textsafe import escape_text

__all__ = ["register", "run"]


def register(sub) -> None:
    p = sub.add_parser(
        "check",
        help="pre-flight: config, scenario, listening ports free, state dir writable",
        description="Check what `fluxrig run` needs: the configuration parses, the scenario is valid, every "
        "server port it binds is free, the state directory is writable. Exit 0 when all pass, "
        "2 when the configuration or the scenario is wrong, 1 when only the host is not ready (a port "
        "taken, the state directory not writable); every failure is named.",
    )
    p.add_argument("-c", "--config", metavar="FILE", help="fluxrig.toml to check")
    p.add_argument("-s", "--scenario", metavar="FILE", help="scenario to check (else base.scenario)")
    p.set_defaults(func=run)


def _port_free(addr: str) -> str | None:
    host, port = parse_hostport(addr, "0.0.0.0")
    if port == 0:
        return None
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
    except OSError as exc:
        return f"{addr}: cannot bind ({exc.strerror})"
    finally:
        s.close()
    return None


def run(args) -> int:
    failures: list[str] = []
    ok: list[str] = []
    bad_input = False
    try:
        cfg = load_config(args.config)
        ok.append(f"config {args.config or '(defaults + environment)'}")
    except FluxError as exc:
        print(f"FAIL config: {escape_text(str(exc))}")
        return 2
    path = args.scenario or cfg.base.scenario
    if path:
        from ..scenario import load_scenario

        try:
            scenario = load_scenario(path)
            ok.append(f"scenario {path} ({len(scenario.gears)} gears)")
            for g in scenario.gears:
                if g.config.get("mode") == "server" and isinstance(g.config.get("bind"), str):
                    problem = _port_free(g.config["bind"])
                    if problem:
                        failures.append(f"port of gear {g.name}: {problem}")
                    else:
                        ok.append(f"port {g.config['bind']} free (gear {g.name})")
        except FluxError as exc:
            bad_input = True
            failures.append(f"scenario: {exc}")
    else:
        bad_input = True
        failures.append("scenario: none given (--scenario or base.scenario)")
    state = cfg.base.state_dir
    try:
        os.makedirs(state, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=state, prefix=".check-"):
            pass
        ok.append(f"state dir {state} writable")
    except OSError as exc:
        failures.append(f"state dir {state}: not writable ({exc.strerror})")
    for line in ok:
        print(f"ok   {line}")
    for line in failures:
        print(f"FAIL {escape_text(line)}")
    if bad_input:
        return 2
    return 1 if failures else 0
