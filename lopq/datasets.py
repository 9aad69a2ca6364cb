"""Synthetic data for demos, tests and benchmarks (no downloads)."""

import numpy as np


def make_clustered(n, d=128, n_clusters=64, seed=0, dtype=np.float32):
    """Gaussian-mixture vectors with decaying per-dimension variance, like PCA'd
    embeddings.

    Args:
        n: rows; d: dimension; n_clusters: mixture components; seed: RNG seed.

    Returns:
        (n, d) array of ``dtype``.
    """
    rng = np.random.RandomState(seed)
    scale = np.linspace(2.0, 0.2, d)
    centres = rng.randn(n_clusters, d) * scale * 2.0
    out = np.empty((n, d), dtype=dtype)
    block = 100_000
    for start in range(0, n, block):
        m = min(block, n - start)
        which = rng.randint(n_clusters, size=m)
        out[start:start + m] = centres[which] + rng.randn(m, d) * scale
    return out
