"""Bounded scenario parsing (fluxrig/scenario/limits.py) and `fluxrig check` exit codes.

Every hostile document of issue 13 item 4 is refused with a ScenarioError naming the line and
the limit, quickly, and nothing else is ever raised; `fluxrig check` exits 2 on bad input
(a config or scenario the operator must fix), so systemd's RestartPreventExitStatus=2 holds."""

from __future__ import annotations

import time

import pytest

from fluxrig.cli.main import main as rack_main
from fluxrig.errors import ConfigError, ScenarioError
from fluxrig.scenario import parse_scenario, validate_scenario
from fluxrig.scenario.limits import Limits, check_bounds, parse_bounded
from fluxrig.settings import read_toml

BOMB = "meta: {version: 1}\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)

HOSTILE = [
    ("alias bomb", BOMB, "yaml", "alias", "<scenario>:3:"),
    ("deep flow", "x: " + "[" * 5000 + "]" * 5000, "yaml", "max_depth", "<scenario>:1:"),
    ("deep block", "x:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(200)), "yaml", "max_depth", ":65:"),
    ("long int", "meta:\n  version: " + "9" * 5000, "yaml", "max_int_digits", "<scenario>:2:"),
    ("long string", "x: " + "a" * 300_000, "yaml", "max_scalar_chars", "<scenario>:1:"),
    ("deep toml", "x = " + "[" * 5000 + "]" * 5000, "toml", "max_depth", "<scenario>:1:"),
    ("dotted toml", "k." * 3000 + "z = 1", "toml", "max_depth", "<scenario>:1"),
    ("long toml int", "[meta]\nversion = " + "9" * 5000, "toml", "digits", "<scenario>:2"),
    ("bad yaml", "a: [1, 2\nb: }", "yaml", "not valid YAML", "<scenario>:"),
    ("bad toml", "[meta\nversion = 1", "toml", "not valid TOML", "<scenario>:1"),
    ("bad date", "x: 2024-13-45", "yaml", "not valid YAML", "<scenario>"),
]


@pytest.mark.parametrize("name,text,fmt,message,location", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_documents_refused_quickly_with_location(name, text, fmt, message, location):
    t0 = time.perf_counter()
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, fmt)
    assert time.perf_counter() - t0 < 1.0, name
    problem = info.value.problems[0]
    assert message in problem.message, problem
    assert problem.location.startswith(location) or location in problem.location, problem


def test_size_limit_before_parsing():
    with pytest.raises(ScenarioError, match="max_bytes"):
        parse_bounded("x: 1\n" * 1000, "yaml", limits=Limits(max_bytes=1000))


def test_node_limit():
    with pytest.raises(ScenarioError, match="max_nodes"):
        parse_bounded("[" + ", ".join(["1"] * 500) + "]", "yaml", limits=Limits(max_nodes=100))


def test_anchor_without_alias_and_normal_documents_pass():
    doc = parse_scenario("meta: &m {name: ok, version: 1}\ngears: []\nwires: []\n")
    assert doc["meta"] == {"name": "ok", "version": 1}
    doc = parse_scenario('[meta]\nname = "ok"\nversion = 1\n', "toml")
    assert doc["meta"]["version"] == 1


def test_check_bounds_is_iterative_and_validate_uses_it():
    deep: dict = {}
    cur = deep
    for _ in range(100_000):  # far past Python's recursion limit
        cur["k"] = {}
        cur = cur["k"]
    problem = check_bounds(deep)
    assert problem is not None and "max_depth" in problem.message
    assert problem.location.startswith("k.k.k")
    # A document that bypassed the parser (a passport, JSON) is bounded by the validator too.
    problems = validate_scenario({"meta": {"version": 1}, "gears": deep})
    assert problems and "max_depth" in problems[0].message
    assert check_bounds({"n": 10**50}).message.startswith("integer")


def test_config_toml_never_tracebacks(tmp_path):
    for body, fragment in (
        ("x = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
        ("[api]\nport = " + "9" * 5000, "not valid TOML"),
        ("[api\n", ":1 is not valid TOML"),
        (b"\xff\xfe".decode("latin-1"), "not valid TOML"),
    ):
        path = tmp_path / "c.toml"
        path.write_text(body)
        with pytest.raises(ConfigError, match=fragment):
            read_toml({"api": {}}, str(path), {"api": {}})


@pytest.mark.parametrize(
    "config,scenario,code",
    [
        ("[rack]\nmax_hops = 0\n", "meta: {version: 1}\n", 2),
        ("x = " + "[" * 3000 + "]" * 3000 + "\n", "meta: {version: 1}\n", 2),
        ("", BOMB, 2),
        ("", "meta:\n  version: " + "9" * 5000 + "\n", 2),
        ("", "meta: {version: 1}\n", 0),
    ],
    ids=["range", "deep-toml", "alias-bomb", "long-int", "ok"],
)
def test_fluxrig_check_exit_codes(tmp_path, capsys, config, scenario, code):
    cfg = tmp_path / "fluxrig.toml"
    cfg.write_text(config + f'[base]\nstate_dir = "{tmp_path / "state"}"\n' if "[base]" not in config else config)
    scen = tmp_path / "s.yaml"
    scen.write_text(scenario)
    assert rack_main(["check", "-c", str(cfg), "-s", str(scen)]) == code
    out = capsys.readouterr().out
    assert "Traceback" not in out
    if code:
        assert "FAIL" in out
