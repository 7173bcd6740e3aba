"""The loaded ISO 8583 message spec: identity, semantics and a compiled codec, built once.

Job: `load_spec(source)` turns a spec file path, a built-in base name (`moov:spec87ascii`,
`moov:spec87hex`), a parsed document dict (v2 spec, moov wire document or pyiso8583 spec) or
an existing Spec into a `Spec`: identity (`id`, `version`, `name`, `hash` = first 12 hex of
the SHA-256 of the source text), semantics (`aliases`, `sensitivity`, `labels`, `catalog`,
`enums`), the compiled field table behind `spec.decode(raw)` / `spec.encode(fields)`, and
`spec.rules` (fluxrig.iso8583.rules: per-MTI usage, `when`, value sets, checks) whose
`spec.rules.check(fields)` lists the violations of one message.

Contract: the table is validated and compiled at load (SpecError lists every problem); the
codec is the active one of fluxrig.iso8583.codec (`impl="py"` / `impl="c"` forces one;
`impl="c"` raises ImportError when the twin is not built) and `spec.backend` names it.
`spec.decode` and `spec.encode` are the codec's bound methods: no per-message work happens in
this module.
"""

from __future__ import annotations

import json
import os

from fluxrig.iso8583 import codec_py, plan
from fluxrig.iso8583.codec import codec_module
from fluxrig.iso8583.errors import SpecError
from fluxrig.iso8583.masking import log_safe, mask_value
from fluxrig.iso8583.rules import compile_rules
from fluxrig.iso8583.sdl import BASES, read_text_document, resolve_base, resolve_document, source_hash

__all__ = ["Spec", "load_spec", "DEFAULT_MAX_MESSAGE_BYTES"]

DEFAULT_MAX_MESSAGE_BYTES = codec_py.DEFAULT_MAX_MESSAGE_BYTES


class Spec:
    """A compiled message spec. `decode`/`encode` are bound to the codec at construction."""

    def __init__(self, resolved, impl=None, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES):
        problems: list = []
        # Compile with the pure module first: it validates and is the reference table.
        table = plan.compile_table(resolved.wire, codec_py, problems, where=f"{resolved.source}.fields")
        if problems:
            raise SpecError(problems, resolved.source)
        self.id = resolved.id
        self.version = resolved.version
        self.name = resolved.name
        self.hash = resolved.hash
        self.source = resolved.source
        self.protocol = resolved.protocol
        self.wire = resolved.wire
        self.aliases = dict(resolved.aliases)
        self.fields_by_alias = {a: n for n, a in self.aliases.items()}
        self.part_aliases = dict(resolved.part_aliases)
        self.sensitivity = dict(resolved.sensitivity)
        self.catalog = dict(resolved.catalog)
        self.transitions = list(resolved.transitions)
        self.correlate_on = list(resolved.correlate_on)
        self.enums = dict(resolved.enums)
        self.document = resolved.document
        self.max_message_bytes = max_message_bytes
        self.labels = {n: (d.get("description") or "") for n, d in resolved.wire.items()}
        self.labels.update(resolved.labels)
        doc = resolved.document.get("spec") if isinstance(resolved.document, dict) else None
        self.rules = compile_rules(doc, resolved.wire.keys(), self.catalog, self.enums, problems)
        self.mti_version = resolved.mti_version
        self.rules.mti_version = resolved.mti_version
        if problems:
            raise SpecError(problems, resolved.source)
        self.masked = {n: s for n, s in self.sensitivity.items() if s != "none"}
        for n, on in resolved.log_mask.items():
            if on and n not in self.masked:
                self.masked[n] = "pan" if n == 2 else "sad"
        mod = codec_module(impl)
        if mod is codec_py:
            self.codec = codec_py.Codec(table, max_message_bytes)
        else:
            self.codec = mod.Codec(plan.compile_table(resolved.wire, mod, []), max_message_bytes)
        self.backend = "cython" if mod is not codec_py else "pure"
        self.decode = self.codec.decode
        self.encode = self.codec.encode

    def with_impl(self, impl):
        """The same spec over another codec backend ("py" or "c")."""
        clone = object.__new__(Spec)
        clone.__dict__.update(self.__dict__)
        mod = codec_module(impl)
        clone.codec = mod.Codec(plan.compile_table(self.wire, mod, []), self.max_message_bytes)
        clone.backend = "cython" if mod is not codec_py else "pure"
        clone.decode = clone.codec.decode
        clone.encode = clone.codec.encode
        return clone

    def field_number(self, name):
        """A field number from an int, a numeric string or an alias."""
        if isinstance(name, int):
            return name
        if isinstance(name, str) and name.isdigit():
            return int(name)
        try:
            return self.fields_by_alias[name]
        except KeyError:
            raise KeyError(f"spec {self.id} has no field or alias {name!r}") from None

    def log_safe(self, fields: dict) -> dict:
        """A copy of decoded `fields` with every sensitive field masked (see masking.py)."""
        return log_safe(fields, self.masked)

    def mask(self, num, value):
        """Mask one field's value if the spec classifies it."""
        level = self.masked.get(num)
        return value if level is None else mask_value(value, level)

    def __repr__(self) -> str:
        return f"<Spec {self.id} {self.version} hash={self.hash} backend={self.backend}>"


def load_spec(source, *, impl=None, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES) -> Spec:
    """Load and compile a spec from a path, a base name, a document dict or a Spec."""
    if isinstance(source, Spec):
        return source if impl is None else source.with_impl(impl)
    if isinstance(source, dict):
        text = json.dumps(source, sort_keys=True, default=str)
        resolved = resolve_document(source, text, "<dict>", None)
        resolved.hash = source_hash(text)
        return Spec(resolved, impl, max_message_bytes)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(f"load_spec() takes a path, a base name, a dict or a Spec, not {type(source).__name__}")
    if source.startswith("moov:"):
        if source not in BASES:
            raise SpecError([f"{source}: unknown base; known: {', '.join(sorted(BASES))}"], source)
        return Spec(resolve_base(source), impl, max_message_bytes)
    try:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise SpecError([f"{source}: cannot read: {exc.strerror}"], source) from None
    doc = read_text_document(text, source)
    resolved = resolve_document(doc, text, source, os.path.dirname(os.path.abspath(source)))
    return Spec(resolved, impl, max_message_bytes)
