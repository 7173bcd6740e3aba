"""Tiny templates for config-driven gears: `{{ path | filter | ... }}` reading a message.

Paths: `raw`, `id`, `trace`, `ts`, `meta.<key>` (the rest is the flat metadata key, dots
included), `data.<dotted.path>` (or a bare dotted path, read from data), and for generators
`seq` and `now`. Filters: upper, lower, strip, hex, unhex, len, str, int, bytes, default(X).

A value that is exactly one template keeps the native type of what it reads (`{{ raw |
upper }}` stays bytes); text around templates makes the result a string. Templates compile
once, at gear init, into small closures; rendering never parses.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .errors import FluxError
from .msg import FluxMsg

__all__ = ["compile_template", "compile_path", "TemplateError"]

_TPL = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_MISSING = object()


class TemplateError(FluxError):
    def __init__(self, template: str, message: str):
        self.template = template
        super().__init__(f"template {template!r}: {message}")


def compile_path(path: str, extra: dict[str, Callable[[FluxMsg], Any]] | None = None) -> Callable[[FluxMsg], Any]:
    """A reader `f(msg) -> value or None` for one path."""
    if extra and path in extra:
        return extra[path]
    if path == "raw":
        return lambda m: m.raw
    if path == "id":
        return lambda m: m.id.hex()
    if path in ("trace", "ts", "flags"):
        return lambda m, a=path: getattr(m, a)
    if path.startswith("meta."):
        key = path[5:]
        return lambda m: m.meta.get(key)
    if path.startswith("data."):
        path = path[5:]
    parts = path.split(".")
    if len(parts) == 1:
        key = parts[0]
        return lambda m: m.data.get(key)

    def read(m: FluxMsg):
        node = m.data
        for p in parts:
            if not isinstance(node, dict) or p not in node:
                return None
            node = node[p]
        return node

    return read


def _text(v) -> str:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "replace")
    return "" if v is None else str(v)


def _filter(name: str, arg: str | None, template: str) -> Callable[[Any], Any]:
    if name == "upper":
        return lambda v: v.upper() if isinstance(v, (str, bytes)) else _text(v).upper()
    if name == "lower":
        return lambda v: v.lower() if isinstance(v, (str, bytes)) else _text(v).lower()
    if name in ("strip", "trim"):
        return lambda v: v.strip() if isinstance(v, (str, bytes)) else _text(v).strip()
    if name == "hex":
        return lambda v: v.hex() if isinstance(v, (bytes, bytearray)) else _text(v).encode().hex()
    if name == "unhex":
        return lambda v: bytes.fromhex(_text(v))
    if name == "len":
        return lambda v: 0 if v is None else len(v)
    if name == "str":
        return _text
    if name == "bytes":
        return lambda v: v if isinstance(v, bytes) else _text(v).encode()
    if name == "int":

        def to_int(v):
            try:
                return int(_text(v).strip() or 0)
            except ValueError:
                raise TemplateError(template, f"value {v!r} is not an integer") from None

        return to_int
    if name == "default":
        if arg is None:
            raise TemplateError(template, "default needs an argument: default(X)")
        fallback = arg.strip().strip("'\"")
        return lambda v: fallback if v in (None, "", b"") else v
    raise TemplateError(
        template, f"unknown filter {name!r} (upper, lower, strip, hex, unhex, len, str, int, bytes, default)"
    )


def _compile_expr(expr: str, template: str, extra) -> Callable[[FluxMsg], Any]:
    parts = [p.strip() for p in expr.split("|")]
    if not parts[0]:
        raise TemplateError(template, "empty expression")
    reader = compile_path(parts[0], extra)
    filters = []
    for f in parts[1:]:
        m = re.fullmatch(r"([a-z_]+)(?:\((.*)\))?", f)
        if not m:
            raise TemplateError(template, f"bad filter {f!r}")
        filters.append(_filter(m.group(1), m.group(2), template))
    if not filters:
        return reader

    def run(msg: FluxMsg):
        v = reader(msg)
        for f in filters:
            v = f(v)
        return v

    return run


def compile_template(value, extra: dict[str, Callable[[FluxMsg], Any]] | None = None) -> Callable[[FluxMsg], Any]:
    """Compile a config value (any type) into `f(msg) -> value`; non-strings are constants."""
    if isinstance(value, dict):
        items = [(k, compile_template(v, extra)) for k, v in value.items()]
        return lambda m: {k: f(m) for k, f in items}
    if isinstance(value, list):
        fs = [compile_template(v, extra) for v in value]
        return lambda m: [f(m) for f in fs]
    if not isinstance(value, str) or "{{" not in value:
        return lambda m, v=value: v
    matches = list(_TPL.finditer(value))
    if len(matches) == 1 and matches[0].group(0) == value.strip():
        return _compile_expr(matches[0].group(1), value, extra)
    pieces: list = []
    pos = 0
    for m in matches:
        if m.start() > pos:
            pieces.append(value[pos : m.start()])
        pieces.append(_compile_expr(m.group(1), value, extra))
        pos = m.end()
    if pos < len(value):
        pieces.append(value[pos:])
    return lambda m: "".join(p if isinstance(p, str) else _text(p(m)) for p in pieces)
