"""Similarity metrics: cosine and inner product as LOPQ over transformed vectors.

LOPQ quantises and searches in squared L2 distance. The other two metrics are exact
reductions to it, applied to every row and query at the model's boundary, so training,
codes, the index and the search kernels stay L2 (and the `.lopq` file stays one the
reference reads, as an L2 model of the transformed dimension):

============== ======================================== ===============================
metric         row x (d,) -> model space                distance reported (ascending)
============== ======================================== ===============================
l2             x                                        |q - x|^2
cosine         x / |x|                                  1 - cos(q, x) = |q' - x'|^2 / 2
inner_product  x, sqrt(phi^2 - |x|^2), zeros (below)     -q.x (see below)
============== ======================================== ===============================

For inner product (Bachrach et al., RecSys 2014: "Speeding up the Xbox recommender
system using a Euclidean transformation for inner-product spaces"), ``phi`` is the
largest norm among the training rows; a query becomes ``[q, 0, ..., 0]``. Then
``|q' - x'|^2 = |q|^2 + phi^2 - 2 q.x`` for every row, so the nearest transformed rows
are those of largest inner product. Training, coarse cells and encoding use this L2 space.
Search does not rank by ``|q' - x_hat'|^2`` itself: that adds each reconstruction's
norm error to its score (at 16 bytes per 384-d token embedding it cut recall@1 from 0.58
to 0.25). Its tables are adjusted instead (`LOPQModel.table_adjustment`) so that they
sum to ``|q|^2 - 2 q.x_hat``, the dot product with the reconstruction. The zero padding
makes the model dimension a
multiple of M (both coarse splits and every subquantizer equal-sized, as the format
needs); zero coordinates carry no variance and the local rotations put no code bits on
them. The layout keeps the two coarse halves balanced: the first ``ceil(d/2)``
coordinates of x open the first half, the rest of x and then the norm coordinate open
the second, zeros fill both. A row encoded later with a norm above ``phi`` gets 0 as
its extra coordinate (it is coded in the cell nearest to it; its reported dot products
stay those of its reconstruction).

Every distance reported is ascending (smaller is closer) in all three metrics, so
results of different partitions and indexes merge the same way: for inner product it
is the negated inner product.
"""

import numpy as np

METRICS = ("l2", "cosine", "inner_product")


def check_metric(name):
    """Return ``name`` if it is one of `METRICS`, else raise ValueError saying which are."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}: choose one of {', '.join(METRICS)}")
    return name


def model_dimension(metric, dim, M):
    """Dimension of the model space for input vectors of dimension ``dim``.

    l2 and cosine keep ``dim``; inner product adds the norm coordinate and pads with
    zeros to the next multiple of M (M is even, so the result is even too)."""
    if metric != "inner_product":
        return dim
    return M * -(-(dim + 1) // M)


def unit_rows(X, name="vectors"):
    """Rows of X (n, d) scaled to unit L2 norm (float32). A zero row has no direction:
    ValueError naming the first one."""
    norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(f"{name}: {zero.size} rows have norm 0 (first: row {zero[0]}); "
                         "cosine similarity is undefined for them: drop them or use "
                         "metric='l2'")
    return (X / norms[:, None]).astype(np.float32)


def inner_product_layout(dim, model_dim):
    """Where the inner-product transform puts things: (columns (dim,) int64 of the
    input coordinates in the model space, column of the norm coordinate)."""
    h, first = model_dim // 2, (dim + 1) // 2
    columns = np.concatenate([np.arange(first), h + np.arange(dim - first)])
    return columns, h + dim - first


def padded_queries(Q, model_dim):
    """Inner-product transform of queries Q (n, d): (n, model_dim) float32, q's
    coordinates in their columns (`inner_product_layout`), zeros elsewhere."""
    columns, _ = inner_product_layout(Q.shape[1], model_dim)
    out = np.zeros((Q.shape[0], model_dim), dtype=np.float32)
    out[:, columns] = Q
    return out


def augmented_rows(X, phi, model_dim):
    """Inner-product transform of rows X (n, d): (n, model_dim) float32, as
    `padded_queries` plus ``sqrt(max(phi^2 - |x|^2, 0))`` in the norm column."""
    X = np.asarray(X, dtype=np.float32)
    out = padded_queries(X, model_dim)
    sq = np.einsum("ij,ij->i", X, X, dtype=np.float64)
    out[:, inner_product_layout(X.shape[1], model_dim)[1]] = \
        np.sqrt(np.maximum(float(phi) ** 2 - sq, 0.0))
    return out


def largest_norm(X):
    """Largest L2 norm among the rows of X (n, d), a float (0.0 for no rows)."""
    if not len(X):
        return 0.0
    return float(np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64).max()))


class Metric:
    """The transform of one model's metric.

    Args:
        name: one of `METRICS`.
        dim: input vector dimension d (None until known).
        model_dim: dimension of the model space (see `model_dimension`).
        phi: for inner product, the norm the rows are lifted to (None for other metrics).
    """

    def __init__(self, name="l2", dim=None, model_dim=None, phi=None):
        self.name = check_metric(name)
        self.dim, self.model_dim, self.phi = dim, model_dim, phi

    @property
    def is_l2(self):
        return self.name == "l2"

    def rows(self, X, name="vectors"):
        """Data rows X (n, dim) float32 into the model space: (n, model_dim) float32."""
        if self.name == "cosine":
            return unit_rows(X, name)
        if self.name == "inner_product":
            if self.phi is None:
                raise ValueError("this inner-product model has no phi (largest training "
                                 "norm) yet: fit it first")
            return augmented_rows(X, self.phi, self.model_dim)
        return X

    def queries(self, Q, name="queries"):
        """Queries Q (n, dim) float32 into the model space: (n, model_dim) float32."""
        if self.name == "cosine":
            return unit_rows(Q, name)
        if self.name == "inner_product":
            return padded_queries(Q, self.model_dim)
        return Q

    def distances(self, squared_l2, query_sq_norms=None):
        """Squared L2 distances in the model space to distances of this metric.

        Args:
            squared_l2: array of any shape, ``|q' - x'|^2``.
            query_sq_norms: for inner product, ``|q|^2`` broadcastable against
                ``squared_l2`` (ignored otherwise); there ``squared_l2`` are sums of
                adjusted tables, ``|q|^2 - 2 q.x_hat`` (`LOPQModel.table_adjustment`).

        Returns:
            float array of the same shape: ascending is closer (see the module table).
        """
        d = np.asarray(squared_l2)
        if self.name == "cosine":
            return d / 2
        if self.name == "inner_product":
            return (d - query_sq_norms) / 2
        return d

    def original(self, Xm):
        """Model-space rows (n, model_dim) back to the input space (n, dim): drops the
        inner-product coordinates (cosine rows stay unit-norm)."""
        if self.name == "inner_product":
            return Xm[:, inner_product_layout(self.dim, self.model_dim)[0]]
        return Xm


def candidate_distances(metric, Q, C):
    """Exact distances of the metric from each query to its candidates, computed in the
    input space (re-ranking: no quantisation, and no clipping of rows longer than phi).

    Args:
        metric: one of `METRICS`.
        Q: (q, d) queries; C: (q, l, d) the candidates of each query.

    Returns:
        (q, l) float32, ascending is nearer (the module table's distances).
    """
    Q = np.asarray(Q, dtype=np.float32)
    C = np.asarray(C, dtype=np.float32)
    if metric == "inner_product":
        return -np.einsum("qd,qld->ql", Q, C)
    if metric == "cosine":
        q_norms = np.sqrt(np.einsum("qd,qd->q", Q, Q))[:, None]
        c_norms = np.sqrt(np.einsum("qld,qld->ql", C, C))
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.einsum("qd,qld->ql", Q, C) / (q_norms * c_norms)
        return (1.0 - np.nan_to_num(cos, nan=0.0)).astype(np.float32)
    diff = C - Q[:, None, :]
    return np.einsum("qld,qld->ql", diff, diff)
