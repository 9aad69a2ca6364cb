"""Plain numpy reference kernels: the specification of every hot path.

Read this file first. Each function works on a *batch* of rows and is written to be
obviously correct rather than fast; the compiled kernels in this package compute the
same thing and are tested against these functions.

Conventions: ``X : (n, d) float32`` C-contiguous; labels are ``int32``; squared
distances are ``float32``; accumulators are ``float64``.
"""

import numpy as np

from .blas import small_gemms

#: Rows per block in distance computations: bounds the (block, k) temporary.
DISTANCE_BLOCK_ROWS = 4096


def assign(X, C):
    """Nearest centroid of every row.

    Args:
        X: (n, d) float32 rows.
        C: (k, d) float32 centroids, k >= 1.

    Returns:
        labels: (n,) int32 index of the nearest centroid (lowest index on exact ties).
        sqdist: (n,) float32 squared Euclidean distance to that centroid.
    """
    n = X.shape[0]
    labels = np.empty(n, dtype=np.int32)
    sqdist = np.empty(n, dtype=np.float32)
    c_sqnorm = np.einsum("ij,ij->i", C, C)
    for start in range(0, n, DISTANCE_BLOCK_ROWS):
        block = X[start:start + DISTANCE_BLOCK_ROWS]
        # |x|^2 is the same for every centroid, so it does not change the argmin.
        scores = c_sqnorm[None, :] - 2.0 * (block @ C.T)
        best = np.argmin(scores, axis=1)
        labels[start:start + DISTANCE_BLOCK_ROWS] = best
        diff = block - C[best]
        sqdist[start:start + DISTANCE_BLOCK_ROWS] = np.einsum("ij,ij->i", diff, diff)
    return labels, sqdist


def project_residuals(X, labels, C, R, mu):
    """Rotated residuals in the local frame of each row's coarse cluster.

    ``P[i] = R[labels[i]] @ (X[i] - C[labels[i]] - mu[labels[i]])``

    Args:
        X: (n, d) float32 rows (one coarse split).
        labels: (n,) int32 coarse cluster of each row.
        C: (V, d) float32 coarse centroids.
        R: (V, d, d) float32 local rotations (rows are the rotated axes).
        mu: (V, d) float32 mean residual of each cluster.

    Returns:
        P: (n, d) float32 projected residuals.
    """
    P = np.empty(X.shape, dtype=np.float32)
    for cluster in np.unique(labels):
        rows = labels == cluster
        centred = X[rows] - C[cluster] - mu[cluster]
        P[rows] = centred @ R[cluster].T
    return P


def encode_fine(P, codebooks, assign=assign):
    """Subquantizer codes of projected residuals: `assign` per subvector.

    Args:
        P: (n, m * ds) float32 projected residuals, split into m subvectors of ds dims.
        codebooks: (m, S, ds) float32 subquantizer centroids.
        assign: the nearest-centroid function to use (compiled backends pass theirs).

    Returns:
        codes: (n, m) uint8 when S <= 256, else uint16.
    """
    m, S, ds = codebooks.shape
    codes = np.empty((P.shape[0], m), dtype=code_dtype(S))
    for j in range(m):
        labels, _ = assign(np.ascontiguousarray(P[:, j * ds:(j + 1) * ds]), codebooks[j])
        codes[:, j] = labels
    return codes


def encode_split(X, C, R, mu, codebooks, assign=assign, project_residuals=project_residuals,
                 encode_fine=encode_fine):
    """Coarse labels and fine codes of one coarse split: `assign`, then
    `project_residuals`, then `encode_fine`.

    Args:
        X: (n, h) float32 rows of this split; C (V, h); R (V, h, h); mu (V, h);
        codebooks: (m, S, h / m) this split's subquantizers.
        assign, project_residuals, encode_fine: the steps to use (compiled backends
            without a fused encoder pass theirs).

    Returns:
        labels (n,) int32, codes (n, m) uint8/uint16.
    """
    labels, _ = assign(X, C)
    return labels, encode_fine(project_residuals(X, labels, C, R, mu), codebooks)


def decode_fine(codes, codebooks):
    """Inverse of `encode_fine`: (n, m) codes -> (n, m * ds) float32 subquantizer centroids."""
    m, S, ds = codebooks.shape
    parts = [codebooks[j][codes[:, j]] for j in range(m)]
    return np.concatenate(parts, axis=1).astype(np.float32, copy=False)


def accumulate_covariance(residuals, labels, V):
    """Per-cluster sufficient statistics of residuals, for covariance estimation.

    Args:
        residuals: (n, d) float32 residuals ``x - C[label]``.
        labels: (n,) int32 cluster of each row, in [0, V).
        V: number of clusters.

    Returns:
        A: (V, d, d) float64 summed outer products ``sum r r^T``.
        sums: (V, d) float64 summed residuals.
        counts: (V,) int64 rows per cluster.
    """
    d = residuals.shape[1]
    A = np.zeros((V, d, d))
    sums = np.zeros((V, d))
    counts = np.bincount(labels, minlength=V).astype(np.int64)
    for cluster in np.unique(labels):
        r = residuals[labels == cluster].astype(np.float64)
        A[cluster] = r.T @ r
        sums[cluster] = r.sum(axis=0)
    return A, sums, counts


def cluster_sums(X, labels, k):
    """Per-cluster sums and counts (the Lloyd update statistics).

    Args:
        X: (n, d) float32 rows.
        labels: (n,) int32 in [0, k).
        k: number of clusters.

    Returns:
        sums: (k, d) float64, counts: (k,) int64.
    """
    sums = np.zeros((k, X.shape[1]))
    np.add.at(sums, labels, X.astype(np.float64))
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    return sums, counts


def adc_tables(P, codebooks):
    """Asymmetric distance tables of projected queries.

    Args:
        P: (q, m * ds) float32 projected query residuals.
        codebooks: (m, S, ds) float32.

    Returns:
        tables: (q, m, S) float32, ``tables[i, j, s] = |P[i, j-th sub] - codebooks[j, s]|^2``.
    """
    m, S, ds = codebooks.shape
    sub = P.reshape(P.shape[0], m, 1, ds)
    return ((sub - codebooks[None]) ** 2).sum(axis=3).astype(np.float32)


def rotated_tables(residuals, R, codebooks):
    """Rotated residuals of one cluster's rows and their ADC tables (what the grouped batch
    search computes per cluster).

    Args:
        residuals: (n, h) float32 residuals ``x - centroid - mu`` of one cluster.
        R: (h, h) float32 rotation of that cluster.
        codebooks: (half_m, S, ds) float32 with ``half_m * ds = h``.

    Returns:
        P (n, h) float32 ``residuals @ R^T``, tables (n, half_m, S) float32 (`adc_tables`).
    """
    P = (residuals.astype(np.float64) @ R.T.astype(np.float64)).astype(np.float32)
    return P, adc_tables(P, codebooks)


def adc_scan(table, codes):
    """Asymmetric distances of codes to one query.

    Args:
        table: (m, S) float32 distance table of the query.
        codes: (n, m) uint8/uint16 fine codes.

    Returns:
        (n,) float32 ``sum_j table[j, codes[:, j]]``.
    """
    m = table.shape[0]
    return table[np.arange(m)[None, :], codes].sum(axis=1, dtype=np.float32)


def group_rows(labels, k):
    """Rows grouped by label: a stable order and offsets, so the rows of group c are
    ``order[offsets[c]:offsets[c + 1]]``.

    Returns:
        order (n,) int64, offsets (k + 1,) int64.
    """
    # numpy's stable sort is a radix sort for 16-bit keys: 7x faster than on int32 here.
    keys = labels.astype(np.uint16) if k <= 65536 else labels
    order = np.argsort(keys, kind="stable")
    offsets = np.searchsorted(labels[order], np.arange(k + 1))
    return order, offsets


def project_grouped(X, labels, C, R, mu):
    """`project_residuals` with rows left grouped by cluster (one GEMM per cluster).

    Returns:
        P_grouped: (n, d) float32, ``P_grouped[r]`` is the projection of row ``order[r]``.
        order: (n,) int64 row order (see `group_rows`).
    """
    order, offsets = group_rows(labels, C.shape[0])
    sorted_labels = labels[order]
    centred = X[order]
    centred -= (C + mu)[sorted_labels]
    P = np.empty_like(centred)
    clusters = np.flatnonzero(np.diff(offsets))
    d = X.shape[1]
    per_gemm = len(X) / max(len(clusters), 1) * d * d  # multiply-adds of one cluster's GEMM
    with small_gemms(per_gemm, calls=len(clusters)):
        for cluster in clusters:
            lo, hi = offsets[cluster], offsets[cluster + 1]
            np.dot(centred[lo:hi], R[cluster].T, out=P[lo:hi])
    return P, order


def kmeanspp(X, first, uniforms):
    """Greedy k-means++ seeding: each next centre is, of ``trials`` candidates drawn with
    probability proportional to the squared distance to the nearest centre so far, the
    one that lowers the potential (sum of those distances) most.

    Args:
        X: (n, d) float32 rows.
        first: index of the first centre.
        uniforms: (k - 1, trials) float64 in [0, 1): the draws, one row per next centre
            (``u * total`` located in the cumulative distances; every row a centre
            already: ``int(u * n)``).

    Returns:
        (k, d) float32 centres (rows of X).
    """
    n = X.shape[0]
    centers = np.empty((uniforms.shape[0] + 1, X.shape[1]), dtype=np.float32)
    centers[0] = X[first]
    closest = ((X - X[first]) ** 2).sum(axis=1, dtype=np.float32)
    for c in range(1, centers.shape[0]):
        cumulative = np.cumsum(closest, dtype=np.float64)
        total = cumulative[-1]
        if total > 0:
            picks = np.minimum(np.searchsorted(cumulative, uniforms[c - 1] * total), n - 1)
        else:
            picks = (uniforms[c - 1] * n).astype(np.int64)
        candidates = ((X[None, :, :] - X[picks][:, None, :]) ** 2).sum(axis=2,
                                                                       dtype=np.float32)
        potentials = np.minimum(closest[None, :], candidates).sum(axis=1, dtype=np.float64)
        best = int(np.argmin(potentials))
        centers[c] = X[picks[best]]
        closest = np.minimum(closest, candidates[best])
    return centers


def code_dtype(num_clusters):
    """Smallest unsigned dtype that holds codes in [0, num_clusters)."""
    if num_clusters <= 256:
        return np.dtype(np.uint8)
    if num_clusters <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)
