"""`fluxrig-mixer up`: the Standard tier in one command (a Mixer plus a local Rack).

Job. Start the Mixer exactly as `serve` does (the Snake as a supervised nats-server child,
registry, control API) with auto-adopt on; import and activate one scenario built from
`scenarios/tcp-echo.yaml` and `scenarios/iso8583-authorizer.yaml`; start a local Rack, a
`fluxrig run -c <state_dir>/rack/fluxrig.toml` child enrolled with the bootstrap token and
the pinned cluster key; wait until that Rack has applied the scenario; print the API URL
and token, the Snake URL, the ports and how to try them; run until SIGINT/SIGTERM, then stop
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
  - The Rack child: own session (Ctrl-C on the terminal reaches `up` only, which stops things
    in order), SIGTERM if `up` dies (PR_SET_PDEATHSIG), output forwarded to stderr prefixed
    with its name, restarted with exponential backoff when it dies, except on exit 2 (its
    configuration is wrong: retrying cannot help, so `up` stops and exits 1).
  - Exit: 0 after a signal-initiated stop; 1 when the Rack never becomes ready or gives up;
    2 on a configuration error (a port in use, a missing scenario file).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import time

import yaml

from fluxrig.errors import ConfigError, FluxError, ScenarioError, ScenarioProblem
from fluxrig.fileutil import write_private_atomic
from fluxrig.scenario import parse_scenario, validate_scenario

__all__ = ["merge_scenarios", "load_standard_tier", "RackSupervisor", "rack_toml", "register", "find_scenarios_dir"]

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
READY_POLL_S = 0.1
# Variables that would override what `up` writes into the Rack's fluxrig.toml (the Rack reads
# the environment after its file); inherited from a shell, they would point the local Rack at
# the Mixer's own state dir or another Snake.
RACK_ENV_OWNED = (
    "FLUXRIG_BASE_NAME", "FLUXRIG_BASE_STATE_DIR", "FLUXRIG_BASE_SCENARIO", "FLUXRIG_STORE_DIR",
    "FLUXRIG_SNAKE_URL", "FLUXRIG_SNAKE_BOOTSTRAP_TOKEN", "FLUXRIG_SNAKE_MIXER_PUBLIC_KEY",
    "FLUXRIG_SNAKE_ROOT_CA_FILE", "FLUXRIG_CONFIG", "FLUXRIG_RACK_DRAIN_TIMEOUT",
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
    raise ConfigError(f"no directory with {' and '.join(SCENARIO_FILES)} (tried {', '.join(candidates)}); "
                      "pass --scenarios DIR", "--scenarios")


def _bind_default(doc: dict, var: str) -> str | None:
    """The default of the `${var:-default}` placeholder in any gear config, else None."""
    needle = "${" + var + ":-"
    for g in doc.get("gears") or []:
        for value in ((g or {}).get("config") or {}).values():
            if isinstance(value, str) and value.startswith(needle) and value.endswith("}"):
                return value[len(needle):-1]
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
                        problems.append(ScenarioProblem(f"{where}: {key}[{i}]", f"{ident!r} is also defined in {first}"))
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
    header = ("# Generated by `fluxrig-mixer up` from " + " and ".join(SCENARIO_FILES)
              + "; edit those, not this.\n")
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
            raise ConfigError(f"{what} port {host}:{port} is not free ({exc.strerror}); pick another with {flag}",
                              flag) from None


async def _listening(bind: str, timeout: float = 0.5) -> bool:
    host, _, port = bind.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(_loopback(host), int(port)), timeout)
    except (OSError, ValueError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


# -- the local Rack -------------------------------------------------------------------------------


def rack_toml(*, name: str, state_dir: str, snake_url: str, token: str, mixer_key: str,
              root_ca: str = "", drain_timeout: float = RACK_DRAIN_TIMEOUT_S) -> str:
    q = lambda v: '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'  # noqa: E731
    lines = [
        "# Generated by `fluxrig-mixer up` on every start; edits are overwritten.",
        "[base]", f"name = {q(name)}", f"state_dir = {q(state_dir)}",
        "[rack]", f'drain_timeout = "{drain_timeout:g}s"',
        "[snake]", f"url = {q(snake_url)}", f"bootstrap_token = {q(token)}", f"mixer_public_key = {q(mixer_key)}",
    ]
    if root_ca:
        lines.append(f"root_ca_file = {q(root_ca)}")
    return "\n".join(lines) + "\n"


def rack_command(conf: str) -> list[str]:
    """`fluxrig run -c conf` with the Python that runs the Mixer (same install, same backend)."""
    if getattr(sys, "frozen", False):
        exe = shutil.which("fluxrig") or os.path.join(os.path.dirname(sys.executable), "fluxrig")
        return [exe, "run", "-c", conf]
    return [sys.executable, "-m", "fluxrig.cli.main", "run", "-c", conf]


def _pdeathsig_preexec():  # pragma: no cover - runs in the child
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class RackSupervisor:
    """Owns the `fluxrig run` child: `start()`, a watcher that restarts it with backoff,
    `stop()` (SIGTERM, SIGKILL after `stop_timeout`). `on_give_up(code)` is called when the
    child exits with RACK_EXIT_CONFIG (not restarted)."""

    def __init__(self, argv: list[str], env: dict, label: str, stop_timeout: float,
                 backoff: float = RACK_RESTART_BACKOFF_S, backoff_max: float = RACK_RESTART_BACKOFF_MAX_S,
                 on_give_up=None, out=None):
        self.argv, self.env, self.label = argv, env, label
        self.stop_timeout = stop_timeout
        self.backoff, self.backoff_max = backoff, backoff_max
        self.on_give_up = on_give_up or (lambda code: None)
        self.out = out or sys.stderr
        self.restarts = 0
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._watcher: asyncio.Task | None = None
        self._pump: asyncio.Task | None = None
        self._started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    async def _spawn(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            preexec_fn=_pdeathsig_preexec if sys.platform.startswith("linux") else None,
            start_new_session=True,
        )
        self._started_at = time.monotonic()
        self._pump = asyncio.get_running_loop().create_task(self._forward(self.proc.stdout), name="rack-output")
        log.info("rack %s: pid %s", self.label, self.proc.pid)

    async def _forward(self, stream) -> None:
        prefix = f"[rack {self.label}] "
        while True:
            line = await stream.readline()
            if not line:
                return
            try:
                self.out.write(prefix + line.decode("utf-8", "replace"))
                self.out.flush()
            except (OSError, ValueError):
                pass

    async def start(self) -> None:
        self._stopping = False
        await self._spawn()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="rack-watch")

    async def _watch(self) -> None:
        backoff = self.backoff
        while not self._stopping:
            code = await self.proc.wait()
            if self._pump:
                await asyncio.gather(self._pump, return_exceptions=True)
            if self._stopping:
                return
            uptime = time.monotonic() - self._started_at
            if code == RACK_EXIT_CONFIG:
                log.error("rack %s exited with code 2 (configuration or scenario error, see its output above); "
                          "not restarting it", self.label)
                self.on_give_up(code)
                return
            if uptime > RACK_STABLE_AFTER_S:
                backoff = self.backoff
            log.error("rack %s exited (code %s) after %.1fs; restarting in %.1fs", self.label, code, uptime, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max)
            if self._stopping:
                return
            try:
                await self._spawn()
                self.restarts += 1
            except OSError as exc:
                log.error("rack %s: cannot restart: %s", self.label, exc)
                self.on_give_up(1)
                return

    def kill_now(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.kill()

    async def stop(self) -> int | None:
        """SIGTERM (the Rack drains), SIGKILL after stop_timeout; the child's exit code."""
        self._stopping = True
        proc = self.proc
        if proc and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except asyncio.TimeoutError:
                log.error("rack %s ignored SIGTERM for %.0fs; killing it", self.label, self.stop_timeout)
                proc.kill()
                await proc.wait()
        for task in (self._watcher, self._pump):
            if task and not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), 2.0)
                except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    task.cancel()
        return proc.returncode if proc else None


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
        self.rack: RackSupervisor | None = None
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
        os.makedirs(self.rack_state, mode=0o700, exist_ok=True)
        s = self.cfg.snake
        root_ca = ""
        if s.tls_cert_file:
            default_ca = os.path.join(self.state_dir, "certs", "ca.pem")
            root_ca = s.tls_ca_file or (default_ca if os.path.exists(default_ca) else "")
        write_private_atomic(self.rack_conf, rack_toml(
            name=self.args.rack_name, state_dir=self.rack_state, snake_url=self.mixer.snake.url,
            token=self.mixer.bootstrap_token, mixer_key=self.mixer.key.public_hex, root_ca=root_ca,
            drain_timeout=self.args.drain_timeout).encode())

    async def _activate(self) -> None:
        m = self.mixer
        self.stored, created = m.scenarios.import_text(self.text, "yaml")
        active = m.scenarios.active()
        if active is None or active.digest != self.stored.digest:
            await m.controller.activate_scenario(self.stored)
        log.info("scenario %s %s active (%s)", self.stored.name, self.stored.version, "imported" if created else "known")

    async def _wait_rack_ready(self) -> str:
        """The Rack's name once it is active and reports the scenario applied; FluxError if it
        rejects it or args.ready_timeout passes."""
        deadline = time.monotonic() + self.args.ready_timeout
        name, row = None, None
        while time.monotonic() < deadline:
            name = name or _rack_name_from_passport(self.rack_state)
            row = self.mixer.registry.find(name) if name else None
            if row is not None and row.status == "active" and row.scenario_version == self.stored.version:
                # The registry row may be left from the last run (same state dir): only the
                # ports answering prove that this Rack process has applied it.
                if row.apply_state == "applied" and all(await asyncio.gather(*map(_listening, self.binds.values()))):
                    return name
                if row.apply_state == "rejected":
                    raise FluxError(f"the local Rack {name} rejected {self.stored.version}: {row.apply_reason}")
            await asyncio.sleep(READY_POLL_S)
        state = f"status {row.status}, scenario {row.scenario_version or '-'} {row.apply_state}" if row else "not enrolled"
        raise FluxError(f"the local Rack is not ready after {self.args.ready_timeout:g}s ({state}); "
                        "see its output above")

    def _banner(self, rack_name: str | None) -> str:
        m, fx = self.mixer, _fluxrig_cli()
        api, token = m.api_url, m.api_token or ""
        token_file = os.path.join(self.state_dir, "api-token")
        echo, iso = self.binds["echo"], self.binds["iso"]
        echo_h, echo_p = echo.rpartition(":")[::2]
        iso_h, iso_p = iso.rpartition(":")[::2]
        echo_try, iso_try = f"{_loopback(echo_h)}:{echo_p}", f"{_loopback(iso_h)}:{iso_p}"
        auth = f"--api-url {api} --api-token {token}"
        lines = [
            "",
            "fluxrig-mixer up: the Standard tier is running (Ctrl-C or SIGTERM stops "
            + ("the Rack, then the Mixer)" if rack_name else "the Mixer)"),
            "",
            f"  Mixer API   {api}   (OpenAPI UI at {api}/docs)",
            f"  API token   {token}   (kept in {token_file})" if token else "  API token   none (auth disabled)",
            f"  Snake       {m.snake.url}   (more Racks: snake.url = this host, bootstrap_token from "
            f"{os.path.join(self.state_dir, 'bootstrap-token')})",
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
            f"  printf 'hello\\n' | nc {host} {port}",
            f"  python3 -c \"import socket; s = socket.create_connection(('{host}', {port})); "
            f"s.sendall(b'hello\\n'); print(s.recv(100))\"",
            f"  {fx} iso8583 load --target {iso_try} --duration 5",
            f"  {fx} admin racks list {auth}",
            f"  {fx} scenario active {auth}",
            f"  {fx} logs {auth} --rack {rack_name or self.args.rack_name} --since 15m",
            f"  {fx} metrics {auth} --name 'flux.gear.*' --bucket 1m",
            f"  curl -H 'Authorization: Bearer {token}' {api}/api/v1/racks",
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
        self._write_rack_config()
        rack_name = None
        if not self.args.no_rack:
            _clear_stale_passport(self.rack_state, self.mixer.registry, self.mixer.key.public_hex)
            self.rack = RackSupervisor(
                rack_command(self.rack_conf), self._rack_env(), self.args.rack_name,
                stop_timeout=self.args.drain_timeout + RACK_STOP_MARGIN_S, on_give_up=self._give_up)
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
    from .cli import _config_path, _setup_logging
    from .config import load_config

    overrides = {"enrollment.auto_adopt": True}
    if args.api_port is not None:
        overrides["api.port"] = args.api_port
    if args.snake_port is not None:
        overrides["snake.port"] = args.snake_port
    if args.state_dir:
        overrides["base.state_dir"] = args.state_dir
    cfg = load_config(_config_path(args.config), overrides=overrides)
    doc, text = load_standard_tier(find_scenarios_dir(args.scenarios))
    if args.print_scenario:
        sys.stdout.write(text)
        return 0
    _setup_logging(cfg.logging.level)
    from fluxrig.scenario.model import NAME_RE

    if not NAME_RE.match(args.rack_name):
        raise ConfigError(f"invalid Rack name {args.rack_name!r} (use a-z, 0-9, _ and -)", "--rack-name")
    binds = resolve_binds(doc, {"echo": args.echo_port, "iso": args.iso_port}, os.environ)
    _check_port_free(cfg.api.host, cfg.api.port, "API", "--api-port")
    _check_port_free(cfg.snake.host, cfg.snake.port, "Snake", "--snake-port")
    if not args.no_rack:
        for label, flag in (("echo", "--echo-port"), ("iso", "--iso-port")):
            host, _, port = binds[label].rpartition(":")
            try:
                _check_port_free(host, int(port), "TCP echo" if label == "echo" else "ISO 8583", flag)
            except ValueError:
                raise ConfigError(f"{binds[label]!r} is not host:port", dict(ENDPOINTS)[label]) from None
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
    p.add_argument("-c", "--config", help="fluxrig-mixer.toml (default: $FLUXRIG_MIXER_CONFIG or "
                   "./fluxrig-mixer.toml if present, else built-in defaults with state in ./data)")
    p.add_argument("--state-dir", help="override base.state_dir (Mixer state; the Rack's is <state-dir>/rack)")
    p.add_argument("--api-port", type=int, help="override api.port (default 8090)")
    p.add_argument("--snake-port", type=int, help="override snake.port (default 4222)")
    p.add_argument("--echo-port", type=int, help="TCP echo port (default: $FLUXRIG_ECHO_BIND, else 9000)")
    p.add_argument("--iso-port", type=int, help="ISO 8583 authorizer port (default: $FLUXRIG_ISO_BIND, else 8583)")
    p.add_argument("--rack-name", default=DEFAULT_RACK_NAME, help=f"name of the local Rack (default {DEFAULT_RACK_NAME})")
    p.add_argument("--drain-timeout", type=_duration, default=RACK_DRAIN_TIMEOUT_S, metavar="DURATION",
                   help=f"how long the local Rack may drain on stop before it is killed "
                   f"(default {RACK_DRAIN_TIMEOUT_S:g}s; e.g. 500ms, 30s)")
    p.add_argument("--ready-timeout", type=_duration, default=READY_TIMEOUT_S, metavar="DURATION",
                   help=f"give up (exit 1) if the local Rack has not applied the scenario by then "
                   f"(default {READY_TIMEOUT_S:g}s)")
    p.add_argument("--no-rack", action="store_true",
                   help="run only the Mixer with the scenario active; print how to start a Rack for it")
    p.add_argument("--scenarios", metavar="DIR",
                   help=f"directory holding {' and '.join(SCENARIO_FILES)} (default ./scenarios, else the checkout's)")
    p.add_argument("--print-scenario", action="store_true",
                   help="print the merged scenario (YAML) and exit; e.g. to import it on another Mixer")
    p.set_defaults(func=_cmd_up)
