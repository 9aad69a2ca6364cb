"""LOPQ training and PCA on Spark: steps 0 (coarse), 1 (rotations), 2 (subquantizers).

Each step is a few passes over the cached blocks; the model travels as a broadcast and
the accumulators are sized by the model, never by the data.
"""

import logging
import time

import numpy as np

from .. import _kernels as kernels
from ..model import LOPQModel
from ..training import (
    REFINE_POINTS_PER_CENTROID,
    ROTATION_SHRINKAGE,
    compute_rotations_from_accumulators,
    refine_local_rotations,
)
from .kmeans import kmeans_column_groups, sample_rows
from .session import as_context

logger = logging.getLogger(__name__)


def train_coarse_on_blocks(sc, blocks, V, iters=10, seed=None, depth=2, n_rows=None):
    """Step 0: both coarse quantizers in the same passes. Returns Cs (2, V, D/2)."""
    sc = as_context(sc)
    return kmeans_column_groups(sc, blocks, 2, V, iters, seed=seed, depth=depth,
                                label=" coarse (step 0)", n_rows=n_rows)


def _covariance_partition(Cs_bc):
    def partition(items):
        Cs = Cs_bc.value
        V, h = Cs.shape[1], Cs.shape[2]
        A = np.zeros((2, V, h, h))
        sums = np.zeros((2, V, h))
        counts = np.zeros((2, V), dtype=np.int64)
        for _, X in items:
            for split in range(2):
                half = np.ascontiguousarray(X[:, split * h:(split + 1) * h])
                labels, _ = kernels.assign(half, Cs[split])
                a, s, c = kernels.accumulate_covariance(half - Cs[split][labels], labels, V)
                A[split] += a
                sums[split] += s
                counts[split] += c
        yield A, sums, counts
    return partition


def train_rotations_on_blocks(sc, blocks, Cs, M, depth=2,
                              shrinkage=ROTATION_SHRINKAGE):
    """Step 1: per-cluster covariance accumulators aggregated across the cluster, then
    rotations on the driver (`compute_rotations_from_accumulators`, covariances shrunk by
    ``shrinkage`` as in `LOPQModel.fit`). Returns Rs (2, V, h, h), mus (2, V, h)
    float32."""
    sc = as_context(sc)
    start = time.time()
    sc.setJobDescription("lopq rotations (step 1): covariance accumulators")
    Cs_bc = sc.broadcast(np.ascontiguousarray(Cs, dtype=np.float32))
    V, h = Cs.shape[1], Cs.shape[2]
    zero = (np.zeros((2, V, h, h)), np.zeros((2, V, h)), np.zeros((2, V), dtype=np.int64))

    def add(a, b):
        return a[0] + b[0], a[1] + b[1], a[2] + b[2]

    A, sums, counts = blocks.mapPartitions(_covariance_partition(Cs_bc)).treeAggregate(
        zero, add, add, depth=depth)
    Cs_bc.unpersist()
    Rs, mus = [], []
    for split in range(2):
        R, mu = compute_rotations_from_accumulators(A[split], sums[split], counts[split],
                                                    M // 2, shrinkage)
        Rs.append(R)
        mus.append(mu)
    logger.info("step 1: rotations of 2 x %d clusters in %.2f s", V, time.time() - start)
    return np.stack(Rs).astype(np.float32), np.stack(mus).astype(np.float32)


def _projection_partition(model_bc, fraction, seed):
    base_seed = 0 if seed is None else int(seed)

    def partition(index, items):
        model = model_bc.value
        rng = np.random.RandomState((base_seed * 7919 + index) % (2 ** 32))
        for ids, X in items:
            if fraction < 1.0:
                X = X[rng.random_sample(X.shape[0]) < fraction]
                if X.shape[0] == 0:
                    continue
            _, projected = model.project_rows(X)
            yield ids, projected
    return partition


def train_subquantizers_on_blocks(sc, blocks, Cs, Rs, mus, M, S=256, iters=20,
                                  sample_ratio=1.0, seed=None, depth=2):
    """Step 2: project the residuals once (cached), then train all M subquantizers in the
    same passes. Returns subs (M, S, D/M) float32."""
    sc = as_context(sc)
    V = Cs.shape[1]
    partial = LOPQModel(V, M, S, (Cs, Rs, mus, None))
    model_bc = sc.broadcast(partial)
    from pyspark import StorageLevel
    projected = blocks.mapPartitionsWithIndex(
        _projection_partition(model_bc, sample_ratio, seed)).persist(
            StorageLevel.MEMORY_AND_DISK)
    try:
        subs = kmeans_column_groups(sc, projected, M, S, iters, seed=seed, depth=depth,
                                    label=" subquantizers (step 2)")
    finally:
        projected.unpersist()
        model_bc.unpersist()
    return subs


def refine_rotations(sc, blocks, n, Cs, Rs, mus, subs, iters=3, seed=None, depth=2,
                     shrinkage=ROTATION_SHRINKAGE):
    """`lopq.training.refine_local_rotations` on a driver-side sample of at most 64 rows
    per subquantizer centroid (bounded by the model, not the data), then one Lloyd step
    of the codebooks over all rows on the cluster."""
    sc = as_context(sc)
    S = subs.shape[1]
    rng = np.random.RandomState(seed)
    sc.setJobDescription("lopq rotation refinement: sample")
    sample = sample_rows(blocks, min(1.0, REFINE_POINTS_PER_CENTROID * S / n),
                         rng.randint(2 ** 31))
    Rs, subs = refine_local_rotations(sample, Cs, Rs, mus, subs, iters, rng,
                                      shrinkage=shrinkage)
    if sample.shape[0] < n:
        V, M = Cs.shape[1], subs.shape[0]
        model_bc = sc.broadcast(LOPQModel(V, M, S, (Cs, Rs, mus, None)))
        projected = blocks.mapPartitionsWithIndex(_projection_partition(model_bc, 1.0, 0))
        subs = kmeans_column_groups(sc, projected, M, S, 1, depth=depth, init=subs,
                                    label=" rotation refinement: codebook update")
        model_bc.unpersist()
    return Rs, subs


def train_model(sc, blocks, V, M, S=256, steps=(0, 1, 2), existing=None, seed=None,
                subquantizer_sampling_ratio=1.0, coarse_iters=10, local_iters=20, depth=2,
                rotation_refinement_iters=3, n_rows=None,
                rotation_shrinkage=ROTATION_SHRINKAGE):
    """Run the requested steps, reusing ``existing`` parameters for the others.

    Step 1 shrinks the local covariances toward the pooled one by
    ``rotation_shrinkage``; when steps 1 and 2 both run, `refine_rotations` follows for
    ``rotation_refinement_iters`` rounds (both 0: the reference's training exactly).

    Args:
        existing: an `LOPQModel` whose parameters are reused (or None).
        n_rows: number of rows in blocks, if known.

    Returns:
        the trained `LOPQModel`.
    """
    sc = as_context(sc)
    Cs = Rs = mus = subs = None
    if existing is not None:
        Cs, Rs, mus, subs = existing.Cs, existing.Rs, existing.mus, existing.codebooks
    rng = np.random.RandomState(seed)
    timings = {}
    if 0 in steps:
        start = time.time()
        Cs = train_coarse_on_blocks(sc, blocks, V, coarse_iters, rng.randint(2 ** 31), depth,
                                    n_rows)
        timings["step 0 (coarse)"] = time.time() - start
    if 1 in steps:
        start = time.time()
        Rs, mus = train_rotations_on_blocks(sc, blocks, Cs, M, depth, rotation_shrinkage)
        timings["step 1 (rotations)"] = time.time() - start
    if 2 in steps:
        start = time.time()
        subs = train_subquantizers_on_blocks(sc, blocks, Cs, Rs, mus, M, S, local_iters,
                                   subquantizer_sampling_ratio, rng.randint(2 ** 31), depth)
        timings["step 2 (subquantizers)"] = time.time() - start
        if 1 in steps and rotation_refinement_iters > 0:
            start = time.time()
            n = n_rows if n_rows is not None else blocks.map(lambda b: b[1].shape[0]).sum()
            Rs, subs = refine_rotations(sc, blocks, n, Cs, Rs, mus, subs,
                                        rotation_refinement_iters, rng.randint(2 ** 31), depth,
                                        rotation_shrinkage)
            timings["rotation refinement"] = time.time() - start
    for name, seconds in timings.items():
        logger.info("%s: %.2f s", name, seconds)
    model = LOPQModel(V, M, S if subs is None else subs.shape[1], (Cs, Rs, mus, subs))
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
