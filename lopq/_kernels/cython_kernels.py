"""Cython backend: the functions of `reference.py` on ahead-of-time compiled loops.

Distances use numpy's sgemm on row blocks and a compiled argmin. Per-cluster GEMM work
(projection, covariance) groups rows with numpy's stable argsort. Built by
``pip install .`` (setup.py compiles ``_cython.pyx``).
"""

import numpy as np

from . import _cython, reference
from .reference import code_dtype

#: Up to this dimension, distances are a fused C loop (measured faster than sgemm).
SMALL_D = 32
BLOCK_ROWS = 1024


def assign(X, C):
    """Nearest centroid; see `reference.assign`. Small d: fused C loop; large d: sgemm on
    row blocks + compiled argmin."""
    n, d = X.shape
    labels = np.empty(n, dtype=np.int32)
    sqdist = np.empty(n, dtype=np.float32)
    c_sqnorm = np.einsum("ij,ij->i", C, C)
    CT = np.ascontiguousarray(C.T)
    if d <= SMALL_D and _cython.FUSED_FAST:
        _cython.assign_fused(X, CT, c_sqnorm, labels, sqdist)
        return labels, sqdist
    for start in range(0, n, BLOCK_ROWS):
        stop = min(n, start + BLOCK_ROWS)
        G = X[start:stop] @ CT
        _cython.argmin_scores(X[start:stop], C, G, c_sqnorm, labels[start:stop],
                              sqdist[start:stop])
    return labels, sqdist


def encode_fine(P, codebooks):
    """Subquantizer codes; see `reference.encode_fine`. Fused C loop per subquantizer."""
    m, S, ds = codebooks.shape
    if ds > SMALL_D or not _cython.FUSED_FAST:
        return _encode_fine_gemm(P, codebooks)
    CBT = np.ascontiguousarray(codebooks.transpose(0, 2, 1))
    cb_sqnorm = np.einsum("msd,msd->ms", codebooks, codebooks)
    codes = np.empty((P.shape[0], m), dtype=np.int32)
    _cython.encode_fused(P, CBT, cb_sqnorm, codes)
    return codes.astype(code_dtype(S))


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
    for cluster in np.flatnonzero(np.diff(offsets)):
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
