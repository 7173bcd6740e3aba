# cython: boundscheck=True, wraparound=False
"""ISO 8583 message codec: the hot loop, sans-IO (pure-Python original of fluxrig.iso8583.codec_c).

Job: turn one ISO 8583 message (bytes, framing already removed) into a dict keyed by field
number, and back, driven by a precompiled field table (`FieldPlan` objects built by
fluxrig.iso8583.plan from a spec). This same file is compiled by Cython, augmented by
codec_c.pxd beside it (C types for plans, positions and locals), into the twin
`fluxrig.iso8583.codec_c`; `fluxrig.iso8583.codec` binds the public names to one of the two.
Keep it plain Python and never use negative indices (the twin is compiled with
wraparound=False).

Contract:
  Codec.decode(raw: bytes) -> dict: {0: MTI str, n: value} for every data field present, in
    field order. Character fields (String, Numeric, Track2) are str exactly as on the wire
    (padding and leading zeros kept); Binary fields are bytes; Hex fields are upper-case hex
    str; composites are dicts (TLV keyed by upper-case tag hex, positional by part key) or, for
    repeating positional composites, lists of dicts. The bitmap fields 1 and 65 are implicit
    and never returned. Raises Iso8583DecodeError (field, subfield, offset, reason) and nothing
    else for any input bytes; the error carries `.partial`, the fields decoded before it.
  Codec.encode(fields: dict) -> bytes: builds the bitmap(s) from the keys (ints; key 1 is
    ignored, None values are skipped), encodes fields in ascending order. Raises
    Iso8583EncodeError (field, subfield, offset = bytes built before the failing field).
  decode(encode(f)) == f for every f whose values are already in decoded form (full-length
  padded values, upper-case hex).

This module is deliberately one compile unit (primitives, composites and the codec) so the
twin runs composites compiled too; that is why it is longer than most modules.

Lengths follow the moov vocabulary: a field's `length` counts value units (characters for
String/Numeric/Track2, bytes for Binary/Hex, content bytes for composites) and a length
prefix carries that unit count; the wire size depends on the encoding (BCD packs two digits a
byte, HexToASCII doubles).
"""

import re
from binascii import Error as _HexError
from binascii import hexlify, unhexlify

from fluxrig.iso8583.errors import Iso8583DecodeError, Iso8583EncodeError

# In the compiled twin the int constants and BITS are C globals (cdef in codec_c.pxd), not module
# attributes: read them from this module (fluxrig.iso8583.plan does). Codec, FieldPlan,
# prefix_for, EBCDIC_CODEC and DEFAULT_MAX_MESSAGE_BYTES exist in both.
__all__ = [
    "Codec",
    "FieldPlan",
    "prefix_for",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "EBCDIC_CODEC",
    "BITS",
    "T_STRING",
    "T_NUMERIC",
    "T_BINARY",
    "T_HEX",
    "T_TRACK2",
    "T_COMPOSITE",
    "T_TLV",
    "T_BITMAP",
    "T_TAGGED",
    "T_BITMAPPED",
    "E_ASCII",
    "E_EBCDIC",
    "E_BCD",
    "E_BINARY",
    "E_HEXASCII",
    "E_LBCD",
    "E_EBCDIC1047",
    "E_EBCDICHEX",
    "EBCDIC1047_DECODE",
    "EBCDIC1047_ENCODE",
    "P_FIXED",
    "P_ASCII",
    "P_EBCDIC",
    "P_BCD",
    "P_BINARY",
    "P_HEX",
    "K_GENERIC",
    "K_ASCII_FIXED",
    "K_ASCII_VAR",
    "PAD_NONE",
    "PAD_LEFT",
    "PAD_RIGHT",
    "U_REJECT",
    "U_PRESERVE",
    "U_DROP",
    "MAX_BITMAPS",
    "MAX_FIELD",
    "MAX_TLV_TAG_BYTES",
    "MAX_TLV_LENGTH_BYTES",
]

# Value types.
T_STRING = 1
T_NUMERIC = 2
T_BINARY = 3
T_HEX = 4
T_TRACK2 = 5
T_COMPOSITE = 6
T_TLV = 7
T_BITMAP = 8
T_TAGGED = 9  # composite of (tag, prefixed value) pairs, tags of a fixed width (not BER)
T_BITMAPPED = 10  # composite whose parts are announced by a bitmap at its start

# Encodings of the value bytes.
E_ASCII = 1
E_EBCDIC = 2
E_BCD = 3
E_BINARY = 4
E_HEXASCII = 5
E_LBCD = 6  # BCD left-aligned: an odd digit count is padded on the right (jPOS's default BCD)
E_EBCDIC1047 = 7  # EBCDIC code page 1047 (z/OS); E_EBCDIC is code page 037
E_EBCDICHEX = 8  # bytes as upper-case hex characters in EBCDIC (jPOS EbcdicHexInterpreter)

# Length prefix kinds (`<enc>.Fixed` is P_FIXED whatever <enc> says).
P_FIXED = 0
P_ASCII = 1
P_EBCDIC = 2
P_BCD = 3
P_BINARY = 4
P_HEX = 5

# Fast-path kinds chosen by the plan compiler; K_GENERIC handles every combination.
K_GENERIC = 0
K_ASCII_FIXED = 1
K_ASCII_VAR = 2

# Padding.
PAD_NONE = 0
PAD_LEFT = 1
PAD_RIGHT = 2

# Unknown TLV tags.
U_REJECT = 0
U_PRESERVE = 1
U_DROP = 2

# Limits (named; the spec compiler may pass others to Codec).
MAX_BITMAPS = 3
MAX_FIELD = 192
MAX_TLV_TAG_BYTES = 4
MAX_TLV_LENGTH_BYTES = 4
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20

EBCDIC_CODEC = "cp037"  # moov's EBCDIC is code page 037

# Code page 1047 is code page 037 with six positions exchanged ([ ] ^ ¬ Ý ¨); both cover
# exactly Latin-1, so a translate() table each way is the whole codec.
_CP037_TO_L1 = bytes(range(256)).decode("cp037").encode("latin-1")
_SWAP_1047 = {0x5F: 0xB0, 0xB0: 0x5F, 0xAD: 0xBA, 0xBA: 0xAD, 0xBB: 0xBD, 0xBD: 0xBB}
EBCDIC1047_DECODE = bytes(_CP037_TO_L1[_SWAP_1047.get(i, i)] for i in range(256))
EBCDIC1047_ENCODE = bytes(EBCDIC1047_DECODE.index(i) for i in range(256))

# EBCDIC hex digits <-> ASCII hex digits; any other byte becomes "?" so unhexlify refuses it.
_HEXA = b"0123456789ABCDEFabcdef"
_HEXE = _HEXA.decode("ascii").encode("cp037")
_EHEX_TO_A = bytearray(b"?" * 256)
for _i in range(len(_HEXA)):
    _EHEX_TO_A[_HEXE[_i]] = _HEXA[_i]
EHEX_DECODE = bytes(_EHEX_TO_A)
EHEX_ENCODE = bytes(range(256)).decode("latin-1").encode("cp037")

_ONE = 1
_TRACK2 = re.compile(r"[0-9]{1,19}[=D][0-9]{7}[^?]*")

# BITS[b] = the 1-based bit positions set in byte b, most significant first.
BITS = tuple(tuple(i + 1 for i in range(8) if b & (0x80 >> i)) for b in range(256))


class FieldPlan:
    """One compiled field (or composite part): every attribute the hot loop needs, resolved."""

    __slots__ = (
        "num",
        "key",
        "sub",
        "label",
        "kind",
        "vtype",
        "enc",
        "pref",
        "ndig",
        "plen",
        "length",
        "wlen",
        "pad",
        "padchar",
        "padbyte",
        "len_table",
        "parts",
        "tags",
        "unknown",
        "rep_len",
        "rep_max",
        "len_str",
        "ikey",
        "padnib",
        "tag_len",
        "tag_enc",
        "tagb",
        "uplan",
        "bykey",
        "bm_len",
        "bm_hex",
        "bm_ext",
        "bits",
    )

    def __init__(self):
        self.num = 0
        self.key = None
        self.sub = None
        self.label = ""
        self.kind = K_GENERIC
        self.vtype = T_STRING
        self.enc = E_ASCII
        self.pref = P_FIXED
        self.ndig = 0
        self.plen = 0
        self.length = 0
        self.wlen = -1
        self.pad = PAD_NONE
        self.padchar = ""
        self.padbyte = b""
        self.len_table = None
        self.len_str = None
        self.parts = None
        self.tags = None
        self.unknown = U_REJECT
        self.rep_len = 0
        self.rep_max = 0
        self.ikey = None  # the int a str part key "7" is also accepted as on encode
        self.padnib = 0  # LBCD: the nibble an odd digit count is padded with (0 or 15)
        self.tag_len = 0  # T_TAGGED: tag width in bytes
        self.tag_enc = E_ASCII  # T_TAGGED: tag characters' encoding
        self.tagb = b""  # a part of T_TAGGED: its tag as it is on the wire
        self.uplan = None  # T_TAGGED: how an undeclared tag's value is framed (or None)
        self.bykey = None  # T_TAGGED / T_BITMAPPED: part key (str and int) -> part
        self.bm_len = 0  # T_BITMAPPED: bitmap bytes (8, or 16 with a secondary bitmap)
        self.bm_hex = False  # T_BITMAPPED: the bitmap travels as hex characters
        self.bm_ext = False  # T_BITMAPPED: bit 1 flags the secondary bitmap
        self.bits = None  # T_BITMAPPED: part by bit number (None where undeclared)


# ---------------------------------------------------------------------------------------
# errors


def _derr(f, message, offset, reason):
    return Iso8583DecodeError(message, f.num, offset, reason, f.sub)


def _eerr(f, message, reason):
    # The offset is filled in by Codec.encode, which knows how many bytes precede the field.
    return Iso8583EncodeError(message, f.num, None, reason, f.sub)


# ---------------------------------------------------------------------------------------
# decoding


def _prefix_units(f, raw, pos, n):
    """Read the length prefix at `pos`; return the value length in units (checked <= max)."""
    pk = f.pref
    if pk == P_FIXED:
        return f.length
    plen = f.plen
    if pos + plen > n:
        raise _derr(f, f"length prefix needs {plen} bytes, {n - pos} left", pos, "short")
    units = 0
    j = pos
    stop = pos + plen
    if pk == P_ASCII or pk == P_EBCDIC:
        base = 48 if pk == P_ASCII else 0xF0
        while j < stop:
            c = raw[j] - base
            if c < 0 or c > 9:
                raise _derr(f, f"length prefix byte 0x{raw[j]:02X} is not a digit", j, "prefix")
            units = units * 10 + c
            j += 1
    elif pk == P_BCD:
        while j < stop:
            c = raw[j]
            if (c >> 4) > 9 or (c & 15) > 9:
                raise _derr(f, f"length prefix byte 0x{c:02X} is not BCD", j, "prefix")
            units = units * 100 + (c >> 4) * 10 + (c & 15)
            j += 1
    elif pk == P_BINARY:
        while j < stop:
            units = units * 256 + raw[j]
            j += 1
    else:  # P_HEX: 2 hex characters per prefix byte
        while j < stop:
            c = raw[j]
            if 48 <= c <= 57:
                c -= 48
            elif 65 <= c <= 70:
                c -= 55
            elif 97 <= c <= 102:
                c -= 87
            else:
                raise _derr(f, f"length prefix byte 0x{c:02X} is not a hex digit", j, "prefix")
            units = units * 16 + c
            j += 1
    if units > f.length:
        raise _derr(f, f"length {units} exceeds the maximum {f.length}", pos, "length")
    return units


def _wire_size(enc, units):
    if enc == E_BCD or enc == E_LBCD:
        return (units + 1) // 2
    if enc == E_HEXASCII or enc == E_EBCDICHEX:
        return units * 2
    return units


def _unhex(f, data, offset):
    try:
        return unhexlify(data)
    except (_HexError, ValueError):
        raise _derr(f, "hex characters expected", offset, "hex") from None


def _decode_text(f, raw, p, end, units, start):
    """Decode a character value (String, Numeric, Track2) occupying raw[p:end]."""
    enc = f.enc
    try:
        if enc == E_ASCII:
            s = raw[p:end].decode("ascii")
        elif enc == E_EBCDIC:
            s = raw[p:end].decode(EBCDIC_CODEC)
        elif enc == E_BINARY:
            s = raw[p:end].decode("latin-1")
        elif enc == E_HEXASCII:
            s = _unhex(f, raw[p:end], p).decode("latin-1")
        elif enc == E_EBCDIC1047:
            s = raw[p:end].translate(EBCDIC1047_DECODE).decode("latin-1")
        elif enc == E_LBCD:
            s = _decode_lbcd(f, raw, p, end, units)
        else:
            s = _decode_bcd(f, raw, p, end, units)
    except UnicodeDecodeError:
        raise _derr(f, "bytes outside the field's character set", p, "charset") from None
    vt = f.vtype
    if vt == T_NUMERIC:
        if s and not (s.isdigit() and s.isascii()):
            raise _derr(f, "numeric field holds a non-digit", start, "numeric")
    elif vt == T_TRACK2:
        if _TRACK2.fullmatch(s) is None:
            raise _derr(f, "value is not track 2 data (PAN, separator, YYMM, service code)", start, "track2")
    return s


def _decode_bcd(f, raw, p, end, units):
    h = raw[p:end].hex()
    if f.vtype == T_TRACK2:
        # Track 2 in BCD: '=' travels as nibble D and an odd length is right-padded with F.
        h = h.upper()
        if units % 2:
            if h[units] != "F":
                raise _derr(f, "odd-length BCD track 2 must end with an F nibble", p, "bcd")
            h = h[:units]
        if h and not h.replace("D", "0").isdigit():
            raise _derr(f, "invalid BCD track 2 nibble", p, "bcd")
        return h.replace("D", "=")
    if h and not h.isdigit():
        raise _derr(f, "invalid BCD nibble", p, "bcd")
    if units % 2:
        if h[0] != "0":
            raise _derr(f, "odd-length BCD value must start with a 0 nibble", p, "bcd")
        return h[1:]
    return h


def _decode_lbcd(f, raw, p, end, units):
    # Left-aligned BCD: an odd digit count ends with a pad nibble, 0 or F whichever the field
    # declares (jPOS ignores the pad nibble on input, so either is accepted here).
    h = raw[p:end].hex()
    if units % 2:
        last = h[units]
        if last != "0" and last != "f":
            raise _derr(f, "odd-length left-aligned BCD must end with a 0 or F nibble", p, "bcd")
        h = h[:units]
    if f.vtype == T_TRACK2:
        # '=' travels as nibble D (jPOS writes track 2 into IFB_LLNUM this way)
        h = h.upper()
        if h and not h.replace("D", "0").isdigit():
            raise _derr(f, "invalid BCD track 2 nibble", p, "bcd")
        return h.replace("D", "=")
    if h and not h.isdigit():
        raise _derr(f, "invalid BCD nibble", p, "bcd")
    return h


def _decode_value(f, raw, p, end, units, start):
    vt = f.vtype
    if vt == T_STRING or vt == T_NUMERIC or vt == T_TRACK2:
        return _decode_text(f, raw, p, end, units, start)
    enc = f.enc
    if vt == T_BINARY:
        if enc == E_BINARY:
            return raw[p:end]
        if enc == E_HEXASCII:
            return _unhex(f, raw[p:end], p)
        if enc == E_EBCDICHEX:
            return _unhex(f, raw[p:end].translate(EHEX_DECODE), p)
        b = raw[p:end]  # E_ASCII: bytes restricted to 7 bits
        if not b.isascii():
            raise _derr(f, "bytes outside ASCII", p, "charset")
        return b
    # T_HEX
    if enc == E_HEXASCII:
        return _unhex(f, raw[p:end], p).hex().upper()
    if enc == E_EBCDICHEX:
        return _unhex(f, raw[p:end].translate(EHEX_DECODE), p).hex().upper()
    return raw[p:end].hex().upper()


def _decode_into(f, raw, pos, n, out):
    """Decode the field described by `f` at `pos` (bounded by `n`), store it in `out[f.key]`,
    return the position after it. Every composite and non-fast-path field goes through here."""
    units = _prefix_units(f, raw, pos, n)
    p = pos + f.plen
    vt = f.vtype
    if vt >= T_COMPOSITE and vt != T_BITMAP:
        end = p + units
        if end > n:
            raise _derr(f, f"composite needs {units} bytes, {n - p} left", pos, "short")
        out[f.key] = _decode_content(f, raw, p, end)
        return end
    end = p + _wire_size(f.enc, units)
    if end > n:
        raise _derr(f, f"value needs {end - p} bytes, {n - p} left", pos, "short")
    out[f.key] = _decode_value(f, raw, p, end, units, pos)
    return end


def _decode_content(f, raw, pos, end):
    """A composite's parts from its content bytes raw[pos:end], by the composite's layout."""
    vt = f.vtype
    if vt == T_TLV:
        return _decode_tlv(f, raw, pos, end)
    if vt == T_TAGGED:
        return _decode_tagged(f, raw, pos, end)
    if vt == T_BITMAPPED:
        return _decode_bitmapped(f, raw, pos, end)
    return _decode_positional(f, raw, pos, end)


def _decode_tagged(f, raw, pos, end):
    d = {}
    tags = f.tags
    tl = f.tag_len
    p = pos
    while p < end:
        if p + tl > end:
            raise _derr(f, f"tag needs {tl} bytes, {end - p} left", p, "tag")
        tb = raw[p : p + tl]
        if f.tag_enc == E_EBCDIC:
            tag = tb.decode(EBCDIC_CODEC)
        else:
            tag = tb.decode("latin-1")
        part = tags.get(tag)
        if part is None:
            if f.unknown == U_REJECT or f.uplan is None:
                raise _derr(f, f"tag {tag!r} is not declared (unknown_tags: reject)", p, "unknown_tag")
            held = {}
            p = _decode_into(f.uplan, raw, p + tl, end, held)
            if f.unknown == U_PRESERVE:
                if tag in d:
                    raise _derr(f, f"tag {tag!r} appears twice", p, "tag")
                d[tag] = held[f.uplan.key]
            continue
        if part.key in d:
            raise _derr(f, f"tag {tag!r} appears twice", p, "tag")
        p = _decode_into(part, raw, p + tl, end, d)
    return d


def _decode_bitmapped(f, raw, pos, end):
    step = 16 if f.bm_hex else 8
    p = pos
    bm = b""
    while True:
        if p + step > end:
            raise _derr(f, f"subfield bitmap needs {step} bytes, {end - p} left", p, "short")
        if f.bm_hex:
            one = _unhex(f, raw[p : p + step], p)
        else:
            one = raw[p : p + step]
        bm = bm + one
        p += step
        if len(bm) >= f.bm_len or (f.bm_ext and not (bm[0] & 0x80)):
            break
    d = {}
    bits = f.bits
    for i in range(len(bm)):
        b = bm[i]
        if b == 0:
            continue
        for off in BITS[b]:
            num = i * 8 + off
            if f.bm_ext and num == 1 and bits[1] is None:
                continue  # only the secondary-bitmap flag (jPOS also ties a declared subfield 1 to it)
            part = bits[num] if num < len(bits) else None
            if part is None:
                raise _derr(f, f"subfield {num} is in the bitmap but not declared", p, "unknown_field")
            p = _decode_into(part, raw, p, end, d)
    if p != end:
        raise _derr(f, f"{end - p} bytes left over after the last subfield", p, "trailing")
    return d


def _decode_group(f, raw, pos, end):
    d = {}
    p = pos
    for part in f.parts:
        p = _decode_into(part, raw, p, end, d)
    if p != end:
        raise _derr(f, f"{end - p} bytes left over after the last part", p, "trailing")
    return d


def _decode_positional(f, raw, pos, end):
    if f.rep_len == 0:
        return _decode_group(f, raw, pos, end)
    total = end - pos
    count = total // f.rep_len
    if count * f.rep_len != total:
        raise _derr(f, f"{total} bytes is not a whole number of {f.rep_len}-byte groups", pos, "repeat")
    if count > f.rep_max:
        raise _derr(f, f"{count} groups exceed the maximum {f.rep_max}", pos, "repeat")
    groups = []
    p = pos
    for _ in range(count):
        groups.append(_decode_group(f, raw, p, p + f.rep_len))
        p += f.rep_len
    return groups


def _decode_tlv(f, raw, pos, end):
    d = {}
    tags = f.tags
    unknown = f.unknown
    p = pos
    while p < end:
        tstart = p
        b = raw[p]
        p += 1
        if (b & 0x1F) == 0x1F:
            count = 1
            while True:
                if p >= end:
                    raise _derr(f, "TLV tag runs past the end of the field", tstart, "tlv")
                b = raw[p]
                p += 1
                count += 1
                if count > MAX_TLV_TAG_BYTES:
                    raise _derr(f, f"TLV tag longer than {MAX_TLV_TAG_BYTES} bytes", tstart, "tlv")
                if not (b & 0x80):
                    break
        tag = raw[tstart:p].hex().upper()
        if p >= end:
            raise _derr(f, f"TLV tag {tag} has no length", tstart, "tlv")
        lb = raw[p]
        p += 1
        if lb & 0x80:
            nb = lb & 0x7F
            if nb == 0 or nb > MAX_TLV_LENGTH_BYTES:
                raise _derr(f, f"TLV tag {tag}: unsupported BER length form 0x{lb:02X}", p - 1, "tlv")
            if p + nb > end:
                raise _derr(f, f"TLV tag {tag}: length runs past the end of the field", p - 1, "tlv")
            ln = 0
            for _ in range(nb):
                ln = ln * 256 + raw[p]
                p += 1
        else:
            ln = lb
        vend = p + ln
        if vend > end:
            raise _derr(f, f"TLV tag {tag}: value of {ln} bytes runs past the end of the field", tstart, "tlv")
        if tag in d:
            raise _derr(f, f"TLV tag {tag} appears twice", tstart, "tlv")
        part = tags.get(tag)
        if part is None:
            if unknown == U_PRESERVE:
                d[tag] = raw[p:vend]
            elif unknown == U_REJECT:
                raise _derr(f, f"TLV tag {tag} is not declared (unknown_tags: reject)", tstart, "unknown_tag")
        else:
            d[tag] = _decode_tlv_value(part, raw, p, vend)
        p = vend
    return d


def _decode_tlv_value(part, raw, p, end):
    size = end - p
    enc = part.enc
    if enc == E_BCD or enc == E_LBCD:
        units = size * 2
    elif enc == E_HEXASCII or enc == E_EBCDICHEX:
        if size % 2:
            raise _derr(part, "odd number of hex characters", p, "hex")
        units = size // 2
    else:
        units = size
    if part.length and units > part.length:
        raise _derr(part, f"length {units} exceeds the maximum {part.length}", p, "length")
    if part.vtype >= T_COMPOSITE and part.vtype != T_BITMAP:
        # A composite part inside TLV: its value bytes are the composite's content.
        return _decode_content(part, raw, p, end)
    return _decode_value(part, raw, p, end, units, p)


# ---------------------------------------------------------------------------------------
# encoding


def _prefix_bytes(f, units):
    """The length prefix for a value of `units` units (checks fixed/maximum length)."""
    pk = f.pref
    if pk == P_FIXED:
        if units != f.length:
            raise _eerr(f, f"length {units} but the field is fixed at {f.length}", "length")
        return b""
    if units > f.length:
        raise _eerr(f, f"length {units} exceeds the maximum {f.length}", "length")
    table = f.len_table
    if table is not None:
        return table[units]
    return prefix_for(pk, f.ndig, units)


def prefix_for(pk, ndig, units):
    """Encode a length prefix of kind `pk` with `ndig` digits (or bytes) for `units`."""
    if pk == P_ASCII:
        return b"%0*d" % (ndig, units)
    if pk == P_EBCDIC:
        return (b"%0*d" % (ndig, units)).translate(_ASCII_TO_EBCDIC_DIGITS)
    if pk == P_BCD:
        digits = b"%0*d" % (ndig + (ndig % 2), units)
        return unhexlify(digits)
    if pk == P_BINARY:
        return units.to_bytes(ndig, "big")
    return b"%0*X" % (2 * ndig, units)  # P_HEX


_ASCII_TO_EBCDIC_DIGITS = bytes(range(48)) + bytes(range(0xF0, 0xFA)) + bytes(range(58, 256))


def _text_of(f, v):
    if type(v) is str:
        return v
    if f.vtype == T_NUMERIC and type(v) is int and v >= 0:
        return str(v)
    raise _eerr(f, f"expected str, got {type(v).__name__}", "type")


def _encode_text(f, v):
    """Encode a character value; return (data bytes, units)."""
    s = _text_of(f, v)
    if f.pad != PAD_NONE and len(s) < f.length:
        if f.pad == PAD_LEFT:
            s = f.padchar * (f.length - len(s)) + s
        else:
            s = s + f.padchar * (f.length - len(s))
    vt = f.vtype
    if vt == T_NUMERIC:
        if s and not (s.isdigit() and s.isascii()):
            raise _eerr(f, "numeric field given a non-digit", "numeric")
    elif vt == T_TRACK2:
        if _TRACK2.fullmatch(s) is None:
            raise _eerr(f, "value is not track 2 data (PAN, separator, YYMM, service code)", "track2")
    units = len(s)
    enc = f.enc
    try:
        if enc == E_ASCII:
            return s.encode("ascii"), units
        if enc == E_EBCDIC:
            return s.encode(EBCDIC_CODEC), units
        if enc == E_BINARY:
            return s.encode("latin-1"), units
        if enc == E_HEXASCII:
            return hexlify(s.encode("latin-1")).upper(), units
        if enc == E_EBCDIC1047:
            return s.encode("latin-1").translate(EBCDIC1047_ENCODE), units
    except UnicodeEncodeError:
        raise _eerr(f, "character outside the field's character set", "charset") from None
    # E_BCD
    if vt == T_TRACK2:
        if not (s.replace("=", "0").isdigit() and s.isascii()):
            raise _eerr(f, "BCD track 2 carries digits and '=' only", "bcd")
        h = s.replace("=", "D")
        if units % 2:
            h = h + ("0" if enc == E_LBCD and f.padnib == 0 else "F")
        return unhexlify(h), units
    if s and not (s.isdigit() and s.isascii()):
        raise _eerr(f, "BCD field given a non-digit", "bcd")
    if units % 2:
        if enc == E_LBCD:
            s = s + ("F" if f.padnib == 15 else "0")
        else:
            s = "0" + s
    return unhexlify(s), units


def _bytes_of(f, v):
    t = type(v)
    if t is bytes:
        return v
    if t is bytearray or t is memoryview:
        return bytes(v)
    raise _eerr(f, f"expected bytes, got {t.__name__}", "type")


def _encode_data(f, v):
    """Encode a primitive value; return (data bytes, units)."""
    vt = f.vtype
    if vt == T_STRING or vt == T_NUMERIC or vt == T_TRACK2:
        return _encode_text(f, v)
    if vt == T_BINARY:
        b = _bytes_of(f, v)
        if f.enc == E_ASCII and not b.isascii():
            raise _eerr(f, "bytes outside ASCII", "charset")
    else:  # T_HEX
        if type(v) is str:
            try:
                b = unhexlify(v)
            except (_HexError, ValueError):
                raise _eerr(f, "expected a string of hex digit pairs", "hex") from None
        else:
            b = _bytes_of(f, v)
    if f.enc == E_HEXASCII:
        return hexlify(b).upper(), len(b)
    if f.enc == E_EBCDICHEX:
        return hexlify(b).upper().translate(EHEX_ENCODE), len(b)
    return b, len(b)


def _encode_field(f, v):
    """Prefix + data for one field or composite part."""
    vt = f.vtype
    if vt >= T_COMPOSITE and vt != T_BITMAP:
        content = _encode_composite(f, v)
        return _prefix_bytes(f, len(content)) + content
    data, units = _encode_data(f, v)
    return _prefix_bytes(f, units) + data


def _encode_composite(f, v):
    t = type(v)
    if t is bytes:
        return v  # raw content supplied as-is
    if t is str:
        try:
            return v.encode("ascii")
        except UnicodeEncodeError:
            raise _eerr(f, "raw composite content must be ASCII", "charset") from None
    if f.vtype == T_TLV:
        if not isinstance(v, dict):
            raise _eerr(f, f"expected a dict of TLV tags, got {t.__name__}", "type")
        return _encode_tlv(f, v)
    if f.vtype == T_TAGGED:
        if not isinstance(v, dict):
            raise _eerr(f, f"expected a dict of tagged parts, got {t.__name__}", "type")
        return _encode_tagged(f, v)
    if f.vtype == T_BITMAPPED:
        if not isinstance(v, dict):
            raise _eerr(f, f"expected a dict of subfields, got {t.__name__}", "type")
        return _encode_bitmapped(f, v)
    if f.rep_len:
        if not isinstance(v, (list, tuple)):
            raise _eerr(f, f"expected a list of groups, got {t.__name__}", "type")
        if len(v) > f.rep_max:
            raise _eerr(f, f"{len(v)} groups exceed the maximum {f.rep_max}", "repeat")
        out = []
        for g in v:
            out.append(_encode_group(f, g))
        return b"".join(out)
    return _encode_group(f, v)


def _encode_group(f, v):
    if not isinstance(v, dict):
        raise _eerr(f, f"expected a dict of parts, got {type(v).__name__}", "type")
    out = []
    used = 0
    for part in f.parts:
        pv = v.get(part.key)
        if pv is None:
            ik = part.ikey
            if ik is not None:
                pv = v.get(ik)
            if pv is None:
                if part.pad == PAD_NONE:
                    raise _eerr(part, _missing_text(f, part), "missing")
                pv = ""
            else:
                used += 1
        else:
            used += 1
        out.append(_encode_field(part, pv))
    if len(v) > used:
        _check_keys(f, v)
    data = b"".join(out)
    if f.rep_len and len(data) != f.rep_len:
        raise _eerr(f, f"group of {len(data)} bytes, the repeat length is {f.rep_len}", "repeat")
    return data


def _missing_text(f, part):
    keys = ", ".join(repr(p.key) for p in f.parts)
    label = f" ({part.label})" if part.label else ""
    return f"part {part.key!r}{label} missing: give it under key {part.key!r} (parts of this field: {keys})"


def _check_keys(f, v):
    """Name the first key of `v` that is no part of `f`, or a part given both as int and str."""
    for k in v:
        if v[k] is None:
            continue
        found = None
        for part in f.parts:
            if part.key == k or (type(k) is int and part.ikey == k):
                found = part
                break
        if found is None:
            if f.vtype == T_TAGGED and f.unknown != U_REJECT and type(k) is str:
                continue  # an undeclared tag, preserved or dropped by _encode_tagged
            keys = ", ".join(repr(p.key) for p in f.parts)
            raise _eerr(f, f"unknown part {k!r} (parts of this field: {keys})", "unknown_part")
        if type(k) is int and v.get(found.key) is not None:
            raise _eerr(f, f"part {found.key!r} given twice, as {found.key!r} and {k!r}", "duplicate_part")


def _part_value(part, v):
    pv = v.get(part.key)
    if pv is None and part.ikey is not None:
        pv = v.get(part.ikey)
    return pv


def _encode_tagged(f, v):
    out = []
    used = 0
    for part in f.parts:
        pv = _part_value(part, v)
        if pv is None:
            continue
        used += 1
        out.append(part.tagb)
        out.append(_encode_field(part, pv))
    if len(v) > used:
        _check_keys(f, v)
        for k, value in v.items():
            if type(k) is not str or f.bykey.get(k) is not None or value is None:
                continue
            if f.unknown == U_DROP:
                continue
            tb = _tag_text_bytes(f, k)
            out.append(tb)
            out.append(_encode_field(f.uplan, value))
    return b"".join(out)


def _tag_text_bytes(f, tag):
    try:
        if f.tag_enc == E_EBCDIC:
            tb = tag.encode(EBCDIC_CODEC)
        else:
            tb = tag.encode("latin-1")
    except UnicodeEncodeError:
        raise _eerr(f, f"tag {tag!r} has characters the tag encoding lacks", "tag") from None
    if len(tb) != f.tag_len:
        raise _eerr(f, f"tag {tag!r} is not {f.tag_len} characters", "tag")
    return tb


def _encode_bitmapped(f, v):
    out = []
    # a bytearray, not an int: the bitmap may be 128 bits and the twin shifts in C
    bm = bytearray(f.bm_len)
    top = 0
    used = 0
    for part in f.parts:
        pv = _part_value(part, v)
        if pv is None:
            continue
        used += 1
        num = part.ikey
        bm[(num - 1) >> 3] |= 0x80 >> ((num - 1) & 7)
        if num > top:
            top = num
        out.append(_encode_field(part, pv))
    if len(v) > used:
        _check_keys(f, v)
    head = bytes(bm)
    if f.bm_ext:
        tied = f.bits[1] is not None
        if tied and top > 64 and not (bm[0] & 0x80):
            raise _eerr(
                f, "subfield 1 is tied to the secondary bitmap (jPOS): give it when a subfield above 64 is", "missing"
            )
        if top > 64 or (tied and (bm[0] & 0x80)):
            bm[0] |= 0x80
            head = bytes(bm)
        else:
            head = head[0:8]
    if f.bm_hex:
        head = hexlify(head).upper()
    return head + b"".join(out)


def _ber_length(ln):
    if ln < 0x80:
        return bytes((ln,))
    body = ln.to_bytes((ln.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def _encode_tlv(f, v):
    out = []
    tags = f.tags
    for tag, value in v.items():
        if type(tag) is not str:
            raise _eerr(f, f"TLV tags are hex strings, got {type(tag).__name__}", "type")
        key = tag.upper()
        part = tags.get(key)
        if part is None:
            if f.unknown == U_DROP:
                continue
            if f.unknown == U_REJECT:
                raise _eerr(f, f"TLV tag {key} is not declared (unknown_tags: reject)", "unknown_tag")
            data = _bytes_of(f, value)
        else:
            if part.vtype >= T_COMPOSITE and part.vtype != T_BITMAP:
                data = _encode_composite(part, value)
            else:
                data, units = _encode_data(part, value)
                if part.length and units > part.length:
                    raise _eerr(part, f"length {units} exceeds the maximum {part.length}", "length")
        tagb = _tag_bytes(f, key)
        out.append(tagb)
        out.append(_ber_length(len(data)))
        out.append(data)
    return b"".join(out)


def _tag_bytes(f, key):
    try:
        tb = unhexlify(key)
    except (_HexError, ValueError):
        raise _eerr(f, f"TLV tag {key!r} is not hex", "tlv") from None
    n = len(tb)
    ok = n >= 1 and n <= MAX_TLV_TAG_BYTES
    if ok:
        if (tb[0] & 0x1F) == 0x1F:
            # continuation bytes have bit 8 set, the last one has it clear
            i = 1
            while i < n - 1:
                if not (tb[i] & 0x80):
                    ok = False
                i += 1
            ok = ok and n >= 2 and not (tb[n - 1] & 0x80)
        else:
            ok = n == 1
    if not ok:
        raise _eerr(f, f"TLV tag {key} is not a well-formed BER tag", "tlv")
    return tb


# ---------------------------------------------------------------------------------------
# the codec


class Codec:
    """A compiled field table and the two hot entry points, `decode` and `encode`."""

    __slots__ = ("plans", "mti", "bitmap", "bm_hex", "bm_ebc", "max_message_bytes")

    def __init__(self, plans, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES):
        if len(plans) != MAX_FIELD + 1 or plans[0] is None or plans[1] is None:
            raise ValueError("plans must hold MAX_FIELD + 1 entries with the MTI and the bitmap")
        self.plans = list(plans)
        self.mti = plans[0]
        self.bitmap = plans[1]
        self.bm_hex = plans[1].enc == E_HEXASCII or plans[1].enc == E_EBCDICHEX
        self.bm_ebc = plans[1].enc == E_EBCDICHEX
        self.max_message_bytes = max_message_bytes

    # -- decode ---------------------------------------------------------------------------

    def _read_bitmaps(self, raw, pos, n):
        """Return the 8, 16 or 24 bitmap bytes starting at `pos`."""
        step = 16 if self.bm_hex else 8
        bm = b""
        count = 0
        while True:
            if pos + step > n:
                raise _derr(self.bitmap, f"bitmap needs {step} bytes, {n - pos} left", pos, "short")
            if self.bm_ebc:
                one = _unhex(self.bitmap, raw[pos : pos + step].translate(EHEX_DECODE), pos)
            elif self.bm_hex:
                one = _unhex(self.bitmap, raw[pos : pos + step], pos)
            else:
                one = raw[pos : pos + step]
            bm = bm + one
            count += 1
            pos += step
            if not (one[0] & 0x80) or count == MAX_BITMAPS:
                return bm

    def decode(self, raw):
        """Decode one message; see the module docstring for the contract."""
        if type(raw) is not bytes:
            if isinstance(raw, (bytearray, memoryview)):
                raw = bytes(raw)
            else:
                raise TypeError(f"decode() needs bytes, got {type(raw).__name__}")
        return self._decode(raw)

    def _decode(self, raw):
        n = len(raw)
        out = {}
        num = 0
        pos = 0
        try:
            if n > self.max_message_bytes:
                raise Iso8583DecodeError(
                    f"message of {n} bytes exceeds max_message_bytes={self.max_message_bytes}", None, 0, "too_large"
                )
            f = self.mti
            if f.kind == K_ASCII_FIXED and f.vtype == T_STRING:
                end = f.wlen
                if end > n:
                    raise _derr(f, f"MTI needs {end} bytes, {n} left", 0, "short")
                out[0] = raw[0:end].decode("ascii")
                pos = end
            else:
                pos = _decode_into(f, raw, 0, n, out)
            num = 1
            bm = self._read_bitmaps(raw, pos, n)
            pos += len(bm) * (2 if self.bm_hex else 1)
            plans = self.plans
            for i in range(len(bm)):
                b = bm[i]
                if b == 0:
                    continue
                for off in BITS[b]:
                    num = i * 8 + off
                    if num == 1 or num == 65:
                        continue
                    f = plans[num]
                    if f is None:
                        raise Iso8583DecodeError(
                            "present in the bitmap but not defined by the spec", num, pos, "unknown_field"
                        )
                    kind = f.kind
                    if kind == K_ASCII_FIXED:
                        end = pos + f.wlen
                        if end > n:
                            raise _derr(f, f"value needs {f.wlen} bytes, {n - pos} left", pos, "short")
                        s = raw[pos:end].decode("ascii")
                        if f.vtype == T_NUMERIC and not s.isdigit():
                            raise _derr(f, "numeric field holds a non-digit", pos, "numeric")
                        out[num] = s
                        pos = end
                    elif kind == K_ASCII_VAR:
                        p = pos + f.plen
                        if p > n:
                            raise _derr(f, f"length prefix needs {f.plen} bytes, {n - pos} left", pos, "short")
                        ln = 0
                        j = pos
                        while j < p:
                            c = raw[j] - 48
                            if c < 0 or c > 9:
                                raise _derr(f, f"length prefix byte 0x{raw[j]:02X} is not a digit", j, "prefix")
                            ln = ln * 10 + c
                            j += 1
                        if ln > f.length:
                            raise _derr(f, f"length {ln} exceeds the maximum {f.length}", pos, "length")
                        end = p + ln
                        if end > n:
                            raise _derr(f, f"value needs {ln} bytes, {n - p} left", pos, "short")
                        s = raw[p:end].decode("ascii")
                        if f.vtype == T_NUMERIC and ln and not s.isdigit():
                            raise _derr(f, "numeric field holds a non-digit", pos, "numeric")
                        out[num] = s
                        pos = end
                    else:
                        pos = _decode_into(f, raw, pos, n, out)
            if pos != n:
                num = -1
                raise Iso8583DecodeError(f"{n - pos} bytes left over after the last field", None, pos, "trailing")
        except UnicodeDecodeError:
            err = Iso8583DecodeError("bytes outside ASCII", num, pos, "charset")
            err.partial = out
            raise err from None
        except Iso8583DecodeError as err:
            err.partial = out
            raise
        return out

    # -- encode ---------------------------------------------------------------------------

    def _bitmap_str(self, b1, b2, b3):
        if self.bm_hex:
            out = "%016X" % b1
            if b2:
                out = out + ("%016X" % b2)
            if b3:
                out = out + ("%016X" % b3)
            if self.bm_ebc:
                return out.encode("ascii").translate(EHEX_ENCODE).decode("latin-1")
            return out
        out = b1.to_bytes(8, "big")
        if b2:
            out = out + b2.to_bytes(8, "big")
        if b3:
            out = out + b3.to_bytes(8, "big")
        return out.decode("latin-1")

    def encode(self, fields):
        """Encode one message; see the module docstring for the contract."""
        if type(fields) is not dict:
            fields = dict(fields)
        # The message is assembled as a str (one code point per byte): text fields on the
        # fast paths are appended as given, and whether they were ASCII is checked once, on
        # the whole message, instead of encoding every field separately.
        try:
            msg = self._build(fields, True)
        except Iso8583EncodeError:
            # A text field's charset is only checked at the end on the fast path; the generic
            # pass checks in field order, so the error names the first offending field.
            self._build(fields, False)
            raise
        if msg.isascii():
            return msg.encode("ascii")
        if not self._fast_text_ok(fields):
            self._build(fields, False)  # raises the precise error for the offending field
        return msg.encode("latin-1")

    def _fast_text_ok(self, fields):
        plans = self.plans
        for key, v in fields.items():
            if type(v) is str and 0 <= key <= MAX_FIELD:
                f = plans[key]
                if f is not None and f.kind != K_GENERIC and not v.isascii():
                    return False
        return True

    def _build(self, fields, fast):
        parts = ["", ""]
        b1 = 0
        b2 = 0
        b3 = 0
        num = 0
        try:
            try:
                nums = sorted(fields)
            except TypeError:
                raise Iso8583EncodeError("field numbers must be int", None, None, "key") from None
            v = fields.get(0)
            if v is None:
                raise Iso8583EncodeError("the MTI (field 0) is missing", 0, None, "missing")
            f = self.mti
            if fast and f.kind == K_ASCII_FIXED and f.vtype == T_STRING and type(v) is str and len(v) == f.wlen:
                parts[0] = v
            else:
                parts[0] = _encode_field(f, v).decode("latin-1")
            plans = self.plans
            for key in nums:
                # Checked on the object first: the compiled twin holds `num` in a C int.
                if type(key) is not int:
                    raise Iso8583EncodeError(f"field numbers must be int, got {key!r}", None, None, "key")
                if key <= 1:
                    if key < 0:
                        raise Iso8583EncodeError(f"negative field number {key}", None, None, "key")
                    continue
                if key > MAX_FIELD:
                    raise Iso8583EncodeError(f"field {key}: numbers stop at {MAX_FIELD}", None, None, "key")
                num = key
                v = fields[num]
                if v is None:
                    continue
                f = plans[num]
                if f is None or num == 65:
                    raise Iso8583EncodeError(
                        "not defined by the spec"
                        if num != 65
                        else "field 65 flags the tertiary bitmap and is set automatically",
                        num,
                        None,
                        "unknown_field",
                    )
                if num <= 64:
                    b1 |= _ONE << (64 - num)
                elif num <= 128:
                    b2 |= _ONE << (128 - num)
                else:
                    b3 |= _ONE << (192 - num)
                kind = f.kind if fast else K_GENERIC
                if kind == K_ASCII_FIXED and type(v) is str:
                    s = v
                    if len(s) != f.wlen or (f.vtype == T_NUMERIC and not s.isdigit()):
                        s = _encode_field(f, v).decode("latin-1")  # pads, or raises
                    parts.append(s)
                elif kind == K_ASCII_VAR and type(v) is str:
                    s = v
                    ln = len(s)
                    if ln > f.length or (f.vtype == T_NUMERIC and ln and not s.isdigit()):
                        parts.append(_encode_field(f, v).decode("latin-1"))  # raises
                    else:
                        parts.append(f.len_str[ln])
                        parts.append(s)
                else:
                    parts.append(_encode_field(f, v).decode("latin-1"))
        except Iso8583EncodeError as err:
            if err.offset is None:
                raise Iso8583EncodeError(
                    err.detail, err.field, self._offset(parts, b2, b3, num), err.reason, err.subfield
                ) from None
            raise
        if b3:
            b2 |= _ONE << 63
        if b2:
            b1 |= _ONE << 63
        parts[1] = self._bitmap_str(b1, b2, b3)
        return "".join(parts)

    def _offset(self, parts, b2, b3, num):
        """Bytes that precede field `num` in the message being built (for error reports)."""
        if num <= 1:
            return 0 if num == 0 else len(parts[0])
        count = 1
        if b2 or b3 or num > 64:
            count = 2
        if b3 or num > 128:
            count = 3
        size = len(parts[0]) + count * (16 if self.bm_hex else 8)
        for i in range(2, len(parts)):
            size += len(parts[i])
        return size
