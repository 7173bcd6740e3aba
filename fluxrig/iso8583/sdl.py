"""Read ISO 8583 spec documents into a resolved wire layer plus semantics (no codec work here).

Job: accept the document shapes a spec arrives in and reduce each to one `Resolved` record:
the merged wire fields ({int: moov definition}) and the semantic layer (aliases, sensitivity,
labels, message catalog, enums). Shapes:
  * the Go original's v2 spec document: `spec: {id, version, name, protocol, wire: {source,
    format, fields}, fields, messages: {catalog, transitions, correlate_on}, enums, ...}`;
    `wire.fields` is merged per field over the source (a built-in base `moov:spec87ascii` /
    `moov:spec87hex`, or a moov wire document beside the spec file);
  * a bare moov wire document `{name, fields}`;
  * a built-in base name `moov:spec87ascii` / `moov:spec87hex`;
  * a pyiso8583 spec dict (`from_pyiso8583`).
Load-time checks report every problem at once (SpecError): wire keys or `description` in the
semantic layer, unknown `values_ref`, catalog references to undeclared MTIs, duplicate
aliases, bad sensitivity, `log_mask: false` on a classified field, escaping file sources.
`checks`, `validation_policy`, per-MTI `messages` usage and `when` rules are compiled and enforced by fluxrig.iso8583.rules (through Spec.rules); `x-*` sections are kept, not evaluated.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import yaml

from fluxrig.iso8583 import jpos
from fluxrig.iso8583.errors import SpecError

__all__ = [
    "Resolved",
    "BASES",
    "resolve_document",
    "resolve_base",
    "read_text_document",
    "from_pyiso8583",
    "source_hash",
    "SENSITIVITIES",
    "WIRE_KEYS",
    "SEMANTIC_KEYS",
]

BASES = {
    "moov:spec87ascii": "spec87ascii.yaml",
    "moov:spec87hex": "spec87hex.yaml",
    "moov:spec93ascii": "spec93ascii.yaml",  # ISO 8583:1993, MTI version digit 1
    "moov:spec93binary": "spec93binary.yaml",
    "moov:spec2003binary": "spec2003binary.yaml",  # ISO 8583:2003, MTI version digit 2
}
SENSITIVITIES = ("pan", "chd", "sad", "pii", "none")
WIRE_KEYS = ("type", "length", "enc", "prefix", "padding", "tag", "bitmap", "disableautoexpand")
SEMANTIC_KEYS = (
    "alias",
    "crypto",
    "meaning",
    "format",
    "log_mask",
    "name",
    "scope",
    "sensitivity",
    "values_ref",
    "validValues",
    "note",
    "messages",
)
_ID = re.compile(r"[a-z0-9][a-z0-9-]*")
_SEMVER = re.compile(r"v?\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Resolved:
    """A spec document reduced to what Spec needs."""

    id: str
    version: str
    name: str
    hash: str
    source: str
    wire: dict
    protocol: str = "iso8583"
    aliases: dict = field(default_factory=dict)
    sensitivity: dict = field(default_factory=dict)
    log_mask: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    part_aliases: dict = field(default_factory=dict)
    catalog: dict = field(default_factory=dict)
    transitions: list = field(default_factory=list)
    correlate_on: list = field(default_factory=list)
    enums: dict = field(default_factory=dict)
    document: dict = field(default_factory=dict)
    mti_version: str | None = None  # the first MTI digit of the ISO 8583 version, when the base says


def source_hash(text: str) -> str:
    """First 12 hex digits of the SHA-256 of the spec's source text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def read_text_document(text: str, where: str) -> dict:
    """Parse YAML (a superset of JSON), or a jPOS GenericPackager XML file, into a mapping."""
    if jpos.looks_like_packager(text):
        return jpos.read_packager(text, where)
    try:
        doc = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise SpecError([f"{where}: not valid YAML/JSON: {exc}"], where) from None
    if not isinstance(doc, dict):
        raise SpecError([f"{where}: the document must be a mapping"], where)
    return doc


@cache
def _base_text(name: str) -> str:
    return resources.files("fluxrig.iso8583").joinpath("specs", BASES[name]).read_text("utf-8")


def _base(name: str, where: str, problems: list):
    if name not in BASES:
        problems.append(f"{where}: unknown wire source {name!r}; known: {', '.join(sorted(BASES))}")
        return {}, {}, ""
    doc = read_text_document(_base_text(name), name)
    fields, defaults = _fields_of(doc, name, problems), doc.get("x-fluxrig-defaults") or {}
    return fields, defaults, doc.get("name", name)


def _field_num(key, where, problems):
    try:
        num = int(key)
    except (TypeError, ValueError):
        problems.append(f"{where}.{key}: field keys are numbers 0..192")
        return None
    if not 0 <= num <= 192 or isinstance(key, bool):
        problems.append(f"{where}.{key}: field keys are numbers 0..192")
        return None
    return num


def _fields_of(doc, where, problems):
    raw = doc.get("fields")
    if not isinstance(raw, dict) or not raw:
        problems.append(f"{where}.fields: no fields declared")
        return {}
    out = {}
    for key, value in raw.items():
        num = _field_num(key, f"{where}.fields", problems)
        if num is None:
            continue
        if not isinstance(value, dict):
            problems.append(f"{where}.fields.{key}: a field definition must be a mapping")
            continue
        out[num] = copy.deepcopy(value)
    return out


def _file_source(rel, base_dir, where, problems):
    if base_dir is None:
        problems.append(
            f"{where}: {rel!r} is a path but this spec has no directory; "
            "name a base with `moov:` or carry the wire layer in `wire.fields`"
        )
        return None
    if os.path.isabs(rel):
        problems.append(f"{where}: {rel!r} must be relative to the spec's directory")
        return None
    root = os.path.realpath(base_dir)
    full = os.path.realpath(os.path.join(root, rel))
    if full != root and not full.startswith(root + os.sep):
        problems.append(f"{where}: {rel!r} resolves outside the spec's directory")
        return None
    try:
        with open(full, encoding="utf-8") as fh:
            return read_text_document(fh.read(), full)
    except OSError as exc:
        problems.append(f"{where}: cannot read {rel!r}: {exc.strerror}")
        return None


def _strip_semantic(d):
    """The wire half of a field entry: semantic keys dropped, `name` becomes `description`."""
    out = {k: v for k, v in d.items() if k not in SEMANTIC_KEYS}
    if isinstance(d.get("name"), str) and d["name"]:
        out["description"] = d["name"]
    return out


def _resolve_wire(spec, base_dir, problems):
    wire = spec.get("wire")
    if wire is None:
        problems.append("spec.wire: missing (name a `source` and/or declare `fields`)")
        return {}, {}, ""
    if not isinstance(wire, dict):
        problems.append("spec.wire: must be a mapping")
        return {}, {}, ""
    fmt = wire.get("format", "moov")
    if fmt != "moov":
        problems.append(f"spec.wire.format: {fmt!r} is not supported (moov)")
    source = wire.get("source")
    fields, defaults, base_name = {}, {}, ""
    if source:
        if not isinstance(source, str):
            problems.append("spec.wire.source: must be a string")
        elif source.startswith("moov:"):
            fields, defaults, base_name = _base(source, "spec.wire.source", problems)
        elif (
            "/" not in source
            and "\\" not in source
            and not source.endswith((".yaml", ".yml", ".json"))
            and ":" in source
        ):
            problems.append(
                f"spec.wire.source: {source!r} names a stored artefact; no store resolver is "
                "available here (use `moov:` or a file beside the spec)"
            )
        else:
            doc = _file_source(source, base_dir, "spec.wire.source", problems)
            if doc is not None:
                fields = _fields_of(doc, f"spec.wire.source({source})", problems)
                base_name = doc.get("name", source)
    delta = wire.get("fields") or {}
    if not isinstance(delta, dict):
        problems.append("spec.wire.fields: must be a mapping")
        delta = {}
    for key, value in delta.items():
        num = _field_num(key, "spec.wire.fields", problems)
        if num is None:
            continue
        if not isinstance(value, dict):
            problems.append(f"spec.wire.fields.{key}: must be a mapping")
            continue
        merged = dict(fields.get(num, {}))
        merged.update(copy.deepcopy(value))  # per-field merge: the delta's keys win
        fields[num] = merged
    if not fields and not problems:
        problems.append("spec.wire: names no source and declares no fields")
    return {n: _strip_semantic(d) for n, d in fields.items()}, defaults, base_name


def _semantic(spec, res, problems):
    enums = spec.get("enums") or {}
    if not isinstance(enums, dict):
        problems.append("spec.enums: must be a mapping")
        enums = {}
    res.enums = enums
    fields = spec.get("fields") or {}
    if not isinstance(fields, dict):
        problems.append("spec.fields: must be a mapping")
        fields = {}
    seen_alias = {}
    for key, entry in fields.items():
        loc = f"spec.fields.{key}"
        num = _field_num(key, "spec.fields", problems)
        if num is None:
            continue
        if not isinstance(entry, dict):
            problems.append(f"{loc}: must be a mapping")
            continue
        for k in entry:
            if k in WIRE_KEYS:
                problems.append(f"{loc}.{k}: wire key in the semantic layer; put it under spec.wire.fields.{key}")
            elif k == "description":
                problems.append(f"{loc}.description: the semantic layer says `name` (label) and `meaning` (prose)")
        alias = entry.get("alias")
        if alias is not None:
            if not isinstance(alias, str) or not alias:
                problems.append(f"{loc}.alias: must be a non-empty string")
            elif alias in seen_alias:
                problems.append(f"{loc}.alias: {alias!r} is already the alias of field {seen_alias[alias]}")
            else:
                seen_alias[alias] = num
                res.aliases[num] = alias
        sens = entry.get("sensitivity")
        if sens is not None:
            if sens not in SENSITIVITIES:
                problems.append(f"{loc}.sensitivity: {sens!r} is not one of {', '.join(SENSITIVITIES)}")
            else:
                res.sensitivity[num] = sens
        if "log_mask" in entry:
            lm = entry["log_mask"]
            if not isinstance(lm, bool):
                problems.append(f"{loc}.log_mask: must be true or false")
            elif lm is False and res.sensitivity.get(num, "none") != "none":
                problems.append(f"{loc}.log_mask: cannot be false on a field classified {res.sensitivity[num]!r}")
            else:
                res.log_mask[num] = lm
        if isinstance(entry.get("name"), str):
            res.labels[num] = entry["name"]
        _values_ref(entry, loc, enums, problems)
        subs = entry.get("subfields")
        if isinstance(subs, dict) and isinstance(subs.get("parts"), list):
            for i, part in enumerate(subs["parts"]):
                if not isinstance(part, dict):
                    continue
                for k in ("type", "length", "enc", "prefix", "padding", "from", "to"):
                    if k in part:
                        problems.append(f"{loc}.subfields.parts[{i}].{k}: wire key in the semantic layer")
                _values_ref(part, f"{loc}.subfields.parts[{i}]", enums, problems)
                if isinstance(part.get("alias"), str):
                    tag = part.get("tag")
                    pkey = str(tag).upper() if tag is not None else str(i + 1)
                    res.part_aliases[part["alias"]] = (num, pkey)


def _values_ref(entry, loc, enums, problems):
    ref = entry.get("values_ref")
    if ref is None:
        return
    if ref == "@messages":
        return
    if isinstance(ref, str) and ref.startswith("@"):
        problems.append(f"{loc}.values_ref: {ref!r}: the only special set is @messages")
    elif ref not in enums:
        problems.append(f"{loc}.values_ref: enum {ref!r} is not declared under spec.enums")


def _messages(spec, res, problems):
    messages = spec.get("messages") or {}
    if not isinstance(messages, dict):
        problems.append("spec.messages: must be a mapping")
        return
    catalog = messages.get("catalog") or {}
    if not isinstance(catalog, dict):
        problems.append("spec.messages.catalog: must be a mapping")
        catalog = {}
    for mti, entry in catalog.items():
        loc = f"spec.messages.catalog.{mti}"
        if not isinstance(mti, str):
            problems.append(f'{loc}: quote MTI keys ("0100"); YAML reads 0100 as a number')
            continue
        if not isinstance(entry, dict):
            problems.append(f"{loc}: must be a mapping")
            continue
        flow = entry.get("flow")
        if flow is not None and flow not in ("request", "response"):
            problems.append(f"{loc}.flow: {flow!r} is not request or response")
        cls = entry.get("class", "business")
        if cls not in ("business", "network"):
            problems.append(f"{loc}.class: {cls!r} is not business or network")
        res.catalog[mti] = dict(entry)
    for mti, entry in res.catalog.items():
        pair = entry.get("pairs_with")
        if pair is not None and pair not in res.catalog:
            problems.append(f"spec.messages.catalog.{mti}.pairs_with: {pair!r} is not in the catalog")
    transitions = messages.get("transitions") or []
    for i, t in enumerate(transitions if isinstance(transitions, list) else []):
        for end in ("from", "to"):
            if isinstance(t, dict) and t.get(end) not in res.catalog:
                problems.append(f"spec.messages.transitions[{i}].{end}: {t.get(end)!r} is not in the catalog")
    res.transitions = list(transitions) if isinstance(transitions, list) else []
    correlate = messages.get("correlate_on") or []
    aliases = set(res.aliases.values())
    for a in correlate if isinstance(correlate, list) else []:
        if a not in aliases:
            problems.append(f"spec.messages.correlate_on: {a!r} is not a field alias")
    res.correlate_on = list(correlate) if isinstance(correlate, list) else []


def _v2(doc, text, where, base_dir, problems):
    spec = doc["spec"]
    sid = spec.get("id")
    if not isinstance(sid, str) or not _ID.fullmatch(sid):
        problems.append(f"spec.id: required, lower-case letters, digits and '-' (got {sid!r})")
        sid = str(sid)
    version = spec.get("version")
    if not isinstance(version, str) or not _SEMVER.fullmatch(version):
        problems.append(f"spec.version: required semantic version like 1.2.0 (got {version!r})")
        version = str(version)
    protocol = spec.get("protocol", "iso8583")
    if protocol != "iso8583":
        problems.append(f"spec.protocol: {protocol!r} is not iso8583")
    wire, defaults, base_name = _resolve_wire(spec, base_dir, problems)
    res = Resolved(
        id=sid,
        version=version,
        name=str(spec.get("name") or base_name or sid),
        hash=source_hash(text),
        source=where,
        wire=wire,
        protocol=protocol,
        document=doc,
    )
    for num, level in (defaults.get("sensitivity") or {}).items():
        if int(num) in wire:
            res.sensitivity[int(num)] = level
    res.mti_version = _mti_version(spec.get("mti_version", defaults.get("mti_version")), problems)
    _semantic(spec, res, problems)
    _messages(spec, res, problems)
    return res


def _mti_version(value, problems):
    if value is None:
        return None
    v = str(value)
    if v not in ("0", "1", "2"):
        problems.append(f"spec.mti_version: {value!r} is not 0 (1987), 1 (1993) or 2 (2003)")
        return None
    return v


def resolve_document(doc: dict, text: str, where: str, base_dir: str | None) -> Resolved:
    """Reduce a parsed document of any supported shape; raise SpecError listing all problems."""
    problems: list = []
    if isinstance(doc.get("spec"), dict):
        res = _v2(doc, text, where, base_dir, problems)
    elif _looks_pyiso8583(doc):
        res = _pyiso(doc, text, where, problems)
    elif "fields" in doc:
        wire = {n: _strip_semantic(d) for n, d in _fields_of(doc, where, problems).items()}
        name = str(doc.get("name") or os.path.splitext(os.path.basename(where))[0])
        res = Resolved(
            id=_slug(name),
            version=str(doc.get("version", "0.0.0")),
            name=name,
            hash=source_hash(text),
            source=where,
            wire=wire,
            document=doc,
        )
        defaults = doc.get("x-fluxrig-defaults") or {}
        for num, level in (defaults.get("sensitivity") or {}).items():
            res.sensitivity[int(num)] = level
        res.mti_version = _mti_version(defaults.get("mti_version"), problems)
    else:
        problems.append(
            f"{where}: not a spec document (expected `spec:`, a moov `fields:` map or a pyiso8583 spec dict)"
        )
        res = None
    if problems:
        raise SpecError(problems, where)
    return res


def resolve_base(name: str) -> Resolved:
    """A built-in base (`moov:spec87ascii`, `moov:spec87hex`) as a spec of its own."""
    if name not in BASES:
        raise SpecError([f"{name}: unknown base; known: {', '.join(sorted(BASES))}"], name)
    text = _base_text(name)
    res = resolve_document(read_text_document(text, name), text, name, None)
    res.id = name.split(":", 1)[1]
    return res


def _slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "spec"


# ---------------------------------------------------------------------------------------
# pyiso8583 spec dicts

_PY_TEXT = {
    "ascii": "ASCII",
    "latin-1": "Binary",
    "latin_1": "Binary",
    "latin1": "Binary",
    "iso8859-1": "Binary",
    "iso-8859-1": "Binary",
    "cp037": "EBCDIC",
}
_PY_LEN = {"ascii": "ASCII", "cp037": "EBCDIC", "b": "Binary"}


def _looks_pyiso8583(doc) -> bool:
    if "t" in doc and "p" in doc:
        return True
    return any(isinstance(v, dict) and "data_enc" in v for v in doc.values())


def _py_field(key, d, loc, problems):
    try:
        data_enc, len_enc = d["data_enc"], d["len_enc"]
        len_type, max_len = int(d["len_type"]), int(d["max_len"])
    except (KeyError, TypeError, ValueError):
        problems.append(f"{loc}: needs data_enc, len_enc, len_type and max_len")
        return None
    nibbles = d.get("len_count", "bytes") == "nibbles"
    out = {"length": max_len, "description": d.get("desc", "")}
    if data_enc == "b":
        if nibbles:
            rpad, lpad = str(d.get("right_pad") or "")[:1], str(d.get("left_pad") or "")[:1]
            if rpad and not lpad:
                if rpad not in "0Ff":
                    problems.append(f"{loc}: right_pad {rpad!r}: nibble fields pad with 0 or F")
                    return None
                out.update(type="String", enc="LBCD" if rpad == "0" else "LBCDF")
            elif lpad and lpad != "0":
                problems.append(f"{loc}: left_pad {lpad!r}: left-padded nibble fields pad with 0")
                return None
            else:
                out.update(type="String", enc="BCD")
        else:
            out.update(type="Hex", enc="Binary")
    elif data_enc in _PY_TEXT:
        if nibbles:
            problems.append(f"{loc}: len_count nibbles needs data_enc 'b'")
            return None
        out.update(type="String", enc=_PY_TEXT[data_enc])
    else:
        problems.append(f"{loc}: data_enc {data_enc!r} is not supported (ascii, latin-1, cp037, b)")
        return None
    if len_type == 0:
        out["prefix"] = "ASCII.Fixed"
    elif len_enc == "bcd":
        if len_type not in (1, 2):
            problems.append(f"{loc}: BCD lengths of {len_type} bytes are not supported (1 or 2)")
            return None
        out["prefix"] = "BCD.LL" if len_type == 1 else "BCD.LLLL"
    elif len_enc in _PY_LEN and 1 <= len_type <= 4:
        out["prefix"] = f"{_PY_LEN[len_enc]}.{'L' * len_type}"
    else:
        problems.append(f"{loc}: length encoding {len_enc!r} with len_type {len_type} is not supported")
        return None
    return out


def _pyiso(spec, text, where, problems):
    wire = {}
    h = spec.get("h")
    if isinstance(h, dict) and int(h.get("max_len", 0) or 0) != 0:
        problems.append(f"{where}.h: message headers belong to the I/O layer (TPDU/header strip); set max_len 0")
    t = spec.get("t")
    if isinstance(t, dict):
        mti = _py_field("t", t, f"{where}.t", problems)
        if mti is not None:
            if mti["type"] == "String" and mti["enc"] == "BCD":
                mti["length"] = 4
            elif mti["type"] == "Hex":
                mti.update(type="String", enc="BCD", length=4)
            wire[0] = mti
    else:
        problems.append(f"{where}.t: the MTI spec is missing")
    p = spec.get("p")
    if isinstance(p, dict) and p.get("data_enc") == "b":
        wire[1] = {"type": "Bitmap", "length": 8, "enc": "Binary", "prefix": "Binary.Fixed"}
    elif isinstance(p, dict) and p.get("data_enc") == "ascii":
        wire[1] = {"type": "Bitmap", "length": 8, "enc": "HexToASCII", "prefix": "Hex.Fixed"}
    else:
        problems.append(f"{where}.p: the primary bitmap must be data_enc 'b' or 'ascii'")
    for key, d in spec.items():
        if key in ("h", "t", "p", "1", "65") or not isinstance(d, dict):
            continue  # 1 and 65 are bitmaps, implicit here
        num = _field_num(key, where, problems)
        if num is None or num < 2:
            continue
        f = _py_field(key, d, f"{where}.{key}", problems)
        if f is not None:
            wire[num] = f
    text = text or json.dumps(spec, sort_keys=True, default=str)
    return Resolved(
        id="pyiso8583",
        version="0.0.0",
        name=str(spec.get("name", "pyiso8583 spec")),
        hash=source_hash(text),
        source=where,
        wire=wire,
        document=spec,
    )


def from_pyiso8583(spec: dict) -> dict:
    """Translate a pyiso8583 spec dict into a moov wire document `{"name", "fields"}` that
    `load_spec` accepts (`load_spec(pyiso_dict)` does the same in one step).

    Mapping: data_enc ascii -> String/ASCII, latin-1 -> String/Binary, cp037 -> String/EBCDIC,
    b -> Hex/Binary (bytes) or String/BCD (len_count nibbles); len_type 0 -> Fixed, else
    ASCII/EBCDIC/Binary .L*len_type, bcd 1 byte -> BCD.LL, 2 bytes -> BCD.LLLL. Field 65 is
    the tertiary-bitmap flag here and is skipped; a non-empty header 'h' is refused.
    """
    problems: list = []
    res = _pyiso(spec, "", "pyiso8583", problems)
    if problems:
        raise SpecError(problems, "pyiso8583")
    return {"name": res.name, "fields": res.wire}
