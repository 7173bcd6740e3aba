"""Spec rules of a v2 spec document, compiled once and run on decoded (or to-be-encoded) fields.

Job: `compile_rules(spec)` reads the semantic layer of the spec document and returns a
`Rules` whose `check(fields)` lists every `Violation` (rule, field, severity, message; never a
field's value) for one message. Rules, from the document:
  * per-MTI usage: `spec.fields.<n>.messages: [{mti: "0100" | [..], usage: mandatory |
    optional | forbidden, when: "<expr>"}]`; the first entry whose MTI matches and whose
    `when` holds applies (an entry without `when` is the default and must come last);
  * `spec.validation_policy.unlisted: forbidden`: a field present in a message whose MTI no
    usage entry of that field names is a violation (default `optional`);
  * closed value sets: `validValues` (list or mapping) or `values_ref` to an enum with
    `closed: true`; `format: {kind: pan}` means digits, 12-19 of them, Luhn-valid;
  * `spec.checks: [{name, mti, severity: reject | warn, note, ...}]`, each either an
    `assert: "<expr>"` or value constraints on one `field`: `min_length`, `max_length`,
    `charset` (digits | alpha | alnum | ans | hex), `pattern` (a regular expression the whole
    value matches), `min`/`max` (numeric range), `luhn: true`.
`when` / `assert` expressions: `field(N)`, `field(N.sub)`, `present(N)`, `present(N.sub)`,
`mti`, `len(x)`, `luhn(x)`, `matches(x, "re")`, string literals ("..."/'...'), numbers,
`== != < > <= >=` (numeric when one side is a number literal and the other holds digits, else
string-wise), `!`, `&&`, `||`, parentheses. Load-time errors (SpecError: every problem, with
the expression position) name the rule; an expression reading a field the wire layer does not
declare is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fluxrig.iso8583.masking import luhn_valid

__all__ = ["Rules", "Violation", "compile_rules", "compile_expr", "luhn_ok", "ExprError", "USAGES", "CHARSETS"]

USAGES = ("mandatory", "optional", "forbidden")
MAX_CACHED_MTIS = 256  # per-MTI plans kept; a peer sending random MTIs cannot grow it further
CHARSETS = {
    "digits": re.compile(r"[0-9]*"),
    "alpha": re.compile(r"[A-Za-z]*"),
    "alnum": re.compile(r"[A-Za-z0-9]*"),
    "ans": re.compile(r"[\x20-\x7e]*"),
    "hex": re.compile(r"[0-9A-Fa-f]*"),
}
_PAN = re.compile(r"[0-9]{12,19}")


luhn_ok = luhn_valid  # the Luhn (mod 10) check, shared with log masking


@dataclass(frozen=True)
class Violation:
    rule: str  # usage.mandatory, usage.forbidden, usage.unlisted, values, pan, or a check's name
    field: object  # field number, "N.sub", or None for a message-level check
    severity: str  # reject | warn
    message: str

    def __str__(self) -> str:
        where = f"field {self.field}" if self.field is not None else "message"
        return f"{self.rule} ({where}): {self.message}"


class ExprError(ValueError):
    def __init__(self, message: str, pos: int):
        self.pos = pos
        super().__init__(f"at {pos}: {message}")


# -- expressions ---------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d+)?)|(?P<str>\"[^\"]*\"|'[^']*')|(?P<op>==|!=|<=|>=|&&|\|\||[<>!(),.])"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*))"
)
_FUNCS = ("field", "present", "len", "luhn", "matches")
_REF = re.compile(r"\d{1,3}(\.[A-Za-z0-9]+)*")


def _tokens(text):
    pos, out = 0, []
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ExprError(f"unexpected {text[pos : pos + 8]!r}", pos)
        kind = m.lastgroup
        out.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    out.append(("end", "", len(text)))
    return out


def _value(fields, ref):
    num, sub = ref
    v = fields.get(num)
    if not sub and type(v) is str:
        return v
    for key in sub:
        if isinstance(v, list):
            v = v[0] if v else None
        if not isinstance(v, dict):
            return None
        v = v.get(key, v.get(key.upper()) if isinstance(key, str) else None)
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex().upper()
    if isinstance(v, (dict, list)):
        return None
    return None if v is None else str(v)


def _cmp(op, a, b):
    if a is None or b is None:
        return op == "!=" and (a is None) != (b is None)
    if isinstance(a, float) or isinstance(b, float):
        try:
            a, b = float(a), float(b)
        except ValueError:
            a, b = str(a), str(b)
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    if op == "<":
        return a < b
    if op == ">":
        return a > b
    if op == "<=":
        return a <= b
    return a >= b


class _Parser:
    def __init__(self, text, declared):
        self.text = text
        self.t = _tokens(text)
        self.i = 0
        self.declared = declared
        self.refs = []

    def peek(self):
        return self.t[self.i]

    def take(self, value=None):
        tok = self.t[self.i]
        if value is not None and tok[1] != value:
            raise ExprError(f"expected {value!r}, found {tok[1] or 'the end'!r}", tok[2])
        self.i += 1
        return tok

    def parse(self):
        fn = self.disj()
        tok = self.peek()
        if tok[0] != "end":
            raise ExprError(f"unexpected {tok[1]!r}", tok[2])
        return fn

    def disj(self):
        left = self.conj()
        while self.peek()[1] == "||":
            self.take()
            right = self.conj()
            left = (lambda a, b: lambda f, m: bool(a(f, m)) or bool(b(f, m)))(left, right)
        return left

    def conj(self):
        left = self.neg()
        while self.peek()[1] == "&&":
            self.take()
            right = self.neg()
            left = (lambda a, b: lambda f, m: bool(a(f, m)) and bool(b(f, m)))(left, right)
        return left

    def neg(self):
        if self.peek()[1] == "!":
            self.take()
            inner = self.neg()
            return lambda f, m: not inner(f, m)
        return self.comparison()

    def comparison(self):
        left, lnum = self.term()
        op = self.peek()[1]
        if op in ("==", "!=", "<", ">", "<=", ">="):
            self.take()
            right, rnum = self.term()
            numeric = lnum or rnum

            def cmp(f, m, a=left, b=right, op=op, numeric=numeric):
                x, y = a(f, m), b(f, m)
                if numeric and x is not None and y is not None:
                    try:
                        return _cmp(op, float(x), float(y))
                    except (TypeError, ValueError):
                        return False
                return _cmp(op, x, y)

            return cmp
        return left

    def ref(self):
        # field(55.9F02): read the reference as raw text up to ')' (tags mix digits and letters)
        start = self.peek()[2]
        end = self.text.find(")", start)
        raw = self.text[start:end].strip() if end >= 0 else ""
        if not _REF.fullmatch(raw):
            raise ExprError("a field reference N or N.sub expected", start)
        while self.peek()[2] < end:
            self.take()
        parts = raw.split(".")
        num = int(parts[0])
        if self.declared is not None and num not in self.declared:
            raise ExprError(f"field {num} is not declared by the wire layer", start)
        self.refs.append(num)
        return (num, tuple(parts[1:]))

    def term(self):
        kind, text, pos = self.peek()
        if kind == "num":
            self.take()
            value = float(text)
            return (lambda f, m: value), True
        if kind == "str":
            self.take()
            value = text[1:-1]
            return (lambda f, m: value), False
        if text == "(":
            self.take()
            inner = self.disj()
            self.take(")")
            return inner, False
        if kind == "name":
            self.take()
            if text == "mti":
                return (lambda f, m: m), False
            if text in ("true", "false"):
                value = text == "true"
                return (lambda f, m: value), False
            if text not in _FUNCS:
                raise ExprError(f"unknown name {text!r} (field, present, len, luhn, matches, mti)", pos)
            self.take("(")
            if text in ("field", "present"):
                ref = self.ref()
                self.take(")")
                if text == "field":
                    return (lambda f, m: _value(f, ref)), False
                return (lambda f, m: _value(f, ref) is not None), False
            arg, _ = self.term_or_expr()
            if text == "matches":
                self.take(",")
                k, pat, p = self.take()
                if k != "str":
                    raise ExprError("matches() takes a string pattern", p)
                try:
                    rx = re.compile(pat[1:-1])
                except re.error as exc:
                    raise ExprError(f"bad pattern: {exc}", p) from None
                self.take(")")
                return (lambda f, m: (lambda v: v is not None and rx.fullmatch(str(v)) is not None)(arg(f, m))), False
            self.take(")")
            if text == "len":
                return (lambda f, m: (lambda v: 0 if v is None else len(str(v)))(arg(f, m))), True
            return (lambda f, m: (lambda v: v is not None and luhn_ok(str(v)))(arg(f, m))), False
        raise ExprError(f"unexpected {text or 'end'!r}", pos)

    def term_or_expr(self):
        return self.disj(), False


def compile_expr(text: str, declared=None):
    """Compile a `when`/`assert` expression to fn(fields, mti) -> bool; ExprError with a position."""
    if not isinstance(text, str) or not text.strip():
        raise ExprError("empty expression", 0)
    p = _Parser(text, declared)
    fn = p.parse()
    return fn, p.refs


# -- rules ---------------------------------------------------------------------------------


def _mti_match(spec_mti):
    if spec_mti is None:
        return lambda mti: True
    items = [spec_mti] if isinstance(spec_mti, str) else list(spec_mti)
    pats = [re.compile(re.escape(str(s)).replace("x", "[0-9]").replace("X", "[0-9]")) for s in items]
    return lambda mti: any(p.fullmatch(mti or "") for p in pats)


class Rules:
    """The compiled rules of one spec; `check(fields)` -> [Violation]."""

    def __init__(self):
        self.usage = []  # (num, [(mti_match, when_fn or None, usage)])
        self.unlisted_forbidden = False
        self.listed = {}  # num -> mti_match of every usage entry (for `unlisted`)
        self.values = []  # (num, allowed set, rule)
        self.pans = []  # field numbers with format.kind pan
        self.checks = []  # (name, mti_match, severity, fn(fields, mti) -> message or None, field)
        self._plans = {}  # mti -> what applies to it (see _plan)
        self.mti_version = None  # "0" | "1" | "2": the version digit every MTI must start with

    @property
    def empty(self) -> bool:
        return not (
            self.usage or self.unlisted_forbidden or self.values or self.pans or self.checks or self.mti_version
        )

    def _plan(self, mti: str):
        """What applies to one MTI, worked out once: MTIs are few, messages many."""
        plan = self._plans.get(mti)
        if plan is not None:
            return plan
        fixed = []  # (num, usage) decided by the MTI alone
        conditional = []  # (num, [(when, usage)]) the first true `when` decides
        for num, entries in self.usage:
            mine = [(when, usage) for match, when, usage in entries if match(mti)]
            if not mine:
                continue
            if mine[0][0] is None:
                if mine[0][1] != "optional":
                    fixed.append((num, mine[0][1]))
            else:
                conditional.append((num, mine))
        allowed = None
        if self.unlisted_forbidden:
            allowed = frozenset(n for n, m in self.listed.items() if m(mti)) | {0, 1}
        checks = [c for c in self.checks if c[1](mti)]
        mand = tuple(n for n, u in fixed if u == "mandatory")
        forb = tuple(n for n, u in fixed if u == "forbidden")
        plan = (mand, forb, conditional, allowed, checks)
        if len(self._plans) < MAX_CACHED_MTIS:
            self._plans[mti] = plan
        return plan

    def check(self, fields: dict) -> list:
        """Violations of one message's fields ({num: value}; a None value counts as absent:
        pass decoded fields, or fields with the Nones an encoder skips removed)."""
        mti = fields.get(0)
        mti = mti if type(mti) is str else str(mti or "")
        mand, forb, conditional, allowed, checks = self._plan(mti)
        out = []
        if self.mti_version is not None and mti[:1] != self.mti_version:
            out.append(Violation("mti.version", 0, "reject", f"MTI {mti} is not of version {self.mti_version}"))
        for num in mand:
            if num not in fields:
                out.append(Violation("usage.mandatory", num, "reject", f"mandatory in MTI {mti}, absent"))
        for num in forb:
            if num in fields:
                out.append(Violation("usage.forbidden", num, "reject", f"forbidden in MTI {mti}, present"))
        for num, entries in conditional:
            for when, usage in entries:
                if when is not None and not when(fields, mti):
                    continue
                has = fields.get(num) is not None
                if usage == "mandatory" and not has:
                    out.append(Violation("usage.mandatory", num, "reject", f"mandatory in MTI {mti}, absent"))
                elif usage == "forbidden" and has:
                    out.append(Violation("usage.forbidden", num, "reject", f"forbidden in MTI {mti}, present"))
                break
        if allowed is not None and not allowed.issuperset(fields):
            for num in [n for n in fields if n not in allowed]:
                out.append(
                    Violation("usage.unlisted", num, "reject", f"not listed for MTI {mti} (unlisted: forbidden)")
                )
        for num, ok, rule in self.values:
            v = fields.get(num)
            if v is not None and v not in ok and str(v) not in ok:
                out.append(Violation(rule, num, "reject", "value outside the closed set"))
        for num in self.pans:
            v = fields.get(num)
            if v is not None and not (type(v) is str and _PAN.fullmatch(v) and luhn_valid(v)):
                out.append(Violation("pan", num, "reject", "not a PAN: 12-19 digits passing the Luhn check"))
        for name, _match, severity, fn, field in checks:
            msg = fn(fields, mti)
            if msg is not None:
                out.append(Violation(name, field, severity, msg))
        return out


def _value_check(c, num, loc, problems):
    tests = []
    for key in ("min_length", "max_length"):
        if key in c:
            n = c[key]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                problems.append(f"{loc}.{key}: a non-negative integer")
                continue
            tests.append((key, n))
    if "charset" in c:
        if c["charset"] not in CHARSETS:
            problems.append(f"{loc}.charset: {c['charset']!r} is not one of {', '.join(CHARSETS)}")
        else:
            tests.append(("charset", CHARSETS[c["charset"]]))
    if "pattern" in c:
        try:
            tests.append(("pattern", re.compile(str(c["pattern"]))))
        except re.error as exc:
            problems.append(f"{loc}.pattern: {exc}")
    for key in ("min", "max"):
        if key in c:
            if isinstance(c[key], bool) or not isinstance(c[key], (int, float)):
                problems.append(f"{loc}.{key}: a number")
            else:
                tests.append((key, c[key]))
    if c.get("luhn"):
        tests.append(("luhn", True))
    if not tests:
        problems.append(
            f"{loc}: a field check needs assert or min_length, max_length, charset, pattern, min, max, luhn"
        )

    def run(fields, mti, num=num, tests=tests):
        v = _value(fields, num)
        if v is None:
            return None
        for key, arg in tests:
            if key == "min_length" and len(v) < arg:
                return f"shorter than {arg}"
            if key == "max_length" and len(v) > arg:
                return f"longer than {arg}"
            if key in ("charset", "pattern") and arg.fullmatch(v) is None:
                return f"fails {key}"
            if key in ("min", "max"):
                try:
                    x = float(v)
                except ValueError:
                    return f"not a number (range {key} {arg})"
                if (key == "min" and x < arg) or (key == "max" and x > arg):
                    return f"out of range ({key} {arg})"
            if key == "luhn" and not luhn_ok(v):
                return "fails the Luhn check"
        return None

    return run


def _field_ref(value, declared, loc, problems):
    text = str(value)
    head, _, rest = text.partition(".")
    if not head.isdigit() or int(head) not in declared:
        problems.append(f"{loc}.field: {value!r} is not a declared field")
        return None
    return (int(head), tuple(rest.split(".")) if rest else ())


def compile_rules(spec_doc, declared, catalog, enums, problems) -> Rules:
    """Rules of a v2 spec document's semantic layer (`spec_doc` is the `spec:` mapping)."""
    rules = Rules()
    if not isinstance(spec_doc, dict):
        return rules
    declared = set(declared)
    policy = spec_doc.get("validation_policy") or {}
    if isinstance(policy, dict):
        unlisted = policy.get("unlisted", "optional")
        if unlisted not in ("optional", "forbidden"):
            problems.append(f"spec.validation_policy.unlisted: {unlisted!r} is not optional or forbidden")
        rules.unlisted_forbidden = unlisted == "forbidden"
    else:
        problems.append("spec.validation_policy: must be a mapping")
    for key, entry in (spec_doc.get("fields") or {}).items():
        if not isinstance(entry, dict) or not str(key).isdigit():
            continue
        num, loc = int(key), f"spec.fields.{key}"
        msgs = entry.get("messages")
        if msgs is not None:
            _usage(rules, num, msgs, loc, declared, catalog, problems)
        allowed = entry.get("validValues")
        if allowed is not None:
            vals = allowed.keys() if isinstance(allowed, dict) else allowed
            rules.values.append((num, {str(v) for v in vals}, "values"))
        ref = entry.get("values_ref")
        if isinstance(ref, str) and ref in (enums or {}):
            enum = enums[ref]
            if isinstance(enum, dict) and enum.get("closed"):
                rules.values.append((num, {str(v) for v in (enum.get("values") or {})}, f"values.{ref}"))
        fmt = entry.get("format")
        if isinstance(fmt, dict) and fmt.get("kind") == "pan":
            rules.pans.append(num)
    for i, c in enumerate(spec_doc.get("checks") or []):
        loc = f"spec.checks[{i}]"
        if not isinstance(c, dict):
            problems.append(f"{loc}: must be a mapping")
            continue
        name = str(c.get("name") or f"check{i}")
        severity = c.get("severity", "reject")
        if severity not in ("reject", "warn"):
            problems.append(f"{loc}.severity: {severity!r} is not reject or warn")
            continue
        _catalog_refs(c.get("mti"), loc, catalog, problems)
        field = None
        if "assert" in c:
            try:
                fn, _refs = compile_expr(c["assert"], declared)
            except ExprError as exc:
                problems.append(f"{loc}.assert: {exc}")
                continue

            def run(fields, mti, fn=fn, text=c["assert"]):
                return None if fn(fields, mti) else f"assert {text!r} is false"

        elif "field" in c:
            ref = _field_ref(c["field"], declared, loc, problems)
            if ref is None:
                continue
            field = str(c["field"]) if ref[1] else ref[0]
            run = _value_check(c, ref, loc, problems)
        else:
            problems.append(f"{loc}: needs assert or field")
            continue
        rules.checks.append((name, _mti_match(c.get("mti")), severity, run, field))
    return rules


def _catalog_refs(mti, loc, catalog, problems):
    if mti is None or not catalog:
        return
    for m in [mti] if isinstance(mti, str) else list(mti):
        if "x" not in str(m).lower() and str(m) not in catalog:
            problems.append(f"{loc}.mti: {m!r} is not in spec.messages.catalog")


def _usage(rules, num, msgs, loc, declared, catalog, problems):
    if not isinstance(msgs, list):
        problems.append(f"{loc}.messages: a list of {{mti, usage, when}}")
        return
    entries = []
    matches = []
    for j, e in enumerate(msgs):
        eloc = f"{loc}.messages[{j}]"
        if not isinstance(e, dict) or "mti" not in e:
            problems.append(f"{eloc}: needs mti and usage")
            continue
        usage = e.get("usage", "optional")
        if usage not in USAGES:
            problems.append(f"{eloc}.usage: {usage!r} is not one of {', '.join(USAGES)}")
            continue
        _catalog_refs(e["mti"], eloc, catalog, problems)
        when = None
        if e.get("when") is not None:
            try:
                when, _refs = compile_expr(e["when"], declared)
            except ExprError as exc:
                problems.append(f"{eloc}.when: {exc}")
                continue
        m = _mti_match(e["mti"])
        entries.append((m, when, usage))
        matches.append(m)
    if entries:
        rules.usage.append((num, entries))
        rules.listed[num] = lambda mti, ms=tuple(matches): any(x(mti) for x in ms)
