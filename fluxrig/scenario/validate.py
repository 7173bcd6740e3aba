"""Scenario validation: every problem at once, each with its location.

Checks (upstream-rack §3.3 plus the gear manifests): `meta.version` present; rack, group and
gear names well formed and unique; a known gear type; gear config against the type's schema
(wrong type, unknown key, missing required key); `deploy` naming a declared rack or group
when racks are declared; endpoint grammar; wires from an output port and to an input port
the gear has; known lanes; no `hot` wire between two Racks.
"""

from __future__ import annotations

from ..errors import ScenarioError, ScenarioProblem
from ..runtime import schema as cfg_schema
from ..runtime.registry import UnknownGearType, get_gear_class
from .groups import projection_groups
from .limits import check_bounds
from .model import ENDPOINT_RE, NAME_RE, Endpoint, GearSpec, Scenario, WireSpec, interpolate, parse_scenario

__all__ = ["validate_scenario", "build_scenario", "load_scenario", "read_scenario_doc"]

LANES = ("", "hot", "guaranteed")
TOP_KEYS = ("meta", "racks", "gears", "wires", "pipes")


def _check_racks(racks, problems: list) -> set[str]:
    names: set[str] = set()
    if racks is None:
        return names
    if not isinstance(racks, list):
        problems.append(ScenarioProblem("racks", "must be a list"))
        return names
    for i, r in enumerate(racks):
        loc = f"racks[{i}]"
        if not isinstance(r, dict):
            problems.append(ScenarioProblem(loc, "must be a map with name or group"))
            continue
        name, group = r.get("name"), r.get("group")
        if name is not None:
            key, value = "name", name
        elif group is not None:
            key, value = "group", group
            labels = (r.get("match") or {}).get("labels") if isinstance(r.get("match"), dict) else None
            if not labels:
                problems.append(ScenarioProblem(f"{loc}.match.labels", "a group needs non-empty match.labels"))
        elif r.get("defaults") is not None:
            continue
        else:
            problems.append(ScenarioProblem(loc, "a rack entry needs name, group or defaults"))
            continue
        if not isinstance(value, str) or not NAME_RE.match(value):
            problems.append(ScenarioProblem(f"{loc}.{key}", f"invalid name {value!r} (use a-z, 0-9, _ and -)"))
        elif value in names:
            problems.append(ScenarioProblem(f"{loc}.{key}", f"duplicate rack/group name {value!r}"))
        else:
            names.add(value)
    return names


def validate_scenario(doc: dict, env=None) -> list[ScenarioProblem]:
    """Every problem in `doc` (an uninterpolated or interpolated document); [] when valid."""
    # A document that did not come through parse_scenario (a passport's projection, JSON from
    # the API) is bounded here first: the walks below recurse.
    bound = check_bounds(doc)
    if bound is not None:
        return [bound]
    problems: list[ScenarioProblem] = []
    try:
        doc = interpolate(doc, env)
    except ScenarioError as exc:
        problems.extend(exc.problems)
    _build(doc, problems)
    return problems


def build_scenario(doc: dict, source: str | None = None, env=None) -> Scenario:
    """Validate and return the typed Scenario; ScenarioError with every problem otherwise."""
    bound = check_bounds(doc)
    if bound is not None:
        raise ScenarioError([bound], source)
    problems: list[ScenarioProblem] = []
    try:
        doc = interpolate(doc, env)
    except ScenarioError as exc:
        problems.extend(exc.problems)
    scenario = _build(doc, problems)
    if problems:
        raise ScenarioError(problems, source)
    scenario.source = source
    return scenario


def _build(doc: dict, problems: list) -> Scenario:
    for key in doc:
        if key not in TOP_KEYS and not str(key).startswith("x-"):
            problems.append(ScenarioProblem(str(key), f"unknown top-level key (known: {', '.join(TOP_KEYS[:4])})"))
    meta = doc.get("meta")
    version = ""
    name = ""
    if not isinstance(meta, dict):
        problems.append(ScenarioProblem("meta", "required map with at least `version`"))
    else:
        version = meta.get("version")
        if version in (None, ""):
            problems.append(ScenarioProblem("meta.version", "scenario version is required"))
            version = ""
        version = str(version)
        name = str(meta.get("name") or "")
    rack_names = _check_racks(doc.get("racks"), problems)

    gears: list[GearSpec] = []
    ports: dict[str, tuple[tuple, tuple]] = {}
    deploy_of: dict[str, str | None] = {}
    raw_gears = doc.get("gears") or []
    if not isinstance(raw_gears, list):
        problems.append(ScenarioProblem("gears", "must be a list"))
        raw_gears = []
    for i, g in enumerate(raw_gears):
        loc = f"gears[{i}]"
        if not isinstance(g, dict):
            problems.append(ScenarioProblem(loc, "must be a map with name and type"))
            continue
        gname = g.get("name")
        label = f"{loc}({gname})" if isinstance(gname, str) else loc
        for key in g:
            if key not in ("name", "type", "config", "deploy", "doc", "id", "ports", "labels"):
                problems.append(
                    ScenarioProblem(f"{label}.{key}", "unknown gear key (known: name, type, config, deploy, doc)")
                )
        if not isinstance(gname, str) or not gname:
            problems.append(ScenarioProblem(f"{loc}.name", "gear name is required"))
            continue
        if not NAME_RE.match(gname):
            problems.append(ScenarioProblem(f"{label}.name", f"invalid gear name {gname!r} (use a-z, 0-9, _ and -)"))
        if gname in ports:
            problems.append(ScenarioProblem(f"{label}.name", f"duplicate gear name {gname!r}"))
            continue
        gtype = g.get("type")
        config = g.get("config") or {}
        if not isinstance(config, dict):
            problems.append(ScenarioProblem(f"{label}.config", "must be a map"))
            config = {}
        deploy = g.get("deploy")
        if deploy is not None and not (isinstance(deploy, str) and NAME_RE.match(deploy)):
            problems.append(ScenarioProblem(f"{label}.deploy", f"invalid rack name {deploy!r}"))
        elif deploy and rack_names and deploy not in rack_names:
            problems.append(
                ScenarioProblem(f"{label}.deploy", f"names rack {deploy!r}, which `racks` does not declare")
            )
        if not isinstance(gtype, str) or not gtype:
            problems.append(ScenarioProblem(f"{label}.type", "gear type is required"))
            ports[gname] = ((), ())
            continue
        try:
            cls = get_gear_class(gtype)
        except UnknownGearType as exc:
            problems.append(ScenarioProblem(f"{label}.type", str(exc)))
            ports[gname] = None  # unknown ports: do not report wires to it twice
            continue
        manifest = cls.MANIFEST
        for where, msg in cfg_schema.check(manifest.schema, config, f"{label}.config"):
            problems.append(ScenarioProblem(where, msg))
        full = cfg_schema.with_defaults(manifest.schema, config)
        extra = getattr(cls, "validate_config", None)
        if extra is not None:
            for where, msg in extra(full):
                problems.append(ScenarioProblem(f"{label}.config.{where}" if where else f"{label}.config", msg))
        try:
            ports[gname] = manifest.ports(full)
        except Exception as exc:  # a dynamic-port function choking on bad config already reported
            ports[gname] = None
            if not problems:
                problems.append(ScenarioProblem(f"{label}.config", f"cannot derive ports: {exc}"))
        deploy_of[gname] = deploy
        gears.append(GearSpec(name=gname, type=gtype, config=full, deploy=deploy, doc=str(g.get("doc") or "")))

    wires: list[WireSpec] = []
    raw_wires = doc.get("wires")
    if raw_wires is None:
        raw_wires = doc.get("pipes") or []
    if not isinstance(raw_wires, list):
        problems.append(ScenarioProblem("wires", "must be a list"))
        raw_wires = []
    for i, w in enumerate(raw_wires):
        loc = f"wires[{i}]"
        if not isinstance(w, dict):
            problems.append(ScenarioProblem(loc, "must be a map with from and to"))
            continue
        for key in w:
            if key not in ("from", "to", "lane", "id"):
                problems.append(ScenarioProblem(f"{loc}.{key}", "unknown wire key (known: from, to, lane)"))
        lane = w.get("lane") or ""
        if lane not in LANES:
            problems.append(ScenarioProblem(f"{loc}.lane", f"unknown lane {lane!r} (hot or guaranteed)"))
        ends = []
        for side, direction in (("from", 1), ("to", 0)):
            text = w.get(side)
            if not isinstance(text, str) or not text:
                problems.append(ScenarioProblem(f"{loc}.{side}", "endpoint is required (gear.port or rack.gear.port)"))
                ends.append(None)
                continue
            if not ENDPOINT_RE.match(text):
                problems.append(
                    ScenarioProblem(f"{loc}.{side}", f"bad endpoint {text!r}: use gear.port or rack.gear.port")
                )
                ends.append(None)
                continue
            ep = Endpoint.parse(text)
            if ep.rack and rack_names and ep.rack not in rack_names:
                problems.append(ScenarioProblem(f"{loc}.{side}", f"rack {ep.rack!r} is not declared in racks"))
            if ep.gear not in ports:
                problems.append(ScenarioProblem(f"{loc}.{side}", f"no gear named {ep.gear!r}"))
                ends.append(None)
                continue
            gp = ports[ep.gear]
            if gp is not None:
                have = gp[direction]
                kind = "output" if direction else "input"
                if ep.port not in have:
                    problems.append(
                        ScenarioProblem(
                            f"{loc}.{side}",
                            f"gear {ep.gear!r} has no {kind} port {ep.port!r} ({kind}s: {', '.join(have) or 'none'})",
                        )
                    )
            ends.append(ep)
        if None in ends:
            continue
        src, dst = ends
        if lane == "hot":
            rs = src.rack or deploy_of.get(src.gear)
            rd = dst.rack or deploy_of.get(dst.gear)
            if rs and rd and rs != rd:
                problems.append(
                    ScenarioProblem(f"{loc}.lane", f"a hot wire cannot cross Racks ({rs} -> {rd}); use guaranteed")
                )
        wires.append(WireSpec(src=src, dst=dst, lane=lane))
    racks = doc.get("racks") if isinstance(doc.get("racks"), list) else []
    return Scenario(name=name, version=version, gears=gears, wires=wires, racks=racks, doc=doc,
                    groups=projection_groups(doc))  # fmt: skip


def read_scenario_doc(path: str) -> dict:
    """Read and parse a scenario file (YAML by default, TOML by its extension)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ScenarioError([ScenarioProblem(path, f"cannot read: {exc.strerror}")]) from None
    fmt = "toml" if path.endswith(".toml") else "yaml"
    return parse_scenario(text, fmt, source=path)


def load_scenario(path: str, env=None) -> Scenario:
    """Read, interpolate and validate a scenario file."""
    return build_scenario(read_scenario_doc(path), source=path, env=env)
