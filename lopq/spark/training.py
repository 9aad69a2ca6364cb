"""LOPQ training and PCA on Spark.

Training is `lopq.training.train_sequence`, the same steps as `LOPQModel.fit`, over the
cached row blocks (`lopq.spark.rows.BlockRows`): each pass is one job, the model travels
as a broadcast and the accumulators are sized by the model, never by the data.
"""

import logging

import numpy as np

from ..kmeans import kmeans_rows
from ..metric import Metric, model_dimension
from ..model import LOPQModel
from ..training import (
    ROTATION_SHRINKAGE,
    parameters_to_keep,
    rotations_from_statistics,
    train_sequence,
)
from .rows import BlockRows
from .session import as_context, driver_threads

logger = logging.getLogger(__name__)


def train_coarse_on_blocks(sc, blocks, V, iters=10, seed=None, depth=None):
    """Step 0 alone: both coarse quantizers in the same passes. Returns Cs (2, V, D/2)."""
    source = BlockRows(sc, blocks, depth)
    try:
        return kmeans_rows(source, 2, V, iters, 1, random_state=seed,
                           label=" coarse (step 0)")
    finally:
        source.release()


def train_rotations_on_blocks(sc, blocks, Cs, M, depth=None, shrinkage=ROTATION_SHRINKAGE):
    """Step 1 alone: per-cluster covariance accumulators aggregated across the cluster,
    rotations on the driver (`lopq.training.rotations_from_statistics`). Returns
    Rs (2, V, h, h), mus (2, V, h) float32."""
    source = BlockRows(sc, blocks, depth, row_files=False)  # one pass: files cost more
    return rotations_from_statistics(*source.covariance_pass(Cs), M, shrinkage)


def train_subquantizers_on_blocks(sc, blocks, Cs, Rs, mus, M, S=256, iters=20, seed=None,
                                  depth=None):
    """Step 2 alone: project the residuals once (cached), then train all M
    subquantizers in the same passes. Returns subs (M, S, D/M) float32."""
    projected = BlockRows(sc, blocks, depth, row_files=False).projected(Cs, Rs, mus)
    try:
        return kmeans_rows(projected, M, S, iters, 1, random_state=seed,
                           label=" subquantizers (step 2)")
    finally:
        projected.release()


def reads_row_files_only(metric):
    """Whether `train_model` under ``metric`` reads nothing of its blocks but their row
    files (local mode): L2 trains on the loaded rows as they are; the other metrics map
    the blocks first (`lopq.metric.Metric`), so their loading keeps the blocks cached
    (`lopq.spark.data.load_blocks`'s ``cache``)."""
    return metric == "l2"


def train_model(sc, blocks, V, M, S=256, steps=(0, 1, 2), existing=None, seed=None,
                subquantizer_sampling_ratio=1.0, coarse_iters=10, local_iters=20, depth=None,
                rotation_refinement_iters=3, n_rows=None,
                rotation_shrinkage=ROTATION_SHRINKAGE, n_init=1, metric="l2", dim=None,
                max_norm=None):
    """`lopq.training.train_sequence` over the blocks: fit what ``existing`` lacks.

    What the retrained ``steps`` make stale is dropped first
    (`lopq.training.parameters_to_keep`), then the parameters of ``steps`` are trained.
    With the same rows (in the same order), seed and ``n_init``, the model is
    `LOPQModel.fit`'s, up to summation order.

    Args:
        existing: an `LOPQModel` whose parameters are reused (or None).
        steps: training steps to run (0 coarse, 1 rotations, 2 subquantizers).
        n_rows: ignored (the rows are counted per partition once).
        The driver compares the ``"auto"`` shrinkage candidates on
        `lopq.spark.session.driver_threads` threads.
        metric, dim, max_norm: the model's metric (`lopq.metric`), the dimension of the
            rows in ``blocks`` and, for inner product, the norm rows are lifted to
            (`lopq.spark.metric.blocks_for_metric` gives the largest). The rows are
            mapped into the model space on the fly, each pass (no second cached copy).

    Returns:
        the trained `LOPQModel` (``.timings``: seconds per step).
    """
    sc = as_context(sc)
    parameters = (None,) * 4
    if existing is not None:
        parameters = parameters_to_keep(
            (existing.Cs, existing.Rs, existing.mus, existing.codebooks), steps)
    rows_dim = dim  # the rows' dimension, when known (a job finds it otherwise)
    if metric != "l2":
        dim = dim if dim is not None else blocks.first()[1].shape[1]
        rows_dim = model_dimension(metric, dim, M)
        transform = Metric(metric, dim, rows_dim, max_norm)
        blocks = blocks.map(lambda b: (b[0], transform.rows(b[1])))
    source = BlockRows(sc, blocks, depth, dim=rows_dim)
    try:
        (Cs, Rs, mus, subs), timings = train_sequence(
            source, V, M, S, parameters, coarse_iters, local_iters, n_init,
            subquantizer_sampling_ratio, seed, rotation_refinement_iters,
            rotation_shrinkage, steps=steps, n_jobs=driver_threads(sc))
    finally:
        source.release()  # its row files (the blocks are the caller's)
    model = LOPQModel(V, M, S if subs is None else subs.shape[1], (Cs, Rs, mus, subs),
                      metric=metric, dim=dim if metric != "l2" else None,
                      max_norm=max_norm if metric == "inner_product" else None)
    model.timings = timings
    return model


def pca_statistics(sc, blocks, depth=4):
    """Count, mean and covariance of the blocks via ``treeAggregate``.

    Returns:
        dict with ``mu (D,)``, ``P (D, D)`` eigenvectors as columns, ``E (D,)``
        eigenvalues in ascending order, ``A (D, D)`` covariance and ``c`` the count, the
        keys of the reference's PCA pickle.
    """
    sc = as_context(sc)
    sc.setJobDescription("lopq PCA: covariance")

    def partition(items):
        n, s, outer = 0, 0.0, 0.0
        for _, X in items:
            X64 = X.astype(np.float64)
            n += X.shape[0]
            s = s + X64.sum(axis=0)
            outer = outer + X64.T @ X64
        yield n, s, outer

    def add(a, b):
        return a[0] + b[0], a[1] + b[1], a[2] + b[2]

    n, s, outer = blocks.mapPartitions(partition).treeAggregate((0, 0.0, 0.0), add, add,
                                                                depth=depth)
    if n < 2:
        raise ValueError(f"PCA needs at least 2 vectors, got {n}")
    mu = s / n
    A = (outer - n * np.outer(mu, mu)) / (n - 1)
    E, P = np.linalg.eigh(A)
    return {"mu": mu, "P": P, "E": E, "A": A, "c": n}


def prepare_pca(params, D):
    """Truncate PCA to the top D components and balance the variance of the two halves
    (the reference's ``pca_preparation``). Returns ``{"P": (D0, D), "mu": (D0,)}``."""
    from ..training import eigenvalue_allocation
    E, P = np.asarray(params["E"]), np.asarray(params["P"])
    if not 0 < D <= E.shape[0] or D % 2:
        raise ValueError(f"--D must be even and in (0, {E.shape[0]}], got {D}")
    E, P = E[-D:], P[:, -D:]  # eigh: ascending eigenvalues
    permutation = eigenvalue_allocation(2, E)
    return {"P": P[:, permutation], "mu": np.asarray(params["mu"])}


def apply_pca(X, pca):
    """Project rows with prepared PCA parameters: ``(X - mu) @ P``, float32."""
    return ((np.asarray(X, dtype=np.float64) - pca["mu"]) @ pca["P"]).astype(np.float32)
