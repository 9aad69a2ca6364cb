"""Row sources: what the training sequence (`lopq.training`) needs from its data.

A row source holds ``n_rows`` rows of ``dim`` float32 columns in a fixed order and offers
a handful of passes, each returning statistics sized by the model, never by the data:

- ``take(indices)``: the rows at sorted global indices, as an in-memory array (samples);
- ``subset(indices)``: a row source of only those rows (``subquantizer_sample_ratio``);
- ``lloyd_pass(centers)``: one k-means assignment pass of G column groups (`LloydStep`);
- ``covariance_pass(Cs)``: per coarse cluster, the residual statistics of both splits;
- ``projected(Cs, Rs, mus, passes=None)``: a row source of the locally rotated
  residuals (``passes=1``: the caller reads it once, so a source on files may project
  on the fly rather than store the projections);
- ``release()``: free what the source cached.

`ArrayRows` is the in-memory source (a numpy array). `lopq.spark.rows.BlockRows` is the
same interface over cached row blocks on Spark, one job per pass. The training sequence
only sees this interface, so `LOPQModel.fit` and ``spark/train_model.py`` run the very
same steps: the same samples drawn from the same seed give the same model, up to the
order of summation.
"""

import numpy as np

from . import _kernels as kernels
from .kmeans import ArrayLloydSource, split_columns


def covariance_statistics(X, Cs, backend=None):
    """Per coarse cluster of each split, the residual statistics of one block of rows.

    Args:
        X: (b, D) float32 rows; Cs: (2, V, D/2) float32 coarse centroids.

    Returns:
        A (2, V, h, h) float64 summed outer products, sums (2, V, h) float64,
        counts (2, V) int64.
    """
    V, h = Cs.shape[1], Cs.shape[2]
    A = np.zeros((2, V, h, h))
    sums = np.zeros((2, V, h))
    counts = np.zeros((2, V), dtype=np.int64)
    for split in range(2):
        half = split_columns(X, 2, split)
        labels, _ = kernels.assign(half, Cs[split], backend)
        a, s, c = kernels.accumulate_covariance(half - Cs[split][labels], labels, V, backend)
        A[split] += a
        sums[split] += s
        counts[split] += c
    return A, sums, counts


def project_rows(X, Cs, Rs, mus, backend=None):
    """Coarse-assign both halves of ``X`` (n, D) and rotate their residuals: ``R_c (x -
    C_c - mu_c)`` per split, (n, D) float32."""
    projected = np.empty(X.shape, dtype=np.float32)
    h = X.shape[1] // 2
    for split in range(2):
        half = split_columns(X, 2, split)
        labels, _ = kernels.assign(half, Cs[split], backend)
        projected[:, split * h:(split + 1) * h] = kernels.project_residuals(
            half, labels, Cs[split], Rs[split], mus[split], backend)
    return projected


class ArrayRows(ArrayLloydSource):
    """The in-memory row source: every pass runs the kernels over one (n, D) array.

    Args:
        X: (n, D) rows (converted to C-contiguous float32 once).
        backend: kernel backend (see `lopq._kernels`).
        threads: column groups of a Lloyd pass assigned side by side (also in the sources
            it derives); the results do not depend on it.
    """

    def subset(self, indices):
        return ArrayRows(self.take(indices), self.backend, self.threads)

    def covariance_pass(self, Cs):
        return covariance_statistics(self.X, Cs, self.backend)

    def projected(self, Cs, Rs, mus, passes=None):
        """The projected residuals as a row source (``passes``: how often the caller
        will read it, a hint that sources on files use; in memory it changes nothing)."""
        return ArrayRows(project_rows(self.X, Cs, Rs, mus, self.backend), self.backend,
                         self.threads)

    def release(self):
        pass
