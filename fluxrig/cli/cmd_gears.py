"""`fluxrig gears list|doc|manifest`: what gear types this build offers."""

from __future__ import annotations

import json

from ..runtime import schema as cfg_schema
from ..runtime.registry import UnknownGearType, gear_types, get_gear_class

__all__ = ["register", "list_gears", "doc_gear", "manifest"]


def register(sub) -> None:
    p = sub.add_parser(
        "gears",
        help="list gear types and show their ports and config",
        description="Gear types built into this binary, with their ports and config schema.",
    )
    gsub = p.add_subparsers(dest="gears_command", metavar="SUBCOMMAND")
    lst = gsub.add_parser(
        "list", help="one line per gear type", description="List gear types: type, category, summary."
    )
    lst.add_argument("--json", action="store_true", help="print manifests as JSON")
    lst.set_defaults(func=list_gears)
    doc = gsub.add_parser(
        "doc",
        help="reference of one gear type (ports, config keys, defaults)",
        description="Markdown reference for a gear type, generated from its manifest.",
    )
    doc.add_argument("type", help="gear type, e.g. io_tcp")
    doc.set_defaults(func=doc_gear)
    man = gsub.add_parser(
        "manifest",
        help="manifest of one gear type as JSON",
        description="The manifest (ports, JSON schema of the config) as JSON.",
    )
    man.add_argument("type", help="gear type")
    man.set_defaults(func=manifest)
    p.set_defaults(func=list_gears, json=False)


def list_gears(args) -> int:
    types = gear_types()
    if getattr(args, "json", False):
        print(json.dumps([cls.MANIFEST.as_dict() for cls in types.values()], indent=2))
        return 0
    width = max(len(t) for t in types)
    print(f"{'TYPE':<{width}}  {'CATEGORY':<13}  SUMMARY")
    for t, cls in types.items():
        print(f"{t:<{width}}  {cls.MANIFEST.category:<13}  {cls.MANIFEST.summary}")
    return 0


def _get(type_name: str):
    try:
        return get_gear_class(type_name)
    except UnknownGearType as exc:
        print(f"fluxrig: {exc}")
        return None


def doc_gear(args) -> int:
    cls = _get(args.type)
    if cls is None:
        return 2
    m = cls.MANIFEST
    d = m.as_dict()
    print(f"# {m.type}\n\n{m.summary}\n")
    if m.doc or cls.__module__:
        text = (m.doc or (__import__(cls.__module__, fromlist=["_"]).__doc__ or "")).strip()
        if text:
            print(text + "\n")
    print(f"- category: {m.category}\n- terminus: {m.terminus}")
    print(f"- inputs: {', '.join(d['inputs']) or 'none'}")
    outs = ", ".join(d["outputs"]) + (" (+ ports named by the config)" if d["dynamic_ports"] else "")
    print(f"- outputs: {outs}\n")
    print("| key | type | default | description |\n|---|---|---|---|")
    for key, kind, default, desc in cfg_schema.describe(m.schema):
        print(f"| `{key}` | {kind} | {default} | {desc} |")
    return 0


def manifest(args) -> int:
    cls = _get(args.type)
    if cls is None:
        return 2
    print(json.dumps(cls.MANIFEST.as_dict(), indent=2))
    return 0
