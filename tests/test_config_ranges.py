"""Configuration values are range-checked, in the file, the environment and the flags, and the
error names the key (Rack fluxrig/config.py, Mixer fluxrig_mixer/config.py, fluxrig/settings.py)."""

from __future__ import annotations

import pytest
from fluxrig_mixer.cli import main as mixer_main
from fluxrig_mixer.config import load_config as mixer_config

from fluxrig.config import load_config as rack_config
from fluxrig.errors import ConfigError


@pytest.mark.parametrize(
    "text,key",
    [
        ("[api]\nport = 99999\n", "api.port"),
        ("[snake]\nport = 65536\n", "snake.port"),
        ("[api]\nmax_requests = 0\n", "api.max_requests"),
        ('[telemetry]\nretention = "99999999999h"\n', "telemetry.retention"),
        ("[telemetry]\nbatch_max_messages = 9007199254740993\n", "telemetry.batch_max_messages"),
        ("[api]\nmax_connections = 10\nmax_connections_per_client = 11\n", "api.max_connections_per_client"),
    ],
)
def test_mixer_file_values_out_of_range(tmp_path, text, key):
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        mixer_config(str(path), environ={})
    assert info.value.key == key


def test_mixer_env_and_flags_checked_too(tmp_path, capsys):
    with pytest.raises(ConfigError, match="api.port"):
        mixer_config(None, environ={"FLUXRIG_MIXER_API_PORT": "99999"})
    with pytest.raises(ConfigError, match="api.port"):
        mixer_config(None, environ={}, overrides={"api.port": 99999})
    path = tmp_path / "m.toml"
    path.write_text("[api]\nport = 99999\n")
    assert mixer_main(["config", "check", "-c", str(path)]) == 2
    assert "api.port" in capsys.readouterr().err
    assert mixer_config(None, environ={}, overrides={"api.port": 0}).api.port == 0


@pytest.mark.parametrize(
    "env,key",
    [
        ({"FLUXRIG_RACK_MAX_HOPS": "0"}, "rack.max_hops"),
        ({"FLUXRIG_RACK_LANE_QUEUE_SIZE": "0"}, "rack.lane_queue_size"),
        ({"FLUXRIG_RACK_HEARTBEAT_INTERVAL": "0s"}, "rack.heartbeat_interval"),
        ({"FLUXRIG_TELEMETRY_SHIP_RATE": "nan"}, "telemetry.ship_rate"),
        ({"FLUXRIG_TELEMETRY_SHIP_RATE": "inf"}, "telemetry.ship_rate"),
    ],
)
def test_rack_values_out_of_range(env, key):
    with pytest.raises(ConfigError) as info:
        rack_config(None, environ=env)
    assert info.value.key == key
