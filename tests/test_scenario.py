import subprocess
import sys

import pytest
from helpers import ROOT

from fluxrig.errors import ScenarioError
from fluxrig.scenario import build_scenario, load_scenario, parse_scenario, validate_scenario

GOOD = """
meta: {name: t, version: 1.0.0}
gears:
  - name: gw
    type: io_tcp
    config: {mode: server, bind: "127.0.0.1:${PORT:-9000}"}
  - name: up
    type: map
    config: {ops: [{set: raw, value: "{{ raw | upper }}"}]}
wires:
  - {from: gw.out, to: up.in}
  - {from: up.out, to: gw.in}
"""


def problems(text, env=None):
    return [str(p) for p in validate_scenario(parse_scenario(text), env=env or {})]


def test_valid_scenario():
    s = build_scenario(parse_scenario(GOOD), env={})
    assert s.version == "1.0.0"
    assert [g.name for g in s.gears] == ["gw", "up"]
    assert s.gears[0].config["max_connections"] == 4096  # defaults filled in


def test_env_interpolation_types_and_defaults():
    s = build_scenario(parse_scenario(GOOD), env={"PORT": "9100"})
    assert s.gears[0].config["bind"] == "127.0.0.1:9100"
    doc = parse_scenario("meta: {version: '1'}\ngears:\n  - {name: g, type: generator, config: {count: '${N:-3}'}}\n")
    assert build_scenario(doc, env={}).gears[0].config["count"] == 3
    with pytest.raises(ScenarioError, match="MISSING is not set"):
        build_scenario(parse_scenario("meta: {version: '${MISSING}'}"), env={})


def test_every_problem_reported_at_once_with_locations():
    text = """
meta: {name: bad}
gears:
  - name: Bad Name
    type: map
    config: {ops: []}
  - name: dup
    type: sink
  - name: dup
    type: sink
  - name: what
    type: no_such_gear
  - name: tcp
    type: io_tcp
    config: {mode: server, bind: 9000, colour: red}
  - name: cli
    type: io_tcp
    config: {mode: client}
  - name: m
    type: map
wires:
  - {from: tcp.out, to: m.nope}
  - {from: "tcp", to: m.in}
  - {from: tcp.in, to: m.in}
  - {from: ghost.out, to: m.in}
  - {from: tcp.out, to: what.in}
"""
    ps = problems(text)
    joined = "\n".join(ps)
    assert "meta.version: scenario version is required" in joined
    assert "gears[0](Bad Name).name: invalid gear name" in joined
    assert "gears[2](dup).name: duplicate gear name 'dup'" in joined
    assert "gears[3](what).type: unknown gear type: no_such_gear" in joined
    assert "gears[4](tcp).config.bind: expected string" in joined
    assert "gears[4](tcp).config.colour: unknown key" in joined
    assert "gears[5](cli).config.connect: mode=client needs connect" in joined
    assert "gears[6](m).config.ops: required key is missing" in joined
    assert "wires[0].to: gear 'm' has no input port 'nope'" in joined
    assert "wires[1].from: bad endpoint 'tcp'" in joined
    assert "wires[2].from: gear 'tcp' has no output port 'in'" in joined
    assert "wires[3].from: no gear named 'ghost'" in joined
    # a wire to a gear of unknown type is not reported twice
    assert not any(p.startswith("wires[4]") for p in ps)
    assert len(ps) >= 12


def test_racks_and_lanes():
    text = """
meta: {version: '1'}
racks: [{name: a}, {name: b}, {group: edge}]
gears:
  - {name: x, type: generator, deploy: a}
  - {name: y, type: sink, deploy: b}
  - {name: z, type: sink, deploy: c}
wires:
  - {from: x.out, to: y.in, lane: hot}
  - {from: x.out, to: z.in, lane: fast}
"""
    joined = "\n".join(problems(text))
    assert "racks[2].match.labels: a group needs non-empty match.labels" in joined
    assert "gears[2](z).deploy: names rack 'c'" in joined
    assert "wires[0].lane: a hot wire cannot cross Racks (a -> b)" in joined
    assert "wires[1].lane: unknown lane 'fast'" in joined


def test_router_ports_come_from_config():
    text = """
meta: {version: '1'}
gears:
  - name: r
    type: router
    config: {rules: [{name: visa, match: {field: data.pan, prefix: "4"}}], default: other}
  - {name: s, type: sink}
wires:
  - {from: r.out_visa, to: s.in}
  - {from: r.out_other, to: s.in}
  - {from: r.error, to: s.in}
  - {from: r.out_amex, to: s.in}
"""
    ps = problems(text)
    assert ps == ["wires[3].from: gear 'r' has no output port 'out_amex' (outputs: out_visa, out_other, error)"]


def test_toml_scenario(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(
        '[meta]\nversion = "2"\n[[gears]]\nname = "g"\ntype = "generator"\n[[gears]]\nname = "s"\n'
        'type = "sink"\n[[wires]]\nfrom = "g.out"\nto = "s.in"\n'
    )
    s = load_scenario(str(p))
    assert s.version == "2" and len(s.wires) == 1


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("meta:\n  version: 1\ngears: [\n")
    with pytest.raises(ScenarioError, match=r"s.yaml:\d+:\d+: not valid YAML"):
        load_scenario(str(p))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fluxrig.cli.main", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_validate_exit_codes(tmp_path):
    assert _cli("scenario", "validate", "scenarios/tcp-echo.yaml").returncode == 0
    assert _cli("scenario", "validate", "scenarios/getting-started.yaml").returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("meta: {}\ngears: [{name: x, type: nope}]\n")
    r = _cli("scenario", "validate", str(bad))
    assert r.returncode == 2
    assert "meta.version" in r.stderr and "unknown gear type: nope" in r.stderr
