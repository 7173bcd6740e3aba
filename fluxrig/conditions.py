"""Field conditions shared by config-driven gears (router rules, responder rules).

A condition is a map with `field` (a path: raw, meta.<key>, data.<dotted>) and exactly one
test: equals, not_equals, prefix (one or a list), in, regex, exists, gt, lt. Values are
compared as text; gt/lt compare numbers (a value that is not a number never matches).
`compile_condition` returns `f(msg) -> bool`; ValueError (or re.error) names what is wrong.
"""

from __future__ import annotations

import re

from .templates import compile_path

__all__ = ["TESTS", "CONDITION_PROPERTIES", "compile_condition", "compile_all"]

TESTS = ("equals", "not_equals", "prefix", "in", "regex", "exists", "gt", "lt")

CONDITION_PROPERTIES = {
    "field": {"type": "string", "description": "path read: raw, meta.<key>, data.<path>"},
    "equals": {"description": "value equals (compared as text)"},
    "not_equals": {"description": "value differs (as text)"},
    "prefix": {"type": ["string", "array"], "description": "text starts with (one of) these"},
    "in": {"type": "array", "description": "value is one of (as text)"},
    "regex": {"type": "string", "description": "Python regular expression searched in the text"},
    "exists": {"type": "boolean", "description": "field present (true) or absent (false)"},
    "gt": {"type": "number", "description": "numeric value greater than"},
    "lt": {"type": "number", "description": "numeric value less than"},
}


def _text(v) -> str:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "replace")
    return str(v)


def compile_condition(cond: dict, path: str | None = None, read=None):
    """`f(obj) -> bool` for one condition. By default `obj` is a message and the value is read
    from cond['field'] (or `path`); a custom `read(obj)` lets a gear test its own structures."""
    tests = [t for t in TESTS if t in cond]
    if len(tests) != 1:
        raise ValueError(f"a condition needs exactly one of {', '.join(TESTS)}")
    test, arg = tests[0], cond[tests[0]]
    read = read or compile_path(path or cond["field"])
    if test == "exists":
        return lambda m: (read(m) is not None) == bool(arg)
    if test == "equals":
        want = _text(arg)
        return lambda m: (v := read(m)) is not None and _text(v) == want
    if test == "not_equals":
        want = _text(arg)
        return lambda m: (v := read(m)) is None or _text(v) != want
    if test == "prefix":
        prefixes = tuple(_text(p) for p in arg) if isinstance(arg, list) else (_text(arg),)
        return lambda m: (v := read(m)) is not None and _text(v).startswith(prefixes)
    if test == "in":
        allowed = frozenset(_text(a) for a in arg)
        return lambda m: (v := read(m)) is not None and _text(v) in allowed
    if test == "regex":
        rx = re.compile(arg)
        return lambda m: (v := read(m)) is not None and rx.search(_text(v)) is not None
    try:
        bound = float(arg)
    except (TypeError, ValueError):
        raise ValueError(f"{test} needs a number, got {arg!r}") from None

    def numeric(m):
        v = read(m)
        try:
            x = float(_text(v))
        except (TypeError, ValueError):
            return False
        return x > bound if test == "gt" else x < bound

    return numeric


def compile_all(conds) -> tuple:
    """One condition or a list (all must hold) -> tuple of predicates."""
    conds = conds if isinstance(conds, list) else [conds]
    return tuple(compile_condition(c) for c in conds)
