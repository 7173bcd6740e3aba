"""`fluxrig-mixer`: run the control plane and its helpers.

    fluxrig-mixer serve -c fluxrig-mixer.toml [--auto-adopt] [--scenario FILE]
    fluxrig-mixer up [-c FILE] [--api-port N] [--snake-port N] [--echo-port N] [--iso-port N] [--no-rack]
    fluxrig-mixer certs init [-c FILE] [--host NAME ...] [--client NAME ...] [--force] [--offline-ca --ca-key-out PATH]
    fluxrig-mixer tokens create [--uses N] [--ttl D] [--labels k=v] [--name RACK] [--bundle FILE] | list | revoke ID
    fluxrig-mixer config defaults | check -c FILE
    fluxrig-mixer version
    fluxrig-mixer healthcheck [-c FILE] [--url URL] [--timeout 3s] [--json]

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
from .config import DEFAULT_CONFIG_NAME, config_path, defaults_toml, load_config, setup_logging
from .healthcheck import register as register_healthcheck
from .up import register as register_up

__all__ = ["main", "build_parser"]


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
    cfg = load_config(config_path(args.config), overrides=overrides)
    setup_logging(cfg.logging.level)
    if cfg.enrollment.auto_adopt:
        logging.getLogger("fluxrig.mixer").warning(
            "auto-adopt is on: every Rack with a valid enrollment token becomes active"
        )
    from .app import Mixer

    async def run() -> int:
        return await Mixer(cfg).run(startup_scenario=args.scenario)

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 130


def _cmd_certs_init(args) -> int:
    from .certs import ca_fingerprint, init_certs, issue_client_cert

    cfg = load_config(config_path(args.config))
    cert_dir = args.dir or os.path.join(cfg.base.state_dir, "certs")
    hosts = list(args.host or [])
    if cfg.snake.advertise_host:
        hosts.append(cfg.snake.advertise_host)
    if args.offline_ca and not args.ca_key_out:
        raise ConfigError("--offline-ca needs --ca-key-out PATH (outside the state dir)", "--ca-key-out")
    paths = init_certs(
        cert_dir,
        hosts,
        force=args.force,
        cluster_name=cfg.base.name,
        ca_key=args.ca_key,
        offline_ca_key_out=args.ca_key_out if args.offline_ca else None,
    )
    print(f"CA, server certificate and the Mixer's client certificate written to {cert_dir}")
    for name in args.client or []:
        c = issue_client_cert(cert_dir, name, force=args.force, ca_key=args.ca_key or (args.ca_key_out or None))
        print(f"client certificate {c['cert_file']} (key {c['key_file']})")
    with open(paths["ca_file"], encoding="ascii") as fh:
        print(f"CA SHA-256 {ca_fingerprint(fh.read())}")
    if args.offline_ca:
        print(
            f"\nOFFLINE CA: the CA key is in {paths['ca_key_file']} and NOT in {cert_dir}. Move it off this host "
            "(removable medium, vault). Bring it back with --ca-key PATH to renew the server certificate or "
            "issue client certificates."
        )
    print(
        "\n`serve` and `up` use these files by default (TLS is on unless snake.insecure_plaintext); Racks get "
        "the CA through their enrollment bundle (`fluxrig-mixer tokens create`)."
    )
    return 0


def _cmd_tokens_create(args) -> int:
    from fluxrig.fileutil import write_private_atomic

    from .tokens import TokenStore, offline_bundle, parse_labels

    cfg = load_config(config_path(args.config))
    os.makedirs(cfg.base.state_dir, mode=0o700, exist_ok=True)
    labels = parse_labels(args.labels)
    token, rec = TokenStore(cfg.base.state_dir).create(
        uses=args.uses, ttl=args.ttl, labels=labels, rack_name=args.name or ""
    )
    bundle = offline_bundle(cfg, token, args.url)
    uses = f"{rec['uses_left']} use(s)" if rec["uses_left"] else "unlimited uses"
    expiry = f", expires in {args.ttl:g}s" if args.ttl else ""
    if args.bundle:
        write_private_atomic(os.path.abspath(args.bundle), (bundle + "\n").encode())
        print(f"token {rec['id']} ({uses}{expiry}): enrollment bundle written to {args.bundle} (mode 0600)")
        print(f'On the Rack: [snake] enrollment_bundle = "/path/to/{os.path.basename(args.bundle)}"')
    else:
        # stdout only (never argv or a log): `tokens create > rack.bundle` keeps it in a file.
        print(f"token {rec['id']} ({uses}{expiry}); the bundle is on stdout", file=sys.stderr)
        print(bundle)
    return 0


def _cmd_tokens_list(args) -> int:
    from .tokens import TokenStore

    cfg = load_config(config_path(args.config))
    rows = TokenStore(cfg.base.state_dir).list()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'ID':<14} {'STATE':<8} {'USES':>5} {'LEFT':>9} {'EXPIRES':<20} {'RACK':<16} LABELS")
    for r in rows:
        exp = "-" if r["expires_at"] is None else _iso(r["expires_at"])
        left = "unlimited" if r["uses_left"] is None else str(r["uses_left"])
        labels = ",".join(f"{k}={v}" for k, v in r["labels"].items()) or "-"
        print(f"{r['id']:<14} {r['state']:<8} {r['uses']:>5} {left:>9} {exp:<20} {r['rack_name'] or '-':<16} {labels}")
    return 0


def _iso(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cmd_tokens_revoke(args) -> int:
    from .tokens import TokenStore

    cfg = load_config(config_path(args.config))
    rec = TokenStore(cfg.base.state_dir).revoke(args.id)
    print(f"token {rec['id']} revoked (used {rec['uses']} time(s)); Racks it enrolled stay enrolled")
    return 0


def _duration_arg(text: str) -> float:
    from fluxrig.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_config_defaults(args) -> int:
    sys.stdout.write(defaults_toml())
    return 0


def _cmd_config_check(args) -> int:
    cfg = load_config(config_path(args.config))
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
    p.add_argument("--version", action="version", version=f"fluxrig-mixer {__version__}", help="print the version")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="run the Mixer (Snake, registry, API) until Ctrl-C / SIGTERM",
        description="Run the Mixer. State (registry, keys, tokens, bus store) lives in base.state_dir.",
    )
    s.add_argument(
        "-c", "--config", help=f"configuration file (default: $FLUXRIG_MIXER_CONFIG or ./{DEFAULT_CONFIG_NAME})"
    )
    s.add_argument("--auto-adopt", action="store_true", help="new Racks with the bootstrap token become active at once")
    s.add_argument("--state-dir", help="override base.state_dir")
    s.add_argument("--api-port", type=int, help="override api.port")
    s.add_argument("--snake-port", type=int, help="override snake.port")
    s.add_argument("-s", "--scenario", help="import and activate this scenario file at start")
    s.set_defaults(func=_cmd_serve)

    c = sub.add_parser(
        "certs", help="TLS certificates for the Snake", description="Create the cluster CA and certificates."
    )
    csub = c.add_subparsers(dest="certs_command", metavar="SUBCOMMAND")
    ci = csub.add_parser(
        "init",
        help="create a CA and a server certificate (and client certs)",
        description="Create <state_dir>/certs/{ca,server}.pem with cryptography; prints the config lines to add.",
    )
    ci.add_argument("-c", "--config", help="configuration file (for base.state_dir and snake.advertise_host)")
    ci.add_argument("--dir", help="output directory (default <state_dir>/certs)")
    ci.add_argument("--host", action="append", help="extra DNS name or IP for the server certificate (repeatable)")
    ci.add_argument(
        "--client", action="append", help="also issue a client certificate with this name (repeatable; for mTLS)"
    )
    ci.add_argument(
        "--force", action="store_true", help="issue a new server certificate even if one exists (keeps the CA)"
    )
    ci.add_argument(
        "--offline-ca",
        action="store_true",
        help="keep the CA key off the hub: write it to --ca-key-out and leave none in the state dir",
    )
    ci.add_argument("--ca-key-out", metavar="PATH", help="where --offline-ca writes the CA key (outside the state dir)")
    ci.add_argument("--ca-key", metavar="PATH", help="the offline CA key, brought back to issue certificates")
    ci.set_defaults(func=_cmd_certs_init)
    c.set_defaults(func=lambda a: (c.print_help(), 2)[1])

    t = sub.add_parser(
        "tokens",
        help="enrollment tokens: create (with a bundle), list, revoke",
        description="Enrollment tokens admit new Racks. Stored hashed in <state_dir>/enroll-tokens.json; "
        "works whether or not the Mixer runs. A token is handed to a Rack inside an enrollment bundle "
        "(Snake URLs, CA, Mixer key, token): one file, or one string.",
    )
    tsub = t.add_subparsers(dest="tokens_command", metavar="SUBCOMMAND")
    tc = tsub.add_parser(
        "create",
        help="create a token and print/write its enrollment bundle",
        description="Create a token and its enrollment bundle. Labels and the Rack name come from the token "
        "(a Rack's Hello cannot choose them).",
        epilog="Example: fluxrig-mixer tokens create --uses 1 --ttl 24h --labels site=lab,zone=a --name gw-1 "
        "--bundle gw-1.bundle",
    )
    tc.add_argument("-c", "--config", help="fluxrig-mixer.toml (for base.state_dir and the Snake's address)")
    tc.add_argument("--uses", type=int, default=1, help="how many Racks it may enroll (default 1; 0 = unlimited)")
    tc.add_argument("--ttl", type=_duration_arg, metavar="DURATION", help="validity, e.g. 30m, 24h (default none)")
    tc.add_argument("--labels", action="append", metavar="K=V[,K=V]", help="labels the Racks get (repeatable)")
    tc.add_argument("--name", metavar="RACK", help="the Rack name the token gives (whatever the Hello says)")
    tc.add_argument("--bundle", metavar="FILE", help="write the bundle there (0600) instead of stdout")
    tc.add_argument("--url", action="append", metavar="URL", help="Snake URL(s) in the bundle (default: the Mixer's)")
    tc.set_defaults(func=_cmd_tokens_create)
    tl = tsub.add_parser("list", help="list tokens (never the secrets)")
    tl.add_argument("-c", "--config", help="fluxrig-mixer.toml")
    tl.add_argument("--json", action="store_true", help="JSON output")
    tl.set_defaults(func=_cmd_tokens_list)
    tr = tsub.add_parser("revoke", help="revoke a token: it admits nobody from now on")
    tr.add_argument("id", help="token id (see `tokens list`)")
    tr.add_argument("-c", "--config", help="fluxrig-mixer.toml")
    tr.set_defaults(func=_cmd_tokens_revoke)
    t.set_defaults(func=lambda a: (t.print_help(), 2)[1])

    g = sub.add_parser("config", help="print default or effective configuration", description="Configuration helpers.")
    gsub = g.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    gd = gsub.add_parser("defaults", help="print a fluxrig-mixer.toml with every key at its default")
    gd.set_defaults(func=_cmd_config_defaults)
    gc = gsub.add_parser("check", help="validate a configuration file and print the effective values (secrets masked)")
    gc.add_argument("-c", "--config", help="configuration file")
    gc.set_defaults(func=_cmd_config_check)
    g.set_defaults(func=lambda a: (g.print_help(), 2)[1])

    register_up(sub)
    register_healthcheck(sub)

    v = sub.add_parser("version", help="print the version")
    v.set_defaults(func=_cmd_version)
    return p


def main(argv: list[str] | None = None) -> int:
    # The frozen binary is also the scenario parse child (parse_worker.py), by a private argument.
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["__scenario-parse-worker"]:
        from .parse_worker import main as parse_worker_main

        return parse_worker_main(args_in[1:])
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
