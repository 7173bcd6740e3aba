"""map, router, generator and sink gears, run inside a real runtime."""

import asyncio
import json

import pytest
from helpers import running

from fluxrig.msg import FluxMsg
from fluxrig.runtime import Gear, Manifest, register
from fluxrig.scenario import build_scenario, parse_scenario

OUT: list = []


@register
class InjectGear(Gear):
    MANIFEST = Manifest(
        "test_inject",
        "pushes messages given by the test",
        inputs=(),
        schema={"type": "object", "properties": {}, "additionalProperties": False},
    )

    async def push(self, msg):
        await self.emit("out", msg)


@register
class CollectGear(Gear):
    MANIFEST = Manifest(
        "test_collect",
        "collects messages",
        outputs=(),
        inputs=("in", "in_b"),
        schema={"type": "object", "properties": {}, "additionalProperties": False},
    )

    async def process(self, port, msg):
        OUT.append((self.name, port, msg))


def wired(gear_yaml: str, outs=("out",)):
    wires = "\n".join(f"  - {{from: g.{o}, to: c.in}}" for o in outs)
    return f"""
meta: {{version: '1'}}
gears:
  - {{name: src, type: test_inject}}
  - name: g
{gear_yaml}
  - {{name: c, type: test_collect}}
wires:
  - {{from: src.out, to: g.in}}
{wires}
"""


@pytest.fixture(autouse=True)
def clear():
    OUT.clear()


async def test_map_ops_in_order():
    text = wired("""    type: map
    config:
      ops:
        - {set: meta.reply, value: "got {{ raw }} from {{ meta.conn.id }}"}
        - {set: data.card.pan, value: "4111111111111111"}
        - {copy: data.card.pan, to: data.bin6}
        - {move: meta.conn.id, to: data.origin}
        - {delete: data.card}
        - {set: raw, value: "{{ raw | upper }}"}
        - {set: data.n, value: "{{ data.count | int }}"}
        - {set: data.none, value: "{{ data.absent | default(zero) }}"}
""")
    async with running(text) as rt:
        await rt.gears["src"].push(FluxMsg(raw=b"hi", meta={"conn.id": "c7"}, data={"count": "0042"}))
        ((_, _, m),) = OUT
        assert m.meta["reply"] == "got hi from c7"
        assert m.raw == b"HI"
        assert m.get("bin6") == "4111111111111111"
        assert m.get("origin") == "c7" and "conn.id" not in m.meta
        assert m.get("card") is None
        assert m.get("n") == 42
        assert m.get("none") == "zero"


def test_map_bad_op_and_template_reported():
    doc = parse_scenario(
        wired("""    type: map
    config:
      ops:
        - {set: raw}
        - {set: raw, value: "{{ raw | shout }}"}
        - {copy: raw}
""")
    )
    with pytest.raises(Exception) as ei:
        build_scenario(doc, env={})
    text = str(ei.value)
    assert "ops[0]: set needs value" in text
    assert "ops[1]: template" in text and "unknown filter 'shout'" in text
    assert "ops[2]: copy needs to" in text


async def test_router_rules_default_and_no_match():
    text = """
meta: {version: '1'}
gears:
  - {name: src, type: test_inject}
  - name: r
    type: router
    config:
      rules:
        - {name: visa, match: {field: data.pan, prefix: "4"}}
        - name: big
          match: [{field: data.amount, gt: 1000}, {field: meta.cur, in: ["EUR", "USD"]}]
        - {name: echo, match: {field: raw, regex: "^ping"}}
  - {name: c, type: test_collect}
wires:
  - {from: src.out, to: r.in}
  - {from: r.out_visa, to: c.in}
  - {from: r.out_big, to: c.in}
  - {from: r.out_echo, to: c.in}
  - {from: r.error, to: c.in_b}
"""
    async with running(text) as rt:
        push = rt.gears["src"].push
        await push(FluxMsg(data={"pan": "4111"}))
        await push(FluxMsg(data={"pan": "5111", "amount": "1500"}, meta={"cur": "EUR"}))
        await push(FluxMsg(data={"pan": "5111", "amount": "1500"}, meta={"cur": "GBP"}))
        await push(FluxMsg(raw=b"ping 1"))
        await asyncio.gather(*(lane.join() for lane in rt.lanes))
        rules = [(port, m.meta.get("router.rule"), m.meta.get("error.reason")) for _, port, m in OUT]
        assert sorted(rules, key=str) == sorted(
            [("in", "visa", None), ("in", "big", None), ("in_b", None, "no_route"), ("in", "echo", None)], key=str
        )


async def test_generator_count_and_interval(tmp_path):
    path = tmp_path / "out.jsonl"
    text = f"""
meta: {{version: '1'}}
gears:
  - name: gen
    type: generator
    config: {{count: 4, interval: 20ms, template: {{raw: "n={{{{ seq }}}}", data: {{seq: "{{{{ seq }}}}"}}}}}}
  - {{name: s, type: sink, config: {{mode: file, path: "{path}"}}}}
wires:
  - {{from: gen.out, to: s.in}}
"""
    loop = asyncio.get_running_loop()
    async with running(text) as rt:
        t0 = loop.time()
        await asyncio.wait_for(rt.gears["gen"].done.wait(), 5)
        elapsed = loop.time() - t0
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["raw"] for x in lines] == ["n=1", "n=2", "n=3", "n=4"]
    assert [x["data"]["seq"] for x in lines] == [1, 2, 3, 4]
    assert elapsed >= 0.055  # three intervals of 20 ms between four messages


async def test_sink_file_writes_binary_as_hex(tmp_path):
    path = tmp_path / "s.jsonl"
    text = f"""
meta: {{version: '1'}}
gears:
  - {{name: src, type: test_inject}}
  - {{name: s, type: sink, config: {{mode: file, path: "{path}"}}}}
wires:
  - {{from: src.out, to: s.in}}
"""
    async with running(text) as rt:
        await rt.gears["src"].push(FluxMsg(raw=b"\xff\x00", data={"b": b"\x01"}))
    (line,) = path.read_text().splitlines()
    doc = json.loads(line)
    assert doc["raw"] == "hex:ff00" and doc["data"]["b"] == "\x01"


def test_two_templates_in_one_value_render_as_text():
    from fluxrig.msg import FluxMsg
    from fluxrig.templates import compile_template

    render = compile_template("{{ meta.a }} {{ meta.b | upper }}")
    assert render(FluxMsg(meta={"a": "x", "b": "y"})) == "x Y"
    assert compile_template("{{ raw }}")(FluxMsg(raw=b"\x01")) == b"\x01"  # a lone template keeps its type
