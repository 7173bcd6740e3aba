"""Scenario store (versioned, content-addressed) and per-Rack projection.

Job. Import a scenario document (YAML or TOML), validate it with the Rack's own validator
(`fluxrig.scenario.validate_scenario`: the Mixer never accepts what a Rack would refuse),
store it under the SHA-256 of its canonical JSON form, keep the history of activations, and
cut the active scenario into one projection per Rack.

Versions. A stored scenario is addressed by its digest; its display version is
`<meta.version>@<digest[:12]>`, so two different documents that both claim `version: 1` are
never confused. Importing the same document twice is a no-op that returns the first import.

Projection for Rack R (`project`):
  - gears whose `deploy` is R, or a group whose `match.labels` are all among R's labels,
    plus global gears (no `deploy`);
  - wires whose two ends are both in that set (endpoints may name R explicitly);
  - wires with one end here and one on another Rack go to `x-remote-wires` with the
    guaranteed-lane subject `flux.msg.<rack>.<gear>.<port>` of their source, for the runtime;
  - `racks` keeps only R's own entry and the entries of the groups R is a member of, `meta` is
    kept, and `x-fluxrig` says what this is (rack, digest, and `groups`: R's groups, issue 17).
    A group's projection depends on R's labels only, never on the other members.
"""

from __future__ import annotations

import hashlib
import json
import logging

from fluxrig.errors import FluxError, ScenarioError, ScenarioProblem
from fluxrig.scenario import parse_scenario, validate_scenario
from fluxrig.scenario.groups import PROJECTION_KEY, member_groups
from fluxrig.wire import subjects as S

from .parse_worker import Checked, ScenarioChecker

__all__ = [
    "ScenarioStore",
    "StoredScenario",
    "project",
    "digest_of",
    "ScenarioNotFound",
    "NoActiveScenario",
    "DIGEST_SHOWN",
    "DDL",
    "placement",
    "gear_home",
]

log = logging.getLogger("fluxrig.mixer.scenarios")

DIGEST_SHOWN = 12

DDL = [
    """CREATE TABLE IF NOT EXISTS scenarios(
           digest VARCHAR PRIMARY KEY, seq BIGINT NOT NULL, name VARCHAR NOT NULL, version VARCHAR NOT NULL,
           doc VARCHAR NOT NULL, source_format VARCHAR NOT NULL, source_text VARCHAR NOT NULL,
           imported_at TIMESTAMPTZ NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS scenario_activations(
           ts TIMESTAMPTZ NOT NULL, digest VARCHAR NOT NULL, detail VARCHAR)""",
]


class ScenarioNotFound(FluxError):
    """No stored scenario matches `key` (a name, a digest or digest prefix, or name@version)."""

    def __init__(self, key: str):
        self.key = key
        super().__init__(f"no stored scenario matches {key!r}")


class NoActiveScenario(FluxError):
    """No scenario has been activated yet."""


def digest_of(doc: dict) -> str:
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class StoredScenario:
    __slots__ = ("digest", "seq", "name", "meta_version", "doc", "source_format", "source_text", "imported_at")

    def __init__(self, digest, seq, name, meta_version, doc, source_format, source_text, imported_at):
        self.digest = digest
        self.seq = seq
        self.name = name
        self.meta_version = meta_version
        self.doc = doc
        self.source_format = source_format
        self.source_text = source_text
        self.imported_at = imported_at

    @property
    def version(self) -> str:
        return f"{self.meta_version}@{self.digest[:DIGEST_SHOWN]}"

    def summary(self) -> dict:
        gears = self.doc.get("gears") or []
        return {
            "name": self.name,
            "version": self.version,
            "meta_version": self.meta_version,
            "digest": self.digest,
            "seq": self.seq,
            "gears": len(gears),
            "wires": len(self.doc.get("wires") or []),
            "imported_at": self.imported_at.isoformat() if self.imported_at else None,
        }


def _ep(text: str) -> tuple[str | None, str, str]:
    parts = str(text).split(".")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return None, parts[0], parts[1]
    return None, str(text), ""


def _targets(doc: dict) -> tuple[set[str], dict[str, dict]]:
    """(declared rack names, group name -> match labels)."""
    names, groups = set(), {}
    for r in doc.get("racks") or []:
        if not isinstance(r, dict):
            continue
        if r.get("name"):
            names.add(r["name"])
        elif r.get("group"):
            groups[r["group"]] = dict((r.get("match") or {}).get("labels") or {})
    return names, groups


def placement(doc: dict, rack: str, labels: dict | None = None) -> set[str]:
    """Names of the gears that run on `rack`: its own, global ones, and those of every group
    it is a member of (fluxrig.scenario.groups.member_groups: by its labels alone)."""
    groups = set(member_groups(doc, labels))
    out = set()
    for g in doc.get("gears") or []:
        if not isinstance(g, dict) or not g.get("name"):
            continue
        deploy = g.get("deploy")
        if not deploy or deploy == rack or deploy in groups:
            out.add(g["name"])
    return out


def gear_home(doc: dict) -> dict[str, str | None]:
    """gear name -> the rack it is deployed on (None for global gears and groups)."""
    names, _groups = _targets(doc)
    out = {}
    for g in doc.get("gears") or []:
        if isinstance(g, dict) and g.get("name"):
            d = g.get("deploy")
            out[g["name"]] = d if d and (d in names or not names) else None
    return out


def project(doc: dict, rack: str, labels: dict | None = None, digest: str = "") -> dict:
    """The part of `doc` that Rack `rack` runs (see the module docstring)."""
    here = placement(doc, rack, labels)
    home = gear_home(doc)
    groups = member_groups(doc, labels)
    deploy_of = {g["name"]: g.get("deploy") for g in doc.get("gears") or [] if isinstance(g, dict) and g.get("name")}
    gears = [g for g in (doc.get("gears") or []) if isinstance(g, dict) and g.get("name") in here]
    wires, remote = [], []
    for w in doc.get("wires") or []:
        if not isinstance(w, dict):
            continue
        fr, fg, fp = _ep(w.get("from", ""))
        tr, tg, tp = _ep(w.get("to", ""))
        src_here = fg in here and fr in (None, rack)
        dst_here = tg in here and tr in (None, rack)
        if src_here and dst_here:
            wires.append(w)
        elif src_here or dst_here:
            src_rack = fr or (rack if src_here else home.get(fg)) or rack
            entry = dict(w)
            entry["lane"] = "guaranteed"
            entry["direction"] = "out" if src_here else "in"
            entry["subject"] = S.msg(src_rack, fg, fp) if S.RACK_NAME_RE.match(src_rack) else ""
            if dst_here and deploy_of.get(tg) in groups:
                entry["group"] = deploy_of[tg]  # a group input: the group's shared consumer (groups.py)
            remote.append(entry)
    out: dict = {"meta": dict(doc.get("meta") or {})}
    own = [
        r
        for r in (doc.get("racks") or [])
        if isinstance(r, dict) and (r.get("name") == rack or (not r.get("name") and r.get("group") in groups))
    ]
    if own:
        out["racks"] = own
    out["gears"] = gears
    out["wires"] = wires
    if remote:
        out["x-remote-wires"] = remote
    out[PROJECTION_KEY] = {"rack": rack, "digest": digest, "groups": groups}
    return out


class ScenarioStore:
    """Scenarios in the registry database (tables `scenarios`, `scenario_activations`)."""

    def __init__(self, db, checker: ScenarioChecker | None = None):
        self.db = db
        # Documents from the API are parsed and validated in a child process with a time and
        # memory budget (parse_worker.py), never on the event loop.
        self.checker = checker or ScenarioChecker()
        db.ensure(DDL)
        self._active: StoredScenario | None = None
        self._active_loaded = False
        # Called with each new import (scenariostate.SharedScenarios puts it in the shared state).
        self.on_import = None

    # -- import ----------------------------------------------------------------------------------

    @staticmethod
    def check(text: str, fmt: str = "yaml") -> dict:
        """Parse and validate; ScenarioError listing every problem, else the document."""
        doc = parse_scenario(text, fmt)
        problems = validate_scenario(doc)
        if problems:
            raise ScenarioError(problems, "import")
        return doc

    async def check_async(self, text: str, fmt: str, racks: list[tuple[str, dict]]) -> Checked:
        """`check` plus the projection warnings for `racks`, in a child process (parse_worker):
        the event loop only waits. ScenarioError (ScenarioCheckFailed past the budget)."""
        return await self.checker.check(text, fmt, racks)

    async def import_text_async(self, text: str, fmt: str = "yaml") -> tuple[StoredScenario, bool]:
        """`import_text` with the parse and validation off the event loop (the API's path)."""
        checked = await self.check_async(text, fmt, [])
        return self.import_checked(checked.doc, text, fmt)

    def import_text(self, text: str, fmt: str = "yaml") -> tuple[StoredScenario, bool]:
        """(stored scenario, created). Importing an identical document returns the first.
        Parses on the calling thread: for trusted files (the --scenario flag), not the API."""
        return self.import_checked(json.loads(json.dumps(self.check(text, fmt), default=str)), text, fmt)

    def import_checked(self, doc: dict, text: str, fmt: str, notify: bool = True) -> tuple[StoredScenario, bool]:
        """Store `doc`, already parsed and validated from `text` (check or check_async);
        `notify`: tell `on_import` (not for documents that came from the shared state)."""
        digest = digest_of(doc)
        existing = self._by_digest(digest)
        if existing:
            return existing, False
        meta = doc.get("meta") or {}
        name = str(meta.get("name") or "unnamed")
        c = self.db.conn
        seq = (c.execute("SELECT coalesce(max(seq), 0) + 1 FROM scenarios").fetchone())[0]
        c.execute(
            "INSERT INTO scenarios VALUES (?, ?, ?, ?, ?, ?, ?, now())",
            [digest, seq, name, str(meta.get("version", "")), json.dumps(doc, default=str), fmt, text],
        )
        stored = self._by_digest(digest)
        log.info("scenario imported: %s %s", stored.name, stored.version)
        if notify and self.on_import is not None:
            self.on_import(stored)
        return stored, True

    # -- reads -----------------------------------------------------------------------------------------

    _COLS = "digest, seq, name, version, doc, source_format, source_text, imported_at"

    def _row(self, r) -> StoredScenario:
        return StoredScenario(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7])

    def _by_digest(self, digest: str) -> StoredScenario | None:
        r = self.db.cur().execute(f"SELECT {self._COLS} FROM scenarios WHERE digest = ?", [digest]).fetchone()
        return self._row(r) if r else None

    def list(self, name: str | None = None) -> list[StoredScenario]:
        sql = f"SELECT {self._COLS} FROM scenarios"
        args = []
        if name:
            sql += " WHERE name = ?"
            args.append(name)
        return [self._row(r) for r in self.db.cur().execute(sql + " ORDER BY seq DESC", args).fetchall()]

    def get(self, key: str) -> StoredScenario:
        """By digest (or a prefix of at least 6 chars), `name@version`, or name (latest import)."""
        cur = self.db.cur()
        if "@" in key:
            name, _, ver = key.partition("@")
            rows = cur.execute(
                f"SELECT {self._COLS} FROM scenarios WHERE name = ? ORDER BY seq DESC", [name]
            ).fetchall()
            for r in rows:
                s = self._row(r)
                if ver in (s.meta_version, s.version.split("@", 1)[1]) or s.version == key.split("@", 1)[1]:
                    return s
                if s.digest.startswith(ver):
                    return s
            raise ScenarioNotFound(key)
        r = cur.execute(
            f"SELECT {self._COLS} FROM scenarios WHERE name = ? ORDER BY seq DESC LIMIT 1", [key]
        ).fetchone()
        if r:
            return self._row(r)
        if len(key) >= 6:
            rows = cur.execute(f"SELECT {self._COLS} FROM scenarios WHERE starts_with(digest, ?)", [key]).fetchall()
            if len(rows) == 1:
                return self._row(rows[0])
        raise ScenarioNotFound(key)

    # -- activation ----------------------------------------------------------------------------------

    def mark_active(self, stored: StoredScenario, detail: str = "") -> None:
        self.db.conn.execute("INSERT INTO scenario_activations VALUES (now(), ?, ?)", [stored.digest, detail])
        self._active, self._active_loaded = stored, True

    def active(self) -> StoredScenario | None:
        """The active scenario (cached: it changes only through mark_active)."""
        if not self._active_loaded:
            r = self.db.cur().execute("SELECT digest FROM scenario_activations ORDER BY ts DESC LIMIT 1").fetchone()
            self._active = self._by_digest(r[0]) if r else None
            self._active_loaded = True
        return self._active

    def history(self, limit: int = 50) -> list[dict]:
        rows = (
            self.db.cur()
            .execute(
                "SELECT a.ts, a.digest, s.name, s.version FROM scenario_activations a JOIN scenarios s USING (digest) "
                "ORDER BY a.ts DESC LIMIT ?",
                [limit],
            )
            .fetchall()
        )
        return [
            {"ts": r[0].isoformat(), "digest": r[1], "name": r[2], "version": f"{r[3]}@{r[1][:DIGEST_SHOWN]}"}
            for r in rows
        ]

    @staticmethod
    def projection_problems(doc: dict, racks: list[tuple[str, dict]]) -> list[ScenarioProblem]:
        """Validate every Rack's projection the way that Rack will; problems are prefixed with
        the Rack name. Also flags `deploy` targets that are not known Racks."""
        from .groups import group_problems

        problems: list[ScenarioProblem] = list(group_problems(doc))
        known = {name for name, _ in racks}
        declared, groups = _targets(doc)
        for i, g in enumerate(doc.get("gears") or []):
            d = isinstance(g, dict) and g.get("deploy")
            if d and d not in known and d not in groups:
                problems.append(ScenarioProblem(f"gears[{i}].deploy", f"rack {d!r} is not registered on this Mixer"))
        for name, labels in racks:
            proj = project(doc, name, labels)
            proj.pop("x-remote-wires", None)
            for p in validate_scenario(proj):
                problems.append(ScenarioProblem(f"{name}: {p.location}", p.message))
        return problems
