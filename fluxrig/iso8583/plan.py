"""Compile moov-vocabulary field definitions into the codec's field table (once per spec).

Job: validate one wire-layer field definition (`type`, `length`, `enc`, `prefix`, `padding`,
`subfields`, `tag`) and build the `FieldPlan` the hot loop runs on, choosing a fast path where
one applies (ASCII fixed, ASCII L..LLLL) and precomputing length-prefix bytes. Every problem
is appended to a list as "location: text" so a spec reports all its problems at once.

Contract: `compile_table(wire, mod, problems, where)` returns a list of MAX_FIELD + 1 plans
(None where the spec defines no field), built with `mod.FieldPlan` so the table fits the
backend (`mod` is fluxrig.iso8583.codec_py or its compiled twin). Accepted vocabulary:
  type     String | Numeric | Binary | Hex | Track2 | Bitmap | Composite
  enc      ASCII | EBCDIC (code page 037) | EBCDIC1047 | BCD (odd counts 0-padded on the left) |
           LBCD (left-aligned: 0-padded on the right) | LBCDF (fluxrig: F-padded on the right) |
           Binary | HexToASCII | ASCIIToHex (value: hex string, wire: its bytes, length in bytes)
  prefix   <ASCII|BCD|Binary|EBCDIC|Hex>.<Fixed|L .. LLLLLL>
           on the wire, for a value of N units and k = number of L's:
             ASCII.L..LLLL   k decimal digits ("05")        EBCDIC.L..LLLL  k digits 0xF0-0xF9
             BCD.L..LLLL     ceil(k/2) bytes of BCD (0x05)   Binary.L..LLLL  k bytes, big-endian
             Hex.L..LLLL     2k upper-case hex characters of N (moov's current Hex prefixer)
  padding  {type: Left|Right|None, pad: "<one character>"}   (character types only; applied on
           encode up to `length`, never stripped on decode)
  subfields  fluxrig authoring form {layout: positional|tlv, parts: [...], unknown_tags,
           repeat: {length, max}} or moov's map form {key: {field}} with an optional
           `tag: {enc: BerTLVTag, skipUnknownTLVTags, storeUnknownTLVTags}`; tagged composites
           (`tag: {length: 2|3.., enc: ASCII|EBCDIC, padding}` in moov's form, or layout: tagged
           with parts [{tag, key, ...}], `unknown_tags` + `unknown_prefix`) put each present
           part as tag + its own prefix + value; bitmapped composites (a field-level `bitmap:
           {length: 8|16, enc: Binary|HexToASCII, secondary}` over numbered subfields, or
           layout: bitmap with parts [{bit, ...}]) start with a bitmap announcing the parts.
  keys     parts are keyed by str ("1", "9F02"); encode also takes the int of a numeric key.
"""

from __future__ import annotations

from functools import lru_cache

from fluxrig.iso8583 import codec_py as C

__all__ = [
    "compile_table",
    "build_field",
    "parse_prefix",
    "TYPES",
    "ENCODINGS",
    "MAX_NESTING",
    "MAX_PREFIX_DIGITS",
    "LEN_TABLE_LIMIT",
]

TYPES = {
    "string": C.T_STRING,
    "numeric": C.T_NUMERIC,
    "binary": C.T_BINARY,
    "hex": C.T_HEX,
    "track2": C.T_TRACK2,
    "composite": C.T_COMPOSITE,
    "bitmap": C.T_BITMAP,
}
ENCODINGS = {
    "ascii": C.E_ASCII,
    "ebcdic": C.E_EBCDIC,
    "bcd": C.E_BCD,
    "binary": C.E_BINARY,
    "hextoascii": C.E_HEXASCII,
    "bytestoasciihex": C.E_HEXASCII,
    "lbcd": C.E_LBCD,
    "lbcdf": C.E_LBCD,  # fluxrig: LBCD padded with an F nibble (jPOS IFB_F*, RIGHT_PADDED_F)
    "ebcdic1047": C.E_EBCDIC1047,
    "ebcdic037": C.E_EBCDIC,
    "ebcdichex": C.E_EBCDICHEX,  # fluxrig: bytes as EBCDIC hex characters (jPOS IFE_BINARY, IFE_BITMAP)
}
# `ASCIIToHex` (moov's ASCIIHexToBytes): the value is a hex string, the wire carries the bytes
# it spells, `length` and the prefix count bytes. That is the Hex type over Binary.
_ASCII_TO_HEX = "asciitohex"
_TAG_ENCODINGS = {"ascii": C.E_ASCII, "ebcdic": C.E_EBCDIC}
_PREFIX_KINDS = {"ascii": C.P_ASCII, "ebcdic": C.P_EBCDIC, "bcd": C.P_BCD, "binary": C.P_BINARY, "hex": C.P_HEX}
_TEXT_ENC = {C.E_ASCII, C.E_EBCDIC, C.E_EBCDIC1047, C.E_BCD, C.E_LBCD, C.E_BINARY, C.E_HEXASCII}
_ALLOWED_ENC = {
    C.T_STRING: _TEXT_ENC,
    C.T_NUMERIC: _TEXT_ENC,
    C.T_TRACK2: {C.E_ASCII, C.E_EBCDIC, C.E_EBCDIC1047, C.E_BCD, C.E_LBCD, C.E_BINARY, C.E_HEXASCII},
    C.T_BINARY: {C.E_BINARY, C.E_HEXASCII, C.E_EBCDICHEX, C.E_ASCII},
    C.T_HEX: {C.E_BINARY, C.E_HEXASCII, C.E_EBCDICHEX},
    C.T_BITMAP: {C.E_BINARY, C.E_HEXASCII, C.E_EBCDICHEX},
}
_TEXT_TYPES = (C.T_STRING, C.T_NUMERIC, C.T_TRACK2)
_UNKNOWN = {"preserve": C.U_PRESERVE, "drop": C.U_DROP, "reject": C.U_REJECT}

MAX_NESTING = 4  # composites inside composites
MAX_PREFIX_DIGITS = 6  # L .. LLLLLL (jPOS has 5- and 6-digit ASCII and BCD prefixes)
LEN_TABLE_LIMIT = 9999  # precompute prefix bytes up to this many units


def parse_prefix(text):
    """'ASCII.LL' -> (P_ASCII, 2); 'Binary.Fixed' -> (P_FIXED, 0). Raises ValueError."""
    if not isinstance(text, str) or "." not in text:
        raise ValueError(f"prefix {text!r} is not <encoding>.<Fixed|L|LL|LLL|LLLL>")
    enc, size = text.split(".", 1)
    kind = _PREFIX_KINDS.get(enc.lower())
    if kind is None:
        raise ValueError(f"prefix {text!r}: unknown encoding {enc!r} (ASCII, BCD, Binary, EBCDIC, Hex)")
    if size.lower() == "fixed":
        return C.P_FIXED, 0
    if not size or set(size) != {"L"} or len(size) > MAX_PREFIX_DIGITS:
        raise ValueError(f"prefix {text!r}: size must be Fixed or L .. {'L' * MAX_PREFIX_DIGITS}")
    return kind, len(size)


def _prefix_wire_len(pk, ndig):
    if pk == C.P_BCD:
        return (ndig + 1) // 2
    if pk == C.P_HEX:
        return 2 * ndig
    return ndig


def _prefix_capacity(pk, ndig):
    if pk in (C.P_BINARY, C.P_HEX):
        return 256**ndig - 1
    return 10**ndig - 1


@lru_cache(maxsize=256)
def _len_table(pk, ndig, upto):
    # Shared by every plan with the same prefix and maximum; never mutated.
    return [C.prefix_for(pk, ndig, i) for i in range(upto + 1)]


@lru_cache(maxsize=256)
def _len_str(pk, ndig, upto):
    return [b.decode("latin-1") for b in _len_table(pk, ndig, upto)]


def _wire_size(enc, units):
    if enc in (C.E_BCD, C.E_LBCD):
        return (units + 1) // 2
    if enc in (C.E_HEXASCII, C.E_EBCDICHEX):
        return 2 * units
    return units


def _lookup(table, value, what, loc, problems):
    if not isinstance(value, str) or value.lower() not in table:
        problems.append(f"{loc}: unknown {what} {value!r}")
        return None
    return table[value.lower()]


def _int(value, loc, problems, what="length"):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        problems.append(f"{loc}: {what} must be a non-negative integer, got {value!r}")
        return None
    return value


class _Ctx:
    """What a compile pass threads through: the backend module and the problem list."""

    def __init__(self, mod, problems):
        self.mod = mod
        self.problems = problems


def _base_plan(ctx, num, key, sub, d, loc):
    f = ctx.mod.FieldPlan()
    f.num = num
    f.key = key
    f.sub = sub
    label = d.get("description") or d.get("name") or ""
    f.label = str(label)
    return f


def _apply_prefix(ctx, f, prefix, loc, default="ASCII.Fixed"):
    try:
        pk, ndig = parse_prefix(prefix if prefix is not None else default)
    except ValueError as exc:
        ctx.problems.append(f"{loc}.prefix: {exc}")
        return False
    f.pref = pk
    f.ndig = ndig
    f.plen = _prefix_wire_len(pk, ndig) if pk != C.P_FIXED else 0
    return True


def _check_capacity(ctx, f, loc):
    if f.pref != C.P_FIXED and f.length > _prefix_capacity(f.pref, f.ndig):
        ctx.problems.append(
            f"{loc}: length {f.length} does not fit a {f.ndig}-digit prefix (max {_prefix_capacity(f.pref, f.ndig)})"
        )
        return False
    return True


def _set_len_table(f):
    if f.pref != C.P_FIXED and f.length <= LEN_TABLE_LIMIT:
        f.len_table = _len_table(f.pref, f.ndig, f.length)
        f.len_str = _len_str(f.pref, f.ndig, f.length)


def build_field(ctx, num, d, loc, key=None, sub=None, parent_enc=None, depth=0, in_tlv=False):
    """Compile one field or part definition `d`; return a plan or None (problems recorded)."""
    if not isinstance(d, dict):
        ctx.problems.append(f"{loc}: a field definition must be a mapping")
        return None
    key = num if key is None else key
    if d.get("subfields") or str(d.get("type", "")).lower() == "composite":
        return _build_composite(ctx, num, d, loc, key, sub, parent_enc, depth, in_tlv)
    f = _base_plan(ctx, num, key, sub, d, loc)
    vt = _lookup(TYPES, d.get("type", "String"), "type", f"{loc}.type", ctx.problems)
    if vt is None:
        return None
    enc_name = d.get("enc")
    if isinstance(enc_name, str) and enc_name.lower() == _ASCII_TO_HEX:
        if vt not in (C.T_STRING, C.T_HEX):
            ctx.problems.append(f"{loc}: ASCIIToHex carries a hex string; use type String or Hex")
            return None
        vt, enc_name = C.T_HEX, "Binary"
    f.vtype = vt
    if enc_name is None:
        if in_tlv and vt in (C.T_BINARY, C.T_HEX):
            enc = C.E_BINARY
        elif parent_enc is not None:
            enc = parent_enc
        elif in_tlv:
            enc = C.E_ASCII
        else:
            ctx.problems.append(f"{loc}.enc: missing (ASCII, EBCDIC, BCD, Binary, HexToASCII)")
            return None
    else:
        enc = _lookup(ENCODINGS, enc_name, "encoding", f"{loc}.enc", ctx.problems)
        if enc is None:
            return None
    if enc not in _ALLOWED_ENC[vt]:
        ctx.problems.append(f"{loc}: type {d.get('type')} cannot use encoding {enc_name or enc}")
        return None
    f.enc = enc
    if isinstance(enc_name, str) and enc_name.lower() == "lbcdf":
        f.padnib = 15
    length = _int(d.get("length", 0), f"{loc}.length", ctx.problems)
    if length is None:
        return None
    f.length = length
    if in_tlv:
        f.pref = C.P_FIXED  # the BER length carries the size; `length` is a maximum (0 = none)
    else:
        if not _apply_prefix(ctx, f, d.get("prefix"), loc):
            return None
        if f.pref == C.P_FIXED and length == 0 and vt != C.T_BITMAP:
            ctx.problems.append(f"{loc}.length: a fixed-length field needs a length >= 1")
            return None
        if not _check_capacity(ctx, f, loc):
            return None
    if not _apply_padding(ctx, f, d.get("padding"), loc):
        return None
    if f.pref == C.P_FIXED:
        f.wlen = _wire_size(enc, length)
    if not in_tlv:
        _set_len_table(f)
        _choose_fast_path(f)
    return f


def _apply_padding(ctx, f, padding, loc):
    if padding is None:
        return True
    if not isinstance(padding, dict):
        ctx.problems.append(f"{loc}.padding: expected {{type: Left|Right|None, pad: '0'}}")
        return False
    ptype = str(padding.get("type", "None")).lower()
    if ptype == "none":
        return True
    if ptype not in ("left", "right"):
        ctx.problems.append(f"{loc}.padding.type: {padding.get('type')!r} is not Left, Right or None")
        return False
    if f.vtype not in _TEXT_TYPES:
        ctx.problems.append(f"{loc}.padding: only String, Numeric and Track2 fields are padded")
        return False
    pad = padding.get("pad")
    if isinstance(pad, int) and not isinstance(pad, bool):
        pad = str(pad)
    if not isinstance(pad, str) or len(pad) != 1:
        ctx.problems.append(f"{loc}.padding.pad: one character expected, got {pad!r}")
        return False
    if f.enc in (C.E_BCD, C.E_LBCD) and not pad.isdigit():
        ctx.problems.append(f"{loc}.padding.pad: a BCD field pads with a digit")
        return False
    if f.vtype == C.T_NUMERIC and not pad.isdigit():
        ctx.problems.append(f"{loc}.padding.pad: a Numeric field pads with a digit")
        return False
    f.pad = C.PAD_LEFT if ptype == "left" else C.PAD_RIGHT
    f.padchar = pad
    f.padbyte = pad.encode("latin-1", "replace")
    return True


def _choose_fast_path(f):
    if f.vtype not in (C.T_STRING, C.T_NUMERIC) or f.enc != C.E_ASCII:
        return
    if f.pref == C.P_FIXED:
        f.kind = C.K_ASCII_FIXED
    elif f.pref == C.P_ASCII and f.pad == C.PAD_NONE and f.len_table is not None:
        f.kind = C.K_ASCII_VAR


def _build_composite(ctx, num, d, loc, key, sub, parent_enc, depth, in_tlv):
    if depth >= MAX_NESTING:
        ctx.problems.append(f"{loc}: composites nest deeper than {MAX_NESTING}")
        return None
    f = _base_plan(ctx, num, key, sub, d, loc)
    subs = d.get("subfields")
    if not isinstance(subs, dict) or not subs:
        ctx.problems.append(f"{loc}.subfields: a composite needs subfields")
        return None
    enc_name = d.get("enc")
    penc = parent_enc
    if enc_name is not None:
        penc = _lookup(ENCODINGS, enc_name, "encoding", f"{loc}.enc", ctx.problems)
        if penc is None:
            return None
    length = _int(d.get("length", 0), f"{loc}.length", ctx.problems)
    if length is None:
        return None
    f.length = length
    if in_tlv:
        f.pref = C.P_FIXED
    else:
        if not _apply_prefix(ctx, f, d.get("prefix"), loc):
            return None
        if not _check_capacity(ctx, f, loc):
            return None
        if f.pref == C.P_FIXED and length == 0:
            ctx.problems.append(f"{loc}.length: a fixed-length composite needs a length >= 1")
            return None
    prefix_sub = (sub + ".") if sub else ""
    layout = subs.get("layout")
    if layout is not None or "parts" in subs:
        ok = _authoring_form(ctx, f, subs, loc, prefix_sub, penc, depth)
    elif d.get("bitmap") is not None:
        items = []
        for k, part in subs.items():
            if isinstance(k, bool) or not str(k).isdigit():
                ctx.problems.append(f"{loc}.subfields.{k}: subfields of a bitmapped composite are numbered")
                return None
            items.append((int(k), part))
        bm = dict(d["bitmap"]) if isinstance(d["bitmap"], dict) else d["bitmap"]
        if isinstance(bm, dict) and "secondary" not in bm and d.get("disableAutoExpand"):
            bm["secondary"] = False
        ok = _bitmapped(ctx, f, items, bm, f"{loc}.subfields", prefix_sub, penc, depth)
    else:
        ok = _moov_form(ctx, f, subs, d.get("tag"), loc, prefix_sub, penc, depth)
    if not ok:
        return None
    if f.vtype == C.T_COMPOSITE and f.pref == C.P_FIXED and not in_tlv and not f.rep_len:
        size = _group_size(f)
        if size is not None and size != f.length:
            ctx.problems.append(f"{loc}: parts add up to {size} bytes, the field is fixed at {f.length}")
            return None
    if f.rep_len:
        size = _group_size(f)
        if size is not None and size != f.rep_len:
            ctx.problems.append(f"{loc}.subfields.repeat.length: parts add up to {size} bytes, not {f.rep_len}")
            return None
    _set_len_table(f)
    return f


def _group_size(f):
    """Bytes taken by one group of positional parts, or None if some part is variable."""
    total = 0
    for p in f.parts:
        if p.pref != C.P_FIXED:
            return None
        if p.vtype in (C.T_COMPOSITE, C.T_TLV, C.T_TAGGED, C.T_BITMAPPED):
            total += p.length
        else:
            total += p.wlen
    return total


def _authoring_form(ctx, f, subs, loc, prefix_sub, penc, depth):
    layout = subs.get("layout")
    parts = subs.get("parts")
    sloc = f"{loc}.subfields"
    keep_all = layout == "tlv" and str(subs.get("unknown_tags", "")).lower() == "preserve"
    if not isinstance(parts, list) or (not parts and not keep_all):
        ctx.problems.append(f"{sloc}.parts: layout {layout!r} needs a non-empty list of parts")
        return False
    if layout == "tlv":
        return _tlv(
            ctx,
            f,
            [(p.get("tag") if isinstance(p, dict) else None, p) for p in parts],
            subs.get("unknown_tags", "reject"),
            sloc,
            prefix_sub,
            penc,
            depth,
            by_list=True,
        )
    if layout == "tagged":
        items = []
        for i, p in enumerate(parts):
            if not isinstance(p, dict) or p.get("tag") is None:
                ctx.problems.append(f"{sloc}.parts[{i}].tag: a tagged part needs its tag")
                return False
            items.append((str(p.get("key", p["tag"])), str(p["tag"]), p, f"{sloc}.parts[{i}]"))
        return _tagged(ctx, f, items, subs.get("tag"), subs, sloc, prefix_sub, penc, depth)
    if layout == "bitmap":
        items = []
        for i, p in enumerate(parts):
            num = p.get("bit") if isinstance(p, dict) else None
            if isinstance(num, bool) or not isinstance(num, int):
                ctx.problems.append(f"{sloc}.parts[{i}].bit: a part of a bitmapped composite names its bit")
                return False
            items.append((num, p))
        return _bitmapped(ctx, f, items, subs.get("bitmap"), sloc, prefix_sub, penc, depth)
    if layout != "positional":
        ctx.problems.append(f"{sloc}.layout: {layout!r} is not supported (positional, tlv, tagged, bitmap)")
        return False
    f.vtype = C.T_COMPOSITE
    built = []
    expect_from = 1
    for i, part in enumerate(parts):
        ploc = f"{sloc}.parts[{i}]"
        if not isinstance(part, dict):
            ctx.problems.append(f"{ploc}: a part must be a mapping")
            return False
        spec = {
            k: v for k, v in part.items() if k in ("type", "length", "enc", "prefix", "padding", "subfields", "tag")
        }
        spec.setdefault("type", "String")
        spec.setdefault("prefix", "ASCII.Fixed")
        if "from" in part or "to" in part:
            lo, hi = part.get("from"), part.get("to")
            if not (isinstance(lo, int) and isinstance(hi, int)) or hi < lo:
                ctx.problems.append(f"{ploc}: from/to must be integers with to >= from")
                return False
            if lo != expect_from:
                ctx.problems.append(f"{ploc}: starts at {lo}, expected {expect_from} (parts must be contiguous)")
                return False
            expect_from = hi + 1
            spec.setdefault("length", hi - lo + 1)
        elif "length" not in spec:
            ctx.problems.append(f"{ploc}: a positional part needs from/to or a length")
            return False
        key = str(i + 1)
        p = build_field(ctx, f.num, spec, ploc, key=key, sub=prefix_sub + key, parent_enc=penc, depth=depth + 1)
        if p is None:
            return False
        p.ikey = i + 1
        built.append(p)
    f.parts = built
    repeat = subs.get("repeat")
    if repeat is not None:
        if not isinstance(repeat, dict):
            ctx.problems.append(f"{sloc}.repeat: expected {{length, max}}")
            return False
        rl = _int(repeat.get("length"), f"{sloc}.repeat.length", ctx.problems)
        if rl is None or rl == 0:
            if rl == 0:
                ctx.problems.append(f"{sloc}.repeat.length: must be >= 1")
            return False
        rmax = repeat.get("max", (f.length // rl) if f.length else 0)
        rmax = _int(rmax, f"{sloc}.repeat.max", ctx.problems)
        if rmax is None:
            return False
        f.rep_len = rl
        f.rep_max = rmax
    return True


def _moov_form(ctx, f, subs, tag, loc, prefix_sub, penc, depth):
    sloc = f"{loc}.subfields"
    tag = tag or {}
    if not isinstance(tag, dict):
        ctx.problems.append(f"{loc}.tag: expected a mapping")
        return False
    tag_enc = str(tag.get("enc", "")).lower()
    if tag_enc == "bertlvtag":
        if tag.get("skipUnknownTLVTags") and tag.get("storeUnknownTLVTags"):
            mode = "preserve"
        elif tag.get("skipUnknownTLVTags"):
            mode = "drop"
        else:
            mode = "reject"
        return _tlv(ctx, f, list(subs.items()), mode, sloc, prefix_sub, penc, depth, by_list=False)
    if tag.get("length"):
        items = [(str(k), str(k), part, f"{sloc}.{k}") for k, part in subs.items()]
        items.sort(key=lambda it: (len(it[0]), it[0]))
        return _tagged(ctx, f, items, tag, tag, sloc, prefix_sub, penc, depth)
    f.vtype = C.T_COMPOSITE
    keys = list(subs)
    try:
        keys.sort(key=lambda k: int(k))
    except (TypeError, ValueError):
        keys.sort(key=str)
    built = []
    for k in keys:
        part = subs[k]
        if isinstance(part, dict):
            part = dict(part)
            part.setdefault("type", "String")
            part.setdefault("prefix", "ASCII.Fixed")
        skey = str(k)
        p = build_field(
            ctx, f.num, part, f"{sloc}.{skey}", key=skey, sub=prefix_sub + skey, parent_enc=penc, depth=depth + 1
        )
        if p is None:
            return False
        p.ikey = int(skey) if skey.isdigit() else None
        built.append(p)
    f.parts = built
    return True


MAX_TAG_CHARS = 8  # width of a tagged composite's tags
UNKNOWN_VALUE_LIMIT = 9999  # the largest undeclared tagged value kept or skipped


def _part_spec(part):
    spec = {k: v for k, v in part.items() if k in ("type", "length", "enc", "prefix", "padding", "subfields", "tag")}
    for k in ("bitmap", "disableAutoExpand"):
        if k in part:
            spec[k] = part[k]
    spec.setdefault("type", "String")
    spec.setdefault("prefix", "ASCII.Fixed")
    return spec


def _tagged(ctx, f, items, tagspec, opts, sloc, prefix_sub, penc, depth):
    """A tagged composite: each present part is its tag (fixed width) then its own prefix and
    value. `items` are (key, tag, part definition, location)."""
    f.vtype = C.T_TAGGED
    if not isinstance(tagspec, dict):
        ctx.problems.append(f"{sloc}.tag: expected {{length, enc, padding}}")
        return False
    tl = _int(tagspec.get("length"), f"{sloc}.tag.length", ctx.problems)
    if tl is None:
        return False
    if not 1 <= tl <= MAX_TAG_CHARS:
        ctx.problems.append(f"{sloc}.tag.length: 1..{MAX_TAG_CHARS} characters, got {tl}")
        return False
    tenc = _lookup(_TAG_ENCODINGS, tagspec.get("enc", "ASCII"), "tag encoding", f"{sloc}.tag.enc", ctx.problems)
    if tenc is None:
        return False
    pad = tagspec.get("padding") or {}
    padc = None
    if isinstance(pad, dict) and str(pad.get("type", "None")).lower() == "left":
        padc = str(pad.get("pad", "0"))[:1] or "0"
    f.tag_len = tl
    f.tag_enc = tenc
    mode = _UNKNOWN.get(str(opts.get("unknown_tags", "reject")).lower())
    if mode is None:
        ctx.problems.append(f"{sloc}.unknown_tags: {opts.get('unknown_tags')!r} is not preserve, drop or reject")
        return False
    f.unknown = mode
    upref = opts.get("unknown_prefix") or opts.get("prefUnknownTLV")
    if opts.get("skipUnknownTLVTags"):
        f.unknown = C.U_PRESERVE if opts.get("storeUnknownTLVTags") else C.U_DROP
    if upref:
        try:
            pk, nd = parse_prefix(upref)
        except ValueError as exc:
            ctx.problems.append(f"{sloc}.unknown_prefix: {exc}")
            return False
        cap = min(_prefix_capacity(pk, nd), UNKNOWN_VALUE_LIMIT) if pk != C.P_FIXED else 0
        if pk == C.P_FIXED:
            ctx.problems.append(f"{sloc}.unknown_prefix: an undeclared tag's value needs a length prefix")
            return False
        f.uplan = build_field(
            ctx,
            f.num,
            {"type": "Binary", "enc": "Binary", "length": cap, "prefix": upref},
            f"{sloc}.unknown_prefix",
            key="?",
            sub=prefix_sub + "?",
        )
    elif f.unknown != C.U_REJECT:
        ctx.problems.append(f"{sloc}.unknown_prefix: unknown_tags preserve/drop needs the prefix undeclared tags carry")
        return False
    tags, bykey, built = {}, {}, []
    for key, tag, part, ploc in items:
        if padc is not None and len(tag) < tl:
            tag = padc * (tl - len(tag)) + tag
        try:
            tb = tag.encode("cp037" if tenc == C.E_EBCDIC else "latin-1")
        except UnicodeEncodeError:
            tb = b""
        if len(tb) != tl:
            ctx.problems.append(f"{ploc}: tag {tag!r} is not {tl} characters")
            return False
        if tag in tags:
            ctx.problems.append(f"{ploc}: tag {tag!r} declared twice")
            return False
        if not isinstance(part, dict):
            ctx.problems.append(f"{ploc}: a part must be a mapping")
            return False
        p = build_field(
            ctx, f.num, _part_spec(part), ploc, key=key, sub=prefix_sub + key, parent_enc=penc, depth=depth + 1
        )
        if p is None:
            return False
        p.tagb = tb
        p.ikey = int(key) if key.isdigit() else None
        tags[tag] = p
        bykey[key] = p
        if p.ikey is not None:
            bykey[p.ikey] = p
        built.append(p)
    f.tags = tags
    f.bykey = bykey
    f.parts = built
    return True


def _bitmapped(ctx, f, items, bmspec, sloc, prefix_sub, penc, depth):
    """A bitmapped composite: a bitmap of `length` bytes, then the parts whose bits are set."""
    f.vtype = C.T_BITMAPPED
    if not isinstance(bmspec, dict):
        ctx.problems.append(f"{sloc}.bitmap: expected {{length: 8|16, enc: Binary|HexToASCII}}")
        return False
    length = bmspec.get("length", 8)
    if length not in (8, 16):
        ctx.problems.append(f"{sloc}.bitmap.length: 8 or 16 bytes, got {length!r}")
        return False
    enc = _lookup(ENCODINGS, bmspec.get("enc", "Binary"), "encoding", f"{sloc}.bitmap.enc", ctx.problems)
    if enc is None:
        return False
    if enc not in (C.E_BINARY, C.E_HEXASCII):
        ctx.problems.append(f"{sloc}.bitmap.enc: a bitmap is Binary or HexToASCII")
        return False
    f.bm_len = length
    f.bm_hex = enc == C.E_HEXASCII
    f.bm_ext = bool(bmspec.get("secondary", length == 16))
    bits = [None] * (8 * length + 1)
    built = []
    for num, part in sorted(items, key=lambda it: it[0]):
        ploc = f"{sloc}.{num}"
        if not 1 <= num <= 8 * length:
            ctx.problems.append(f"{ploc}: subfield numbers run 1..{8 * length} with this bitmap")
            return False
        # With a secondary bitmap, bit 1 is its flag; a declared subfield 1 rides on it too
        # (jPOS GenericSubFieldPackager: bit 1 set = 16-byte bitmap and subfield 1 present).
        if not isinstance(part, dict):
            ctx.problems.append(f"{ploc}: a part must be a mapping")
            return False
        key = str(num)
        p = build_field(
            ctx, f.num, _part_spec(part), ploc, key=key, sub=prefix_sub + key, parent_enc=penc, depth=depth + 1
        )
        if p is None:
            return False
        p.ikey = num
        bits[num] = p
        built.append(p)
    f.bits = bits
    f.parts = built
    f.bykey = {p.key: p for p in built}
    return True


def _norm_tag(tag):
    if isinstance(tag, int) and not isinstance(tag, bool):
        tag = str(tag)
        if len(tag) % 2:
            tag = "0" + tag
    if not isinstance(tag, str):
        return None
    return tag.strip().upper()


def _tag_ok(tag):
    try:
        tb = bytes.fromhex(tag)
    except ValueError:
        return False
    if not tb or len(tb) > C.MAX_TLV_TAG_BYTES or " " in tag:
        return False
    if (tb[0] & 0x1F) != 0x1F:
        return len(tb) == 1
    if len(tb) < 2 or tb[-1] & 0x80:
        return False
    return all(b & 0x80 for b in tb[1:-1])


def _tlv(ctx, f, items, unknown, sloc, prefix_sub, penc, depth, by_list):
    f.vtype = C.T_TLV
    mode = _UNKNOWN.get(str(unknown).lower())
    if mode is None:
        ctx.problems.append(f"{sloc}.unknown_tags: {unknown!r} is not preserve, drop or reject")
        return False
    f.unknown = mode
    tags = {}
    for i, (raw_tag, part) in enumerate(items):
        ploc = f"{sloc}.parts[{i}]" if by_list else f"{sloc}.{raw_tag}"
        tag = _norm_tag(raw_tag)
        if tag is None or not _tag_ok(tag):
            ctx.problems.append(f"{ploc}.tag: {raw_tag!r} is not a BER-TLV tag in hex")
            return False
        if tag in tags:
            ctx.problems.append(f"{ploc}.tag: {tag} declared twice")
            return False
        if not isinstance(part, dict):
            ctx.problems.append(f"{ploc}: a part must be a mapping")
            return False
        spec = {k: v for k, v in part.items() if k in ("type", "length", "enc", "padding", "subfields", "tag")}
        if by_list:
            spec.pop("tag", None)
        spec.setdefault("type", "String")
        p = build_field(
            ctx, f.num, spec, ploc, key=tag, sub=prefix_sub + tag, parent_enc=penc, depth=depth + 1, in_tlv=True
        )
        if p is None:
            return False
        tags[tag] = p
    f.tags = tags
    f.parts = list(tags.values())
    return True


def compile_table(wire, mod, problems, where="fields", max_field=C.MAX_FIELD):
    """Build the full field table for `wire` ({int: definition}) with backend module `mod`."""
    ctx = _Ctx(mod, problems)
    plans = [None] * (max_field + 1)
    for num in sorted(wire):
        d = wire[num]
        loc = f"{where}.{num}"
        if num == 1:
            plans[1] = _bitmap_plan(ctx, d, loc)
            continue
        if num == 65 and isinstance(d, dict) and str(d.get("type", "")).lower() == "bitmap":
            continue  # the tertiary-bitmap flag: implicit, like field 1
        if num == 65:
            problems.append(f"{loc}: field 65 flags the tertiary bitmap; declare it as type Bitmap or leave it out")
            continue
        plan = build_field(ctx, num, d, loc)
        if plan is not None and plan.vtype == C.T_BITMAP:
            problems.append(f"{loc}: only fields 1 and 65 can be bitmaps")
            continue
        plans[num] = plan
    if 0 not in wire:
        problems.append(f"{where}.0: the MTI (field 0) is not defined")
    if 1 not in wire:
        problems.append(f"{where}.1: the bitmap (field 1) is not defined")
    return plans


def _bitmap_plan(ctx, d, loc):
    if not isinstance(d, dict):
        ctx.problems.append(f"{loc}: a field definition must be a mapping")
        return None
    f = _base_plan(ctx, 1, 1, None, d, loc)
    f.vtype = C.T_BITMAP
    if str(d.get("type", "Bitmap")).lower() != "bitmap":
        ctx.problems.append(f"{loc}.type: field 1 must be of type Bitmap")
        return None
    enc = _lookup(ENCODINGS, d.get("enc", "HexToASCII"), "encoding", f"{loc}.enc", ctx.problems)
    if enc is None:
        return None
    if enc not in _ALLOWED_ENC[C.T_BITMAP]:
        ctx.problems.append(f"{loc}.enc: a bitmap is Binary or HexToASCII")
        return None
    length = d.get("length", 8)
    hexchars = enc in (C.E_HEXASCII, C.E_EBCDICHEX)
    if length not in (0, 8, 16) or (length == 16 and not hexchars):
        ctx.problems.append(f"{loc}.length: a bitmap is 8 bytes each (16 hex characters), got {length!r}")
        return None
    f.enc = enc
    f.length = 8
    f.wlen = 16 if hexchars else 8
    return f
