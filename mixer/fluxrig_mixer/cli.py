"""`fluxrig-mixer`: run the control plane and its helpers.

    fluxrig-mixer serve -c fluxrig-mixer.toml [--auto-adopt] [--scenario FILE]
    fluxrig-mixer up [-c FILE] [--api-port N] [--snake-port N] [--echo-port N] [--iso-port N] [--no-rack]
    fluxrig-mixer certs init [-c FILE] [--host NAME ...] [--client NAME ...] [--force]
    fluxrig-mixer config defaults | check -c FILE
    fluxrig-mixer version

`main(argv=None) -> int`: 0 ok, 1 runtime failure, 2 configuration error (named key).
Without `-c`, `FLUXRIG_MIXER_CONFIG` or `./fluxrig-mixer.toml` is used when present, else
the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from fluxrig.errors import ConfigError, FluxError

from ._version import __version__
from .config import DEFAULT_CONFIG_NAME, defaults_toml, load_config

__all__ = ["main", "build_parser"]


def _config_path(arg: str | None) -> str | None:
    if arg:
        return arg
    env = os.environ.get("FLUXRIG_MIXER_CONFIG")
    if env:
        return env
    return DEFAULT_CONFIG_NAME if os.path.exists(DEFAULT_CONFIG_NAME) else None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_serve(args) -> int:
    overrides = {}
    if args.auto_adopt:
        overrides["enrollment.auto_adopt"] = True
    if args.api_port is not None:
        overrides["api.port"] = args.api_port
    if args.snake_port is not None:
        overrides["snake.port"] = args.snake_port
    if args.state_dir:
        overrides["base.state_dir"] = args.state_dir
    cfg = load_config(_config_path(args.config), overrides=overrides)
    _setup_logging(cfg.logging.level)
    if cfg.enrollment.auto_adopt:
        logging.getLogger("fluxrig.mixer").warning("auto-adopt is on: every Rack with the bootstrap token becomes active")
    from .app import Mixer

    async def run() -> int:
        return await Mixer(cfg).run(startup_scenario=args.scenario)

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 130


def _cmd_certs_init(args) -> int:
    from .certs import init_certs, issue_client_cert

    cfg = load_config(_config_path(args.config))
    cert_dir = args.dir or os.path.join(cfg.base.state_dir, "certs")
    hosts = list(args.host or [])
    if cfg.snake.advertise_host:
        hosts.append(cfg.snake.advertise_host)
    paths = init_certs(cert_dir, hosts, force=args.force, cluster_name=cfg.base.name)
    print(f"CA and server certificate written to {cert_dir}")
    for name in args.client or []:
        c = issue_client_cert(cert_dir, name, force=args.force)
        print(f"client certificate {c['cert_file']} (key {c['key_file']})")
    print("\nAdd to fluxrig-mixer.toml:\n  [snake]")
    print(f'  tls_cert_file = "{os.path.abspath(paths["cert_file"])}"')
    print(f'  tls_key_file = "{os.path.abspath(paths["key_file"])}"')
    if args.client:
        print(f'  tls_ca_file = "{os.path.abspath(paths["ca_file"])}"\n  tls_verify = true')
    print("\nAnd on each Rack (fluxrig.toml), with a tls:// snake.url:\n  [snake]")
    print(f'  root_ca_file = "{os.path.abspath(paths["ca_file"])}"')
    return 0


def _cmd_config_defaults(args) -> int:
    sys.stdout.write(defaults_toml())
    return 0


def _cmd_config_check(args) -> int:
    cfg = load_config(_config_path(args.config))
    print(json.dumps(cfg.as_dict(redact=True), indent=2))
    return 0


def _cmd_version(args) -> int:
    print(f"fluxrig-mixer {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fluxrig-mixer",
        description="fluxrig Mixer: registry, enrollment, signed passports, scenario distribution, "
        "telemetry in DuckDB and the control API, around a supervised nats-server (the Snake).",
        epilog="Try it with `fluxrig-mixer up` (a Mixer plus a local Rack with demo scenarios); run a hub with "
        "`fluxrig-mixer serve`, whose first start prints the bootstrap token for Racks.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the Mixer (Snake, registry, API) until Ctrl-C / SIGTERM",
                       description="Run the Mixer. State (registry, keys, tokens, bus store) lives in base.state_dir.")
    s.add_argument("-c", "--config", help=f"configuration file (default: $FLUXRIG_MIXER_CONFIG or ./{DEFAULT_CONFIG_NAME})")
    s.add_argument("--auto-adopt", action="store_true", help="new Racks with the bootstrap token become active at once")
    s.add_argument("--state-dir", help="override base.state_dir")
    s.add_argument("--api-port", type=int, help="override api.port")
    s.add_argument("--snake-port", type=int, help="override snake.port")
    s.add_argument("-s", "--scenario", help="import and activate this scenario file at start")
    s.set_defaults(func=_cmd_serve)

    c = sub.add_parser("certs", help="TLS certificates for the Snake", description="Create the cluster CA and certificates.")
    csub = c.add_subparsers(dest="certs_command", metavar="SUBCOMMAND")
    ci = csub.add_parser("init", help="create a CA and a server certificate (and client certs)",
                         description="Create <state_dir>/certs/{ca,server}.pem with cryptography; prints the config lines to add.")
    ci.add_argument("-c", "--config", help="configuration file (for base.state_dir and snake.advertise_host)")
    ci.add_argument("--dir", help="output directory (default <state_dir>/certs)")
    ci.add_argument("--host", action="append", help="extra DNS name or IP for the server certificate (repeatable)")
    ci.add_argument("--client", action="append", help="also issue a client certificate with this name (repeatable)")
    ci.add_argument("--force", action="store_true", help="issue a new server certificate even if one exists (keeps the CA)")
    ci.set_defaults(func=_cmd_certs_init)
    c.set_defaults(func=lambda a: (c.print_help(), 2)[1])

    g = sub.add_parser("config", help="print default or effective configuration", description="Configuration helpers.")
    gsub = g.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    gd = gsub.add_parser("defaults", help="print a fluxrig-mixer.toml with every key at its default")
    gd.set_defaults(func=_cmd_config_defaults)
    gc = gsub.add_parser("check", help="validate a configuration file and print the effective values (secrets masked)")
    gc.add_argument("-c", "--config", help="configuration file")
    gc.set_defaults(func=_cmd_config_check)
    g.set_defaults(func=lambda a: (g.print_help(), 2)[1])

    from .up import register as register_up

    register_up(sub)

    v = sub.add_parser("version", help="print the version")
    v.set_defaults(func=_cmd_version)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except FluxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
