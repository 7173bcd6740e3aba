# C declarations for fluxrig/wal/crc32c_py.py, compiled with it as fluxrig.wal.crc32c_c.
# The .py stays the one source; this file only adds C types: the lookup table becomes a C
# array and the byte loops run over a typed memoryview with C-integer locals. The zero-operator
# tables (crc32c_shift) stay Python lists: they are used a few times per resync, not per byte.

cimport cython

cdef unsigned int _MASK
cdef unsigned int _TABLE[256]


@cython.locals(view="const unsigned char[:]", c="unsigned int", n=Py_ssize_t, i=Py_ssize_t)
cpdef unsigned int crc32c(data, unsigned long long crc=*) except? 0xFFFFFFFF


@cython.locals(view="const unsigned char[:]", outv="unsigned int[:]", c="unsigned int", n=Py_ssize_t, i=Py_ssize_t)
cpdef unsigned int crc32c_prefix(data, out, unsigned long long crc=*) except? 0xFFFFFFFF
