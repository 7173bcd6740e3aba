"""The runtime's two transition tables (fluxrig/runtime/states.py), and the runtime package's
import graph: no module imports one that imports it back."""

import ast
import itertools
import os

import pytest
from helpers import ROOT, scenario_from_yaml

from fluxrig.runtime import Runtime
from fluxrig.runtime.reload import ReloadError
from fluxrig.runtime.states import (
    GEAR_TRANSITIONS,
    RUNTIME_TRANSITIONS,
    GearEvent,
    GearState,
    IllegalTransition,
    RuntimeEvent,
    RuntimeState,
    next_gear_state,
    next_runtime_state,
)

TABLES = [
    ("gear", GearState, GearEvent, GEAR_TRANSITIONS, next_gear_state, GearState.CREATED),
    ("runtime", RuntimeState, RuntimeEvent, RUNTIME_TRANSITIONS, next_runtime_state, RuntimeState.RUNNING),
]


@pytest.mark.parametrize("machine,states,events,table,step,initial", TABLES, ids=["gear", "runtime"])
def test_every_pair_is_a_move_or_a_typed_error(machine, states, events, table, step, initial):
    for state, event in itertools.product(states, events):
        if (state, event) in table:
            assert step("x", state, event) is table[(state, event)]
            continue
        with pytest.raises(IllegalTransition) as ei:
            step("x", state, event)
        err = ei.value
        assert (err.machine, err.name, err.state, err.event) == (machine, "x", state, event)
        assert str(state) in str(err) and str(event) in str(err)
        assert err.allowed == [str(e) for (s, e) in table if s == state]


@pytest.mark.parametrize("machine,states,events,table,step,initial", TABLES, ids=["gear", "runtime"])
def test_every_state_is_reachable_and_stopped_is_final(machine, states, events, table, step, initial):
    seen, todo = {initial}, [initial]
    while todo:
        s = todo.pop()
        for (src, _e), dst in table.items():
            if src is s and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    assert seen == set(states)
    assert not [e for (s, e) in table if s == states("stopped")]


def test_a_gear_state_moves_only_through_the_table():
    gear = Runtime(scenario_from_yaml(ONE_MAP)).build().gears["xf"]
    assert gear.state is GearState.CREATED and gear.state == "created"  # StrEnum: compares as text
    with pytest.raises(AttributeError):
        gear.state = GearState.STOPPED
    with pytest.raises(IllegalTransition, match="gear xf is created: cannot drain"):
        gear.transition(GearEvent.DRAIN)
    assert gear.transition(GearEvent.START) is GearState.STARTED
    assert gear.transition(GearEvent.STOP) is GearState.STOPPED
    with pytest.raises(IllegalTransition, match=r"allowed: nothing"):
        gear.transition(GearEvent.STOP)


ONE_MAP = """
meta: {version: '1'}
gears:
  - {name: xf, type: map, config: {ops: []}}
"""


async def test_the_runtime_refuses_a_swap_once_draining_or_stopped():
    rt = Runtime()
    assert rt.state is RuntimeState.RUNNING  # the empty graph runs from the start
    await rt.swap(scenario_from_yaml(ONE_MAP))
    with pytest.raises(AttributeError):
        rt.state = RuntimeState.STOPPED
    assert await rt.drain(1.0)
    assert rt.state is RuntimeState.DRAINING
    with pytest.raises(ReloadError, match="the graph is draining, not running") as ei:
        await rt.swap(Runtime.EMPTY)
    assert isinstance(ei.value.__cause__, IllegalTransition)
    assert ei.value.__cause__.event == "swap"
    await rt.stop()
    assert rt.state is RuntimeState.STOPPED and rt.gears["xf"].state is GearState.STOPPED
    await rt.stop()  # idempotent: not a transition
    assert await rt.drain(1.0)  # nothing to drain
    with pytest.raises(ReloadError, match="the graph is stopped, not running"):
        await rt.swap(scenario_from_yaml(ONE_MAP))


def _imports(path: str, package: str) -> set[str]:
    """Modules of `package` imported at module level by `path` (TYPE_CHECKING blocks included)."""
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:
                out.update(a.name for a in node.names)
            elif node.level == 0 and node.module and node.module.startswith(package + "."):
                out.add(node.module[len(package) + 1 :].split(".")[0])
        elif isinstance(node, ast.Import):
            out.update(a.name[len(package) + 1 :].split(".")[0] for a in node.names if a.name.startswith(package + "."))
    return out


def test_no_import_cycles_in_the_runtime_package():
    pkg_dir = os.path.join(ROOT, "fluxrig", "runtime")
    mods = [f[:-3] for f in os.listdir(pkg_dir) if f.endswith(".py") and f != "__init__.py"]
    graph = {m: _imports(os.path.join(pkg_dir, m + ".py"), "fluxrig.runtime") & set(mods) for m in mods}
    assert "lane" not in graph["gear"] and "gear" in graph["lane"]  # the circle this replaced

    def visit(m, stack):
        assert m not in stack, f"import cycle: {' -> '.join([*stack, m])}"
        for n in graph[m]:
            visit(n, [*stack, m])

    for m in mods:
        visit(m, [])
