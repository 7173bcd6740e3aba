"""Import jPOS GenericPackager XML files as moov-vocabulary wire documents.

Job: `read_packager(text, where)` parses a jPOS `GenericPackager` description (`<isopackager>`
with `<isofield id length name class pad token/>` and `<isofieldpackager ... packager=...>`
for composites) and returns `{"name", "fields"}` in the moov vocabulary that fluxrig.iso8583.plan
compiles, so `load_spec("iso87ascii.xml")` runs a jPOS packager on fluxrig's codec. Nothing is
guessed: a field packager class that is not in `CLASSES` (or a composite packager not in
`SUB_PACKAGERS`) is a SpecError naming the field, the class and what is supported; every
problem of the file is listed at once.

Semantics carried over from jPOS (read from its field packager classes):
  * `length` is the maximum in value units: characters for CHAR/NUM classes, bytes for BINARY.
  * jPOS "ASCII" (AsciiInterpreter, LiteralInterpreter) is ISO-8859-1: CHAR classes map to
    String over `Binary` text (Latin-1, one byte per character); NUM classes to Numeric ASCII.
  * BCD numbers (IFB_*NUM, IFB_NUMERIC): `pad="true"` is jPOS's LEFT_PADDED (a 0 nibble
    before an odd digit count: `BCD`), the default is RIGHT_PADDED (`LBCD`, pad nibble after);
    IFB_F* classes pad with an F nibble (`LBCDF`).
  * Prefixes: AsciiPrefixer L..LLLL -> ASCII.L..LLLL, BcdPrefixer LL/LLL/LLLL -> BCD.LL..,
    BinaryPrefixer B/BB (the H classes) -> Binary.L/Binary.LL, EbcdicPrefixer -> EBCDIC.L...
  * Fixed NUMERIC classes pad on the left with 0, fixed CHAR classes on the right with spaces,
    as jPOS's LeftPadder.ZERO_PADDER and RightTPadder.SPACE_PADDER do on pack.
  * IFA_AMOUNT / IFE_AMOUNT (x+n: a C/D sign then digits) are fixed Strings of `length`
    characters: the value carries its sign and full-length digits. IFB_AMOUNT (a sign byte then
    BCD digits) is a fixed composite {"1": "C", "2": "00001000"}.
  * A field declared twice: the last declaration wins (jPOS keeps its fields in a map).
  * IF_NOP / IF_UNUSED declare no field.
Composites (`isofieldpackager`): GenericSubFieldPackager (and Base1SubFieldPackager) with
`emitBitmap="true"` or a bitmap class at subfield 0 -> a bitmapped composite (bit n = subfield
n; a 16-byte bitmap is a primary plus a secondary announced by bit 1); without a bitmap -> a
positional composite keyed by subfield id; GenericTaggedFieldsPackager with IFA_TT*/IFA_TTT*
subfields -> a tagged composite (2 or 3 ASCII tag characters, then each subfield's own
prefix), tags from `token` or the DecimalTagMapper rule (the id, zero-padded); the BER-TLV
packagers (BERTLVBinaryPackager, DefaultICCBERTLVPackager, BERTLVAsciiHexPackager is refused)
-> a TLV composite keeping every tag as bytes.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from fluxrig.iso8583.errors import SpecError

__all__ = ["read_packager", "looks_like_packager", "CLASSES", "SUB_PACKAGERS", "REFUSED", "MAX_PACKAGER_BYTES"]

MAX_PACKAGER_BYTES = 4 << 20  # a packager description larger than this is refused
_PAD0 = {"type": "Left", "pad": "0"}
_PADSP = {"type": "Right", "pad": " "}
_LAT1 = "Binary"  # jPOS's "ASCII" is ISO-8859-1: String over Binary text is Latin-1


def _char(prefix, enc=_LAT1, pad=None):
    return {"type": "String", "enc": enc, "prefix": prefix, **({"padding": pad} if pad else {})}


def _num(prefix, enc="ASCII", pad=None):
    return {"type": "Numeric", "enc": enc, "prefix": prefix, **({"padding": pad} if pad else {})}


def _bin(prefix, enc="Binary"):
    return {"type": "Binary", "enc": enc, "prefix": prefix}


_BCD = "@bcd"  # placeholder: BCD or LBCD by the field's `pad` attribute

#: jPOS field packager class (short name) -> moov wire definition without length/description.
CLASSES: dict[str, dict] = {
    # ASCII
    "IFA_NUMERIC": _num("ASCII.Fixed", pad=_PAD0),
    "IFA_LLNUM": _num("ASCII.LL"),
    "IFA_LLLNUM": _num("ASCII.LLL"),
    "IFA_LCHAR": _char("ASCII.L"),
    "IFA_LLCHAR": _char("ASCII.LL"),
    "IFA_LLLCHAR": _char("ASCII.LLL"),
    "IFA_LLLLCHAR": _char("ASCII.LLLL"),
    "IFA_LLLLLCHAR": _char("ASCII.LLLLL"),
    "IFA_LLLLLLCHAR": _char("ASCII.LLLLLL"),
    "IFA_AMOUNT": _char("ASCII.Fixed"),
    "IFA_AMOUNT2003": _num("ASCII.Fixed", pad=_PAD0),
    "IFA_BINARY": _bin("ASCII.Fixed", enc="HexToASCII"),
    "IFA_LBINARY": _bin("ASCII.L"),
    "IFA_LLBINARY": _bin("ASCII.LL"),
    "IFA_LLLBINARY": _bin("ASCII.LLL"),
    "IFA_LLLLBINARY": _bin("ASCII.LLLL"),
    "IFA_LLLLLBINARY": _bin("ASCII.LLLLL"),
    "IFA_LLLLLLBINARY": _bin("ASCII.LLLLLL"),
    "IF_CHAR": _char("ASCII.Fixed", pad=_PADSP),
    "IFMC_TCC": _char("ASCII.Fixed", pad=_PADSP),
    "IFA_BITMAP": {"type": "Bitmap", "enc": "HexToASCII", "prefix": "Hex.Fixed"},
    # binary / BCD
    "IFB_NUMERIC": _num("BCD.Fixed", enc=_BCD, pad=_PAD0),
    "IFB_AMOUNT2003": _num("BCD.Fixed", enc=_BCD, pad=_PAD0),
    "IFB_LLNUM": _num("BCD.LL", enc=_BCD),
    "IFB_LLLNUM": _num("BCD.LLL", enc=_BCD),
    "IFB_LLHNUM": _num("Binary.L", enc=_BCD),
    "IFB_LLLHNUM": _num("Binary.LL", enc=_BCD),
    "IFB_FNUMERIC": _num("BCD.Fixed", enc="LBCDF", pad=_PAD0),
    "IFB_FLLNUM": _num("BCD.LL", enc="LBCDF"),
    "IFB_FLLLNUM": _num("BCD.LLL", enc="LBCDF"),
    "IFB_LLCHAR": _char("BCD.LL"),
    "IFB_LLLCHAR": _char("BCD.LLL"),
    "IFB_LLLLCHAR": _char("BCD.LLLL"),
    "IFB_LLLLLLCHAR": _char("BCD.LLLLLL"),
    "IFB_LLHCHAR": _char("Binary.L"),
    "IFB_LLLHCHAR": _char("Binary.LL"),
    "IFB_LLHECHAR": _char("Binary.L", enc="EBCDIC"),
    "IFB_LLLHECHAR": _char("Binary.LL", enc="EBCDIC"),
    "IFB_BINARY": _bin("Binary.Fixed"),
    "IFB_LLBINARY": _bin("BCD.LL"),
    "IFB_LLLBINARY": _bin("BCD.LLL"),
    "IFB_LLLLBINARY": _bin("BCD.LLLL"),
    "IFB_LLHBINARY": _bin("Binary.L"),
    "IFB_LLLHBINARY": _bin("Binary.LL"),
    "IFB_BITMAP": {"type": "Bitmap", "enc": "Binary", "prefix": "Binary.Fixed"},
    # EBCDIC (code page 037, jPOS's EbcdicInterpreter)
    "IFE_NUMERIC": _num("EBCDIC.Fixed", enc="EBCDIC", pad=_PAD0),
    "IFE_LNUM": _num("EBCDIC.L", enc="EBCDIC"),
    "IFE_LLNUM": _num("EBCDIC.LL", enc="EBCDIC"),
    "IFE_LLLNUM": _num("EBCDIC.LLL", enc="EBCDIC"),
    "IFE_CHAR": _char("EBCDIC.Fixed", enc="EBCDIC", pad=_PADSP),
    "IFEMC_TCC": _char("EBCDIC.Fixed", enc="EBCDIC", pad=_PADSP),
    "IF_ECHAR": _char("EBCDIC.Fixed", enc="EBCDIC", pad=_PADSP),
    "IFE_AMOUNT": _char("EBCDIC.Fixed", enc="EBCDIC"),
    "IFE_LCHAR": _char("EBCDIC.L", enc="EBCDIC"),
    "IFE_LLCHAR": _char("EBCDIC.LL", enc="EBCDIC"),
    "IFE_LLLCHAR": _char("EBCDIC.LLL", enc="EBCDIC"),
    "IFE_LLLLCHAR": _char("EBCDIC.LLLL", enc="EBCDIC"),
    "IFE_BINARY": _bin("EBCDIC.Fixed", enc="EBCDICHex"),
    "IFE_BITMAP": {"type": "Bitmap", "enc": "EBCDICHex", "prefix": "EBCDIC.Fixed"},
    "IFE_LBINARY": _bin("EBCDIC.L"),
    "IFE_LLBINARY": _bin("EBCDIC.LL"),
    "IFE_LLLBINARY": _bin("EBCDIC.LLL"),
    "IFE_LLLLBINARY": _bin("EBCDIC.LLLL"),
    "IFEP_LLLBINARY": _bin("EBCDIC.LLL"),
    # mixed prefix / data encodings
    "IFEA_LLCHAR": _char("EBCDIC.LL", enc=_LAT1),
    "IFAE_LLCHAR": _char("ASCII.LL", enc="EBCDIC"),
}

#: Tagged subfield classes of GenericTaggedFieldsPackager: class -> (tag characters, inner class).
TAGGED: dict[str, tuple[int, str]] = {
    "IFA_TTLCHAR": (2, "IFA_LCHAR"),
    "IFA_TTLLCHAR": (2, "IFA_LLCHAR"),
    "IFA_TTLLLCHAR": (2, "IFA_LLLCHAR"),
    "IFA_TTLLLLCHAR": (2, "IFA_LLLLCHAR"),
    "IFA_TTTLLLCHAR": (3, "IFA_LLLCHAR"),
    "IFA_TTLBINARY": (2, "IFA_LBINARY"),
    "IFA_TTLLBINARY": (2, "IFA_LLBINARY"),
    "IFA_TTLLLBINARY": (2, "IFA_LLLBINARY"),
    "IFA_TTLLLLBINARY": (2, "IFA_LLLLBINARY"),
}

_BITMAP_CLASSES = {
    "IFA_BITMAP": ("HexToASCII", None),
    "IFB_BITMAP": ("Binary", None),
    "Base1_BITMAP126": ("Binary", False),  # 8 bytes, bit 1 is subfield 1
}
_TLV_PACKAGERS = {"BERTLVBinaryPackager", "DefaultICCBERTLVPackager", "BERTLVPackager"}
_DECIMAL_MAPPERS = {"DecimalTagMapper", "TTDecimalTagMapper", "TTTDecimalTagMapper"}

#: Composite (sub-)packager classes understood in `isofieldpackager packager=...`.
SUB_PACKAGERS = ("GenericSubFieldPackager", "Base1SubFieldPackager", "GenericTaggedFieldsPackager", *_TLV_PACKAGERS)

#: Classes refused by name, with the reason given to the operator.
REFUSED: dict[str, str] = {
    "IFB_HEX": "hex nibble values are not supported; use IFB_BINARY",
    "IFB_LLHEX": "a prefix counting nibbles of binary data is not supported",
    "IFB_LLLHEX": "a prefix counting nibbles of binary data is not supported",
    "IFB_LLHFBINARY": "filled binary fields are not supported",
    "IFE_LLLEBINARY": "EBCDIC hex characters for binary data are not supported",
    "IFE_SIGNED_NUMERIC": "zoned signed EBCDIC numbers are not supported",
    "IFA_LLABINARY": "ASCII-hex binary with a character-counting prefix is not supported",
    "IFA_LLLABINARY": "ASCII-hex binary with a character-counting prefix is not supported",
    "IFA_LLBNUM": "BCD digits behind an ASCII prefix are not supported",
    "IFA_FLLCHAR": "filled (space-padded to the maximum) variable fields are not supported",
    "IFA_FLLNUM": "filled (space-padded to the maximum) variable fields are not supported",
    "IF_TCHAR": "token-terminated fields are not supported",
    "IF_TBASE": "token-terminated fields are not supported",
    "IFEB_LLNUM": "EBCDIC-prefixed BCD is not supported",
    "IFEB_LLLNUM": "EBCDIC-prefixed BCD is not supported",
    "IFEP_LLCHAR": "the MasterCard/IPM tagged EBCDIC classes are not supported",
    "IFEP_LLLCHAR": "the MasterCard/IPM tagged EBCDIC classes are not supported",
    "IFELPE_LLLCHAR": "the MasterCard/IPM tagged EBCDIC classes are not supported",
    "IFEPE_LLCHAR": "the MasterCard/IPM tagged EBCDIC classes are not supported",
    "IFEPE_LLLCHAR": "the MasterCard/IPM tagged EBCDIC classes are not supported",
    "IFEPE_LLBINARY": "the MasterCard/IPM tagged EBCDIC classes are not supported",
    "IFEMC_LLCHAR": "the MasterCard/IPM tagged EBCDIC classes are not supported",
    "IFEMC_LLLCHAR": "the MasterCard/IPM tagged EBCDIC classes are not supported",
    "IFMC_LLCHAR": "the MasterCard tagged classes are not supported",
    "IFMC_LLLCHAR": "the MasterCard tagged classes are not supported",
    "IFMC_LLBINARY": "the MasterCard tagged classes are not supported",
    "IFMC_LLLBINARY": "the MasterCard tagged classes are not supported",
    "IFIPM_LLLCHAR": "the IPM classes are not supported",
    "BERTLVAsciiHexPackager": "ASCII-hex BER-TLV is not supported (binary BER-TLV is)",
    "BERTLVEbcdicHexPackager": "EBCDIC-hex BER-TLV is not supported (binary BER-TLV is)",
}
_SKIP = {"IF_NOP", "IF_UNUSED"}
_PREFIX_RE = re.compile(r"^(ASCII|BCD|Binary|EBCDIC|Hex)\.(Fixed|L{1,6})$")


def looks_like_packager(text: str) -> bool:
    """True when `text` is an XML document whose root is <isopackager>."""
    head = text.lstrip("\ufeff \t\r\n")[:4096]
    return head.startswith("<") and "<isopackager" in head


def _short(cls: str | None) -> str:
    return (cls or "").strip().rsplit(".", 1)[-1].rsplit("$", 1)[-1]


def _length(el, loc, problems):
    raw = el.get("length")
    if raw is None or not raw.strip().isdigit():
        problems.append(f"{loc}.length: {raw!r} is not a number")
        return None
    return int(raw)


def _pad(el) -> bool:
    return (el.get("pad") or "").strip().lower() == "true"


_TRACK_FIELDS = (35, 36)  # track 2 / track 3: digits and '=' separators, whatever the class says


def _field(el, loc, problems, cls=None, num=None):
    """One <isofield> as a moov definition (None when skipped or refused)."""
    cls = _short(cls or el.get("class"))
    length = _length(el, loc, problems)
    if length is None:
        return None
    if cls == "IFB_AMOUNT":
        return _bcd_amount(el, length)
    base = CLASSES.get(cls)
    if base is None:
        if cls in REFUSED:
            problems.append(f"{loc}: class {cls} is refused: {REFUSED[cls]}")
        elif cls in TAGGED:
            problems.append(f"{loc}: class {cls} belongs inside a GenericTaggedFieldsPackager")
        else:
            problems.append(
                f"{loc}: class {cls or '(none)'} is not a jPOS field packager fluxrig maps ({_supported()})"
            )
        return None
    d = dict(base)
    if length == 0 and d["prefix"].endswith(".Fixed") and d["type"] != "Bitmap":
        return None  # a zero-length placeholder (postpack's 127.0): nothing on the wire
    if d.get("enc") == _BCD:
        d["enc"] = "BCD" if _pad(el) else "LBCD"
    if d["type"] == "Bitmap":
        return {
            "type": "Bitmap",
            "length": 8,
            "enc": d["enc"],
            "prefix": d["prefix"],
            "description": el.get("name", ""),
        }
    d["length"] = length
    if num in _TRACK_FIELDS and d["type"] == "Numeric":
        # jPOS NUM classes do not check digits and switches put track data in them ('=' as
        # itself in ASCII/EBCDIC, as nibble D in BCD): keep that data decodable.
        d["type"] = "Track2" if d["enc"] in ("BCD", "LBCD", "LBCDF") else "String"
        d.pop("padding", None)
    if el.get("name"):
        d["description"] = el.get("name")
    return d


def _bcd_amount(el, length):
    # IFB_AMOUNT: one sign character (C/D) as a raw byte, then length-1 digits in BCD; no single
    # string type covers both, so it is a fixed two-part composite {"1": sign, "2": digits}.
    digits = max(length - 1, 1)
    d = {
        "type": "Composite",
        "length": 1 + (digits + 1) // 2,
        "prefix": "Binary.Fixed",
        "subfields": {
            "1": {"type": "String", "enc": _LAT1, "length": 1, "prefix": "Binary.Fixed"},
            "2": {
                "type": "Numeric",
                "enc": "BCD" if _pad(el) else "LBCD",
                "length": digits,
                "prefix": "BCD.Fixed",
                "padding": _PAD0,
            },
        },
    }
    if el.get("name"):
        d["description"] = el.get("name")
    return d


def _supported() -> str:
    return f"see fluxrig.iso8583.jpos.CLASSES: {len(CLASSES)} classes mapped"


def _children(el, loc, problems):
    out = {}
    for child in el:
        if child.tag not in ("isofield", "isofieldpackager"):
            continue
        fid = child.get("id", "")
        if not fid.strip().isdigit():
            problems.append(f"{loc}: <{child.tag}> has id {fid!r}, not a number")
            continue
        # A field declared twice: the last declaration wins, as in jPOS (its fields go into a map).
        out[int(fid)] = child
    return out


def _composite(el, loc, problems, depth=0):
    """An <isofieldpackager> as a moov composite definition."""
    outer = _field(el, loc, problems)
    if outer is None:
        return None
    if outer["type"] not in ("String", "Binary"):
        problems.append(f"{loc}: a composite's own class must be a CHAR or BINARY class, not {el.get('class')}")
        return None
    packager = _short(el.get("packager"))
    comp = {"type": "Composite", "length": outer["length"], "prefix": outer["prefix"]}
    if outer.get("description"):
        comp["description"] = outer["description"]
    kids = _children(el, loc, problems)
    if packager in REFUSED:
        problems.append(f"{loc}: packager {packager} is refused: {REFUSED[packager]}")
        return None
    if packager in _TLV_PACKAGERS:
        comp["subfields"] = {"layout": "tlv", "unknown_tags": "preserve", "parts": []}
        return comp
    if packager == "GenericTaggedFieldsPackager":
        return _tagged(el, comp, kids, loc, problems)
    if packager not in ("GenericSubFieldPackager", "Base1SubFieldPackager"):
        problems.append(f"{loc}: packager {packager or '(none)'} is not supported ({', '.join(SUB_PACKAGERS)})")
        return None
    bm_el = kids.get(0)
    bm_cls = _short(bm_el.get("class")) if bm_el is not None else ""
    emit = (el.get("emitBitmap") or "").strip().lower() == "true"
    if bm_cls in _BITMAP_CLASSES or emit:
        if bm_cls not in _BITMAP_CLASSES:
            problems.append(f"{loc}.0: emitBitmap needs a bitmap class at subfield 0, found {bm_cls or 'none'}")
            return None
        enc, secondary = _BITMAP_CLASSES[bm_cls]
        blen = _length(bm_el, f"{loc}.0", problems) or 8
        nbytes = 16 if blen > 8 else 8
        parts = {}
        for n, child in sorted(kids.items()):
            if n == 0:
                continue
            sub = _member(child, f"{loc}.{n}", problems, depth)
            if sub is not None:
                parts[str(n)] = sub
        comp["bitmap"] = {
            "length": nbytes,
            "enc": enc,
            "secondary": nbytes == 16 if secondary is None else secondary,
        }
        comp["subfields"] = parts
        return comp
    parts = {}
    for n, child in sorted(kids.items()):
        sub = _member(child, f"{loc}.{n}", problems, depth)
        if sub is not None:
            parts[str(n)] = sub
    if not parts:
        problems.append(f"{loc}: a composite needs subfields")
        return None
    comp["subfields"] = parts
    return comp


def _member(child, loc, problems, depth):
    if child.tag == "isofieldpackager":
        if depth >= 3:
            problems.append(f"{loc}: composites nest too deep")
            return None
        return _composite(child, loc, problems, depth + 1)
    if _short(child.get("class")) in _SKIP:
        return None
    return _field(child, loc, problems)


def _tagged(el, comp, kids, loc, problems):
    mapper = _short(el.get("tagMapper"))
    sizes = set()
    parts = []
    for n, child in sorted(kids.items()):
        cls = _short(child.get("class"))
        if cls not in TAGGED:
            problems.append(f"{loc}.{n}: class {cls} is not a tagged class ({', '.join(TAGGED)})")
            continue
        width, inner = TAGGED[cls]
        sizes.add(width)
        d = _field(child, f"{loc}.{n}", problems, cls=inner)
        if d is None:
            continue
        token = child.get("token")
        if token is None:
            if mapper and mapper not in _DECIMAL_MAPPERS:
                problems.append(f"{loc}.{n}: tag mapper {mapper} is not known; give each subfield its tag in `token`")
                continue
            token = str(n).zfill(width)
        parts.append({"key": str(n), "tag": token, **d})
    if len(sizes) > 1:
        problems.append(f"{loc}: subfields mix tag widths {sorted(sizes)}")
        return None
    if not parts:
        problems.append(f"{loc}: a tagged composite needs subfields")
        return None
    comp["subfields"] = {"layout": "tagged", "tag": {"length": sizes.pop(), "enc": "ASCII"}, "parts": parts}
    return comp


def read_packager(text: str, where: str) -> dict:
    """Parse a GenericPackager XML text into `{"name", "fields"}` (moov wire vocabulary)."""
    problems: list = []
    if len(text) > MAX_PACKAGER_BYTES:
        raise SpecError([f"{where}: packager larger than {MAX_PACKAGER_BYTES} bytes"], where)
    if "<!ENTITY" in text:
        # Entity declarations are how XML bombs and external reads start; packagers have none.
        raise SpecError([f"{where}: XML entity declarations are refused in a packager"], where)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        line, col = exc.position
        raise SpecError([f"{where}:{line}:{col}: not well-formed XML: {exc}"], where) from None
    if root.tag != "isopackager":
        raise SpecError([f"{where}: the root element is <{root.tag}>, a GenericPackager has <isopackager>"], where)
    for attr in ("headerLength",):
        if (root.get(attr) or "0").strip() not in ("", "0"):
            problems.append(f"{where}: {attr}={root.get(attr)}: headers belong to the channel (io_iso8583 header_*)")
    fields = {}
    for n, el in sorted(_children(root, where, problems).items()):
        loc = f"{where}.{n}"
        if n > 192:
            problems.append(f"{loc}: field numbers stop at 192")
            continue
        if el.tag == "isofieldpackager":
            d = _composite(el, loc, problems)
        elif _short(el.get("class")) in _SKIP:
            continue
        else:
            d = _field(el, loc, problems, num=n)
        if d is None:
            continue
        if n == 65 and d.get("type") != "Bitmap":
            # jPOS declares 65 as a data field (usually IFB_BINARY / IFA_BINARY "BITMAP, EXTENDED");
            # here bit 65 flags the tertiary bitmap, so the field is implicit.
            continue
        fields[n] = d
    if 0 not in fields:
        problems.append(f"{where}.0: the MTI (field 0) is not declared")
    if 1 not in fields:
        problems.append(f"{where}.1: the bitmap (field 1) is not declared")
    for n, d in fields.items():
        pfx = d.get("prefix", "")
        if not _PREFIX_RE.match(pfx):
            problems.append(f"{where}.{n}: internal: prefix {pfx!r}")
    if problems:
        raise SpecError(problems, where)
    return {"name": f"jPOS packager {where.rsplit('/', 1)[-1]}", "fields": fields}
