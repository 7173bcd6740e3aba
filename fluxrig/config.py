"""The Rack's configuration: `fluxrig.toml`, defaults, `FLUXRIG_*` environment overrides.

Precedence: defaults < TOML file < environment. Every key is declared once in `SCHEMA`
with its type, default and a line of documentation (shown by `fluxrig check`). An unknown
key, a bad value or a duration that does not parse raises ConfigError naming the key, and
start-up stops there.

Environment: `FLUXRIG_<SECTION>_<KEY>` sets `<section>.<key>` (e.g. `FLUXRIG_RACK_DRAIN_TIMEOUT=10s`,
`FLUXRIG_SNAKE_URL=nats://hub:4222`); `FLUXRIG_TRACE` and `FLUXRIG_DEBUG` set `logging.trace`
and `logging.debug`. Variables whose first word is not a section (`FLUXRIG_PURE_PYTHON`,
`FLUXRIG_SERIAL_PORT`, ...) are not configuration and are left alone.

Offline start: a Rack with a stored passport runs the passport's scenario at once, before it
tries the Snake (the Go original's `snake.offline_start_timeout` wait is therefore not needed
and not offered); the agent keeps reconnecting with backoff from `snake.reconnect_wait`.

WAL fsync policy (`store.wal_fsync`): `always` fsyncs before each record is acknowledged;
`batch` fsyncs once per `store.wal_fsync_window` (≤ 100 ms) and acknowledges the whole batch
after that fsync; `never` leaves flushing to the OS (a power cut loses what the page cache held).
"""

from __future__ import annotations

import os

from .errors import ConfigError
from .settings import BOOL, DUR, FLOAT, INT, STR, URLS, Settings, check_ranges, defaults, read_env, read_toml
from .wire.vocab import LogLevel

__all__ = ["SCHEMA", "RANGES", "Config", "load_config", "DEFAULT_CONFIG_NAME"]

DEFAULT_CONFIG_NAME = "fluxrig.toml"


# section -> key -> (type, default, doc, choices or None)
SCHEMA: dict[str, dict[str, tuple]] = {
    "base": {
        "name": (STR, "", "Rack name (a-z, 0-9, _ and -); a standalone Rack without one runs every gear", None),
        "state_dir": (STR, "./data", "directory for the passport, scenario copy, WAL, lock", None),
        "state_file": (STR, "rack.flux", "passport file name inside state_dir", None),
        "scenario": (STR, "", "scenario file to run standalone (same as --scenario)", None),
    },
    "logging": {
        "level": (STR, "info", "minimum log level", tuple(LogLevel)),
        "format": (STR, "text", "log line format on stderr", ("text", "json")),
        "filename": (STR, "", "also write logs to this file (empty = stderr only)", None),
        "trace": (BOOL, False, "enable TRACE (per-message, PAN-masked) logging", None),
        "debug": (BOOL, False, "enable DEBUG logging", None),
    },
    "store": {
        "dir": (STR, "", "WAL and local store directory; empty = <base.state_dir>", None),
        "wal_max_size_mb": (INT, 500, "WAL size cap; past it the oldest records are dropped and counted", None),
        "wal_fsync": (STR, "batch", "WAL fsync policy (see module docs)", ("always", "batch", "never")),
        "wal_fsync_window": (DUR, "50ms", "group-commit window for wal_fsync=batch (≤ 100ms)", None),
    },
    "rack": {
        "name_prefix": (STR, "node-", "prefix of generated Rack names", None),
        "drain_timeout": (DUR, "35s", "SIGTERM: max time to finish in-flight work before exit", None),
        "cleanup_timeout": (DUR, "2s", "max time for a gear's stop()", None),
        "lane_queue_size": (INT, 1024, "hot-lane queue depth per wire", None),
        "lane_send_timeout": (DUR, "5s", "max time an emitter waits on a full hot lane", None),
        "fuse_sync_chains": (BOOL, True, "call 1:1 wired gears directly instead of through a queue", None),
        "heartbeat_interval": (DUR, "30s", "heartbeat period towards the Mixer", None),
        "enrollment_timeout": (DUR, "15s", "how long Hello is retried before resuming offline", None),
        "enrollment_interval": (DUR, "2s", "Hello retry period", None),
        "max_hops": (INT, 64, "max hops a message may take, checked at every emit (loop guard)", None),
        "health_listen": (
            STR,
            "",
            "host:port of the HTTP health endpoint an L4 balancer checks (GET /health, /health/<group>: "
            "200 = send traffic, 503 = not); plain HTTP, nothing secret; empty = off (fluxrig/balancer.py)",
            None,
        ),
        "max_payload_size": (
            INT,
            2 * 1024 * 1024,
            "max message size in bytes, checked when it crosses the Snake",
            None,
        ),
    },
    "snake": {
        "url": (
            URLS,
            "",
            "NATS URL(s) of the Mixer's Snake: one, a comma list or a list (a cluster's nodes; the Rack also "
            "uses the servers the cluster advertises); empty = standalone Rack",
            None,
        ),
        "enrollment_bundle": (
            STR,
            "",
            "enrollment bundle from the Mixer (`fluxrig-mixer tokens create`): a file path or the "
            "fluxrig-enroll-v1:... string; gives the Snake URLs, its CA, the Mixer key and a token",
            None,
        ),
        "bootstrap_token": (STR, "", "enrollment token (the bundle carries one; this overrides it)", None),
        "mixer_public_key": (
            STR,
            "",
            "pinned Mixer Ed25519 public key (hex); the bundle carries it; without either enrolling is "
            "refused unless trust_on_first_use = true",
            None,
        ),
        "trust_on_first_use": (
            BOOL,
            False,
            "INSECURE: with no pinned key, trust whichever Mixer answers first (logged at every start)",
            None,
        ),
        "insecure_plaintext": (
            BOOL,
            False,
            "INSECURE: allow a nats:// (plain text) Snake URL; tokens and passports cross readable",
            None,
        ),
        "mixer_public_key_next": (STR, "", "second pinned key, accepted during key rotation", None),
        "connect_timeout": (DUR, "10s", "dial timeout to the Snake", None),
        "reconnect_wait": (DUR, "1s", "initial reconnect backoff", None),
        "root_ca_file": (STR, "", "CA bundle for TLS to the Snake (the enrollment bundle carries it)", None),
        "tls_cert_file": (STR, "", "client certificate for mTLS", None),
        "tls_key_file": (STR, "", "client key for mTLS", None),
    },
    "telemetry": {
        "disabled": (BOOL, False, "do not produce telemetry", None),
        "batch_interval": (DUR, "1s", "metric export period", None),
        "ship_rate": (
            FLOAT,
            0.0,
            "fixed cap on telemetry records/s shipped (a backlog after an outage drains at "
            "most this fast); 0 = adaptive: as fast as live traffic allows (see ship_lag_budget)",
            None,
        ),
        "ship_lag_budget": (
            DUR,
            "5ms",
            "adaptive drain: the shipper halves its window whenever the event loop runs "
            "later than this (live traffic waits that long); raise it to drain faster, lower it to "
            "protect live latency; 0 = ignore the loop",
            None,
        ),
        "ship_rtt_budget": (
            DUR,
            "250ms",
            "adaptive drain: the shipper halves its window whenever a publish takes "
            "longer than this to be acknowledged by the Snake; 0 = ignore",
            None,
        ),
        "ship_max_inflight": (INT, 16, "max telemetry batches awaiting the Snake's acknowledgement at once", None),
        "ship_batch_records": (INT, 1000, "max telemetry records per published batch (1-10000)", None),
    },
}


# Bounds beyond each key's type (settings.py already bounds every port, duration and integer).
# Checked after every layer; the error names the key. (low, high), None = open.
RANGES: dict[str, tuple] = {
    "store.wal_max_size_mb": (1, 1024 * 1024),
    "rack.drain_timeout": (0.0, 3600.0),
    "rack.cleanup_timeout": (0.0, 600.0),
    "rack.lane_queue_size": (1, 1_000_000),
    "rack.lane_send_timeout": (0.0, 3600.0),
    "rack.heartbeat_interval": (0.01, 86400.0),
    "rack.enrollment_timeout": (0.0, 86400.0),
    "rack.enrollment_interval": (0.01, 3600.0),
    "rack.max_hops": (1, 1024),
    "rack.max_payload_size": (1024, 64 * 1024 * 1024),
    "snake.connect_timeout": (0.1, 3600.0),
    "snake.reconnect_wait": (0.01, 3600.0),
    "telemetry.batch_interval": (0.01, 86400.0),
}


class Config(Settings):
    """Resolved configuration: `cfg.rack.drain_timeout` (seconds), `cfg.source` (file or None)."""

    SECRET_KEYS = frozenset({("snake", "bootstrap_token"), ("snake", "enrollment_bundle")})

    @property
    def store_dir(self) -> str:
        return self.store.dir or self.base.state_dir


def load_config(path: str | None = None, environ: dict | None = None) -> Config:
    """Defaults, then the TOML file at `path` (if given), then FLUXRIG_* variables."""
    env = os.environ if environ is None else environ
    values = defaults(SCHEMA)
    if path:
        read_toml(SCHEMA, path, values)
    # FLUXRIG_* variables whose first word is not a section (FLUXRIG_PURE_PYTHON, ...) are not config
    read_env(
        SCHEMA,
        env,
        "FLUXRIG_",
        values,
        unknown_sections_are_errors=False,
        aliases={"trace": "logging.trace", "debug": "logging.debug"},
    )
    check_ranges(values, RANGES)
    if values["store"]["wal_fsync_window"] > 0.1:
        raise ConfigError("the batch window must be at most 100ms", "store.wal_fsync_window")
    tel = values["telemetry"]
    if not 1 <= tel["ship_batch_records"] <= 10_000:
        raise ConfigError("must be in 1..10000", "telemetry.ship_batch_records")
    if tel["ship_max_inflight"] < 1:
        raise ConfigError("must be at least 1", "telemetry.ship_max_inflight")
    if tel["ship_rate"] < 0:
        raise ConfigError("must be 0 (adaptive) or a positive records/s cap", "telemetry.ship_rate")
    return Config(values, path)
