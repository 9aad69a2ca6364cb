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

import hashlib

import numpy as np

from . import _kernels as kernels
from .kmeans import ArrayLloydSource, split_columns


def centroid_tag(Cs):
    """A short hex digest of coarse centroids ``Cs``: the key under which a source keeps
    the coarse labels its covariance pass computed (`covariance_statistics`
    ``labels_out``), for the projection passes that follow with the same centroids."""
    return hashlib.sha1(np.ascontiguousarray(Cs, dtype=np.float32).tobytes()).hexdigest()[:16]


def covariance_statistics(X, Cs, backend=None, labels_out=None):
    """Per coarse cluster of each split, the residual statistics of one block of rows.

    Args:
        X: (b, D) float32 rows; Cs: (2, V, D/2) float32 coarse centroids.
        labels_out: optional (b, 2) int32 array that receives each half's nearest
            centroid (what `project_rows` assigns again otherwise).

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
        if labels_out is not None:
            labels_out[:, split] = labels
        a, s, c = kernels.accumulate_covariance(half - Cs[split][labels], labels, V, backend)
        A[split] += a
        sums[split] += s
        counts[split] += c
    return A, sums, counts


def project_rows(X, Cs, Rs, mus, backend=None, labels=None):
    """Coarse-assign both halves of ``X`` (n, D) and rotate their residuals: ``R_c (x -
    C_c - mu_c)`` per split, (n, D) float32. ``labels``: the halves' nearest centroids
    (n, 2) when already known (from the covariance pass over the same ``Cs``), else
    assigned here."""
    projected = np.empty(X.shape, dtype=np.float32)
    h = X.shape[1] // 2
    for split in range(2):
        half = split_columns(X, 2, split)
        if labels is None:
            nearest, _ = kernels.assign(half, Cs[split], backend)
        else:
            nearest = np.ascontiguousarray(labels[:, split])
        projected[:, split * h:(split + 1) * h] = kernels.project_residuals(
            half, nearest, Cs[split], Rs[split], mus[split], backend)
    return projected


class ArrayRows(ArrayLloydSource):
    """The in-memory row source: every pass runs the kernels over one (n, D) array.

    Args:
        X: (n, D) rows (converted to C-contiguous float32 once).
        backend: kernel backend (see `lopq._kernels`).
        threads: column groups of a Lloyd pass assigned side by side (also in the sources
            it derives); the results do not depend on it.
    """

    #: (`centroid_tag`, (n, 2) int32 labels) of the last covariance pass: the
    #: projections over the same centroids reuse its coarse assignment.
    _labels = None

    def subset(self, indices):
        rows = ArrayRows(self.take(indices), self.backend, self.threads)
        if self._labels is not None:
            rows._labels = (self._labels[0], self._labels[1][np.asarray(indices, np.int64)])
        return rows

    def covariance_pass(self, Cs):
        labels = np.empty((self.n_rows, 2), dtype=np.int32)
        statistics = covariance_statistics(self.X, Cs, self.backend, labels_out=labels)
        self._labels = (centroid_tag(Cs), labels)
        return statistics

    def projected(self, Cs, Rs, mus, passes=None):
        """The projected residuals as a row source (``passes``: how often the caller
        will read it, a hint that sources on files use; in memory it changes nothing)."""
        labels = None
        if self._labels is not None and self._labels[0] == centroid_tag(Cs):
            labels = self._labels[1]
        return ArrayRows(project_rows(self.X, Cs, Rs, mus, self.backend, labels),
                         self.backend, self.threads)

    def release(self):
        self._labels = None
