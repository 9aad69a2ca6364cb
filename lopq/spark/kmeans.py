"""Distributed k-means over column groups of cached row blocks.

The k-means itself is `lopq.kmeans.kmeans_rows` (sample warm start, then Lloyd passes
over every row); here it runs over `lopq.spark.rows.BlockRows`, one Spark job per pass:
the centres are broadcast, every partition runs the assignment kernel on its blocks and
returns per-cluster sums, counts, its objective and its farthest rows (for empty-cluster
repair); ``treeAggregate`` adds them up and the driver finishes the step. Several
independent k-means problems on disjoint column groups (the two coarse splits, or all M
subquantizers) run in the same passes.
"""

import numpy as np

from ..kmeans import kmeans_rows, lloyd_loop
from .rows import BlockRows


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


def kmeans_column_groups(sc, blocks, n_groups, k, max_iter, seed=None, tol=1e-4,
                         depth=None, label="", backend=None, init=None, n_init=1):
    """k-means of each of ``n_groups`` equal column groups of the blocks, in shared passes.

    Args:
        sc: SparkContext; blocks: cached RDD of ``(ids, X)`` with X (b, n_groups * dg).
        k: clusters per group; max_iter: Lloyd iterations.
        seed: seeds the samples and the k-means++ init (`lopq.kmeans.kmeans_rows`).
        tol: stop when every group's squared centre shift <= tol * its mean
            per-dimension variance (scikit-learn's criterion).
        depth: treeAggregate depth (None: `lopq.spark.rows.BlockRows` decides).
        init: optional (n_groups, k, dg) starting centres: then ``max_iter`` Lloyd passes
            over every row from them (no sampling, no k-means++).

    Returns:
        (n_groups, k, dg) float32 centres.
    """
    source = BlockRows(sc, blocks, depth, backend=backend)
    try:
        if init is not None:
            centers = np.ascontiguousarray(init, dtype=np.float32)
            centers, _, _ = lloyd_loop(source.lloyd_pass, centers, max_iter, 0.0, label,
                                       log_level=source.log_level)
            return centers
        return kmeans_rows(source, n_groups, k, max_iter, n_init, tol, seed, label, backend)
    finally:
        source.release()  # its row files (the blocks are the caller's)
