"""Numba kernels: the same functions as `reference.py`, compiled.

How they are faster than the reference:
- nearest centroid in small dimensions (subquantizers, d <= 16) is one loop per
  dimension d, compiled with d as a constant: LLVM unrolls the dimension loop and
  vectorises over 8 rows at a time, so each centroid costs d FMAs per 8 rows, with the
  running minimum in registers (no (n, k) score matrix). Larger d uses numpy's sgemm on
  row blocks, scores written transposed so that the argmin also vectorises over rows;
- per-cluster work (projection, covariance) groups rows with a counting sort and runs
  one GEMM per cluster.

Everything runs on the calling thread: Spark runs one task per core, and on one
machine the batches are too small for threads to pay (a parallel variant was never
selected and is gone). Every function expects float32 inputs whose rows have contiguous
columns (the dispatcher in `__init__` makes them so) and may receive read-only arrays.
The compiled loops are cached on disk (``cache=True``); where no cache can be written,
e.g. lopq imported from a zip, they compile once per process.
"""

import numpy as np

from . import reference
from ._jit import njit
from .blas import small_gemms

_OPTS = dict(cache=True, nogil=True, fastmath=True)
#: Rows per sgemm block of the large-dimension assignment (the reference's block size).
SGEMM_BLOCK_ROWS = 4096
#: Largest dimension the unrolled nearest-centroid loop takes (measured at k=256 on
#: 100k rows: d=4 3.8 ms, d=8 6.6 ms, d=16 11.3 ms, against numpy's 40-50 ms; at d=32 the
#: unrolled body no longer vectorises over rows and sgemm wins).
SMALL_D = 16
#: Rows transposed and scanned together by the small-dimension loop.
TILE_ROWS = 256


@njit(error_model="numpy", **_OPTS)
def _argmin_columns(GT, c_sqnorm, X, C, best, labels, sqdist):
    # GT (k, b) IN C @ X_block^T; X (b, d) IN the block's rows; best (b,) scratch;
    # OUT labels, sqdist (b,). Centroids outer, rows inner: the row loop vectorises (8
    # rows per instruction, a per-lane select keeps the running minimum); strict `<` in
    # centroid order keeps the lowest index on exact ties, and a row of NaN scores gets
    # centroid 0, as np.argmin gives.
    k, b = GT.shape
    d = X.shape[1]
    for i in range(b):
        best[i] = np.inf
        labels[i] = 0
    for c in range(k):
        norm = c_sqnorm[c]
        for i in range(b):
            s = norm - np.float32(2.0) * GT[c, i]
            if s < best[i]:
                best[i] = s
                labels[i] = c
    for i in range(b):
        c = labels[i]
        acc = np.float32(0.0)
        for j in range(d):
            diff = X[i, j] - C[c, j]
            acc += diff * diff
        sqdist[i] = acc


def _make_nearest(d):
    """The nearest-centroid loop for dimension ``d``, compiled with d a constant (a
    closure variable), in chunks of 8 dimensions so that LLVM unrolls each chunk."""
    chunks, rest = divmod(d, 8)

    @njit(error_model="numpy", **_OPTS)
    def nearest(X, CTm2, c_sqnorm, C, labels, sqdist):
        # X (n, d) IN rows (columns contiguous); CTm2 (d, k) IN -2 C^T; c_sqnorm (k,);
        # C (k, d) for the exact distances; OUT labels (n,) int32, sqdist (n,) float32.
        n = X.shape[0]
        k = CTm2.shape[1]
        XT = np.empty((d, TILE_ROWS), dtype=np.float32)
        best = np.empty(TILE_ROWS, dtype=np.float32)
        label = np.empty(TILE_ROWS, dtype=np.int32)
        for start in range(0, n, TILE_ROWS):
            b = min(TILE_ROWS, n - start)
            for r in range(b):
                for t in range(d):
                    XT[t, r] = X[start + r, t]
                best[r] = np.inf
                label[r] = 0
            for c in range(k):
                norm = c_sqnorm[c]
                for r in range(b):  # vectorised: 8 rows per instruction
                    acc = norm
                    for u in range(chunks):
                        part = np.float32(0.0)
                        for t in range(8):
                            part += CTm2[u * 8 + t, c] * XT[u * 8 + t, r]
                        acc += part
                    for t in range(chunks * 8, chunks * 8 + rest):
                        acc += CTm2[t, c] * XT[t, r]
                    if acc < best[r]:  # strict: the lowest index wins ties, as argmin
                        best[r] = acc
                        label[r] = c
            for r in range(b):
                c = label[r]
                labels[start + r] = c
                dist = np.float32(0.0)
                for t in range(d):
                    diff = XT[t, r] - C[c, t]
                    dist += diff * diff
                sqdist[start + r] = dist
    return nearest


_NEAREST = {}


def _nearest_for(d):
    kernel = _NEAREST.get(d)
    if kernel is None:
        kernel = _NEAREST[d] = _make_nearest(d)
    return kernel


def assign(X, C):
    """Nearest centroid; see `reference.assign`. X (n, d), C (k, d) float32.

    d <= SMALL_D: the unrolled loop above; larger d: sgemm on row blocks, then a compiled
    argmin over the transposed scores.
    """
    n, d = X.shape
    labels = np.empty(n, dtype=np.int32)
    sqdist = np.empty(n, dtype=np.float32)
    if n == 0:
        return labels, sqdist
    c_sqnorm = np.einsum("ij,ij->i", C, C)
    if d <= SMALL_D:
        CTm2 = np.ascontiguousarray(-2.0 * C.T, dtype=np.float32)  # exact: a power of 2
        _nearest_for(d)(X, CTm2, c_sqnorm, C, labels, sqdist)
        return labels, sqdist
    # sgemm writes the scores transposed, (k, rows), so the argmin runs along rows.
    k = C.shape[0]
    flat = np.empty(k * min(n, SGEMM_BLOCK_ROWS), dtype=np.float32)
    best = np.empty(min(n, SGEMM_BLOCK_ROWS), dtype=np.float32)
    for start in range(0, n, SGEMM_BLOCK_ROWS):
        stop = min(n, start + SGEMM_BLOCK_ROWS)
        GT = flat[:k * (stop - start)].reshape(k, stop - start)
        np.dot(C, X[start:stop].T, out=GT)
        _argmin_columns(GT, c_sqnorm, X[start:stop], C, best, labels[start:stop],
                        sqdist[start:stop])
    # sgemm may round equal centroids' scores differently (its kernels differ at tile
    # edges), so a duplicated centroid could win over its first copy: map every label to
    # the lowest index holding the same centroid, as the exact loops and np.argmin do
    _, first, inverse = np.unique(C, axis=0, return_index=True, return_inverse=True)
    lowest = first[inverse.ravel()]
    if np.any(lowest != np.arange(k)):
        labels = lowest[labels].astype(np.int32)
    return labels, sqdist


def encode_fine(P, codebooks):
    """Subquantizer codes; see `reference.encode_fine`. Each subquantizer reads its
    columns of P in place."""
    n = P.shape[0]
    m, S, ds = codebooks.shape
    codes = np.empty((n, m), dtype=reference.code_dtype(S))
    for j in range(m):
        codes[:, j] = assign(P[:, j * ds:(j + 1) * ds], codebooks[j])[0]
    return codes


@njit(**_OPTS)
def _counting_sort(labels, k):
    """Stable order of rows grouped by label, and group offsets (k + 1,)."""
    offsets = np.zeros(k + 1, dtype=np.int64)
    for i in range(labels.shape[0]):
        offsets[labels[i] + 1] += 1
    for c in range(k):
        offsets[c + 1] += offsets[c]
    cursor = offsets[:-1].copy()
    order = np.empty(labels.shape[0], dtype=np.int64)
    for i in range(labels.shape[0]):
        c = labels[i]
        order[cursor[c]] = i
        cursor[c] += 1
    return order, offsets


@njit(**_OPTS)
def _gather_centred(X, order, labels, C, mu, out):
    # out[r] = X[order[r]] - C[label] - mu[label], rows grouped by cluster
    d = X.shape[1]
    for r in range(order.shape[0]):
        i = order[r]
        c = labels[i]
        for j in range(d):
            out[r, j] = X[i, j] - C[c, j] - mu[c, j]


@njit(**_OPTS)
def _scatter_rows(src, order, dst):
    for r in range(order.shape[0]):
        dst[order[r]] = src[r]


def project_residuals(X, labels, C, R, mu):
    """Rotated residuals; see `reference.project_residuals`. One GEMM per cluster."""
    n, d = X.shape
    V = C.shape[0]
    order, offsets = _counting_sort(labels, V)
    centred = np.empty((n, d), dtype=np.float32)
    _gather_centred(X, order, labels, C, mu, centred)
    projected = np.empty((n, d), dtype=np.float32)
    for cluster in np.flatnonzero(np.diff(offsets)):
        lo, hi = offsets[cluster], offsets[cluster + 1]
        np.dot(centred[lo:hi], R[cluster].T, out=projected[lo:hi])
    P = np.empty((n, d), dtype=np.float32)
    _scatter_rows(projected, order, P)
    return P


def encode_split(X, C, R, mu, codebooks):
    """Coarse labels and fine codes of one split; see `reference.encode_split`, on this
    module's kernels."""
    return reference.encode_split(np.ascontiguousarray(X), C, R, mu, codebooks,
                                  assign=assign, project_residuals=project_residuals,
                                  encode_fine=encode_fine)


@njit(**_OPTS)
def _gather_float64(X, order, out):
    for r in range(order.shape[0]):
        i = order[r]
        for j in range(X.shape[1]):
            out[r, j] = X[i, j]


def accumulate_covariance(residuals, labels, V):
    """Per-cluster covariance statistics; see `reference.accumulate_covariance`."""
    n, d = residuals.shape
    order, offsets = _counting_sort(labels, V)
    grouped = np.empty((n, d), dtype=np.float64)
    _gather_float64(residuals, order, grouped)
    A = np.zeros((V, d, d))
    sums = np.zeros((V, d))
    clusters = np.flatnonzero(np.diff(offsets))
    with small_gemms(n / max(len(clusters), 1) * d * d, len(clusters)):
        for cluster in clusters:
            g = grouped[offsets[cluster]:offsets[cluster + 1]]
            np.dot(g.T, g, out=A[cluster])
            sums[cluster] = g.sum(axis=0)
    return A, sums, np.diff(offsets)


@njit(**_OPTS)
def _cluster_sums_kernel(X, labels, sums, counts):
    for i in range(X.shape[0]):
        c = labels[i]
        counts[c] += 1
        for j in range(X.shape[1]):
            sums[c, j] += X[i, j]


def cluster_sums(X, labels, k):
    """Per-cluster sums (float64) and counts (int64); see `reference.cluster_sums`."""
    sums = np.zeros((k, X.shape[1]))
    counts = np.zeros(k, dtype=np.int64)
    _cluster_sums_kernel(X, labels, sums, counts)
    return sums, counts


@njit(**_OPTS)
def _adc_tables_kernel(P, codebooks, tables):
    q = P.shape[0]
    m, S, ds = codebooks.shape
    for i in range(q):
        for j in range(m):
            for s in range(S):
                acc = 0.0
                for t in range(ds):
                    diff = P[i, j * ds + t] - codebooks[j, s, t]
                    acc += diff * diff
                tables[i, j, s] = acc


def adc_tables(P, codebooks):
    """Asymmetric distance tables; see `reference.adc_tables`."""
    m, S, _ = codebooks.shape
    tables = np.empty((P.shape[0], m, S), dtype=np.float32)
    _adc_tables_kernel(P, codebooks, tables)
    return tables


@njit(**_OPTS)
def _adc_scan_kernel(table, codes, out):
    m = table.shape[0]
    for i in range(codes.shape[0]):
        acc = np.float32(0.0)
        for j in range(m):
            acc += table[j, codes[i, j]]
        out[i] = acc


def adc_scan(table, codes):
    """Asymmetric distances of codes to one query; see `reference.adc_scan`."""
    out = np.empty(codes.shape[0], dtype=np.float32)
    _adc_scan_kernel(table, codes, out)
    return out


@njit(**_OPTS)
def _sqdist_to_point(XT, p, out):
    # XT (d, n) IN transposed rows, so the inner loop runs (vectorised) over rows
    d, n = XT.shape
    for i in range(n):
        out[i] = 0.0
    for j in range(d):
        pj = p[j]
        for i in range(n):
            diff = XT[j, i] - pj
            out[i] += diff * diff


@njit(**_OPTS)
def _potential(closest, candidate):
    pot = 0.0
    for i in range(closest.shape[0]):
        pot += min(closest[i], candidate[i])
    return pot


@njit(cache=True, nogil=True)
def _kmeanspp_kernel(X, XT, k, first, uniforms, centers):
    # X (n, d) IN float32 and XT its transpose; first IN index of the first centre;
    # uniforms (k-1, trials) IN in [0, 1); centers (k, d) OUT. Greedy k-means++: of
    # `trials` candidates drawn with probability proportional to D(x)^2, keep the one
    # that lowers the potential most.
    n, d = X.shape
    trials = uniforms.shape[1]
    closest = np.empty(n, dtype=np.float32)
    _sqdist_to_point(XT, X[first], closest)
    centers[0] = X[first]
    cand_dist = np.empty((trials, n), dtype=np.float32)
    cumulative = np.empty(n, dtype=np.float64)
    for c in range(1, k):
        total = 0.0
        for i in range(n):
            total += closest[i]
            cumulative[i] = total
        best_trial = 0
        best_pot = np.inf
        best_idx = 0
        for t in range(trials):
            if total > 0.0:
                idx = np.searchsorted(cumulative, uniforms[c - 1, t] * total)
                idx = min(idx, n - 1)
            else:  # every point already is a centre: any point will do
                idx = int(uniforms[c - 1, t] * n)
            _sqdist_to_point(XT, X[idx], cand_dist[t])
            pot = _potential(closest, cand_dist[t])
            if pot < best_pot:
                best_pot = pot
                best_trial = t
                best_idx = idx
        centers[c] = X[best_idx]
        for i in range(n):
            closest[i] = min(closest[i], cand_dist[best_trial, i])


def kmeanspp(X, first, uniforms):
    """Greedy k-means++ centres; see `reference.kmeanspp`."""
    centers = np.empty((uniforms.shape[0] + 1, X.shape[1]), dtype=np.float32)
    _kmeanspp_kernel(X, np.ascontiguousarray(X.T), centers.shape[0], first, uniforms,
                     centers)
    return centers
