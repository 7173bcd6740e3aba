"""Scenario documents: parsing (YAML or TOML), `${NAME}` interpolation, the typed model.

A scenario is `meta` (version required), optional `racks`, `gears` and `wires`
(upstream-rack §3). Values may use `${NAME}` or `${NAME:-default}` from the environment; a
value that is exactly one placeholder takes the type of what it expands to (`${PORT:-9000}`
becomes the integer 9000), a placeholder inside a longer string is substituted as text.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import yaml

from ..errors import ScenarioError, ScenarioProblem
from .limits import DEFAULT_LIMITS, Limits, parse_bounded

__all__ = [
    "parse_scenario",
    "interpolate",
    "Endpoint",
    "GearSpec",
    "WireSpec",
    "Scenario",
    "ENDPOINT_RE",
    "NAME_RE",
]

NAME_RE = re.compile(r"^[a-z0-9_-]+$")
ENDPOINT_RE = re.compile(r"^[a-z0-9_-]+\.[a-z0-9_-]+(\.[a-z0-9_-]+)?$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def parse_scenario(text: str, fmt: str = "yaml", source: str | None = None, limits: Limits = DEFAULT_LIMITS) -> dict:
    """Parse scenario text into a plain dict within `limits` (limits.py: no YAML aliases, bounded
    size, depth, nodes, integers); ScenarioError naming the line if it does not parse or is not
    a map. Never raises anything else."""
    where = source or "<scenario>"
    doc = parse_bounded(text, fmt, where, limits)
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ScenarioError([ScenarioProblem(where, "a scenario must be a map with meta, gears and wires")])
    return doc


def _expand(text: str, env, location: str, problems: list):
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                problems.append(ScenarioProblem(location, f"environment variable {name} is not set and has no default"))
                return m.group(0)
            return default
        return value

    whole = _VAR.fullmatch(text)
    expanded = _VAR.sub(sub, text)
    if whole and expanded != text:
        # Give a lone placeholder the type of its value: ports become integers, flags booleans.
        try:
            typed = yaml.safe_load(expanded)
        except (yaml.YAMLError, ValueError):
            return expanded
        if isinstance(typed, (int, float, bool)):
            return typed
    return expanded


def interpolate(doc, env=None, location: str = "", problems: list | None = None):
    """Expand `${NAME}` / `${NAME:-default}` in every string of `doc` (a new structure)."""
    env = os.environ if env is None else env
    own = problems is None
    problems = [] if own else problems
    if isinstance(doc, dict):
        out = {k: interpolate(v, env, f"{location}.{k}" if location else str(k), problems) for k, v in doc.items()}
    elif isinstance(doc, list):
        out = [interpolate(v, env, f"{location}[{i}]", problems) for i, v in enumerate(doc)]
    elif isinstance(doc, str) and "${" in doc:
        out = _expand(doc, env, location, problems)
    else:
        out = doc
    if own and problems:
        raise ScenarioError(problems)
    return out


@dataclass(frozen=True)
class Endpoint:
    rack: str | None
    gear: str
    port: str

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        parts = text.split(".")
        if len(parts) == 3:
            return cls(parts[0], parts[1], parts[2])
        return cls(None, parts[0], parts[1])

    def __str__(self) -> str:
        return f"{self.rack}.{self.gear}.{self.port}" if self.rack else f"{self.gear}.{self.port}"


@dataclass
class GearSpec:
    name: str
    type: str
    config: dict = field(default_factory=dict)
    deploy: str | None = None
    doc: str = ""


@dataclass
class WireSpec:
    src: Endpoint
    dst: Endpoint
    lane: str = ""


@dataclass
class Scenario:
    """A validated scenario; `doc` is the interpolated document it was built from."""

    name: str
    version: str
    gears: list[GearSpec]
    wires: list[WireSpec]
    racks: list[dict]
    doc: dict
    source: str | None = None
    #: The groups this Rack is a member of (fluxrig.scenario.groups: a projection's
    #: `x-fluxrig.groups`); gears deployed to one of them run here.
    groups: frozenset = frozenset()

    def gear(self, name: str) -> GearSpec | None:
        for g in self.gears:
            if g.name == name:
                return g
        return None
