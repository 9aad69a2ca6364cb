"""Cython backend: the functions of `reference.py` on ahead-of-time compiled loops.

Small-dimension distances (subquantizers) and the whole per-split encoding are fused C
loops (``_fused.h``); large-dimension distances use numpy's sgemm on row blocks and a
compiled argmin. Per-cluster work groups rows with numpy's stable argsort. Built by
``pip install .`` (setup.py compiles ``_cython.pyx``).
"""

import numpy as np

from . import _cython, reference
from .blas import small_gemms
from .reference import code_dtype

#: Which copy of the fused loops runs: "avx2" (8-wide FMA) or "portable" (4-wide; forced
#: by LOPQ_PORTABLE=1).
ISA = _cython.ISA
#: Up to this dimension, distances are a fused C loop (measured faster than sgemm on 100k
#: rows, k=256: with AVX2 up to d=32; on the portable path 20 ms against 26 ms at d=8,
#: even at d=16, 53 ms against 33 ms at d=32) ...
SMALL_D = 32 if ISA == "avx2" else 16
#: ... and, with AVX2, above it too while -2 C^T (d x k floats) stays this small (fits in
#: L2): measured 14 ms against 17 ms for sgemm at d=64, k=64 on 100k rows, but 2x slower
#: at k=1024. The portable loops lose to sgemm there (28 ms against 14 ms).
FUSED_MAX_FLOATS = 32768 if ISA == "avx2" else 0
SGEMM_BLOCK_ROWS = 1024


def assign(X, C):
    """Nearest centroid; see `reference.assign`. Small d or few centroids: fused C loop
    (reads X in place when only its rows are strided); else sgemm on row blocks +
    compiled argmin."""
    n, d = X.shape
    labels = np.empty(n, dtype=np.int32)
    sqdist = np.empty(n, dtype=np.float32)
    if d <= SMALL_D or d * C.shape[0] <= FUSED_MAX_FLOATS:
        CTm2, padded_sqnorm = score_columns(C)
        _cython.assign_fused(X, CTm2, padded_sqnorm, C, labels, sqdist)
        return labels, sqdist
    c_sqnorm = np.einsum("ij,ij->i", C, C)
    CT = np.ascontiguousarray(C.T)
    for start in range(0, n, SGEMM_BLOCK_ROWS):
        stop = min(n, start + SGEMM_BLOCK_ROWS)
        block = np.ascontiguousarray(X[start:stop])
        _cython.argmin_scores(block, C, block @ CT, c_sqnorm, labels[start:stop],
                              sqdist[start:stop])
    return labels, sqdist


def encode_fine(P, codebooks):
    """Subquantizer codes; see `reference.encode_fine`. Fused C loop per subquantizer."""
    m, S, ds = codebooks.shape
    if ds > SMALL_D:
        return _encode_fine_gemm(P, codebooks)
    CBTm2, padded_sqnorm = score_columns(codebooks)
    codes = np.empty((P.shape[0], m), dtype=np.int32)
    _cython.encode_fused(P, CBTm2, padded_sqnorm, codebooks, codes)
    return codes.astype(code_dtype(S))


def encode_split(X, C, R, mu, codebooks):
    """Coarse labels and fine codes of one split; see `lopq._kernels.encode_split`.

    One C loop per split does residual, rotation and all subquantizers for each row
    block of a cluster, so neither residuals nor projections exist as (n, h) arrays.
    Subvectors longer than SMALL_D take this module's kernels
    one after the other instead.
    """
    m, S, ds = codebooks.shape
    if ds > SMALL_D:
        return reference.encode_split(np.ascontiguousarray(X), C, R, mu, codebooks,
                                      assign=assign, project_residuals=project_residuals,
                                      encode_fine=encode_fine)
    n, h = X.shape
    V = C.shape[0]
    labels, _ = assign(X, C)
    order, offsets = reference.group_rows(labels, V)
    hp = padded_width(h)
    RT = np.zeros((V, h, hp), dtype=np.float32)
    RT[:, :, :h] = R.transpose(0, 2, 1)
    CBTm2, padded_sqnorm = score_columns(codebooks)
    codes = np.empty((n, m), dtype=np.int32)
    _cython.encode_grouped(X, order, offsets, C + mu, RT, CBTm2, padded_sqnorm, codes)
    return labels, codes.astype(code_dtype(S))


def padded_width(k):
    """``k`` rounded up to a multiple of the C loops' vector width (padded rows)."""
    width = _cython.VECTOR_WIDTH
    return -(-k // width) * width


def score_columns(books):
    """What the fused loops read for centroids ``books (..., k, d)``: ``-2 * books^T``
    (..., d, kp) and squared norms (..., kp), both float32 with k padded to a multiple of
    the vector width (padding: zero columns, NaN norms, which the loops never pick)."""
    k, d = books.shape[-2:]
    kp = padded_width(k)
    CTm2 = np.zeros(books.shape[:-2] + (d, kp), dtype=np.float32)
    CTm2[..., :k] = -2.0 * np.swapaxes(books, -1, -2)  # exact: a power-of-two scale
    padded_sqnorm = np.full(books.shape[:-2] + (kp,), np.nan, dtype=np.float32)
    padded_sqnorm[..., :k] = np.einsum("...kd,...kd->...k", books, books)
    return CTm2, padded_sqnorm


def _encode_fine_gemm(P, codebooks):
    return reference.encode_fine(P, codebooks, assign=assign)


def project_residuals(X, labels, C, R, mu):
    """Rotated residuals; see `reference.project_residuals`. One GEMM per cluster."""
    grouped, order = reference.project_grouped(X, labels, C, R, mu)
    P = np.empty_like(X)
    P[order] = grouped
    return P


def accumulate_covariance(residuals, labels, V):
    """Per-cluster covariance statistics; see `reference.accumulate_covariance`."""
    order, offsets = reference.group_rows(labels, V)
    grouped = residuals[order].astype(np.float64)
    d = residuals.shape[1]
    A = np.zeros((V, d, d))
    sums = np.zeros((V, d))
    clusters = np.flatnonzero(np.diff(offsets))
    with small_gemms(len(grouped) / max(len(clusters), 1) * d * d, len(clusters)):
        for cluster in clusters:
            g = grouped[offsets[cluster]:offsets[cluster + 1]]
            A[cluster] = g.T @ g
            sums[cluster] = g.sum(axis=0)
    return A, sums, np.diff(offsets).astype(np.int64)


def cluster_sums(X, labels, k):
    """Per-cluster sums and counts; see `reference.cluster_sums`."""
    sums = np.zeros((k, X.shape[1]))
    counts = np.zeros(k, dtype=np.int64)
    _cython.cluster_sums(X, labels, sums, counts)
    return sums, counts


def adc_tables(P, codebooks):
    """Distance tables; see `reference.adc_tables`."""
    m, S, _ = codebooks.shape
    tables = np.empty((P.shape[0], m, S), dtype=np.float32)
    _cython.adc_tables(P, codebooks, tables)
    return tables


def adc_scan(table, codes):
    """Code distances to one query; see `reference.adc_scan`."""
    out = np.empty(codes.shape[0], dtype=np.float32)
    if codes.dtype in (np.uint8, np.uint16):
        _cython.adc_scan(table, codes, out)
    else:
        out[:] = table[np.arange(table.shape[0])[None, :], codes].sum(axis=1)
    return out


def kmeanspp(X, first, uniforms):
    """Greedy k-means++ centres; see `reference.kmeanspp` (the numba loop: it runs on a
    sample of at most 32 rows per centre, and C would gain nothing measurable)."""
    from .numba_kernels import kmeanspp as compiled
    return compiled(X, first, uniforms)


def grouped_table_operands(Rs, books):
    """What the grouped table kernel (`_search.search_cells_grouped`) reads: rotations
    transposed with columns padded to the vector width, RTp (2, V, h, hp), and per split
    ``-2 books^T`` (2, M/2, ds, Sp) with the codebooks' squared norms (2, M/2, Sp), all
    float32. ``Rs`` (2, V, h, h); ``books`` (2, M/2, S, ds)."""
    RT = Rs.transpose(0, 1, 3, 2)
    RTp = np.zeros(RT.shape[:3] + (padded_width(RT.shape[3]),), dtype=np.float32)
    RTp[..., :RT.shape[3]] = RT
    CBTm2, sqnorm = score_columns(books)
    return RTp, CBTm2, sqnorm
