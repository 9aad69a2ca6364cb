# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Ahead-of-time compiled kernels (Cython): fused loops that release the GIL.

Same functions as `reference.py`; `cython_kernels.py` wraps them. Arguments are marked
IN / OUT. Float32 only: the dispatcher converts inputs once at the boundary.
"""


import os

import numpy as np

cdef extern from "_fused_api.h" nogil:
    int LOPQ_W
    int lopq_select_isa(int allow_avx2)
    int lopq_assign_fused(const float *X, Py_ssize_t n, Py_ssize_t d, Py_ssize_t row_stride,
                          const float *CTm2, Py_ssize_t kp, const float *c_sqnorm,
                          const float *C, int *labels, Py_ssize_t label_stride, float *sqdist)
    int lopq_encode_grouped(const float *X, Py_ssize_t h, Py_ssize_t row_stride,
                            const long long *order, const long long *offsets, Py_ssize_t V,
                            const float *shift, const float *RT, Py_ssize_t hp,
                            const float *CBTm2, Py_ssize_t m, Py_ssize_t ds, Py_ssize_t Sp,
                            const float *cb_sqnorm, int *codes)
    int lopq_argmin_scores(const float *G, Py_ssize_t b, Py_ssize_t k, const float *c_sqnorm,
                           const float *X, Py_ssize_t d, const float *C, int *labels,
                           float *sqdist)


#: The copy of the fused loops this process runs: "avx2" where the CPU has AVX2 and FMA,
#: else (or with the environment variable LOPQ_PORTABLE=1) "portable".
ISA = "avx2" if lopq_select_isa(os.environ.get("LOPQ_PORTABLE", "") != "1") else "portable"
#: Floats per vector register: column counts given to the fused loops are padded to this.
VECTOR_WIDTH = LOPQ_W


cdef Py_ssize_t _row_stride(const float[:, :] X) except -1:
    """Row stride of X in floats; its columns must be contiguous (a column slice of a
    C-contiguous array is fine: the fused loops read it in place)."""
    if X.shape[1] > 1 and X.strides[1] != sizeof(float):
        raise ValueError("rows must have contiguous columns")
    return X.strides[0] // sizeof(float)


def assign_fused(const float[:, :] X,          # IN (n, d), columns contiguous
                 const float[:, ::1] CTm2,     # IN (d, kp) -2 * transposed centroids, padded
                 const float[::1] c_sqnorm,    # IN (kp,) squared norms, padding NaN
                 const float[:, ::1] C,        # IN (k, d) centroids
                 int[::1] labels,              # OUT (n,)
                 float[::1] sqdist):           # OUT (n,)
    """Nearest centroid for small d by the fused C loop of _fused.h."""
    cdef Py_ssize_t n = X.shape[0], stride = _row_stride(X)
    cdef int status
    if n == 0:
        return
    with nogil:
        status = lopq_assign_fused(&X[0, 0], n, X.shape[1], stride, &CTm2[0, 0],
                                   CTm2.shape[1], &c_sqnorm[0], &C[0, 0], &labels[0], 1,
                                   &sqdist[0])
    if status:
        raise MemoryError("lopq_assign_fused: no memory for scratch scores")


def encode_fused(const float[:, ::1] P,            # IN (n, m * ds)
                 const float[:, :, ::1] CBTm2,     # IN (m, ds, Sp) -2 * transposed codebooks
                 const float[:, ::1] cb_sqnorm,    # IN (m, Sp) squared norms, padding NaN
                 const float[:, :, ::1] codebooks, # IN (m, S, ds)
                 int[:, ::1] codes):               # OUT (n, m)
    """Fine codes: the fused C loop per subquantizer, reading P in place (strided)."""
    cdef Py_ssize_t n = P.shape[0], m = CBTm2.shape[0], ds = CBTm2.shape[1]
    cdef Py_ssize_t j
    cdef int status = 0
    if n == 0:
        return
    with nogil:
        for j in range(m):
            status |= lopq_assign_fused(&P[0, j * ds], n, ds, P.shape[1], &CBTm2[j, 0, 0],
                                        CBTm2.shape[2], &cb_sqnorm[j, 0], &codebooks[j, 0, 0],
                                        &codes[0, j], m, NULL)
    if status:
        raise MemoryError("lopq_assign_fused: no memory for scratch scores")


def encode_grouped(const float[:, :] X,              # IN (n, h) one split, columns contiguous
                   const long long[::1] order,       # IN (n,) rows grouped by cluster
                   const long long[::1] offsets,     # IN (V + 1,) group boundaries
                   const float[:, ::1] shift,        # IN (V, h) centroid + mean residual
                   const float[:, :, ::1] RT,        # IN (V, h, hp) transposed rotations
                   const float[:, :, ::1] CBTm2,     # IN (m, ds, Sp) -2 * transposed books
                   const float[:, ::1] cb_sqnorm,    # IN (m, Sp) squared norms, pad NaN
                   int[:, ::1] codes):               # OUT (n, m)
    """Fine codes of one split: residual, rotation and every subquantizer in one C loop."""
    cdef int status
    cdef Py_ssize_t stride = _row_stride(X)
    if X.shape[0] == 0:
        return
    with nogil:
        status = lopq_encode_grouped(&X[0, 0], X.shape[1], stride, &order[0], &offsets[0],
                                     shift.shape[0], &shift[0, 0], &RT[0, 0, 0], RT.shape[2],
                                     &CBTm2[0, 0, 0], CBTm2.shape[0], CBTm2.shape[1],
                                     CBTm2.shape[2], &cb_sqnorm[0, 0], &codes[0, 0])
    if status:
        raise MemoryError("lopq_encode_grouped: no memory for scratch buffers")


def argmin_scores(const float[:, ::1] X,       # IN (b, d)
                  const float[:, ::1] C,       # IN (k, d)
                  const float[:, ::1] G,       # IN (b, k) = X @ C.T
                  const float[::1] c_sqnorm,   # IN (k,)
                  int[::1] labels,             # OUT (b,)
                  float[::1] sqdist):          # OUT (b,)
    """Argmin of |c|^2 - 2 x.c over a precomputed GEMM block (vectorised C loop of
    _fused.h), then exact distances."""
    cdef int status
    if G.shape[0] == 0:
        return
    with nogil:
        status = lopq_argmin_scores(&G[0, 0], G.shape[0], G.shape[1], &c_sqnorm[0],
                                    &X[0, 0], X.shape[1], &C[0, 0], &labels[0], &sqdist[0])
    if status:
        raise MemoryError("lopq_argmin_scores: no memory for scratch scores")


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


ctypedef fused code_t:
    unsigned char
    unsigned short


def adc_scan(const float[:, ::1] table,       # IN (m, S)
             const code_t[:, ::1] codes,      # IN (n, m) uint8 or uint16
             float[::1] out):                 # OUT (n,)
    """Sum of table lookups per code row."""
    cdef Py_ssize_t n = codes.shape[0], m = codes.shape[1], i, j
    cdef float acc
    with nogil:
        for i in range(n):
            acc = 0.0
            for j in range(m):
                acc = acc + table[j, codes[i, j]]
            out[i] = acc
