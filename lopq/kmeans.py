"""k-means: greedy k-means++ init and one Lloyd loop with empty-cluster repair.

`lloyd_loop` is the only Lloyd iteration in lopq. It drives an *assignment pass*: a
function that, given centres, returns per-cluster sums and counts, the objective and a way
to fetch the rows farthest from their centres (`LloydStep`). `lloyd` runs it with the
kernels over an in-memory array; `lopq.spark.kmeans` runs it with one Spark job per pass;
the codebook step of the rotation refinement (`lopq.training`) uses its update rule,
`update_centers`.
"""

import logging
import math
import time
from typing import NamedTuple

import numpy as np

from . import _kernels as kernels

logger = logging.getLogger(__name__)

#: k-means++ seeds from at most this many points per cluster (the rest only run Lloyd).
INIT_POINTS_PER_CLUSTER = 32
#: With at least 4x this many rows per cluster, the Lloyd iterations first run on a
#: sample of this many rows per cluster, then FULL_DATA_ITERS more on every row (faiss
#: samples too, 256 per centroid, and stops there).
WARM_START_POINTS_PER_CLUSTER = 64
#: Iterations on every row after the sample's (at most max_iter in all phases each).
FULL_DATA_ITERS = 4


def check_random_state(seed):
    """A `numpy.random.RandomState` from None, an int or a RandomState."""
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.RandomState(seed)
    if isinstance(seed, np.random.RandomState):
        return seed
    raise ValueError(f"random_state must be None, an int or a numpy RandomState, got {seed!r}")


def kmeanspp_init(X, k, rng, backend=None):
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
    return kernels.kmeanspp(X, first, uniforms, backend)


class LloydStep(NamedTuple):
    """What one assignment pass reports for G independent column groups of k centres.

    Attributes:
        sums: (G, k, dg) float64 per-cluster sums of the assigned rows.
        counts: (G, k) int64 rows per cluster.
        objective: (G,) float64 sums of squared distances to the assigned centres.
        farthest: G callables, ``count -> (m <= count, dg)`` rows, farthest from their
            centre first (the candidates for empty clusters).
    """
    sums: np.ndarray
    counts: np.ndarray
    objective: np.ndarray
    farthest: list


def no_farthest_rows(count):
    """A `LloydStep.farthest` entry for passes that do not track distances: empty
    clusters then keep their centre."""
    return np.empty((0, 0), dtype=np.float32)


def update_centers(centers, step, spare_rows=None, rng=None):
    """The Lloyd update: each centre moves to the mean of its rows; an empty one moves onto
    the next of the farthest rows, then onto random ``spare_rows`` (s, G * dg) when given,
    else stays.

    Args:
        centers: (G, k, dg) float32 centres of the pass.
        step: the pass's `LloydStep`.

    Returns:
        new (G, k, dg) float32 centres, number of empty clusters.
    """
    G, k, dg = centers.shape
    new = centers.copy()
    empties = 0
    for g in range(G):
        filled = step.counts[g] > 0
        new[g][filled] = (step.sums[g][filled] / step.counts[g][filled, None])
        empty = np.flatnonzero(~filled)
        if empty.size == 0:
            continue
        empties += empty.size
        far = step.farthest[g](empty.size)
        if len(far):
            new[g][empty[:len(far)]] = far
        rest = empty[len(far):]
        if rest.size and spare_rows is not None and len(spare_rows):
            picks = spare_rows[rng.randint(len(spare_rows), size=rest.size)]
            new[g][rest] = picks[:, g * dg:(g + 1) * dg]
    return new.astype(np.float32, copy=False), empties


def lloyd_loop(assignment_pass, centers, max_iter, abs_tol, label="", spare_rows=None,
               rng=None, log_level=logging.DEBUG):
    """Lloyd iterations of G column groups until ``max_iter``, or until no cluster was
    empty and every group's squared centre shift is <= its ``abs_tol``.

    Args:
        assignment_pass: ``(G, k, dg) centres -> LloydStep``.
        centers: (G, k, dg) float32 starting centres.
        abs_tol: (G,) or scalar tolerance on the squared shift.
        spare_rows, rng: see `update_centers`.

    Returns:
        centres (G, k, dg) float32, the last pass's `LloydStep` (of the centres before the
        last update), iterations run.
    """
    centers = np.ascontiguousarray(centers, dtype=np.float32)
    abs_tol = np.broadcast_to(np.asarray(abs_tol, dtype=np.float64), centers.shape[:1])
    step, it = None, 0
    for it in range(1, max_iter + 1):
        start = time.time()
        step = assignment_pass(centers)
        new_centers, repaired = update_centers(centers, step, spare_rows, rng)
        shift = ((new_centers.astype(np.float64) - centers) ** 2).sum(axis=(1, 2))
        centers = new_centers
        logger.log(log_level, "k-means%s: Lloyd iteration %d/%d: objective %.6g, shift "
                   "%.3g, repaired %d empty, %.2f s", label, it, max_iter,
                   float(step.objective.sum()), float(shift.max()), repaired,
                   time.time() - start)
        if not repaired and np.all(shift <= abs_tol):
            logger.log(log_level, "k-means%s converged after %d iterations", label, it)
            break
    return centers, step, it


def lloyd(X, centers, max_iter, tol, backend=None, label="", final_assignment=True):
    """Lloyd iterations on in-memory rows from ``centers`` (`lloyd_loop` with the
    kernels as the assignment pass).

    Args:
        X: (n, d) float32 rows; centers: (k, d) starting centres.
        tol: absolute tolerance on the squared centre shift.

    Returns:
        centers (k, d) float32, labels (n,) int32, inertia float (sum of squared
        distances), iterations run. With ``final_assignment`` the labels and inertia are
        those of the returned centres (one more pass); otherwise of the last iteration's
        assignment, before its update.
    """
    k = centers.shape[0]
    last = {}

    def assignment_pass(C):
        labels, sqdist = kernels.assign(X, C[0], backend)
        sums, counts = kernels.cluster_sums(X, labels, k, backend)
        last.update(labels=labels, sqdist=sqdist)

        def farthest(count):
            return X[np.argsort(sqdist, kind="stable")[::-1][:count]]
        return LloydStep(sums[None], counts[None],
                         np.array([sqdist.sum(dtype=np.float64)]), [farthest])

    C, _, it = lloyd_loop(assignment_pass, centers[None], max_iter, tol, label)
    centers = C[0]
    if final_assignment:
        labels, sqdist = kernels.assign(X, centers, backend)
    else:
        labels, sqdist = last["labels"], last["sqdist"]
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
    X = kernels.as_float32_rows(X)
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
        init = kmeanspp_init(sample, k, rng, backend)
        full_iters = max_iter
        if n >= 4 * WARM_START_POINTS_PER_CLUSTER * k and max_iter > FULL_DATA_ITERS:
            # Most of the centres' travel happens on a sample; every row then refines
            # them. Measured: 1.6x faster fit of 100k x 128 rows, k-means objective
            # +0.5% over six seeds, reconstruction error 0.05800 -> 0.05825.
            idx = np.sort(rng.choice(n, WARM_START_POINTS_PER_CLUSTER * k, replace=False))
            init, _, _, _ = lloyd(X[idx], init, max_iter, abs_tol, backend,
                                  f"{label} (sample)", final_assignment=False)
            full_iters = FULL_DATA_ITERS
        centers, labels, inertia, iters = lloyd(X, init, full_iters, abs_tol, backend,
                                                label,
                                                final_assignment=return_labels or n_init > 1)
        logger.info("k-means%s (k=%d, n=%d) run %d: inertia %.6g after %d iterations",
                    label, k, n, run + 1, inertia, iters)
        if best is None or inertia < best[2]:
            best = (centers, labels, inertia)
    return best
