# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled reading of the default data format's lines (``id<TAB>base64(pickle)``) whose
pickle has a layout `lopq.formats.VectorPickleLayout` learned and verified.

`decode_run` is `VectorPickleLayout.array_bytes` applied to consecutive lines, in C: it
base64-decodes each payload, checks the learned prefix and suffix and the one string
argument between them, and copies that argument's bytes (the array's bytes) into a row of
the output. It stops at the first line it does not accept; the caller sends that line
down the full, safe path. It accepts no more than the Python path does (anything unusual,
e.g. an escape the learned pickles never use, is left to the Python path), so what
it reads is exactly what the restricted unpickler would build, and it runs nothing.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcmp, memcpy

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t *size) except NULL

#: Layout kinds (the framing of the string opcode's argument), as in lopq.formats.
KIND_BYTES, KIND_UTF8, KIND_UNICODE_LINE, KIND_STRING_LINE = 0, 1, 2, 3

cdef signed char B64[256]
# The same decoding as four tables of shifted 24-bit values: one quad of characters is
# ``T0[a] | T1[b] | T2[c] | T3[d]`` (the scalar-table trick of fast base64 decoders);
# a character outside the alphabet sets bit 24 in every table, checked once per line.
cdef unsigned int T0[256]
cdef unsigned int T1[256]
cdef unsigned int T2[256]
cdef unsigned int T3[256]
cdef const unsigned char *_ALPHABET = \
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
cdef int _i
for _i in range(256):
    B64[_i] = -1
    T0[_i] = T1[_i] = T2[_i] = T3[_i] = 1 << 24
for _i in range(64):
    B64[_ALPHABET[_i]] = _i
    T0[_ALPHABET[_i]] = <unsigned int>_i << 18
    T1[_ALPHABET[_i]] = <unsigned int>_i << 12
    T2[_ALPHABET[_i]] = <unsigned int>_i << 6
    T3[_ALPHABET[_i]] = <unsigned int>_i


cdef Py_ssize_t _b64decode(const unsigned char *s, Py_ssize_t n,
                           unsigned char *out) noexcept nogil:
    """Strict base64: a multiple of 4 characters of the standard alphabet, at most two
    '=' at the very end, unused bits zero. Returns the decoded length, or -1."""
    cdef Py_ssize_t i, o = 0, pad = 0, full
    cdef int a, b, c
    cdef unsigned int v, bad = 0
    if n % 4:
        return -1
    if n and s[n - 1] == 61:  # '='
        pad = 2 if s[n - 2] == 61 else 1
    full = n - 4 if pad else n  # the quads without padding
    for i in range(0, full, 4):
        v = T0[s[i]] | T1[s[i + 1]] | T2[s[i + 2]] | T3[s[i + 3]]
        bad |= v
        out[o] = <unsigned char>(v >> 16)
        out[o + 1] = <unsigned char>(v >> 8)
        out[o + 2] = <unsigned char>v
        o += 3
    if bad >> 24:
        return -1
    if not pad:
        return o
    a = B64[s[full]]
    b = B64[s[full + 1]]
    if a < 0 or b < 0:
        return -1
    out[o] = <unsigned char>((a << 2) | (b >> 4))
    o += 1
    if pad == 2:
        return -1 if b & 15 else o
    c = B64[s[full + 2]]
    if c < 0 or c & 3:
        return -1
    out[o] = <unsigned char>(((b & 15) << 4) | (c >> 2))
    return o + 1


#: Hex digit values (-1: not a digit) and the one-letter escapes repr() writes in a
#: Python 2 string literal (-1: any other, left to the Python path).
cdef signed char HEX[256]
cdef short ESCAPED[256]
for _i in range(256):
    HEX[_i] = -1
    ESCAPED[_i] = -1
for _i in range(10):
    HEX[48 + _i] = _i
for _i in range(6):
    HEX[97 + _i] = HEX[65 + _i] = 10 + _i
for _i in (92, 39, 34):
    ESCAPED[_i] = _i
ESCAPED[110], ESCAPED[114], ESCAPED[116] = 10, 13, 9


cdef Py_ssize_t _argument(const unsigned char *body, Py_ssize_t n, int kind,
                          int length_bytes, unsigned char *out,
                          Py_ssize_t nbytes) noexcept nogil:
    """The array bytes held by the string opcode's argument ``body`` (framed as
    ``kind`` says) written to ``out``; returns how many, or -1 where the Python path
    might read it otherwise."""
    cdef Py_ssize_t i, o = 0, run, size = 0
    cdef int k, v, h
    cdef unsigned char ch, quote
    if kind == 0 or kind == 1:  # length-prefixed
        if n < length_bytes:
            return -1
        for k in range(length_bytes - 1, -1, -1):
            size = (size << 8) | body[k]
        if size != n - length_bytes:
            return -1
        body += length_bytes
        n -= length_bytes
        if kind == 0:
            if n != nbytes:
                return -1
            memcpy(out, body, n)
            return n
        i = 0
        while i < n:  # UTF-8 of latin-1 text: 1 byte below 0x80, else C2/C3 + one
            ch = body[i]
            if o == nbytes:
                return -1
            if ch < 0x80:
                out[o] = ch
                i += 1
            elif (ch == 0xC2 or ch == 0xC3) and i + 1 < n and (body[i + 1] & 0xC0) == 0x80:
                out[o] = <unsigned char>(((ch & 0x1F) << 6) | (body[i + 1] & 0x3F))
                i += 2
            else:
                return -1
            o += 1
        return o
    # newline-terminated: the opcode reads up to its first newline
    if n < 1 or body[n - 1] != 10 or memchr(body, 10, n - 1) != NULL:
        return -1
    n -= 1
    if kind == 2:  # raw-unicode-escape, latin-1 range
        i = 0
        while i < n:
            ch = body[i]
            if ch != 92:  # not a backslash: the byte itself
                if o == nbytes:
                    return -1
                out[o] = ch
                o += 1
                i += 1
                continue
            run = 0
            while i + run < n and body[i + run] == 92:
                run += 1
            if o + run > nbytes:
                return -1
            if run % 2 == 0 or i + run >= n or \
                    (body[i + run] != 117 and body[i + run] != 85):
                for k in range(run):  # backslashes that start no escape are literal
                    out[o + k] = 92
                o += run
                i += run
                continue
            if body[i + run] != 117:
                return -1  # \U: the Python path decides
            for k in range(run - 1):  # an odd run: its last backslash starts \uXXXX
                out[o + k] = 92
            o += run - 1
            i += run + 1
            if i + 4 > n or o == nbytes:
                return -1
            v = 0
            for k in range(4):
                h = HEX[body[i + k]]
                if h < 0:
                    return -1
                v = (v << 4) | h
            if v > 255:
                return -1
            out[o] = <unsigned char>v
            o += 1
            i += 4
        return o
    # kind 3: a quoted Python 2 string literal with the escapes repr() writes
    if n < 2:
        return -1
    quote = body[0]
    if (quote != 39 and quote != 34) or body[n - 1] != quote:
        return -1
    i = 1
    n -= 1  # the closing quote
    while i < n:
        if o == nbytes:
            return -1
        ch = body[i]
        if ch != 92:
            out[o] = ch
            o += 1
            i += 1
            continue
        if i + 1 >= n:
            return -1
        ch = body[i + 1]
        if ch == 120:  # \xhh, most bytes of a float array
            if i + 3 >= n:
                return -1
            h = HEX[body[i + 2]]
            v = HEX[body[i + 3]]
            if (h | v) < 0:
                return -1
            out[o] = <unsigned char>((h << 4) | v)
            o += 1
            i += 4
            continue
        v = ESCAPED[ch]
        if v < 0:
            return -1  # other escapes: the Python path reads them
        out[o] = <unsigned char>v
        o += 1
        i += 2
    return o


def decode_run(list lines, Py_ssize_t start, Py_ssize_t stop, bytes prefix,
               bytes suffix, int kind, int length_bytes, unsigned char[:, ::1] out):
    """Decode ``lines[start:stop]`` while they match the layout.

    Args:
        lines: list of str, ``id<TAB>base64(pickle)`` (trailing CR/LF ignored).
        prefix, suffix, kind, length_bytes: the learned `VectorPickleLayout`.
        out: (stop - start, nbytes) uint8, OUT: row i gets line start + i's array bytes.

    Returns:
        (count, keys): the first ``count`` lines matched (row i of ``out`` holds the
        array bytes of line ``start + i``); ``keys`` their ids (str).
    """
    cdef Py_ssize_t nbytes = out.shape[1], n, tab, size, got, count = 0, line_index
    cdef Py_ssize_t head = PyBytes_GET_SIZE(prefix), tail = PyBytes_GET_SIZE(suffix)
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(prefix)
    cdef const unsigned char *q = <const unsigned char *>PyBytes_AS_STRING(suffix)
    cdef const unsigned char *s
    cdef const void *found
    cdef unsigned char *raw = NULL
    cdef Py_ssize_t capacity = 0
    keys = []
    if out.shape[0] < stop - start:
        raise ValueError("out has fewer rows than lines")
    try:
        for line_index in range(start, stop):
            line = lines[line_index]
            if type(line) is not str:
                break
            try:
                s = <const unsigned char *>PyUnicode_AsUTF8AndSize(line, &n)
            except UnicodeEncodeError:  # a lone surrogate: the Python path names it
                break
            while n and (s[n - 1] == 10 or s[n - 1] == 13):
                n -= 1
            found = memchr(s, 9, n)
            if found == NULL:
                break
            tab = <const unsigned char *>found - s
            size = n - tab - 1
            if size // 4 * 3 > capacity:
                free(raw)
                capacity = size // 4 * 3 + 64
                raw = <unsigned char *>malloc(capacity)
                if raw == NULL:
                    raise MemoryError()
            got = _b64decode(s + tab + 1, size, raw)
            if got < head + tail or memcmp(raw, p, head) or \
                    memcmp(raw + got - tail, q, tail):
                break
            if _argument(raw + head, got - head - tail, kind, length_bytes,
                         &out[count, 0], nbytes) != nbytes:
                break
            keys.append(PyUnicode_DecodeUTF8(<const char *>s, tab, NULL))
            count += 1
    finally:
        free(raw)
    return count, keys
