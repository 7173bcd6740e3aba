# C types for fluxrig/iso8583/codec_py.py, compiled with it as fluxrig.iso8583.codec_c (one
# source, two builds). Only declarations live here; behaviour lives in the .py so the twins cannot drift.
cimport cython

cdef int T_STRING, T_NUMERIC, T_BINARY, T_HEX, T_TRACK2, T_COMPOSITE, T_TLV, T_BITMAP, T_TAGGED, T_BITMAPPED
cdef int E_ASCII, E_EBCDIC, E_BCD, E_BINARY, E_HEXASCII, E_LBCD, E_EBCDIC1047, E_EBCDICHEX
cdef int P_FIXED, P_ASCII, P_EBCDIC, P_BCD, P_BINARY, P_HEX
cdef int K_GENERIC, K_ASCII_FIXED, K_ASCII_VAR
cdef int PAD_NONE, PAD_LEFT, PAD_RIGHT
cdef int U_REJECT, U_PRESERVE, U_DROP
cdef int MAX_BITMAPS, MAX_FIELD, MAX_TLV_TAG_BYTES, MAX_TLV_LENGTH_BYTES
cdef unsigned long long _ONE
cdef tuple BITS


cdef class FieldPlan:
    cdef public int num, kind, vtype, enc, pref, ndig, pad, unknown
    cdef public Py_ssize_t plen, length, wlen, rep_len, rep_max
    cdef public object key, sub, label, padchar, padbyte
    cdef public list len_table, len_str, parts
    cdef public dict tags
    cdef public int padnib, tag_len, tag_enc
    cdef public Py_ssize_t bm_len
    cdef public bint bm_hex, bm_ext
    cdef public object ikey, tagb, uplan
    cdef public dict bykey
    cdef public list bits


cdef object _derr(FieldPlan f, message, offset, reason)
cdef object _eerr(FieldPlan f, message, reason)

@cython.locals(pk=int, plen=Py_ssize_t, units=Py_ssize_t, j=Py_ssize_t, stop=Py_ssize_t, c=int, base=int)
cdef Py_ssize_t _prefix_units(FieldPlan f, bytes raw, Py_ssize_t pos, Py_ssize_t n) except -1

cdef Py_ssize_t _wire_size(int enc, Py_ssize_t units)
cdef bytes _unhex(FieldPlan f, bytes data, Py_ssize_t offset)

@cython.locals(enc=int, vt=int, s=str)
cdef str _decode_text(FieldPlan f, bytes raw, Py_ssize_t p, Py_ssize_t end, Py_ssize_t units, Py_ssize_t start)

@cython.locals(h=str)
cdef str _decode_bcd(FieldPlan f, bytes raw, Py_ssize_t p, Py_ssize_t end, Py_ssize_t units)

@cython.locals(h=str, last=str)
cdef str _decode_lbcd(FieldPlan f, bytes raw, Py_ssize_t p, Py_ssize_t end, Py_ssize_t units)

@cython.locals(vt=int)
cdef object _decode_content(FieldPlan f, bytes raw, Py_ssize_t pos, Py_ssize_t end)

@cython.locals(d=dict, tags=dict, tl=Py_ssize_t, p=Py_ssize_t, tb=bytes, tag=str, part=FieldPlan, held=dict)
cdef dict _decode_tagged(FieldPlan f, bytes raw, Py_ssize_t pos, Py_ssize_t end)

@cython.locals(step=Py_ssize_t, p=Py_ssize_t, bm=bytes, one=bytes, d=dict, bits=list, i=Py_ssize_t, b=int,
               off=int, num=Py_ssize_t, part=FieldPlan)
cdef dict _decode_bitmapped(FieldPlan f, bytes raw, Py_ssize_t pos, Py_ssize_t end)

@cython.locals(vt=int, enc=int, b=bytes)
cdef object _decode_value(FieldPlan f, bytes raw, Py_ssize_t p, Py_ssize_t end, Py_ssize_t units, Py_ssize_t start)

@cython.locals(units=Py_ssize_t, p=Py_ssize_t, end=Py_ssize_t, vt=int)
cdef Py_ssize_t _decode_into(FieldPlan f, bytes raw, Py_ssize_t pos, Py_ssize_t n, dict out) except -1

@cython.locals(d=dict, p=Py_ssize_t, part=FieldPlan)
cdef dict _decode_group(FieldPlan f, bytes raw, Py_ssize_t pos, Py_ssize_t end)

@cython.locals(total=Py_ssize_t, count=Py_ssize_t, p=Py_ssize_t, groups=list)
cdef object _decode_positional(FieldPlan f, bytes raw, Py_ssize_t pos, Py_ssize_t end)

@cython.locals(d=dict, tags=dict, unknown=int, p=Py_ssize_t, tstart=Py_ssize_t, b=int, count=int,
               lb=int, nb=int, ln=Py_ssize_t, vend=Py_ssize_t, tag=str, part=FieldPlan)
cdef dict _decode_tlv(FieldPlan f, bytes raw, Py_ssize_t pos, Py_ssize_t end)

@cython.locals(size=Py_ssize_t, enc=int, units=Py_ssize_t)
cdef object _decode_tlv_value(FieldPlan part, bytes raw, Py_ssize_t p, Py_ssize_t end)

@cython.locals(pk=int)
cdef bytes _prefix_bytes(FieldPlan f, Py_ssize_t units)

cpdef bytes prefix_for(int pk, int ndig, Py_ssize_t units)

cdef str _text_of(FieldPlan f, v)

@cython.locals(s=str, vt=int, units=Py_ssize_t, enc=int, h=str)
cdef tuple _encode_text(FieldPlan f, v)

cdef bytes _bytes_of(FieldPlan f, v)

@cython.locals(vt=int, b=bytes)
cdef tuple _encode_data(FieldPlan f, v)

@cython.locals(vt=int, content=bytes, data=bytes, units=Py_ssize_t)
cdef bytes _encode_field(FieldPlan f, v)

@cython.locals(out=list)
cdef bytes _encode_composite(FieldPlan f, v)

@cython.locals(out=list, part=FieldPlan, data=bytes, used=Py_ssize_t)
cdef bytes _encode_group(FieldPlan f, v)

@cython.locals(part=FieldPlan)
cdef object _check_keys(FieldPlan f, v)

cdef object _part_value(FieldPlan part, v)

@cython.locals(out=list, used=Py_ssize_t, part=FieldPlan, tb=bytes)
cdef bytes _encode_tagged(FieldPlan f, v)

@cython.locals(tb=bytes)
cdef bytes _tag_text_bytes(FieldPlan f, str tag)

@cython.locals(out=list, bm=bytearray, top=Py_ssize_t, used=Py_ssize_t, part=FieldPlan, num=Py_ssize_t, head=bytes)
cdef bytes _encode_bitmapped(FieldPlan f, v)

cdef bytes _ber_length(Py_ssize_t ln)

@cython.locals(out=list, tags=dict, part=FieldPlan, data=bytes, units=Py_ssize_t, tagb=bytes, key=str)
cdef bytes _encode_tlv(FieldPlan f, dict v)

@cython.locals(tb=bytes, n=Py_ssize_t, ok=bint, i=Py_ssize_t)
cdef bytes _tag_bytes(FieldPlan f, str key)


cdef class Codec:
    cdef public list plans
    cdef public FieldPlan mti
    cdef public FieldPlan bitmap
    cdef public bint bm_hex
    cdef public bint bm_ebc
    cdef public Py_ssize_t max_message_bytes

    @cython.locals(step=Py_ssize_t, bm=bytes, one=bytes, count=int)
    cdef bytes _read_bitmaps(self, bytes raw, Py_ssize_t pos, Py_ssize_t n)

    @cython.locals(n=Py_ssize_t, out=dict, num=int, pos=Py_ssize_t, f=FieldPlan, end=Py_ssize_t,
                   bm=bytes, plans=list, i=Py_ssize_t, b=int, off=int, kind=int, p=Py_ssize_t,
                   ln=Py_ssize_t, j=Py_ssize_t, c=int, s=str)
    cdef dict _decode(self, bytes raw)

    cpdef dict decode(self, raw)

    cdef str _bitmap_str(self, unsigned long long b1, unsigned long long b2, unsigned long long b3)

    @cython.locals(msg=str)
    cpdef bytes encode(self, fields)

    @cython.locals(plans=list, f=FieldPlan)
    cdef bint _fast_text_ok(self, dict fields) except -1

    @cython.locals(parts=list, b1="unsigned long long", b2="unsigned long long", b3="unsigned long long",
                   num=int, nums=list, f=FieldPlan, plans=list, kind=int, s=str, ln=Py_ssize_t)
    cdef str _build(self, dict fields, bint fast)

    @cython.locals(count=int, size=Py_ssize_t, i=Py_ssize_t)
    cdef Py_ssize_t _offset(self, list parts, unsigned long long b2, unsigned long long b3, int num)
