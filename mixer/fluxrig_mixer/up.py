"""`fluxrig-mixer up`: the Standard tier in one command (a Mixer plus a local Rack).

Job. Start the Mixer exactly as `serve` does (the Snake as a supervised nats-server child,
registry, control API) with auto-adopt on; import and activate one scenario built from
`scenarios/tcp-echo.yaml` and `scenarios/iso8583-authorizer.yaml`; start a local Rack, a
`fluxrig run -c <state_dir>/rack/fluxrig.toml` child enrolled from its own enrollment bundle
(`<state_dir>/rack/enroll-bundle`: the Snake URL, its CA, the pinned cluster key and a
single-use token bound to the Rack's name); wait until that Rack has applied the scenario;
print the API URL and the token's file (never the token), the Snake URL, the ports and how to
try them; run until SIGINT/SIGTERM, then stop
the Rack (SIGTERM: it drains) and after it the Mixer.

Contract.
  - One scenario: the Mixer activates one at a time, so the two files are merged at start
    (`merge_scenarios`): gears, wires, pipes and racks concatenated, a clash of names is an
    error naming both files. Generated from the files on every start so it cannot drift from
    them; `--print-scenario` shows the result.
  - Ports: the scenarios keep their `${FLUXRIG_ECHO_BIND:-...}` / `${FLUXRIG_ISO_BIND:-...}`
    placeholders (the stored document is the same whatever the ports); the Rack expands them
    from its environment, which `up` sets from `--echo-port` / `--iso-port` (else an operator's
    own FLUXRIG_ECHO_BIND / FLUXRIG_ISO_BIND, else the scenario default). Port 0 = a free port.
  - The Rack child, a supervisor.ProcessSupervisor like the Snake: own session (Ctrl-C on the
    terminal reaches `up` only, which stops things in order), SIGTERM if `up` dies
    (PR_SET_PDEATHSIG), output forwarded to stderr prefixed with its name, restarted with
    exponential backoff when it dies, except on exit 2 (its configuration is wrong: retrying
    cannot help, so `up` stops and exits 1).
  - Exit: 0 after a signal-initiated stop; 1 when the Rack never becomes ready or gives up;
    2 on a configuration error (a port in use, a missing scenario file).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable

import yaml

from fluxrig.errors import ConfigError, FluxError, ScenarioError, ScenarioProblem
from fluxrig.fileutil import write_private_atomic
from fluxrig.scenario import parse_scenario, validate_scenario
from fluxrig.wire.vocab import ApplyState, RackStatus

from .config import config_path, load_config, setup_logging
from .supervisor import ProcessSupervisor

__all__ = [
    "Up",
    "merge_scenarios",
    "load_standard_tier",
    "rack_toml",
    "rack_command",
    "rack_supervisor",
    "resolve_binds",
    "register",
    "find_scenarios_dir",
    "SCENARIO_FILES",
    "MERGED_NAME",
    "MERGED_VERSION",
    "LIST_KEYS",
    "ENDPOINTS",
    "DEFAULT_RACK_NAME",
    "RACK_DRAIN_TIMEOUT_S",
    "RACK_STOP_MARGIN_S",
    "RACK_RESTART_BACKOFF_S",
    "RACK_RESTART_BACKOFF_MAX_S",
    "RACK_STABLE_AFTER_S",
    "RACK_EXIT_CONFIG",
    "READY_TIMEOUT_S",
    "UP_TOKEN_TTL_S",
    "READY_POLL_S",
    "RACK_ENV_OWNED",
]

log = logging.getLogger("fluxrig.mixer.up")

SCENARIO_FILES = ("tcp-echo.yaml", "iso8583-authorizer.yaml")
MERGED_NAME = "standard-tier"
MERGED_VERSION = "1.0.0"
LIST_KEYS = ("racks", "gears", "wires", "pipes")
# (label, environment variable the scenario's bind placeholder reads)
ENDPOINTS = (("echo", "FLUXRIG_ECHO_BIND"), ("iso", "FLUXRIG_ISO_BIND"))

DEFAULT_RACK_NAME = "local"
# A demo should stop promptly; a gateway's 35 s default is for long ISO 8583 exchanges.
RACK_DRAIN_TIMEOUT_S = 10.0
RACK_STOP_MARGIN_S = 5.0
RACK_RESTART_BACKOFF_S = 0.5
RACK_RESTART_BACKOFF_MAX_S = 30.0
RACK_STABLE_AFTER_S = 10.0
RACK_EXIT_CONFIG = 2
READY_TIMEOUT_S = 60.0
# The local Rack's own enrollment token (single use, bound to its name) expires after this.
UP_TOKEN_TTL_S = 600.0
READY_POLL_S = 0.1
# Variables that would override what `up` writes into the Rack's fluxrig.toml (the Rack reads
# the environment after its file); inherited from a shell, they would point the local Rack at
# the Mixer's own state dir or another Snake.
RACK_ENV_OWNED = (
    "FLUXRIG_BASE_NAME",
    "FLUXRIG_BASE_STATE_DIR",
    "FLUXRIG_BASE_SCENARIO",
    "FLUXRIG_STORE_DIR",
    "FLUXRIG_SNAKE_URL",
    "FLUXRIG_SNAKE_BOOTSTRAP_TOKEN",
    "FLUXRIG_SNAKE_ENROLLMENT_BUNDLE",
    "FLUXRIG_SNAKE_MIXER_PUBLIC_KEY",
    "FLUXRIG_SNAKE_ROOT_CA_FILE",
    "FLUXRIG_SNAKE_TLS_CERT_FILE",
    "FLUXRIG_SNAKE_TLS_KEY_FILE",
    "FLUXRIG_SNAKE_TRUST_ON_FIRST_USE",
    "FLUXRIG_SNAKE_INSECURE_PLAINTEXT",
    "FLUXRIG_CONFIG",
    "FLUXRIG_RACK_DRAIN_TIMEOUT",
)


# -- the merged scenario ------------------------------------------------------------------------


def find_scenarios_dir(explicit: str | None = None) -> str:
    """`explicit`, else ./scenarios, else the checkout this code runs from; ConfigError naming
    every place tried."""
    if explicit:
        candidates = [explicit]
    else:
        import fluxrig

        candidates = [
            "scenarios",
            os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(fluxrig.__file__))), "scenarios"),
            os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scenarios"),
        ]
    for c in candidates:
        if all(os.path.isfile(os.path.join(c, f)) for f in SCENARIO_FILES):
            return c
    raise ConfigError(
        f"no directory with {' and '.join(SCENARIO_FILES)} (tried {', '.join(candidates)}); pass --scenarios DIR",
        "--scenarios",
    )


def _bind_default(doc: dict, var: str) -> str | None:
    """The default of the `${var:-default}` placeholder in any gear config, else None."""
    needle = "${" + var + ":-"
    for g in doc.get("gears") or []:
        for value in ((g or {}).get("config") or {}).values():
            if isinstance(value, str) and value.startswith(needle) and value.endswith("}"):
                return value[len(needle) : -1]
    return None


def merge_scenarios(sources: list[tuple[str, str]], name: str = MERGED_NAME, version: str = MERGED_VERSION) -> dict:
    """One scenario from several `(path, text)`: list sections concatenated, meta replaced.
    ScenarioError listing every problem: a file that does not validate on its own, a top-level
    key that cannot be merged, a gear/rack/group name defined in two files."""
    problems: list[ScenarioProblem] = []
    merged: dict = {"meta": {"name": name, "version": version, "sources": []}}
    owners: dict[tuple[str, str], str] = {}
    for path, text in sources:
        where = os.path.basename(path)
        doc = parse_scenario(text, "toml" if path.endswith(".toml") else "yaml", source=path)
        problems += [ScenarioProblem(f"{where}: {p.location}", p.message) for p in validate_scenario(doc)]
        meta = doc.get("meta") or {}
        merged["meta"]["sources"].append(f"{where} {meta.get('name', '?')} {meta.get('version', '?')}")
        for key, value in doc.items():
            if key == "meta":
                continue
            if key not in LIST_KEYS:
                problems.append(ScenarioProblem(f"{where}: {key}", "top-level key cannot be merged"))
                continue
            for i, item in enumerate(value or []):
                ident = None
                if isinstance(item, dict) and key != "wires":
                    ident = item.get("name") or item.get("group")
                if ident:
                    first = owners.setdefault((key, ident), where)
                    if first != where:
                        problems.append(
                            ScenarioProblem(f"{where}: {key}[{i}]", f"{ident!r} is also defined in {first}")
                        )
                        continue
                merged.setdefault(key, []).append(item)
    if not problems:
        problems = validate_scenario(merged)
    if problems:
        raise ScenarioError(problems, "merge")
    return merged


def load_standard_tier(scenarios_dir: str) -> tuple[dict, str]:
    """(merged document, its YAML text) from the Standard tier's files."""
    sources = []
    for f in SCENARIO_FILES:
        path = os.path.join(scenarios_dir, f)
        with open(path, encoding="utf-8") as fh:
            sources.append((path, fh.read()))
    doc = merge_scenarios(sources)
    header = "# Generated by `fluxrig-mixer up` from " + " and ".join(SCENARIO_FILES) + "; edit those, not this.\n"
    return doc, header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def resolve_binds(doc: dict, ports: dict[str, int | None], environ) -> dict[str, str]:
    """label -> host:port each endpoint binds. A port flag wins (host kept from the operator's
    variable or the scenario default), then the operator's variable, then the default."""
    out = {}
    for label, var in ENDPOINTS:
        default = _bind_default(doc, var)
        if default is None:
            raise ConfigError(f"the merged scenario has no ${{{var}:-host:port}} placeholder", var)
        current = environ.get(var) or default
        port = ports.get(label)
        if port is not None:
            host = current.rpartition(":")[0] or "127.0.0.1"
            out[label] = f"{host}:{port or _free_port(host)}"
        else:
            out[label] = current
    return out


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port_free(host: str, port: int, what: str, flag: str) -> None:
    if not port:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError as exc:
            raise ConfigError(
                f"{what} port {host}:{port} is not free ({exc.strerror}); pick another with {flag}", flag
            ) from None


async def _listening(bind: str, timeout: float = 0.5) -> bool:
    host, _, port = bind.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(_loopback(host), int(port)), timeout)
    except (TimeoutError, OSError, ValueError):
        return False
    writer.close()
    return True


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


# -- the local Rack -------------------------------------------------------------------------------


def rack_toml(
    *,
    name: str,
    state_dir: str,
    bundle_file: str,
    client_cert: tuple[str, str] | None = None,
    insecure_plaintext_url: str = "",
    drain_timeout: float = RACK_DRAIN_TIMEOUT_S,
) -> str:
    """The local Rack's fluxrig.toml: it joins through its enrollment bundle (a path: the token
    never sits in this file, in argv or in the environment)."""
    q = lambda v: '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'  # noqa: E731
    lines = [
        "# Generated by `fluxrig-mixer up` on every start; edits are overwritten.",
        "[base]",
        f"name = {q(name)}",
        f"state_dir = {q(state_dir)}",
        "[rack]",
        f'drain_timeout = "{drain_timeout:g}s"',
        "[snake]",
        f"enrollment_bundle = {q(bundle_file)}",
    ]
    if client_cert:
        lines += [f"tls_cert_file = {q(client_cert[0])}", f"tls_key_file = {q(client_cert[1])}"]
    if insecure_plaintext_url:
        lines += [f"url = {q(insecure_plaintext_url)}", "insecure_plaintext = true", "trust_on_first_use = true"]
    return "\n".join(lines) + "\n"


def rack_command(conf: str) -> list[str]:
    """`fluxrig run -c conf` with the Python that runs the Mixer (same install, same backend)."""
    if getattr(sys, "frozen", False):
        exe = shutil.which("fluxrig") or os.path.join(os.path.dirname(sys.executable), "fluxrig")
        return [exe, "run", "-c", conf]
    return [sys.executable, "-m", "fluxrig.cli.main", "run", "-c", conf]


def rack_supervisor(
    argv: list[str], env: dict[str, str], name: str, stop_timeout: float, on_give_up: Callable[[int], None]
) -> ProcessSupervisor:
    """The local Rack's supervisor: output forwarded to stderr as `[rack <name>] ...`, restarted
    with backoff, given up (`on_give_up`) on exit RACK_EXIT_CONFIG or when it cannot be spawned."""
    return ProcessSupervisor(
        argv,
        label=f"rack {name}",
        env=env,
        stop_timeout=stop_timeout,
        backoff=RACK_RESTART_BACKOFF_S,
        backoff_max=RACK_RESTART_BACKOFF_MAX_S,
        stable_after=RACK_STABLE_AFTER_S,
        give_up_codes=(RACK_EXIT_CONFIG,),
        on_give_up=on_give_up,
        retry_spawn=False,
        output=sys.stderr,
    )


def _clear_stale_passport(rack_state: str, registry, mixer_pub_hex: str) -> None:
    """A passport left by another Mixer (the registry was wiped, or the cluster key replaced)
    would keep the Rack dialling with credentials nobody knows: move it aside so it enrolls."""
    from fluxrig.passport import decode_unverified

    path = os.path.join(rack_state, "rack.flux")
    try:
        with open(path, "rb") as fh:
            body = decode_unverified(fh.read(), path)
    except FileNotFoundError:
        return
    except Exception as exc:  # unreadable: same remedy
        body, reason = None, str(exc)
    else:
        reason = ""
        pub = body.get("mixer_pub")
        if isinstance(pub, bytes) and pub.hex() != mixer_pub_hex:
            reason = "signed by another cluster key"
        elif registry.find(str(body.get("rack_id") or "")) is None:
            reason = "its Rack is not in this Mixer's registry"
    if reason:
        log.warning("local Rack passport %s is stale (%s); moving it aside so the Rack enrolls again", path, reason)
        for suffix in ("", ".pub"):
            if os.path.exists(path + suffix):
                os.replace(path + suffix, path + suffix + ".stale")
    _clear_removed_identity(rack_state, registry)


def _clear_removed_identity(rack_state: str, registry) -> None:
    """`up` owns its local Rack: if an operator removed it, the next `up` gives it a new
    identity (a removed identity stays out for good, issue 12) instead of leaving it dead."""
    from fluxrig.wire import identity

    seed_path, removed = os.path.join(rack_state, "identity.nkey"), os.path.join(rack_state, "removed")
    try:
        with open(seed_path, encoding="ascii") as fh:
            nkey = identity.public_key(fh.read().strip())
    except (OSError, identity.IdentityError):
        nkey = None
    if os.path.exists(removed) or (nkey and registry.is_denied(nkey)):
        log.warning("the local Rack's identity was removed; `up` gives it a new one")
        for p in (seed_path, removed, os.path.join(rack_state, "rack.flux")):
            if os.path.exists(p):
                os.replace(p, p + ".removed")


def _rack_name_from_passport(rack_state: str) -> str | None:
    from fluxrig.passport import decode_unverified

    path = os.path.join(rack_state, "rack.flux")
    try:
        with open(path, "rb") as fh:
            return str(decode_unverified(fh.read(), path).get("rack_name") or "") or None
    except (OSError, FluxError, ValueError):
        return None


def _fluxrig_cli() -> str:
    """How the operator should spell `fluxrig` in this shell."""
    beside = os.path.join(os.path.dirname(sys.executable), "fluxrig")
    found = shutil.which("fluxrig")
    if found and (not os.path.exists(beside) or os.path.samefile(found, beside)):
        return "fluxrig"
    if os.path.exists(beside):
        rel = os.path.relpath(beside)
        return rel if not rel.startswith("..") else beside
    return "fluxrig"


class Up:
    """The `up` run: Mixer, scenario, local Rack, banner, wait, ordered stop."""

    def __init__(self, cfg, args, doc: dict, text: str, binds: dict[str, str], out=None):
        self.cfg, self.args, self.doc, self.text, self.binds = cfg, args, doc, text, binds
        self.out = out or sys.stdout
        self.mixer = None
        self.rack: ProcessSupervisor | None = None
        self.stored = None
        self.exit_code = 0
        self.stop_event = asyncio.Event()
        self.signals = 0
        self.state_dir = os.path.abspath(cfg.base.state_dir)
        self.rack_state = os.path.join(self.state_dir, "rack")
        self.rack_conf = os.path.join(self.rack_state, "fluxrig.toml")

    def _on_signal(self) -> None:
        self.signals += 1
        if self.signals > 1 and self.rack is not None:
            log.warning("second signal: killing the Rack without waiting for its drain")
            self.rack.kill_now()
        self.stop_event.set()

    def _give_up(self, code: int) -> None:
        if code == RACK_EXIT_CONFIG:
            log.error("the local Rack has a configuration or scenario error (see its output above); not restarting it")
        self.exit_code = 1
        self.stop_event.set()

    async def _until_stop(self, coro):
        """Run `coro` unless a stop is requested first (then None)."""
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self.stop_event.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None

    def _rack_env(self) -> dict:
        env = dict(os.environ)
        dropped = [k for k in RACK_ENV_OWNED if k in env]
        for k in dropped:
            del env[k]
        if dropped:
            log.warning("not passing %s to the local Rack: `up` sets these in %s", ", ".join(dropped), self.rack_conf)
        for label, var in ENDPOINTS:
            env[var] = self.binds[label]
        return env

    def _write_rack_config(self) -> None:
        """The local Rack's bundle and fluxrig.toml. A Rack with no passport yet gets a fresh
        single-use token bound to its name (expiring in UP_TOKEN_TTL_S); one already enrolled
        gets a bundle without a token (it needs only the CA, the URL and the Mixer key)."""

        from .certs import issue_client_cert

        os.makedirs(self.rack_state, mode=0o700, exist_ok=True)
        m = self.mixer
        enrolled = os.path.exists(os.path.join(self.rack_state, "rack.flux"))
        token = ""
        if not enrolled and not self.args.no_rack:
            token, _ = m.tokens.create(uses=1, ttl=UP_TOKEN_TTL_S, rack_name=self.args.rack_name)
        elif not enrolled:
            token = m.bootstrap_token  # --no-rack: the operator starts it; the first-start token
        client = None
        if m.tls is not None and self.cfg.snake.tls_verify:
            cert = os.path.join(self.rack_state, f"{self.args.rack_name}.pem")
            if not os.path.exists(cert):
                issue_client_cert(os.path.join(self.state_dir, "certs"), self.args.rack_name, out_dir=self.rack_state)
            client = (cert, os.path.join(self.rack_state, f"{self.args.rack_name}-key.pem"))
        plain_url = ""
        if m.tls is None:
            plain_url = m.snake.url  # snake.insecure_plaintext: no CA to put in a bundle
            bundle = ""
        else:
            bundle = m.write_bundle(os.path.join(self.rack_state, "enroll-bundle"), token, self._rack_urls())
        text = rack_toml(
            name=self.args.rack_name,
            state_dir=self.rack_state,
            bundle_file=bundle,
            client_cert=client,
            insecure_plaintext_url=plain_url,
            drain_timeout=self.args.drain_timeout,
        )
        if plain_url:
            text = text.replace('enrollment_bundle = ""\n', f'bootstrap_token = "{token}"\n')
        write_private_atomic(self.rack_conf, text.encode())

    def _rack_urls(self) -> list[str]:
        """The Snake URLs in the local Rack's bundle: this Mixer's (up --cluster: every node's)."""
        return [self.mixer.snake.url]

    async def _activate(self) -> None:
        m = self.mixer
        self.stored, created = m.scenarios.import_text(self.text, "yaml")
        active = m.scenarios.active()
        if active is None or active.digest != self.stored.digest:
            await m.controller.activate_scenario(self.stored)
        log.info(
            "scenario %s %s active (%s)", self.stored.name, self.stored.version, "imported" if created else "known"
        )

    async def _wait_rack_ready(self) -> str:
        """The Rack's name once it is active and reports the scenario applied; FluxError if it
        rejects it or args.ready_timeout passes."""
        deadline = time.monotonic() + self.args.ready_timeout
        name, row = None, None
        while time.monotonic() < deadline:
            name = name or _rack_name_from_passport(self.rack_state)
            row = self.mixer.registry.find(name) if name else None
            if row is not None and row.status == RackStatus.ACTIVE and row.scenario_version == self.stored.version:
                # The registry row may be left from the last run (same state dir): only the
                # ports answering prove that this Rack process has applied it.
                if row.apply_state == ApplyState.APPLIED and all(
                    await asyncio.gather(*map(_listening, self.binds.values()))
                ):
                    return name
                if row.apply_state == ApplyState.REJECTED:
                    raise FluxError(f"the local Rack {name} rejected {self.stored.version}: {row.apply_reason}")
            await asyncio.sleep(READY_POLL_S)
        state = (
            f"status {row.status}, scenario {row.scenario_version or '-'} {row.apply_state}" if row else "not enrolled"
        )
        raise FluxError(
            f"the local Rack is not ready after {self.args.ready_timeout:g}s ({state}); see its output above"
        )

    def _banner(self, rack_name: str | None) -> str:
        m, fx = self.mixer, _fluxrig_cli()
        api, token = m.api_url, m.api_token or ""
        # Paths, never the token: a banner ends up in terminals, scrollback and the journal.
        token_file = os.path.join(self.state_dir, "api-token")
        if token and not os.path.exists(token_file):
            token_file = ""  # api.auth_token set in the configuration file
        echo, iso = self.binds["echo"], self.binds["iso"]
        echo_h, echo_p = echo.rpartition(":")[::2]
        iso_h, iso_p = iso.rpartition(":")[::2]
        echo_try, iso_try = f"{_loopback(echo_h)}:{echo_p}", f"{_loopback(iso_h)}:{iso_p}"
        lines = [
            "",
            "fluxrig-mixer up: the Standard tier is running (Ctrl-C or SIGTERM stops "
            + ("the Rack, then the Mixer)" if rack_name else "the Mixer)"),
            "",
            f"  Console     {api}/console   (start here: log in with the API token below)",
            f"  Mixer API   {api}   (OpenAPI UI at {api}/docs)",
            (
                f"  API token   FLUXRIG_API_TOKEN_FILE={token_file}"
                if token_file
                else "  API token   api.auth_token in the configuration"
            )
            if token
            else "  API token   none (auth disabled)",
            f"  Snake       {m.snake.url}   TLS CA SHA-256 {m.ca_sha256[:32] or '-'}..."
            if m.tls is not None
            else f"  Snake       {m.snake.url}   PLAIN TEXT (snake.insecure_plaintext)",
            f"              more Racks: `fluxrig-mixer tokens create --bundle FILE` (first-start bundle in "
            f"{m.bundle_path or '-'})",
            f"  Scenario    {self.stored.name} {self.stored.version} ({', '.join(SCENARIO_FILES)})",
        ]
        if rack_name:
            lines.append(f"  Rack        {rack_name}: active, scenario applied (state {self.rack_state})")
        lines += [
            f"  TCP echo    {echo}   (lines come back upper-cased)",
            f"  ISO 8583    {iso}   (2-byte length header; 0800 -> 0810, 0200 -> 0210)",
            "",
        ]
        if not rack_name:
            lines += [
                "No local Rack (--no-rack). Start one with:",
                f"  FLUXRIG_ECHO_BIND={echo} FLUXRIG_ISO_BIND={iso} {fx} run -c {self.rack_conf}",
                "",
            ]
        host, port = echo_try.rsplit(":", 1)
        lines += [
            "Try it (from another terminal):",
            f"  export FLUXRIG_API_URL={api}" + (f" FLUXRIG_API_TOKEN_FILE={token_file}" if token_file else ""),
            f"  printf 'hello\\n' | nc {host} {port}",
            f"  python3 -c \"import socket; s = socket.create_connection(('{host}', {port})); "
            f"s.sendall(b'hello\\n'); print(s.recv(100))\"",
            f"  {fx} iso8583 load --target {iso_try} --duration 5",
            f"  {fx} admin racks list",
            f"  {fx} scenario active",
            f"  {fx} logs --rack {rack_name or self.args.rack_name} --since 15m",
            f"  {fx} metrics --name 'flux.gear.*' --bucket 1m",
            # printf is a shell builtin and curl reads the header from stdin (-K -): the token
            # never appears in any process's argv.
            (
                f'  printf \'header = "Authorization: Bearer %s"\\n\' "$(cat {token_file})" | curl -K - {api}/api/v1/racks'
                if token_file
                else f"  curl {api}/api/v1/racks"
            ),
            "",
            "fluxrig-mixer up: ready",
        ]
        return "\n".join(lines) + "\n"

    async def run(self) -> int:
        from .app import Mixer

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            self.mixer = Mixer(self.cfg)
            await self.mixer.start()
            try:
                if not self.stop_event.is_set():
                    await self._serve()
            finally:
                if self.rack is not None:
                    log.info("stopping the local Rack (drain up to %gs)", self.args.drain_timeout)
                    code = await self.rack.stop()
                    if code not in (0, None, -signal.SIGTERM) and self.exit_code == 0 and self.signals < 2:
                        log.warning("the local Rack exited with code %s", code)
                log.info("stopping the Mixer")
                await self.mixer.stop()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return self.exit_code

    async def _serve(self) -> None:
        await self._activate()
        _clear_stale_passport(self.rack_state, self.mixer.registry, self.mixer.key.public_hex)
        self._write_rack_config()
        rack_name = None
        if not self.args.no_rack:
            self.rack = rack_supervisor(
                rack_command(self.rack_conf),
                self._rack_env(),
                self.args.rack_name,
                stop_timeout=self.args.drain_timeout + RACK_STOP_MARGIN_S,
                on_give_up=self._give_up,
            )
            await self.rack.start()
            try:
                rack_name = await self._until_stop(self._wait_rack_ready())
            except FluxError as exc:
                log.error("%s", exc)
                self.exit_code = 1
                return
            if rack_name is None:  # stopped while waiting
                return
        self.out.write(self._banner(rack_name))
        self.out.flush()
        await self.stop_event.wait()


# -- the command ------------------------------------------------------------------------------------


def _cmd_up(args) -> int:
    overrides = {"enrollment.auto_adopt": True}
    if args.api_port is not None:
        overrides["api.port"] = args.api_port
    if args.snake_port is not None:
        overrides["snake.port"] = args.snake_port
    if args.state_dir:
        overrides["base.state_dir"] = args.state_dir
    cfg = load_config(config_path(args.config), overrides=overrides)
    doc, text = load_standard_tier(find_scenarios_dir(args.scenarios))
    cluster_nodes = getattr(args, "cluster", 0)
    if args.print_scenario:
        sys.stdout.write(text)
        return 0
    setup_logging(cfg.logging.level)
    from fluxrig.scenario.model import NAME_RE

    if not NAME_RE.match(args.rack_name):
        raise ConfigError(f"invalid Rack name {args.rack_name!r} (use a-z, 0-9, _ and -)", "--rack-name")
    binds = resolve_binds(doc, {"echo": args.echo_port, "iso": args.iso_port}, os.environ)
    if not cluster_nodes:
        _check_port_free(cfg.api.host, cfg.api.port, "API", "--api-port")
        _check_port_free(cfg.snake.host, cfg.snake.port, "Snake", "--snake-port")
    if not args.no_rack:
        for label, flag in (("echo", "--echo-port"), ("iso", "--iso-port")):
            host, _, port = binds[label].rpartition(":")
            try:
                _check_port_free(host, int(port), "TCP echo" if label == "echo" else "ISO 8583", flag)
            except ValueError:
                raise ConfigError(f"{binds[label]!r} is not host:port", dict(ENDPOINTS)[label]) from None
    if cluster_nodes:  # issue 14 item 7: N nodes on loopback (up_cluster.py)
        from .up_cluster import run_cluster_up

        return run_cluster_up(args, overrides, doc, text, binds)
    return asyncio.run(Up(cfg, args, doc, text, binds).run())


def _duration(text: str) -> float:
    from fluxrig.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub) -> None:
    """Add the `up` subcommand to the `fluxrig-mixer` parser."""
    p = sub.add_parser(
        "up",
        help="the Standard tier in one command: Mixer + a local Rack running tcp-echo and the ISO 8583 authorizer",
        description=(
            "Run the Mixer (Snake, registry, API; auto-adopt on) and a local Rack (`fluxrig run`, state in "
            "<state_dir>/rack, config generated at <state_dir>/rack/fluxrig.toml), activate one scenario "
            f"merged from {' and '.join(SCENARIO_FILES)}, wait until the Rack has applied it, then print the "
            "API URL and token, the Snake URL, the ports and commands to try. Ctrl-C or SIGTERM stops the "
            "Rack (it drains), then the Mixer; exit 0. A Rack that dies is restarted with backoff."
        ),
        epilog=(
            "Examples: `fluxrig-mixer up` (state in ./data, API 8090, Snake 4222, echo 9000, ISO 8583 8583); "
            "`fluxrig-mixer up --state-dir /tmp/fr --api-port 18090 --snake-port 14222 --echo-port 19000 "
            "--iso-port 18583`. Port 0 picks a free port. Exit codes: 0 stopped by a signal, 1 the Rack did "
            "not become ready or gave up, 2 configuration error (e.g. a port in use)."
        ),
    )
    p.add_argument(
        "-c",
        "--config",
        help="fluxrig-mixer.toml (default: $FLUXRIG_MIXER_CONFIG or "
        "./fluxrig-mixer.toml if present, else built-in defaults with state in ./data)",
    )
    p.add_argument("--state-dir", help="override base.state_dir (Mixer state; the Rack's is <state-dir>/rack)")
    p.add_argument("--api-port", type=int, help="override api.port (default 8090)")
    p.add_argument("--snake-port", type=int, help="override snake.port (default 4222)")
    p.add_argument("--echo-port", type=int, help="TCP echo port (default: $FLUXRIG_ECHO_BIND, else 9000)")
    p.add_argument("--iso-port", type=int, help="ISO 8583 authorizer port (default: $FLUXRIG_ISO_BIND, else 8583)")
    p.add_argument(
        "--rack-name", default=DEFAULT_RACK_NAME, help=f"name of the local Rack (default {DEFAULT_RACK_NAME})"
    )
    p.add_argument(
        "--drain-timeout",
        type=_duration,
        default=RACK_DRAIN_TIMEOUT_S,
        metavar="DURATION",
        help=f"how long the local Rack may drain on stop before it is killed "
        f"(default {RACK_DRAIN_TIMEOUT_S:g}s; e.g. 500ms, 30s)",
    )
    p.add_argument(
        "--ready-timeout",
        type=_duration,
        default=READY_TIMEOUT_S,
        metavar="DURATION",
        help=f"give up (exit 1) if the local Rack has not applied the scenario by then (default {READY_TIMEOUT_S:g}s)",
    )
    p.add_argument(
        "--no-rack",
        action="store_true",
        help="run only the Mixer with the scenario active; print how to start a Rack for it",
    )
    p.add_argument(
        "--scenarios",
        metavar="DIR",
        help=f"directory holding {' and '.join(SCENARIO_FILES)} (default ./scenarios, else the checkout's)",
    )
    p.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="run N (3..5) Mixer nodes as one cluster on loopback (node K: API api-port+K-1, Snake "
        "snake-port+K-1, route 6222+K-1; state in <state-dir>/node-K), streams R3, and print how to kill one",
    )
    p.add_argument(
        "--print-scenario",
        action="store_true",
        help="print the merged scenario (YAML) and exit; e.g. to import it on another Mixer",
    )
    p.set_defaults(func=_cmd_up)
