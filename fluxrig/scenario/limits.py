"""Bounded parsing of scenario documents: no YAML aliases, bounded size, depth, nodes and numbers.

Job. A scenario arrives from an operator's file, from the control API (anyone holding a token,
or a script gone wrong) or inside a passport. Every one of these paths parses it with the
functions here, so no document can cost more than its limits allow:

  - YAML aliases are refused (`*name`, and the merge key `<<: *name` with them). An alias is
    how a 446-byte "billion laughs" document expands to gigabytes of nodes; a scenario never
    needs one (a template belongs in `${VAR}` interpolation or in a generator). The anchor
    (`&name`) alone is harmless and accepted.
  - Size: `MAX_DOCUMENT_BYTES` of text, checked before the parser sees a byte.
  - Depth: `MAX_DEPTH` levels of maps and lists (checked while composing YAML, before Python's
    recursion limit could be reached; for TOML, where the standard parser recurses into inline
    arrays and tables, a RecursionError is caught and named, then the parsed tree is walked).
  - Nodes: `MAX_NODES` maps, lists and scalars in all.
  - Integers: at most `MAX_INT_DIGITS` digits. Python refuses to convert 4300+ digit strings
    (`ValueError`, a 500 with a traceback before this module); a scenario's integers are ports,
    timeouts and sizes, so anything past 40 digits is an error that names its line.
  - Strings: at most `MAX_SCALAR_CHARS` characters each.

Every refusal is a ScenarioError whose problem names the line (`<source>:<line>:<column>`
for YAML and TOML where the parser gives it) and the limit. Nothing here raises anything else
for any input text: `parse_bounded` catches the parsers' own RecursionError/ValueError too.

`check_bounds(doc)` walks an already-built document without recursion (a passport's projection,
a document from JSON) and reports the first limit it exceeds, with its dotted location.

Cost. Parsing is linear in the text (aliases being gone); the walk is linear in the nodes. The
pure-Python YAML composer is used (it is where the alias and depth checks hook in): about
1-2 s per MiB on one core, which is why the Mixer parses off its event loop (parse_worker.py).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from ..errors import ScenarioError, ScenarioProblem

__all__ = [
    "Limits",
    "DEFAULT_LIMITS",
    "MAX_DOCUMENT_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_INT_DIGITS",
    "MAX_SCALAR_CHARS",
    "parse_bounded",
    "check_bounds",
    "BoundedYamlLoader",
]

# A real scenario is a few KiB; the largest generated ones seen are ~200 KiB.
MAX_DOCUMENT_BYTES = 2 * 1024 * 1024
# meta/gears[i]/config/<nested map>/... : 8 is the deepest real one; 64 leaves room.
MAX_DEPTH = 64
MAX_NODES = 200_000
MAX_INT_DIGITS = 40
MAX_SCALAR_CHARS = 256 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds one parse is held to (every field a named constant above by default)."""

    max_bytes: int = MAX_DOCUMENT_BYTES
    max_depth: int = MAX_DEPTH
    max_nodes: int = MAX_NODES
    max_int_digits: int = MAX_INT_DIGITS
    max_scalar_chars: int = MAX_SCALAR_CHARS


DEFAULT_LIMITS = Limits()


class _Refused(Exception):
    """Raised inside the loader; turned into a ScenarioError with the location by parse_bounded."""

    def __init__(self, mark, message: str):
        self.mark = mark
        self.message = message
        super().__init__(message)


_INT_DIGITS = re.compile(r"[0-9a-fA-F]")


class BoundedYamlLoader(Reader, Scanner, Parser, Composer, SafeConstructor, Resolver):
    """yaml.SafeLoader (pure Python) that refuses aliases and bounds depth, nodes, ints, strings."""

    limits: Limits = DEFAULT_LIMITS

    def __init__(self, stream, limits: Limits = DEFAULT_LIMITS):
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.limits = limits
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            raise _Refused(
                event.start_mark,
                f"YAML alias *{event.anchor} refused: aliases are not allowed in scenarios "
                "(they let a few bytes expand without bound); write the value out or use ${VAR}",
            )
        self._nodes += 1
        if self._nodes > self.limits.max_nodes:
            raise _Refused(event.start_mark, f"more than {self.limits.max_nodes} nodes (limit max_nodes)")
        nested = isinstance(event, (MappingStartEvent, SequenceStartEvent))
        if nested:
            self._depth += 1
            if self._depth > self.limits.max_depth:
                raise _Refused(event.start_mark, f"nested deeper than {self.limits.max_depth} levels (limit max_depth)")
        try:
            return super().compose_node(parent, index)
        finally:
            if nested:
                self._depth -= 1

    def construct_yaml_int(self, node):
        digits = len(_INT_DIGITS.findall(str(node.value)))
        if digits > self.limits.max_int_digits:
            raise _Refused(
                node.start_mark,
                f"integer of {digits} digits (at most {self.limits.max_int_digits}: limit max_int_digits)",
            )
        return super().construct_yaml_int(node)

    def construct_yaml_str(self, node):
        if len(node.value) > self.limits.max_scalar_chars:
            raise _Refused(
                node.start_mark,
                f"string of {len(node.value)} characters (at most {self.limits.max_scalar_chars}: "
                "limit max_scalar_chars)",
            )
        return super().construct_yaml_str(node)


BoundedYamlLoader.add_constructor("tag:yaml.org,2002:int", BoundedYamlLoader.construct_yaml_int)
BoundedYamlLoader.add_constructor("tag:yaml.org,2002:str", BoundedYamlLoader.construct_yaml_str)


def _loc(where: str, mark) -> str:
    return f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where


_TOML_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")


def _toml_long_int_line(text: str, limits: Limits) -> int | None:
    """The first line holding a digit run longer than the limit (only asked once tomllib failed
    on one: its own error names no line)."""
    pattern = re.compile(r"[0-9][0-9_]{%d,}" % limits.max_int_digits)
    for lineno, line in enumerate(text.splitlines(), 1):
        if pattern.search(line):
            return lineno
    return None


# Brackets and what hides them: a quoted string (one line), a comment. YAML's `#` opens a
# comment only after a space or at a line's start.
_STRUCTURE = re.compile(r"""[\[\]{}]|"(?:[^"\\\n]|\\.)*"|'[^'\n]*'|(?:^|(?<=\s))#[^\n]*""", re.M)
# A TOML key before `=`, or a table header: its dots are levels of nesting.
_TOML_KEY = re.compile(r"^[ \t]*(?:\[\[?([^\]\n]*)\]|([^=\n\"'#\[{]+)=)", re.M)


def _prescan(text: str, where: str, fmt: str, limits: Limits) -> None:
    """Refuse nesting past max_depth before the parser meets it. Linear in the text (regex
    scan). Needed because the parsers are quadratic in nesting: PyYAML keeps a possible simple
    key per open flow level and rescans them (5000 `[` cost 2.7 s), tomllib re-walks dotted keys
    (3000 levels cost 1 s). An estimate on the safe side: brackets inside a plain scalar count."""
    depth = 0
    for m in _STRUCTURE.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limits.max_depth:
                line = text.count("\n", 0, m.start()) + 1
                column = m.start() - (text.rfind("\n", 0, m.start()) + 1) + 1
                raise ScenarioError(
                    [
                        ScenarioProblem(
                            f"{where}:{line}:{column}",
                            f"brackets nested deeper than {limits.max_depth} levels (limit max_depth)",
                        )
                    ]
                )
        elif c in "]}":
            depth = max(0, depth - 1)
    if fmt == "toml":
        for m in _TOML_KEY.finditer(text):
            key = m.group(1) if m.group(1) is not None else m.group(2)
            if key.count(".") >= limits.max_depth:
                line = text.count("\n", 0, m.start()) + 1
                raise ScenarioError(
                    [
                        ScenarioProblem(
                            f"{where}:{line}",
                            f"a dotted key of more than {limits.max_depth} levels (limit max_depth)",
                        )
                    ]
                )


def _parse_yaml(text: str, where: str, limits: Limits):
    loader = BoundedYamlLoader(text, limits)
    try:
        return loader.get_single_data()
    except _Refused as exc:
        raise ScenarioError([ScenarioProblem(_loc(where, exc.mark), exc.message)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ScenarioError(
            [ScenarioProblem(_loc(where, mark), f"not valid YAML: {getattr(exc, 'problem', exc)}")]
        ) from None
    except (ValueError, TypeError, OverflowError) as exc:  # a constructor refused a value (a date, a float)
        raise ScenarioError([ScenarioProblem(where, f"not valid YAML: {exc}")]) from None
    except RecursionError:
        raise ScenarioError([ScenarioProblem(where, "nested too deeply to parse (limit max_depth)")]) from None
    finally:
        loader.dispose()


def _parse_toml(text: str, where: str, limits: Limits):
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_LINE.search(str(exc))
        loc = f"{where}:{m.group(1)}:{m.group(2)}" if m else where
        raise ScenarioError([ScenarioProblem(loc, f"not valid TOML: {exc}")]) from None
    except RecursionError:
        raise ScenarioError(
            [ScenarioProblem(where, f"nested too deeply to parse (at most {limits.max_depth} levels: limit max_depth)")]
        ) from None
    except ValueError as exc:  # e.g. Python's own limit on converting long digit strings
        line = _toml_long_int_line(text, limits)
        loc = f"{where}:{line}" if line else where
        raise ScenarioError([ScenarioProblem(loc, f"not valid TOML: {exc}")]) from None


def parse_bounded(text: str, fmt: str = "yaml", source: str | None = None, limits: Limits = DEFAULT_LIMITS):
    """Parse scenario text within `limits`; the parsed value (not yet checked to be a map).

    Raises ScenarioError (one problem naming the line where known) for text over max_bytes,
    an unknown format, a syntax error, an alias, or any limit exceeded. Nothing else."""
    where = source or "<scenario>"
    # Characters never outnumber UTF-8 bytes: the cheap test first, the encoding only below it.
    size = len(text) if len(text) > limits.max_bytes else len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise ScenarioError(
            [ScenarioProblem(where, f"document of {size} bytes exceeds {limits.max_bytes} (limit max_bytes)")]
        )
    if fmt not in ("yaml", "yml", "toml"):
        raise ScenarioError([ScenarioProblem(where, f"unknown scenario format {fmt!r}; use yaml or toml")])
    _prescan(text, where, fmt, limits)
    doc = _parse_toml(text, where, limits) if fmt == "toml" else _parse_yaml(text, where, limits)
    problem = check_bounds(doc, limits, where)
    if problem is not None:
        raise ScenarioError([problem])
    return doc


def check_bounds(doc, limits: Limits = DEFAULT_LIMITS, where: str = "") -> ScenarioProblem | None:
    """The first bound `doc` exceeds (depth, nodes, integer digits, string length), else None.

    Iterative (an explicit stack), so a document nested a million deep costs a million steps
    and never a RecursionError. Locations are dotted (`gears[3].config.x`)."""
    nodes = 0
    max_int = 10**limits.max_int_digits
    stack: list[tuple[object, str, int]] = [(doc, where, 0)]
    while stack:
        value, loc, depth = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            return ScenarioProblem(loc or "<document>", f"more than {limits.max_nodes} nodes (limit max_nodes)")
        if isinstance(value, dict):
            if depth + 1 > limits.max_depth:
                return ScenarioProblem(
                    loc or "<document>", f"nested deeper than {limits.max_depth} levels (limit max_depth)"
                )
            for k, v in value.items():
                if isinstance(k, str) and len(k) > limits.max_scalar_chars:
                    return ScenarioProblem(
                        loc or "<document>", f"a key of {len(k)} characters (limit max_scalar_chars)"
                    )
                stack.append((v, f"{loc}.{k}" if loc else str(k), depth + 1))
        elif isinstance(value, list):
            if depth + 1 > limits.max_depth:
                return ScenarioProblem(
                    loc or "<document>", f"nested deeper than {limits.max_depth} levels (limit max_depth)"
                )
            for i, v in enumerate(value):
                stack.append((v, f"{loc}[{i}]", depth + 1))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            if not -max_int < value < max_int:
                return ScenarioProblem(
                    loc or "<document>", f"integer longer than {limits.max_int_digits} digits (limit max_int_digits)"
                )
        elif isinstance(value, str) and len(value) > limits.max_scalar_chars:
            return ScenarioProblem(loc or "<document>", f"string of {len(value)} characters (limit max_scalar_chars)")
    return None
