"""Single-machine LOPQ training: coarse quantizers (step 0), local rotations (step 1),
subquantizers (step 2), with the reference implementation's semantics.

Parameters are stacked arrays (see `lopq.model.LOPQModel`):
``Cs (2, V, h)``, ``Rs (2, V, h, h)``, ``mus (2, V, h)``, ``subs (M, S, D/M)`` float32,
with ``h = D / 2``.
"""

import copy
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import numpy as np

from . import _kernels as kernels
from ._kernels.blas import small_gemms, small_matrices
from .kmeans import (
    LloydStep,
    check_random_state,
    kmeans,
    kmeans_rows,
    no_farthest_rows,
    sample_indices,
    update_centers,
)
from .rows import ArrayRows, covariance_statistics, project_rows

logger = logging.getLogger(__name__)


def eigenvalue_allocation(num_buckets, eigenvalues):
    """Balance eigenvalues into buckets of equal size by their log-product.

    Eigenvalues are divided by the smallest non-zero |eigenvalue|, walked in descending
    order, and each goes to the non-full bucket with the smallest running sum of
    log2|eigenvalue| (the first such bucket on a tie).

    Args:
        num_buckets: number of buckets; must divide ``len(eigenvalues)``.
        eigenvalues: (D,) eigenvalues.

    Returns:
        (D,) int permutation: bucket 0's indices, then bucket 1's, ...
    """
    return eigenvalue_allocations(num_buckets, np.asarray(eigenvalues)[None])[0]


def eigenvalue_allocations(num_buckets, eigenvalues):
    """`eigenvalue_allocation` of many eigenvalue sets at once (one greedy step for all
    sets at a time, instead of a Python loop per set).

    Args:
        eigenvalues: (V, D) eigenvalues, one set per row.

    Returns:
        (V, D) int permutations.
    """
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    V, D = eigenvalues.shape
    if num_buckets < 1 or D % num_buckets:
        raise ValueError(f"cannot split {D} eigenvalues into {num_buckets} equal buckets")
    per_bucket = D // num_buckets
    magnitude = np.abs(eigenvalues)
    smallest = np.where(eigenvalues != 0, magnitude, np.inf).min(axis=1)
    scaled = eigenvalues / np.where(np.isfinite(smallest), smallest, 1.0)[:, None]
    with np.errstate(divide="ignore"):
        log_eigs = np.log2(np.abs(scaled))
    order = np.argsort(scaled, axis=1)[:, ::-1]
    rows = np.arange(V)
    log_sum = np.zeros((V, num_buckets))
    size = np.zeros((V, num_buckets), dtype=np.int64)
    permutation = np.zeros((V, num_buckets, per_bucket), dtype=np.int64)
    for step in range(D):
        ind = order[:, step]
        bucket = np.argmin(np.where(size < per_bucket, log_sum, np.inf), axis=1)
        log_sum[rows, bucket] += log_eigs[rows, ind]
        permutation[rows, bucket, size[rows, bucket]] = ind
        size[rows, bucket] += 1
    return permutation.reshape(V, D)


def accumulate_covariance_estimators(data, C, backend=None):
    """Assign rows to centroids and accumulate per-cluster residual statistics.

    Args:
        data: (n, d) rows.
        C: (V, d) centroids.

    Returns:
        A (V, d, d) float64 summed residual outer products, mu (V, d) float64 summed
        residuals, count (V,) int64, assignments (n,) int32, residuals (n, d) in the
        callers' precision: float64 when ``data`` or ``C`` is float64 (as the reference),
        else float32 through the compiled kernels.
    """
    if np.result_type(np.asarray(data).dtype, np.asarray(C).dtype, np.float32) == np.float64:
        return kernels.covariance_statistics_float64(data, C)
    data = kernels.as_float32_rows(data)
    C = kernels.as_float32_rows(C)
    assignments, _ = kernels.assign(data, C, backend)
    residuals = data - C[assignments]
    A, sums, counts = kernels.accumulate_covariance(residuals, assignments, C.shape[0], backend)
    return A, sums, counts, assignments, residuals


#: Default regularisation of the local covariances: chosen from the data
#: (`choose_shrinkage`), not a constant.
ROTATION_SHRINKAGE = "auto"
#: What ``"auto"`` chooses among, by recall on held-back training rows: the per-cluster
#: Ledoit-Wolf estimate, one pseudo-row per dimension, no shrinkage (the refinement alone).
SHRINKAGE_CANDIDATES = ("lw", 1.0, 0.0)
#: What ``"auto"`` gives when the rows are too few to compare candidates (fewer than 500,
#: or fewer than two per subquantizer centroid beside the queries): one pseudo-row per
#: dimension, the previous default.
SHRINKAGE_FALLBACK = 1.0


def check_shrinkage(shrinkage):
    """``"auto"``, ``"lw"`` or a number >= 0 (a fixed pseudo-count per dimension); else
    ValueError."""
    if isinstance(shrinkage, str):
        if shrinkage in ("auto", "lw"):
            return shrinkage
        try:
            shrinkage = float(shrinkage)
        except ValueError:
            raise ValueError(f"rotation shrinkage must be 'auto', 'lw' or a number >= 0, "
                             f"got {shrinkage!r}") from None
    if not float(shrinkage) >= 0:
        raise ValueError(f"rotation shrinkage must be 'auto', 'lw' or a number >= 0, got "
                         f"{shrinkage!r}")
    return float(shrinkage)


def shrinkage_intensities(cov, dof, target):
    """Per cluster, the share ``rho`` of ``target`` in ``(1 - rho) S + rho T`` that
    minimises the expected squared Frobenius error of the estimate (Ledoit & Wolf's
    criterion, with the Gaussian moments of a Wishart sample covariance, as in Chen et
    al.'s Rao-Blackwellised LW, here toward a general target).

    With ``S`` estimated on ``nu = n - 1`` degrees of freedom,
    ``E|S - Sigma|^2 = (tr Sigma^2 + (tr Sigma)^2) / nu``; both traces are estimated
    without bias from ``a = tr S^2`` and ``b = (tr S)^2``:
    ``tr Sigma^2 ~ nu (nu a - b) / ((nu + 2)(nu - 1))``,
    ``(tr Sigma)^2 ~ b - 2 tr Sigma^2 / nu``. The denominator ``E|S - T|^2`` is estimated
    by ``|S - T|^2`` itself. A cluster whose covariance is far from the target (many
    rows, a shape of its own) keeps it; a small or target-like one leans on the target.

    Args:
        cov: (V, d, d) float64 sample covariances ``S``; dof: (V,) degrees of freedom
            ``n - 1``; target: (d, d) float64 ``T``.

    Returns:
        (V,) float64 intensities in [0, 1]; 1 where ``dof < 2``.
    """
    cov = np.asarray(cov, dtype=np.float64)
    nu = np.asarray(dof, dtype=np.float64)
    rho = np.ones(len(nu))
    ok = nu >= 2
    if not ok.any():
        return rho
    S, nu = cov[ok], nu[ok]
    a = np.einsum("vij,vij->v", S, S)
    b = np.trace(S, axis1=1, axis2=2) ** 2
    tr_sq = np.maximum(nu * (nu * a - b) / ((nu + 2) * (nu - 1)), 0.0)
    sq_tr = np.maximum(b - 2 * tr_sq / nu, 0.0)
    expected_error = (tr_sq + sq_tr) / nu
    gap = np.einsum("vij,vij->v", S - target, S - target)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho[ok] = np.where(gap > 0, np.clip(expected_error / gap, 0.0, 1.0), 1.0)
    return rho


def shrunk_covariances(A, mu, count, shrinkage):
    """Local residual covariances shrunk toward the pooled within-cluster covariance.

    With ``W_i`` the scatter of cluster i about its mean, ``S_i = W_i / (n_i - 1)`` and
    ``P = sum W_i / sum (n_i - 1)`` the pooled covariance, cluster i gets
    ``(1 - rho_i) S_i + rho_i P``:

    - ``shrinkage="lw"`` (or ``"auto"``, outside a full training): ``rho_i`` estimated
      from the cluster's own covariance (`shrinkage_intensities`);
    - a number ``s > 0``: ``k = s * d`` pseudo-points with the pooled covariance, i.e.
      ``rho_i = k / (n_i - 1 + k)``;
    - ``0``: the plain sample covariances (zeros where ``n_i < 2``), ``rho = 0``.

    An empty cluster (or one of a single row) gets the pooled covariance when shrinking.

    Args:
        A: (V, d, d) summed outer products of residuals; mu: (V, d) summed residuals;
        count: (V,) rows per cluster; shrinkage: ``"lw"``, ``"auto"`` or a number >= 0.

    Returns:
        covariances (V, d, d) float64, pooled (d, d) float64, means (V, d) float64,
        rho (V,) float64 the pooled covariance's share in each.
    """
    shrinkage = check_shrinkage(shrinkage)
    A = np.asarray(A, dtype=np.float64)
    count = np.asarray(count, dtype=np.int64)
    V, d = np.shape(mu)
    means = np.zeros((V, d))
    nonempty = count > 0
    means[nonempty] = np.asarray(mu, dtype=np.float64)[nonempty] / count[nonempty, None]
    symmetric = (A + A.transpose(0, 2, 1)) / 2
    scatter = symmetric - count[:, None, None] * np.einsum("vi,vj->vij", means, means)
    dof = np.maximum(count - 1, 0)
    pooled = scatter.sum(axis=0) / max(int(dof.sum()), 1)
    sample_cov = np.zeros_like(scatter)
    has_dof = dof > 0
    sample_cov[has_dof] = scatter[has_dof] / dof[has_dof, None, None]
    if shrinkage in ("auto", "lw"):
        rho = shrinkage_intensities(sample_cov, dof, pooled)
    elif shrinkage > 0:
        prior = shrinkage * d
        rho = prior / (dof + prior)
    else:
        rho = np.zeros(V)
    cov = (1 - rho)[:, None, None] * sample_cov + rho[:, None, None] * pooled
    return cov, pooled, means, rho


def compute_rotations_from_accumulators(A, mu, count, num_buckets, shrinkage=0.0, *,
                                        log_level=logging.WARNING):
    """Local rotations and mean residuals from accumulated statistics.

    The covariance of cluster i is ``(A + A.T) / (2 (n - 1)) - outer(m, m)`` with
    ``m = mu[i] / n``. Its eigenvectors, permuted by `eigenvalue_allocation`, are the
    rows of ``R[i]``.

    With ``shrinkage=0`` (the reference) a cluster with fewer points than dimensions gets
    the identity (and an empty cluster a zero mean). Otherwise (``"lw"``, or a fixed
    pseudo-count; ``"auto"`` is resolved to one of them by `train_sequence`) every
    covariance is first shrunk toward the pooled one (`shrunk_covariances`): small clusters get a
    rotation close to the pooled one instead of none.

    Args:
        A: (V, d, d) summed outer products; mu: (V, d) summed residuals; count: (V,).
        num_buckets: subquantizers in this split (M / 2).
        shrinkage: ``"auto"`` or a number >= 0 (0: the reference).
        log_level: of the note on clusters left with the identity (a side computation,
            such as `choose_shrinkage`'s candidates, keeps it at DEBUG).

    Returns:
        R (V, d, d) float64, mu (V, d) float64 mean residuals.
    """
    shrinkage = check_shrinkage(shrinkage)
    count = np.asarray(count)
    V, d = np.shape(mu)
    if shrinkage != 0:
        cov, _, means, rho = shrunk_covariances(A, mu, count, shrinkage)
        # Every cluster has an estimate unless the whole split has fewer than 2 rows.
        small = [] if count.sum() > 1 else list(range(V))
        logger.debug("local covariances: pooled share %.2f (median), %.2f-%.2f over %d "
                    "clusters", float(np.median(rho)), float(rho.min()), float(rho.max()), V)
    else:
        A = np.asarray(A, dtype=np.float64)
        means = np.zeros((V, d))
        cov = np.zeros((V, d, d))
        small = []
        for i in range(V):
            n = int(count[i])
            if n > 0:
                means[i] = np.asarray(mu[i], dtype=np.float64) / n
            if n < d:
                small.append(i)
                continue
            cov[i] = (A[i] + A[i].T) / (2 * (n - 1)) - np.outer(means[i], means[i])
    R = np.zeros((V, d, d))
    R[small] = np.eye(d)
    rotated = np.setdiff1d(np.arange(V), small)
    if rotated.size:
        with small_matrices(d):
            eigenvalues, eigenvectors = np.linalg.eigh(cov[rotated])
        permutations = eigenvalue_allocations(num_buckets, eigenvalues)
        R[rotated] = np.take_along_axis(eigenvectors, permutations[:, None, :],
                                        axis=2).transpose(0, 2, 1)
    if small:
        logger.log(log_level, "%d of %d clusters have fewer points than dimensions (%d): "
                   "they get the identity rotation", len(small), V, d)
    return R, means


def compute_residuals(data, C, backend=None):
    """Residuals ``data - C[assignment]`` (n, d) float32 and assignments (n,) int32."""
    data = kernels.as_float32_rows(data)
    C = kernels.as_float32_rows(C)
    assignments, _ = kernels.assign(data, C, backend)
    return data - C[assignments], assignments


def project_residuals_to_local(residuals, assignments, Rs, mu, backend=None):
    """``R[a] @ (residual - mu[a])`` for every row: (n, d) float32."""
    d = np.shape(residuals)[1]
    zeros = np.zeros((len(mu), d), dtype=np.float32)
    return kernels.project_residuals(residuals, assignments, zeros, Rs, mu, backend)


def train_coarse_splits(data, V, kmeans_coarse_iters=10, n_init=10, random_state=None,
                        backend=None):
    """Step 0 on in-memory rows: k-means of each half of ``data`` (n, D), in shared passes.
    Returns Cs (2, V, D/2) float32."""
    return kmeans_rows(ArrayRows(data, backend), 2, V, kmeans_coarse_iters, n_init,
                       random_state=random_state, label=" coarse (step 0)", backend=backend)


def rotations_from_statistics(A, sums, counts, M, shrinkage=ROTATION_SHRINKAGE, *,
                              log_level=logging.WARNING):
    """Step 1 from the statistics of `lopq.rows.covariance_statistics` (both splits):
    Rs (2, V, h, h) float32, mus (2, V, h) float32."""
    Rs, mus = [], []
    for split in range(2):
        R, mu = compute_rotations_from_accumulators(A[split], sums[split], counts[split],
                                                    M // 2, shrinkage, log_level=log_level)
        Rs.append(R)
        mus.append(mu)
    return np.stack(Rs).astype(np.float32), np.stack(mus).astype(np.float32)


def train_rotations(data, Cs, M, backend=None, shrinkage=ROTATION_SHRINKAGE):
    """Step 1 on in-memory rows: local rotations and mean residuals of each half
    (covariances shrunk by ``shrinkage``, see `compute_rotations_from_accumulators`).

    Returns:
        Rs (2, V, h, h) float32, mus (2, V, h) float32.
    """
    data = kernels.as_float32_rows(data)
    Cs = np.ascontiguousarray(Cs, dtype=np.float32)
    return rotations_from_statistics(*covariance_statistics(data, Cs, backend), M, shrinkage)


def project_data(data, Cs, Rs, mus, backend=None):
    """Coarse-assign both halves and project their residuals: (n, D) float32."""
    return project_rows(kernels.as_float32_rows(data), Cs, Rs, mus, backend)


def train_codebooks(projected, M, subquantizer_clusters=256, kmeans_local_iters=20,
                    n_init=10, random_state=None, backend=None):
    """Step 2 on in-memory rows: k-means of each of the M subvectors of the projected
    residuals, in shared passes.

    Args:
        projected: (n, D) projected residuals (both halves side by side).

    Returns:
        subs (M, S, D/M) float32 codebooks.
    """
    return kmeans_rows(ArrayRows(projected, backend), M, subquantizer_clusters,
                       kmeans_local_iters, n_init, random_state=random_state,
                       label=" subquantizers (step 2)", backend=backend)


#: Rows per subquantizer centroid used by the rotation refinement (a sample beyond).
REFINE_POINTS_PER_CENTROID = 64


def _update_codebooks(projected, codes, books, backend=None):
    """Lloyd update (`lopq.kmeans.update_centers`) of one split's subquantizers from fixed
    codes; empty centroids keep their place (encoding does not report distances).
    Returns new (M/2, S, ds) float32 codebooks."""
    half_m, S, ds = books.shape
    sums = np.empty((half_m, S, ds))
    counts = np.empty((half_m, S), dtype=np.int64)
    for j in range(half_m):
        sums[j], counts[j] = kernels.cluster_sums(projected[:, j * ds:(j + 1) * ds],
                                                  codes[:, j], S, backend)
    step = LloydStep(sums, counts, np.zeros(half_m), [no_farthest_rows] * half_m)
    return update_centers(books, step)[0]


def _procrustes_rotations(centred, quantized, labels, R, prior=None):
    """Per cluster, the orthogonal ``R[c] = U V^T`` from ``B = sum q r^T = U S V^T``, which
    minimises ``sum |R r - q|^2`` over its rows. ``prior`` (V, d, d), when given, is added
    to every ``B``: pseudo-rows that the prior rotation quantizes exactly, so a cluster
    with few rows stays near it (with none, it gets the prior's rotation); without a
    prior, clusters without rows keep R[c]."""
    order, offsets = kernels.group_rows(labels, R.shape[0])
    q, r = quantized[order], centred[order]
    out = R.copy()
    clusters = np.arange(R.shape[0]) if prior is not None else \
        np.flatnonzero(np.diff(offsets))
    if clusters.size == 0:
        return out
    B = np.empty((len(clusters),) + R.shape[1:])
    d = R.shape[1]
    with small_gemms(len(r) / len(clusters) * d * d, len(clusters)):
        for i, c in enumerate(clusters):
            lo, hi = offsets[c], offsets[c + 1]
            B[i] = q[lo:hi].T @ r[lo:hi]
    if prior is not None:
        B += prior[clusters]
    with small_matrices(B.shape[1]):
        U, _, Vt = np.linalg.svd(B)  # one stacked call for every cluster
    out[clusters] = (U @ Vt).astype(np.float32)
    return out


def _procrustes_prior(centred, labels, R, shrinkage, backend=None):
    """The prior term of every cluster's Procrustes problem: ``k_c R[c] P`` (V, d, d)
    float64, with ``P`` the pooled covariance of the sampled ``centred`` (n, d) rows and
    ``k_c`` pseudo-rows; None for ``shrinkage=0``.

    ``"lw"`` (or ``"auto"``): ``k_c = n_c rho_c / (1 - rho_c)`` with ``rho_c`` the
    shrinkage intensity of
    the cluster's own sampled rows (`shrinkage_intensities`), so the prior weighs in the
    fit exactly as the pooled covariance weighs in the cluster's shrunk covariance. A
    number ``s``: ``k_c = s d^2 / (n_c + d)`` (a constant ``s d`` pseudo-rows, faded as a
    cluster's rows outnumber its dimensions).
    """
    shrinkage = check_shrinkage(shrinkage)
    if shrinkage == 0:
        return None
    V, d = R.shape[0], R.shape[1]
    if shrinkage in ("auto", "lw"):
        A, sums, counts = kernels.accumulate_covariance(centred, labels, V, backend)
        _, pooled, _, rho = shrunk_covariances(A, sums, counts, "lw")
        # rho = 1 (no rows, or nothing to tell the cluster from the pooled covariance):
        # a weight that dwarfs the data keeps the starting rotation.
        strength = (counts + 1) * rho / np.maximum(1 - rho, 1e-6)
    else:
        pooled = (centred.T @ centred).astype(np.float64) / max(len(centred), 1)
        rows = np.bincount(labels, minlength=V)
        strength = shrinkage * d * d / (rows + d)
    return strength[:, None, None] * (R.astype(np.float64) @ pooled)


def _refine_split(sample, s, Cs, Rs, mus, subs, iters, shrinkage, backend=None):
    """`_refine_on_sample` of split ``s``: its refined (rotations (V, h, h), codebooks
    (M/2, S, ds)) float32, from copies (the splits do not share anything)."""
    half_m = subs.shape[0] // 2
    h = sample.shape[1] // 2
    books = subs[s * half_m:(s + 1) * half_m].copy()
    R = Rs[s].copy()
    half = kernels.as_float32_rows(sample[:, s * h:(s + 1) * h])
    labels, _ = kernels.assign(half, Cs[s], backend)
    centred = half - Cs[s][labels] - mus[s][labels]
    zeros = np.zeros_like(Cs[s])
    prior = _procrustes_prior(centred, labels, R, shrinkage, backend)
    for _ in range(iters):
        projected = kernels.project_residuals(centred, labels, zeros, R, zeros, backend)
        codes = kernels.encode_fine(projected, books, backend)
        books = _update_codebooks(projected, codes, books, backend)
        quantized = kernels.decode_fine(codes, books)
        R = _procrustes_rotations(centred, quantized, labels, R, prior)
    return R, books


def _refine_on_sample(sample, Cs, Rs, mus, subs, iters, shrinkage, backend=None,
                      threads=1):
    """The rounds of `refine_local_rotations` on in-memory ``sample`` (s, D) rows:
    refined (Rs, subs) float32 copies. With ``threads`` > 1 the two splits run side by
    side (the kernels and LAPACK release the GIL); the result is the same."""
    refine = partial(_refine_split, sample, Cs=Cs, Rs=Rs, mus=mus, subs=subs, iters=iters,
                     shrinkage=shrinkage, backend=backend)
    if threads > 1:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(refine, (0, 1)))
    else:
        results = [refine(s) for s in (0, 1)]
    half_m = subs.shape[0] // 2
    Rs, subs = Rs.copy(), subs.copy()
    for s, (R, books) in enumerate(results):
        Rs[s] = R
        subs[s * half_m:(s + 1) * half_m] = books
    return Rs, subs


def refine_rotations(source, Cs, Rs, mus, subs, iters=3, random_state=None,
                     shrinkage=ROTATION_SHRINKAGE, backend=None, n_jobs=None):
    """`refine_local_rotations` over a row source: the rounds on a sample of at most
    `REFINE_POINTS_PER_CENTROID` rows per subquantizer centroid (sized by the model),
    then, when the sample is not every row, one Lloyd step of the codebooks over every
    row (one projection pass). ``n_jobs`` > 1 (None: the cores) refines the two
    splits side by side, with the same result."""
    rng = check_random_state(random_state)
    n = source.n_rows
    indices = sample_indices(n, REFINE_POINTS_PER_CENTROID * subs.shape[1], rng)
    sample = source.take(indices)
    Rs, subs = _refine_on_sample(sample, Cs, Rs, mus, subs, iters, shrinkage, backend,
                                 threads=n_jobs or os.cpu_count() or 1)
    if len(indices) < n:
        projected = source.projected(Cs, Rs, mus, passes=1)
        try:
            subs, _ = update_centers(subs, projected.lloyd_pass(subs))
        finally:
            projected.release()
    logger.info("refined the local rotations in %d rounds on %d rows", iters, len(sample))
    return Rs, subs


def refine_local_rotations(data, Cs, Rs, mus, subs, iters=3, random_state=None,
                           backend=None, shrinkage=ROTATION_SHRINKAGE):
    """Optimise each coarse cluster's rotation together with the subquantizers
    (non-parametric OPQ within every cluster, started from the eigenvalue-allocation
    rotations): each round assigns codes, updates the codebooks (a Lloyd step) and fits
    every rotation to its cluster's quantized residuals (orthogonal Procrustes).

    The reference stops at the parametric rotations; on Oxford5k this round trip lowers
    the reconstruction error from 0.18 to 0.16 and raises recall@1 by about 0.03. Rounds
    run on a sample of at most 64 rows per subquantizer centroid; a last Lloyd step on
    all rows follows. Unless ``shrinkage=0``, each cluster's fit also counts pseudo-rows
    with the split's pooled covariance that its starting rotation quantizes exactly, so
    a cluster with few sampled rows is not fitted to them alone (`_procrustes_prior`:
    the prior of `shrunk_covariances`, in the Procrustes problem).

    Args:
        data: (n, D) float32 rows; Cs, Rs, mus, subs: the trained parameters.

    Returns:
        (Rs, subs) refined float32 arrays (the inputs are not modified).
    """
    return refine_rotations(ArrayRows(data, backend), Cs, Rs, mus, subs, iters,
                            random_state, shrinkage, backend)


#: Held-back rows of `choose_shrinkage` (at most; a tenth of its sample when smaller).
SELECTION_QUERIES = 1000
#: Exact neighbours of a held-back row among which its nearest must rank first.
SELECTION_CANDIDATES = 100
#: Lloyd iterations of each candidate's subquantizers (at most ``kmeans_local_iters``).
SELECTION_LLOYD_ITERS = 10


def _reconstruct(X, Cs, Rs, mus, subs, backend=None):
    """LOPQ reconstructions of rows ``X`` (n, D): coarse centroid + mean residual +
    the rotated-back subquantizer centroids, per split. (n, D) float32."""
    h = X.shape[1] // 2
    half_m = subs.shape[0] // 2
    out = np.empty(X.shape, dtype=np.float32)
    for split in range(2):
        half = kernels.as_float32_rows(X[:, split * h:(split + 1) * h])
        labels, _ = kernels.assign(half, Cs[split], backend)
        projected = kernels.project_residuals(half, labels, Cs[split], Rs[split],
                                              mus[split], backend)
        books = np.ascontiguousarray(subs[split * half_m:(split + 1) * half_m])
        quantized = kernels.decode_fine(kernels.encode_fine(projected, books, backend), books)
        order, offsets = kernels.group_rows(labels, Cs.shape[1])
        back = np.empty_like(quantized)
        for c in np.flatnonzero(np.diff(offsets)):
            rows = order[offsets[c]:offsets[c + 1]]
            back[rows] = quantized[rows] @ Rs[split][c]  # R^T p, as rows
        out[:, split * h:(split + 1) * h] = back + Cs[split][labels] + mus[split][labels]
    return out


def _evaluate_candidate(shrinkage, seed, fit, queries, base, neighbours, statistics, Cs,
                        M, subquantizer_clusters, iters, refinement_iters, backend,
                        threads=1):
    """One `choose_shrinkage` candidate: its model fitted on the ``fit`` rows (rotations
    from ``statistics``, subquantizers, refinement), then, for each held-back
    query, the rank by LOPQ distance of its exact nearest ``base`` row among its exact
    ``neighbours`` ((q, k) indices into ``base``, or a `concurrent.futures.Future` of
    them, awaited once the model is fitted), and the queries' squared reconstruction
    error: (ranks, error)."""
    Rs, mus = rotations_from_statistics(*statistics, M, shrinkage, log_level=logging.DEBUG)
    projected = ArrayRows(project_rows(fit, Cs, Rs, mus, backend), backend)
    projected.log_level = logging.DEBUG  # a side computation: quiet iterations
    subs = kmeans_rows(projected, M, subquantizer_clusters, iters, 1,
                       random_state=np.random.RandomState(seed), backend=backend,
                       label=f" shrinkage {shrinkage!r} (selection)")
    if refinement_iters > 0:
        Rs, subs = _refine_on_sample(fit, Cs, Rs, mus, subs, refinement_iters, shrinkage,
                                     backend, threads)
    if isinstance(neighbours, Future):
        neighbours = neighbours.result()
    approx = _reconstruct(base, Cs, Rs, mus, subs, backend)
    # |x~|^2 - 2 q.x~ ranks a query's candidates as |q - x~|^2 does
    norms = np.einsum("ij,ij->i", approx, approx)[neighbours]
    dots = np.einsum("qkd,qd->qk", approx[neighbours], queries)
    estimated = norms - 2 * dots
    # where the exact nearest row lands among its nearest, by LOPQ distance
    rank = (estimated < estimated[:, :1]).sum(axis=1)
    residual = queries - _reconstruct(queries, Cs, Rs, mus, subs, backend)
    return rank, float((residual.astype(np.float64) ** 2).sum())


def choose_shrinkage(source, statistics, Cs, M, subquantizer_clusters, kmeans_local_iters,
                     refinement_iters, random_state=None, backend=None,
                     candidates=SHRINKAGE_CANDIDATES, n_jobs=None):
    """``rotation_shrinkage="auto"``: the candidate whose model ranks neighbours best for
    queries it did not see, among rows treated as the training treats them.

    Reconstruction error alone does not predict recall (on the MiniLM token table and on
    Gaussian mixtures the lowest-error setting loses 0.1-0.15 recall@1), so the choice is
    made by recall itself, in two folds (one, holding back the queries of both, where
    the rows would fill two disjoint folds). Each fold holds back queries of its own (at
    most `SELECTION_QUERIES`, a tenth of the rows when fewer) and rebuilds, on the other
    rows, what `fit` does: rotations from the step 1 ``statistics`` of every row but
    the fold's queries, subquantizers trained and refined on a sample of the
    refinement's size (`REFINE_POINTS_PER_CENTROID` per subquantizer centroid), and a
    base to search whose share of fitted rows is the training's (its refinement sample
    over all rows; every row when they are fewer). Each query's exact nearest base row is
    ranked by LOPQ (asymmetric) distance among its `SELECTION_CANDIDATES` exact nearest
    ones, and the candidate of lowest mean ``log(1 + rank)`` wins: recall@1 counts only
    rank 0, the log rank also counts how near the top the nearest row lands, so it tells
    settings apart on fewer rows. The coarse quantizers are the same for every
    candidate, so which cells a search visits does not depend on the choice; how it
    ranks what it finds does.

    Both ways of leaking were measured. Queries inside the statistics favour ``"lw"``
    (its local covariances fit them: chosen on Gaussian mixtures, where it loses 0.03-0.12
    recall@1 on new queries); a base of only fitted rows favours the refinement without a
    prior, which fits the rows it sees (chosen on the Debian descriptions at V=256, where
    it loses 0.02-0.08).

    Args:
        source: the row source; statistics: its ``covariance_pass(Cs)``.
        n_jobs: threads evaluating candidates side by side (None: one per core, at
            most one per candidate). Each candidate draws from its own seed, taken
            from ``random_state`` first, so the choice does not depend on it.

    Returns:
        the chosen shrinkage (an element of ``candidates``).
    """
    from .eval import exact_neighbors
    rng = check_random_state(random_state)
    n = source.n_rows
    n_queries = min(SELECTION_QUERIES, n // 10)
    # The training refines on a sample of `refine_size` rows and searches them all.
    refine_size = min(n, REFINE_POINTS_PER_CENTROID * subquantizer_clusters)
    fit_size = min(refine_size, n - n_queries)
    if n_queries < 50 or fit_size < 2 * subquantizer_clusters:
        logger.info("rotation shrinkage: %d rows are too few to compare settings: %r", n,
                    SHRINKAGE_FALLBACK)
        return SHRINKAGE_FALLBACK
    # Each fold holds back queries of its own (the choice rests on twice as many) and
    # treats the other rows as the training does: all of them in the step 1 statistics,
    # a sample fitted (subquantizers, refinement), and a base to rank that has, as the
    # searched rows of a trained model do, a share refine_size / n of fitted rows (at
    # most one unfitted row per fitted one: the cap binds only above 2 refinement
    # samples of rows, where ranking more base rows would cost seconds per fit). A base
    # of only unfitted rows hides what fitting without a prior does to rows it did not
    # see; a base of only fitted rows makes it look best (measured on the Debian
    # descriptions).
    unfitted = min(n - n_queries - fit_size, fit_size,
                   int(round(fit_size * (n - refine_size) / refine_size)))
    # Two folds reuse scarce rows. Where the rows would fill two disjoint folds, one
    # fold holds back the queries of both: the same number of held-back queries for
    # one fit instead of two (1M x 128, V=256, M=16: 6 candidate fits of 2 s each
    # became 3; every set of the accuracy table has fewer rows and keeps two folds).
    folds = 2
    if n >= 2 * (n_queries + fit_size + unfitted):
        folds, n_queries = 1, 2 * n_queries
    size = min(n, folds * n_queries + fit_size + unfitted)
    rows = source.take(sample_indices(n, size, rng))
    order = rng.permutation(size)
    iters = min(kmeans_local_iters, SELECTION_LLOYD_ITERS)
    ranks = [[] for _ in candidates]
    errors = np.zeros(len(candidates))
    threads = max(1, min(n_jobs or os.cpu_count() or 1, len(candidates)))
    for fold in range(folds):
        held = order[fold * n_queries:(fold + 1) * n_queries]
        rest = np.concatenate([order[:fold * n_queries], order[(fold + 1) * n_queries:]])
        queries = rows[held]
        fit = rows[np.sort(rest[:fit_size])]
        base = rows[np.sort(rest[:fit_size + unfitted])]
        k = min(SELECTION_CANDIDATES, len(base))
        held_statistics = tuple(full - part for full, part in zip(
            statistics, covariance_statistics(queries, Cs, backend)))
        # a seed per candidate, drawn before any runs: the threads' order cannot change
        # what each candidate draws
        seeds = rng.randint(2 ** 31 - 1, size=len(candidates))

        evaluate = partial(_evaluate_candidate, fit=fit, queries=queries, base=base,
                           statistics=held_statistics, Cs=Cs, M=M,
                           subquantizer_clusters=subquantizer_clusters, iters=iters,
                           refinement_iters=refinement_iters, backend=backend)
        shrinkages, seeds = list(candidates), list(seeds)
        if threads == 1:
            neighbours = exact_neighbors(queries, base, k)
            outcomes = [evaluate(s, seed, neighbours=neighbours)
                        for s, seed in zip(shrinkages, seeds)]
        else:
            # The kernels and LAPACK release the GIL: the candidates fit side by side,
            # and beside the exact neighbours, which they need only once fitted
            # (submitted first, so no candidate waits on a task queued behind it).
            # Measured, 1M x 128 rows, V=256, M=16, 2 threads: 5.4 s with the
            # neighbours (1.3 s) ahead of the candidates (1.9 s each), 4.0-4.2 s beside them.
            with ThreadPoolExecutor(threads) as pool:
                neighbours = pool.submit(exact_neighbors, queries, base, k)
                # each candidate also refines its two splits side by side: the pool's
                # threads idle once fewer candidates than threads are left
                outcomes = list(pool.map(partial(evaluate, neighbours=neighbours,
                                                 threads=threads),
                                         shrinkages, seeds))
        for c, (rank, error) in enumerate(outcomes):
            ranks[c].append(rank)
            errors[c] += error
    ranks = [np.concatenate(r) for r in ranks]
    n_queries = len(ranks[0])
    log_ranks = [np.log1p(rank).mean() for rank in ranks]
    best = _best_candidate(ranks)
    logger.info("rotation shrinkage on %d held-back rows: %s: %r chosen", n_queries,
                ", ".join(f"{c!r} recall@1 {np.mean(rank == 0):.3f} mean log rank "
                          f"{lr:.3f} error {e / errors[0]:.3f}"
                          for c, rank, lr, e in zip(candidates, ranks, log_ranks, errors)),
                candidates[best])
    return candidates[best]


#: Parameter names in the order of ``(Cs, Rs, mus, subs)``, and the training step that
#: fits each: 0 coarse, 1 rotations (and mean residuals), 2 subquantizers.
PARAMETER_STEPS = (0, 1, 1, 2)


def _best_candidate(ranks):
    """Index of the candidate of lowest mean ``log(1 + rank)`` (the first on a tie)."""
    return int(np.argmin([np.log1p(rank).mean() for rank in ranks]))


def parameters_to_keep(parameters, steps):
    """What of ``parameters = (Cs, Rs, mus, subs)`` survives retraining ``steps``: a
    parameter is dropped (None) when its own step or a step it depends on is retrained
    (the rotations depend on the coarse quantizers, the subquantizers on both)."""
    first = min(steps) if steps else 3
    return tuple(None if step >= first else value
                 for value, step in zip(parameters, PARAMETER_STEPS))


def train_sequence(source, V, M, subquantizer_clusters=256, parameters=None,
                   kmeans_coarse_iters=10, kmeans_local_iters=20, n_init=10,
                   subquantizer_sample_ratio=1.0, random_state=None,
                   rotation_refinement_iters=3, rotation_shrinkage=ROTATION_SHRINKAGE,
                   backend=None, steps=(0, 1, 2), n_jobs=None):
    """The LOPQ training sequence over any row source (`lopq.rows`): fit whatever of
    ``parameters = (Cs, Rs, mus, subs)`` is None (among the parameters of ``steps``),
    reusing the rest. Callers that retrain a step drop what it makes stale first
    (`parameters_to_keep`).

    Step 0: k-means of both halves (`kmeans_rows`, sample warm start). Step 1: per-cluster
    residual statistics in one pass, local covariances shrunk toward the pooled one by
    ``rotation_shrinkage`` (`shrunk_covariances`), rotations by eigenvalue allocation.
    Step 2: the projected residuals (of a ``subquantizer_sample_ratio`` sample of rows),
    M subquantizer k-means in shared passes. When this call trains both the rotations
    and the subquantizers, `refine_rotations` follows for ``rotation_refinement_iters``
    rounds. ``rotation_refinement_iters=0, rotation_shrinkage=0`` train exactly as the
    reference.

    Every random choice is drawn from ``random_state`` in this order, whatever the
    source: `LOPQModel.fit` (an `ArrayRows`) and Spark (`lopq.spark.rows.BlockRows`) with
    the same rows and seed train the same model, up to summation order. The ``"auto"``
    choice draws from a stream of its own: it trains the very model that its chosen
    shrinkage given as a constant trains with the same seed. ``n_jobs`` (None: one per
    core) threads compare the ``"auto"`` shrinkage candidates (`choose_shrinkage`),
    refine the two splits side by side (`refine_rotations`) and run the column groups of
    the k-means seeding and warm start (`kmeans_rows`); the result does not depend on it.

    Returns:
        ``(Cs, Rs, mus, subs)`` stacked float32 arrays, and a dict of seconds per step.
    """
    rotation_shrinkage = check_shrinkage(rotation_shrinkage)
    rng = check_random_state(random_state)
    Cs, Rs, mus, subs = parameters if parameters is not None else (None,) * 4
    steps = set(steps)
    train_rotations = (Rs is None or mus is None) and 1 in steps
    train_subs = subs is None and 2 in steps
    refine = train_rotations and train_subs and rotation_refinement_iters > 0
    n, D = source.n_rows, source.dim
    # the k-means on the driver (seeding, the warm start's sample) runs its column groups
    # on these threads; the source's passes run as the source does
    threads = n_jobs or os.cpu_count() or 1
    timings = {}
    start = time.time()
    if Cs is None and 0 in steps:
        logger.info("step 0: coarse quantizers (V=%d) on %d x %d", V, n, D)
        Cs = kmeans_rows(source, 2, V, kmeans_coarse_iters, n_init, random_state=rng,
                         label=" coarse (step 0)", backend=backend, threads=threads)
        timings["step 0 (coarse)"] = time.time() - start
        start = time.time()
    if train_rotations:
        Cs = np.ascontiguousarray(Cs, dtype=np.float32)
        logger.info("step 1: local rotations")
        statistics = source.covariance_pass(Cs)
        if rotation_shrinkage == "auto":
            # The choice draws from a stream of its own, seeded from a copy of ``rng``:
            # training then goes on with the very draws (and gives the very model) that
            # the chosen constant would with the same seed. Step 1 alone compares too,
            # with the subquantizers (unrefined) that a later step 2 alone will train.
            own_rng = np.random.RandomState(copy.deepcopy(rng).randint(2 ** 31 - 1))
            rotation_shrinkage = choose_shrinkage(
                source, statistics, Cs, M, subquantizer_clusters, kmeans_local_iters,
                rotation_refinement_iters if refine else 0, own_rng, backend,
                n_jobs=n_jobs)
        Rs, mus = rotations_from_statistics(*statistics, M, rotation_shrinkage)
        timings["step 1 (rotations)"] = time.time() - start
        start = time.time()
    if train_subs:
        logger.info("step 2: %d subquantizers of %d clusters", M, subquantizer_clusters)
        rows = source
        if subquantizer_sample_ratio != 1.0:
            size = int(subquantizer_sample_ratio * n)
            if size < subquantizer_clusters:
                raise ValueError(f"subquantizer_sample_ratio={subquantizer_sample_ratio} "
                                 f"leaves {size} rows, fewer than the "
                                 f"{subquantizer_clusters} subquantizer clusters")
            rows = source.subset(sample_indices(n, size, rng))
        projected = rows.projected(Cs, Rs, mus)
        try:
            subs = kmeans_rows(projected, M, subquantizer_clusters, kmeans_local_iters,
                               n_init, random_state=rng, label=" subquantizers (step 2)",
                               backend=backend, threads=threads)
        finally:
            projected.release()
        timings["step 2 (subquantizers)"] = time.time() - start
        start = time.time()
        if refine:
            Rs, subs = refine_rotations(rows, Cs, Rs, mus, subs, rotation_refinement_iters,
                                        rng, rotation_shrinkage, backend, n_jobs)
            timings["rotation refinement"] = time.time() - start
        if rows is not source:
            rows.release()
    for name, seconds in timings.items():
        logger.info("%s: %.2f s", name, seconds)
    return (Cs, Rs, mus, subs), timings


def train_parameters(data, V=8, M=4, subquantizer_clusters=256, parameters=None,
                     kmeans_coarse_iters=10, kmeans_local_iters=20, n_init=10,
                     subquantizer_sample_ratio=1.0, random_state=None, backend=None,
                     rotation_refinement_iters=3, rotation_shrinkage=ROTATION_SHRINKAGE,
                     n_jobs=None):
    """`train_sequence` over in-memory rows ``data`` (n, D) float32 (already validated).

    Returns:
        (Cs, Rs, mus, subs) stacked float32 arrays.
    """
    rows = ArrayRows(data, backend, threads=n_jobs or os.cpu_count() or 1)
    params, _ = train_sequence(rows, V, M, subquantizer_clusters,
                               parameters, kmeans_coarse_iters, kmeans_local_iters, n_init,
                               subquantizer_sample_ratio, random_state,
                               rotation_refinement_iters, rotation_shrinkage, backend,
                               n_jobs=n_jobs)
    return params


# ---------------------------------------------------------------- the reference's layout
# The reference's module-level training functions, with its signatures and return
# layouts (per-split tuples, lists of codebooks), on the batched code above.

def train_coarse(data, V=8, kmeans_coarse_iters=10, n_init=10, random_state=None):
    """Reference API: k-means++ / Lloyd centroids of ``data`` (n, d): (V, d) float32."""
    centers, _, _ = kmeans(data, V, kmeans_coarse_iters, n_init, random_state=random_state,
                           label=" coarse", return_labels=False)
    return centers


def train_subquantizers(data, num_buckets, subquantizer_clusters=256, kmeans_local_iters=20,
                        n_init=10, random_state=None):
    """Reference API: one k-means per equal column slice of ``data`` (n, d).

    Returns:
        list of ``num_buckets`` (S, d / num_buckets) float32 codebooks.
    """
    return list(train_codebooks(data, num_buckets, subquantizer_clusters, kmeans_local_iters,
                                n_init, random_state))


def compute_local_rotations(data, C, num_buckets):
    """Reference API: local rotations of the clusters of ``C`` (V, d) on ``data`` (n, d).

    Returns:
        R (V, d, d), mu (V, d) mean residuals, assignments (n,), residuals (n, d).
    """
    A, sums, counts, assignments, residuals = accumulate_covariance_estimators(data, C)
    R, mu = compute_rotations_from_accumulators(A, sums, counts, num_buckets)
    return R, mu, assignments, residuals
