"""Single-machine k-means on the kernels: greedy k-means++ init, Lloyd, empty-cluster repair.

The same loop drives the distributed k-means in `lopq.spark.kmeans`: only the
"assign and sum" step differs (a kernel here, a Spark pass there).
"""

import logging
import math

import numpy as np

from . import _kernels as kernels
from ._kernels._jit import njit

logger = logging.getLogger(__name__)

#: k-means++ seeds from at most this many points per cluster (the rest only run Lloyd).
INIT_POINTS_PER_CLUSTER = 32


def check_random_state(seed):
    """A `numpy.random.RandomState` from None, an int or a RandomState."""
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.RandomState(seed)
    if isinstance(seed, np.random.RandomState):
        return seed
    raise ValueError(f"random_state must be None, an int or a numpy RandomState, got {seed!r}")


@njit(cache=True, nogil=True, fastmath=True)
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


@njit(cache=True, nogil=True, fastmath=True)
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


def kmeanspp_init(X, k, rng):
    """Greedy k-means++ seeding (2 + ln k candidates per centre).

    Args:
        X: (n, d) float32 rows, n >= k.
        k: number of centres.
        rng: numpy RandomState.

    Returns:
        (k, d) float32 initial centres.
    """
    n = X.shape[0]
    trials = 2 + int(math.log(k))
    first = rng.randint(n)
    uniforms = rng.random_sample((max(k - 1, 0), trials))
    centers = np.empty((k, X.shape[1]), dtype=np.float32)
    _kmeanspp_kernel(X, np.ascontiguousarray(X.T), k, first, uniforms, centers)
    return centers


def repair_empty_clusters(centers, counts, X, sqdist):
    """Move each empty centre onto one of the points farthest from their centre.

    Args:
        centers: (k, d) float32, updated in place.
        counts: (k,) int64 points per centre, updated in place.
        X: (n, d) float32 the points of the last assignment.
        sqdist: (n,) float32 their distances to their centres.

    Returns:
        number of centres repaired.
    """
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0:
        return 0
    farthest = np.argsort(sqdist, kind="stable")[::-1][:empty.size]
    centers[empty[:farthest.size]] = X[farthest]
    counts[empty[:farthest.size]] = 1
    return int(empty.size)


def lloyd(X, centers, max_iter, tol, backend=None, label="", final_assignment=True):
    """Lloyd iterations from ``centers`` until ``max_iter`` or the centre shift <= tol.

    Returns:
        centers (k, d) float32, labels (n,) int32, inertia float (sum of squared
        distances), iterations run. With ``final_assignment`` the labels and inertia are
        those of the returned centres (one more pass); otherwise of the last iteration's
        assignment, before its update.
    """
    k = centers.shape[0]
    centers = centers.astype(np.float32, copy=True)
    it = 0
    for it in range(1, max_iter + 1):
        labels, sqdist = kernels.assign(X, centers, backend)
        sums, counts = kernels.cluster_sums(X, labels, k, backend)
        new_centers = centers.copy()
        filled = counts > 0
        new_centers[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        repaired = repair_empty_clusters(new_centers, counts, X, sqdist)
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        logger.debug("k-means%s iteration %d: objective %.6g, shift %.3g, repaired %d",
                     label, it, float(sqdist.sum(dtype=np.float64)), shift, repaired)
        if shift <= tol and not repaired:
            break
    if final_assignment:
        labels, sqdist = kernels.assign(X, centers, backend)
    return centers, labels, float(sqdist.sum(dtype=np.float64)), it


def kmeans(X, k, max_iter=20, n_init=1, tol=1e-4, random_state=None, backend=None,
           label="", return_labels=True):
    """k-means with greedy k-means++ seeding; best of ``n_init`` runs by inertia.

    Args:
        X: (n, d) rows (converted to float32), n >= k.
        k: number of clusters.
        max_iter: Lloyd iterations per run.
        n_init: independent runs.
        tol: stop when the squared centre shift <= tol * (mean per-dimension variance
            of X), as scikit-learn does.
        random_state: None, int or RandomState.
        backend: kernel backend (see `lopq._kernels`).
        return_labels: False skips the pass that assigns rows to the final centres
            (labels and inertia are then those of the last iteration) unless n_init > 1.

    Returns:
        centers (k, d) float32, labels (n,) int32, inertia float.
    """
    X = kernels.rows32(X)
    n = X.shape[0]
    if k < 1:
        raise ValueError(f"k-means needs at least one cluster, got k={k}")
    if n < k:
        raise ValueError(f"k-means{label} needs at least k={k} points, got {n}")
    rng = check_random_state(random_state)
    # scikit-learn's criterion: tol times the mean per-dimension variance.
    abs_tol = tol * float(X.var(axis=0, dtype=np.float64).mean()) if tol else 0.0
    best = None
    for run in range(max(1, n_init)):
        sample = X
        if n > INIT_POINTS_PER_CLUSTER * k:
            idx = np.sort(rng.choice(n, INIT_POINTS_PER_CLUSTER * k, replace=False))
            sample = X[idx]
        init = kmeanspp_init(sample, k, rng)
        centers, labels, inertia, iters = lloyd(X, init, max_iter, abs_tol, backend, label,
                                                final_assignment=return_labels or n_init > 1)
        logger.info("k-means%s (k=%d, n=%d) run %d: inertia %.6g after %d iterations",
                    label, k, n, run + 1, inertia, iters)
        if best is None or inertia < best[2]:
            best = (centers, labels, inertia)
    return best
