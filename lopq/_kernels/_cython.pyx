# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Ahead-of-time compiled kernels (Cython): fused loops that release the GIL.

Same functions as `reference.py`; `cython_kernels.py` wraps them. Arguments are marked
IN / OUT. Float32 only: the dispatcher converts inputs once at the boundary.
"""


import numpy as np


def argmin_scores(const float[:, ::1] X,       # IN (b, d)
                  const float[:, ::1] C,       # IN (k, d)
                  const float[:, ::1] G,       # IN (b, k) = X @ C.T
                  const float[::1] c_sqnorm,   # IN (k,)
                  int[::1] labels,             # OUT (b,)
                  float[::1] sqdist):          # OUT (b,)
    """Argmin of |c|^2 - 2 x.c over a precomputed GEMM block, then exact distances."""
    cdef Py_ssize_t b = G.shape[0], k = G.shape[1], d = X.shape[1]
    cdef Py_ssize_t i, j, c, best
    cdef float s, best_score, acc, diff
    with nogil:
        for i in range(b):
            best = 0
            best_score = c_sqnorm[0] - 2.0 * G[i, 0]
            for c in range(1, k):
                s = c_sqnorm[c] - 2.0 * G[i, c]
                if s < best_score:
                    best_score = s
                    best = c
            labels[i] = <int>best
            acc = 0.0
            for j in range(d):
                diff = X[i, j] - C[best, j]
                acc = acc + diff * diff
            sqdist[i] = acc


def argmin_codes(const float[:, ::1] G,      # IN (b, S) block of P_j @ codebook_j.T
                 const float[::1] c_sqnorm,    # IN (S,)
                 int[::1] out):                # OUT (b,) codes of subquantizer j
    """Argmin of |c|^2 - 2 p.c per row of a precomputed GEMM block."""
    cdef Py_ssize_t b = G.shape[0], S = G.shape[1], i, c, best
    cdef float s, best_score
    with nogil:
        for i in range(b):
            best = 0
            best_score = c_sqnorm[0] - 2.0 * G[i, 0]
            for c in range(1, S):
                s = c_sqnorm[c] - 2.0 * G[i, c]
                if s < best_score:
                    best_score = s
                    best = c
            out[i] = <int>best


def cluster_sums(const float[:, ::1] X,       # IN (n, d)
                 const int[::1] labels,       # IN (n,)
                 double[:, ::1] sums,         # INOUT (k, d)
                 long long[::1] counts):      # INOUT (k,)
    """Per-cluster sums (float64) and counts."""
    cdef Py_ssize_t n = X.shape[0], d = X.shape[1], i, j
    cdef int c
    with nogil:
        for i in range(n):
            c = labels[i]
            counts[c] += 1
            for j in range(d):
                sums[c, j] += X[i, j]


def adc_tables(const float[:, ::1] P,             # IN (q, m*ds)
               const float[:, :, ::1] codebooks,  # IN (m, S, ds)
               float[:, :, ::1] tables):          # OUT (q, m, S)
    """Squared distances of each query subvector to each subquantizer centroid."""
    cdef Py_ssize_t q = P.shape[0], m = codebooks.shape[0], S = codebooks.shape[1]
    cdef Py_ssize_t ds = codebooks.shape[2], i, j, s, t
    cdef float acc, diff
    with nogil:
        for i in range(q):
            for j in range(m):
                for s in range(S):
                    acc = 0.0
                    for t in range(ds):
                        diff = P[i, j * ds + t] - codebooks[j, s, t]
                        acc = acc + diff * diff
                    tables[i, j, s] = acc


def adc_scan_u8(const float[:, ::1] table,    # IN (m, S)
                const unsigned char[:, ::1] codes,  # IN (n, m)
                float[::1] out):              # OUT (n,)
    """Sum of table lookups per code row."""
    cdef Py_ssize_t n = codes.shape[0], m = codes.shape[1], i, j
    cdef float acc
    with nogil:
        for i in range(n):
            acc = 0.0
            for j in range(m):
                acc = acc + table[j, codes[i, j]]
            out[i] = acc


def adc_scan_u16(const float[:, ::1] table,   # IN (m, S)
                 const unsigned short[:, ::1] codes,  # IN (n, m)
                 float[::1] out):             # OUT (n,)
    """Sum of table lookups per code row (uint16 codes)."""
    cdef Py_ssize_t n = codes.shape[0], m = codes.shape[1], i, j
    cdef float acc
    with nogil:
        for i in range(n):
            acc = 0.0
            for j in range(m):
                acc = acc + table[j, codes[i, j]]
            out[i] = acc
