"""Distributed k-means over column groups of cached row blocks.

One Lloyd iteration is one Spark job, driven by `lopq.kmeans.lloyd_loop`: the centres
are shipped to the tasks, every partition runs the assignment kernel on its blocks and
returns per-cluster sums, counts, its objective and its farthest points (for empty-cluster
repair); ``treeAggregate`` adds them up and the driver finishes the step. Several
independent k-means problems on disjoint column groups (the two coarse splits, or all M
subquantizers) run in the same passes.
"""

import itertools
import logging

import numpy as np

from .. import _kernels as kernels
from ..kmeans import INIT_POINTS_PER_CLUSTER, LloydStep, kmeanspp_init, lloyd_loop
from .session import as_context

logger = logging.getLogger(__name__)

#: Farthest points each partition reports per group, for empty-cluster repair.
REPAIR_CANDIDATES = 8


#: Centres up to this size travel inside the task closure (measured 20-30 ms less per
#: iteration than a broadcast on small jobs); larger ones are broadcast.
CLOSURE_BYTES = 4 << 20


class ClosureOrBroadcast:
    """A value shipped to tasks: in the closure when small, as a broadcast when large.
    Exposes ``.value`` and ``.unpersist()`` like a broadcast."""

    def __init__(self, sc, value):
        self._broadcast = sc.broadcast(value) if value.nbytes > CLOSURE_BYTES else None
        self._value = None if self._broadcast is not None else value

    @property
    def value(self):
        return self._value if self._broadcast is None else self._broadcast.value

    def unpersist(self):
        if self._broadcast is not None:
            self._broadcast.unpersist()

    def __getstate__(self):
        return {"_broadcast": self._broadcast, "_value": self._value}


def sample_rows(blocks, fraction, seed):
    """Bernoulli sample of rows of a blocks RDD, seeded per partition: (s, D) float32."""
    base_seed = 0 if seed is None else int(seed)

    def sample(index, items):
        rng = np.random.RandomState((base_seed * 1000003 + index) % (2 ** 32))
        for _, X in items:
            keep = rng.random_sample(X.shape[0]) < fraction
            if keep.any():
                yield X[keep]

    parts = blocks.mapPartitionsWithIndex(sample).collect()
    return np.concatenate(parts) if parts else np.empty((0, 0), dtype=np.float32)


def column_stats(blocks, depth=2):
    """Row count, column sums and sums of squares: (n, (D,) float64, (D,) float64)."""
    def partition(items):
        n, s, ss = 0, 0.0, 0.0
        for _, X in items:
            X64 = X.astype(np.float64)
            n += X.shape[0]
            s = s + X64.sum(axis=0)
            ss = ss + (X64 * X64).sum(axis=0)
        yield n, s, ss

    return blocks.mapPartitions(partition).treeAggregate(
        (0, 0.0, 0.0), lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2]),
        lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2]), depth=depth)


def _lloyd_partition(centers_bc, backend):
    def partition(items):
        centers = centers_bc.value  # (G, k, dg)
        G, k, dg = centers.shape
        sums = np.zeros((G, k, dg))
        counts = np.zeros((G, k), dtype=np.int64)
        objective = np.zeros(G)
        far = [[] for _ in range(G)]  # (sqdist, row) candidates
        for _, X in items:
            for g in range(G):
                sub = np.ascontiguousarray(X[:, g * dg:(g + 1) * dg])
                labels, sqdist = kernels.assign(sub, centers[g], backend)
                s, c = kernels.cluster_sums(sub, labels, k, backend)
                sums[g] += s
                counts[g] += c
                objective[g] += sqdist.sum(dtype=np.float64)
                top = np.argsort(sqdist)[-REPAIR_CANDIDATES:]
                far[g].extend((float(sqdist[i]), sub[i].copy()) for i in top)
                far[g] = sorted(far[g], key=lambda t: -t[0])[:REPAIR_CANDIDATES]
        yield sums, counts, objective, far
    return partition


def _merge(a, b):
    far = [sorted(fa + fb, key=lambda t: -t[0])[:REPAIR_CANDIDATES]
           for fa, fb in zip(a[3], b[3])]
    return a[0] + b[0], a[1] + b[1], a[2] + b[2], far


def kmeans_column_groups(sc, blocks, n_groups, k, max_iter, seed=None, tol=1e-4,
                         depth=2, label="", backend=None, n_rows=None, init=None):
    """k-means of each of ``n_groups`` equal column groups of the blocks, in shared passes.

    Args:
        sc: SparkContext; blocks: cached RDD of ``(ids, X)`` with X (b, n_groups * dg).
        k: clusters per group; max_iter: Lloyd iterations.
        seed: seeds the sample and the k-means++ init.
        tol: stop when every group's squared centre shift <= tol * its mean
            per-dimension variance (scikit-learn's criterion).
        depth: treeAggregate depth.
        init: optional (n_groups, k, dg) starting centres (no sampling, no k-means++).

    Returns:
        (n_groups, k, dg) float32 centres.
    """
    sc = as_context(sc)
    rng = np.random.RandomState(seed)
    if init is not None:
        centers = np.ascontiguousarray(init, dtype=np.float32)
        return _lloyd_iterations(sc, blocks, centers, max_iter, np.zeros(n_groups), depth,
                                 label, backend, rng, centers.reshape(-1, centers.shape[2]))
    sc.setJobDescription(f"lopq k-means{label}: statistics")
    n, col_sum, col_sumsq = column_stats(blocks, depth) if n_rows is None else (n_rows, None,
                                                                                None)
    if n < k:
        raise ValueError(f"k-means{label} needs at least k={k} rows, the data has {n}")
    fraction = min(1.0, 1.1 * INIT_POINTS_PER_CLUSTER * k / n)
    sc.setJobDescription(f"lopq k-means{label}: sample for initialisation")
    sample = sample_rows(blocks, fraction, rng.randint(2 ** 31))
    while sample.shape[0] < k and fraction < 1.0:  # an unlucky Bernoulli draw
        fraction = min(1.0, 2 * fraction)
        sample = sample_rows(blocks, fraction, rng.randint(2 ** 31))
    D = sample.shape[1]
    dg = D // n_groups
    if col_sum is None:
        var = sample.astype(np.float64).var(axis=0)
    else:
        mean = col_sum / n
        var = np.maximum(col_sumsq / n - mean * mean, 0.0)
    abs_tol = tol * var.reshape(n_groups, dg).mean(axis=1)  # scikit-learn's criterion
    centers = np.stack([kmeanspp_init(np.ascontiguousarray(sample[:, g * dg:(g + 1) * dg]),
                                      k, rng) for g in range(n_groups)])
    logger.info("k-means%s: %d group(s), k=%d, n=%d, initialised from %d sampled rows",
                label, n_groups, k, n, sample.shape[0])
    return _lloyd_iterations(sc, blocks, centers, max_iter, abs_tol, depth, label, backend,
                             rng, sample)


def _lloyd_iterations(sc, blocks, centers, max_iter, abs_tol, depth, label, backend, rng,
                      sample):
    """`lopq.kmeans.lloyd_loop` with one Spark job per assignment pass."""
    n_groups, k, dg = centers.shape
    iteration = itertools.count(1)

    def assignment_pass(C):
        sc.setJobDescription(f"lopq k-means{label}: Lloyd iteration {next(iteration)}/"
                             f"{max_iter}")
        shipped = ClosureOrBroadcast(sc, C)
        sums, counts, objective, far = blocks.mapPartitions(
            _lloyd_partition(shipped, backend)).treeAggregate(
                (np.zeros((n_groups, k, dg)), np.zeros((n_groups, k), dtype=np.int64),
                 np.zeros(n_groups), [[] for _ in range(n_groups)]),
                _merge, _merge, depth=depth)
        shipped.unpersist()
        return LloydStep(sums, counts, objective, [_rows_of(candidates) for candidates in far])

    spare = sample if sample.shape[1] == n_groups * dg else None
    centers, _, _ = lloyd_loop(assignment_pass, centers, max_iter, abs_tol, label,
                               spare_rows=spare, rng=rng, log_level=logging.INFO)
    return centers


def _rows_of(candidates):
    """`LloydStep.farthest` for merged ``[(sqdist, row), ...]`` candidates (farthest
    first)."""
    def farthest(count):
        return np.array([row for _, row in candidates[:count]], dtype=np.float32)
    return farthest
