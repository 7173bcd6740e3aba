# C declarations for fluxrig/framing/core_py.py, compiled with it as fluxrig.framing.core_c.
# The .py stays the one source; this file only adds C types: the framers become C classes
# with typed fields, and the hot loops get C-integer locals so bytes indexing and slicing
# compile to direct buffer access. Keep it in step with core_py.py (a mismatch fails the build).

cimport cython


@cython.locals(n=Py_ssize_t)
cdef bytes _as_bytes(object data)


cdef class StreamFramer:
    cdef readonly Py_ssize_t max_frame_bytes
    cdef bytearray _buf
    cdef object _error
    cdef long long _base

    cpdef reset(self)
    cpdef list flush(self)
    cdef object _fail(self, exc, frames)
    cdef object _rearm(self)


cdef class DelimiterFramer(StreamFramer):
    cdef readonly bytes delimiter
    cdef readonly str position
    cdef readonly bint include_delimiter
    cdef readonly bint append
    cdef readonly bint strip_cr
    cdef public long long discarded
    cdef bint _prefix
    cdef Py_ssize_t _scan
    cdef bint _synced

    @cython.locals(buf=bytearray, work=bytes, dl=Py_ssize_t, n=Py_ssize_t, content=Py_ssize_t)
    cpdef list feed(self, data)

    @cython.locals(
        frames=list, delim=bytes, dl=Py_ssize_t, n=Py_ssize_t, maxb=Py_ssize_t, base=cython.longlong,
        scan=Py_ssize_t, pos=Py_ssize_t, idx=Py_ssize_t, cut=Py_ssize_t, clen=Py_ssize_t,
        content=Py_ssize_t, incl=bint, strip=bint, rest=bytes,
    )
    cdef list _split(self, bytes work)

    @cython.locals(offset=cython.longlong, i=Py_ssize_t, frames=list)
    cdef object _oversize_part(self, list parts, long long base, Py_ssize_t dl, Py_ssize_t maxb)

    @cython.locals(frames=list, work=bytes, n=Py_ssize_t, dl=Py_ssize_t, base=cython.longlong, clen=Py_ssize_t)
    cpdef list flush(self)

    @cython.locals(data=bytes)
    cpdef bytes encode(self, payload)

    cpdef reset(self)


cdef class LengthPrefixFramer(StreamFramer):
    cdef readonly str kind
    cdef readonly int size
    cdef readonly str endian
    cdef readonly bint includes_header
    cdef readonly bint allow_empty
    cdef readonly bint keep_header
    cdef readonly bytes reserved
    cdef readonly Py_ssize_t max_payload
    cdef int _kind
    cdef Py_ssize_t _hdr
    cdef bint _big
    cdef Py_ssize_t _adj
    cdef Py_ssize_t _need

    @cython.locals(buf=bytearray, work=bytes)
    cpdef list feed(self, data)

    @cython.locals(
        frames=list, n=Py_ssize_t, hdr=Py_ssize_t, kind=int, big=bint, adj=Py_ssize_t,
        maxb=Py_ssize_t, keep=bint, allow_empty=bint, pos=Py_ssize_t, need=Py_ssize_t,
        value=cython.longlong, body=cython.longlong, end=Py_ssize_t,
    )
    cdef list _split(self, bytes work)

    @cython.locals(value=cython.longlong, i=Py_ssize_t, digit=int, high=int, low=int)
    cdef long long _decimal_prefix(self, bytes work, Py_ssize_t pos, list frames) except -1

    @cython.locals(data=bytes, n=Py_ssize_t)
    cpdef bytes encode(self, payload)

    cpdef reset(self)


cdef class FixedFramer(StreamFramer):
    cdef readonly Py_ssize_t size
    cdef readonly object pad

    @cython.locals(buf=bytearray, work=bytes, frames=list, size=Py_ssize_t, n=Py_ssize_t, pos=Py_ssize_t)
    cpdef list feed(self, data)

    @cython.locals(data=bytes, n=Py_ssize_t)
    cpdef bytes encode(self, payload)


cdef class SlipFramer(StreamFramer):
    cdef readonly bint leading_end
    cdef Py_ssize_t _scan

    @cython.locals(buf=bytearray, work=bytes, n=Py_ssize_t)
    cpdef list feed(self, data)

    @cython.locals(
        frames=list, n=Py_ssize_t, maxb=Py_ssize_t, base=cython.longlong, pos=Py_ssize_t,
        scan=Py_ssize_t, idx=Py_ssize_t, raw_len=Py_ssize_t, frame=bytes, escapes=Py_ssize_t,
    )
    cdef list _split(self, bytes work)

    @cython.locals(data=bytes, n=Py_ssize_t)
    cpdef bytes encode(self, payload)

    cpdef reset(self)


cdef class RawFramer(StreamFramer):
    @cython.locals(work=bytes, n=Py_ssize_t, maxb=Py_ssize_t)
    cpdef list feed(self, data)

    cpdef bytes encode(self, payload)
