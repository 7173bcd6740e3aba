import pytest

from fluxrig.config import load_config
from fluxrig.durations import parse_duration
from fluxrig.errors import ConfigError


def test_defaults():
    cfg = load_config(None, environ={})
    assert cfg.rack.drain_timeout == 35.0
    assert cfg.rack.lane_queue_size == 1024
    assert cfg.base.state_dir == "./data"
    assert cfg.store_dir == "./data"


def test_toml_then_env(tmp_path):
    p = tmp_path / "fluxrig.toml"
    p.write_text('[rack]\ndrain_timeout = "10s"\n[snake]\nurl = "nats://hub:4222"\n')
    cfg = load_config(str(p), environ={"FLUXRIG_RACK_DRAIN_TIMEOUT": "250ms", "FLUXRIG_PURE_PYTHON": "1"})
    assert cfg.rack.drain_timeout == 0.25
    assert cfg.snake.url == "nats://hub:4222"


def test_unknown_key_names_it(tmp_path):
    p = tmp_path / "fluxrig.toml"
    p.write_text('[rack]\ndrain_timout = "10s"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(str(p), environ={})
    assert ei.value.key == "rack.drain_timout"


def test_unknown_section(tmp_path):
    p = tmp_path / "fluxrig.toml"
    p.write_text("[rakc]\nx = 1\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(str(p), environ={})


@pytest.mark.parametrize("value", ['"10"', "10", '"ten seconds"', '"5 s"'])
def test_strict_durations(tmp_path, value):
    p = tmp_path / "fluxrig.toml"
    p.write_text(f"[rack]\ndrain_timeout = {value}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(str(p), environ={})
    assert ei.value.key == "rack.drain_timeout"


def test_bad_env_value_names_the_key():
    with pytest.raises(ConfigError) as ei:
        load_config(None, environ={"FLUXRIG_RACK_LANE_QUEUE_SIZE": "many"})
    assert ei.value.key == "rack.lane_queue_size"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, environ={"FLUXRIG_RACK_NOPE": "1"})


def test_bad_choice(tmp_path):
    p = tmp_path / "fluxrig.toml"
    p.write_text('[store]\nwal_fsync = "sometimes"\n')
    with pytest.raises(ConfigError, match="always, batch, never"):
        load_config(str(p), environ={})


def test_batch_window_capped():
    with pytest.raises(ConfigError, match="100ms"):
        load_config(None, environ={"FLUXRIG_STORE_WAL_FSYNC_WINDOW": "2s"})


def test_parse_duration():
    assert parse_duration("1m30s") == 90
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2h") == 7200
    for bad in ("", "5", "s", "1x", "1s2"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_example_file_lists_every_key_and_loads(tmp_path):
    from fluxrig.cli.cmd_config import example
    from fluxrig.config import SCHEMA

    text = example()
    p = tmp_path / "fluxrig.toml"
    p.write_text(text)
    cfg = load_config(str(p), environ={})
    assert cfg.as_dict() == load_config(None, environ={}).as_dict()
    for section, keys in SCHEMA.items():
        for key in keys:
            assert f"\n{key} = " in text, f"{section}.{key}"
