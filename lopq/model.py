"""`LOPQModel`: the reference API on stacked parameters and batched kernels."""

import contextlib
import logging
import sys
from collections import namedtuple

import numpy as np

from . import _kernels as kernels
from . import formats
from .metric import Metric, check_metric, largest_norm, model_dimension
from .training import (  # noqa: F401 (reference API)
    ROTATION_SHRINKAGE,
    accumulate_covariance_estimators,
    compute_local_rotations,
    compute_residuals,
    compute_rotations_from_accumulators,
    eigenvalue_allocation,
    project_residuals_to_local,
    train_coarse,
    train_parameters,
    train_subquantizers,
)

logger = logging.getLogger(__name__)

LOPQCode = namedtuple("LOPQCode", ["coarse", "fine"])


#: Up to this many values, `check_rows` tests finiteness directly (``np.errstate``
#: alone costs about 2 us, more than the check of one query).
SMALL_CHECK_VALUES = 4096


def check_rows(X, D=None, name="data", min_rows=1):
    """Validate and convert input rows at the public boundary.

    Args:
        X: (n, d) array-like (a single (d,) vector is read as one row); a scipy sparse
            matrix or a pyspark ML Vector is densified.
        D: expected dimension, if known.

    Returns:
        (n, d) float32 C-contiguous array.

    Raises:
        ValueError naming the problem: not numeric, wrong shape or dimension, too few
        rows, NaN or infinite values.
    """
    if hasattr(X, "toarray") and getattr(X, "ndim", 0) == 2:
        X = X.toarray()  # a scipy sparse matrix: densified (rows x D stays small per call)
    elif hasattr(X, "toArray"):
        X = X.toArray()  # one pyspark ML Vector, dense or sparse
    try:
        X = np.asarray(X)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{name} cannot be read as an array: {err}") from None
    if X.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be numeric, got dtype {X.dtype}")
    if X.ndim == 1:
        X = X.reshape(1, -1)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, D), got shape {X.shape}")
    if X.shape[0] < min_rows:
        raise ValueError(f"{name} has {X.shape[0]} rows, need at least {min_rows}")
    if D is not None and X.shape[1] != D:
        raise ValueError(f"{name} has dimension {X.shape[1]} but the model expects D={D}")
    X = kernels.as_float32_rows(X)
    if X.size <= SMALL_CHECK_VALUES:  # one query: the exact check costs less than errstate
        all_finite = bool(np.isfinite(X).all())
    else:
        flat = X.ravel()
        # One BLAS dot is finite iff every value is (2x faster than isfinite().all());
        # an overflow of huge but finite values falls through to the exact check.
        with np.errstate(over="ignore", invalid="ignore"):
            all_finite = bool(np.isfinite(flat @ flat)) or bool(np.isfinite(X).all())
    if not all_finite:
        bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
        raise ValueError(f"{name} has {bad.size} rows with NaN or infinite values "
                         f"(first: row {bad[0]}); drop or repair them")
    return X


def _stack_parameters(V, M, parameters):
    """Accept the reference's nested tuples/lists or stacked arrays; return stacked float32."""
    if parameters is None:
        return None, None, None, None
    if len(parameters) != 4:
        raise ValueError("parameters must be (Cs, Rs, mus, subquantizers)")
    Cs, Rs, mus, subs = parameters

    def stack(p):
        if p is None:
            return None
        if isinstance(p, (tuple, list)):
            p = [np.stack([np.asarray(a) for a in s]) if isinstance(s, (tuple, list))
                 else np.asarray(s) for s in p]
            p = np.stack(p)
        return np.ascontiguousarray(p, dtype=np.float32)

    Cs, Rs, mus, subs = stack(Cs), stack(Rs), stack(mus), stack(subs)
    if subs is not None and subs.ndim == 4:  # (2, M/2, S, ds) -> (M, S, ds)
        subs = subs.reshape(-1, *subs.shape[2:])
    return Cs, Rs, mus, subs


@contextlib.contextmanager
def progress_on_stderr(verbose):
    """While the block runs, show lopq's INFO lines (each step, each k-means iteration on
    every row) when ``verbose``: through the user's handlers if logging is configured,
    else on stderr. The ``lopq`` logger's level and handlers are restored afterwards."""
    if not verbose:
        yield
        return
    log = logging.getLogger("lopq")
    level = log.level
    handler = None
    if not log.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s lopq: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.setLevel(level)
        if handler is not None:
            log.removeHandler(handler)


class LOPQModel:
    """Locally Optimized Product Quantization model over D-dimensional vectors.

    Args:
        V: coarse clusters per split (codes have V^2 cells).
        M: total subquantizers (bytes per code for S <= 256); even, divides D.
        subquantizer_clusters: S, clusters per subquantizer.
        parameters: optional ``(Cs, Rs, mus, subquantizers)``, any None, in the
            reference layout (tuples per split) or stacked. When given, V comes from
            the coarse parameters and M and S from the subquantizers, as in the
            reference, whatever the V, M, S arguments say.
        metric: ``"l2"`` (the reference's), ``"cosine"`` or ``"inner_product"``: what
            "nearest" means for `encode`'s input and for search (see `lopq.metric`).
            Cosine and inner product are reductions to L2 applied to every row and
            query, so the parameters are those of an L2 model of dimension ``D``.
        dim: dimension of the input vectors, where it differs from the model's ``D``
            (inner product adds coordinates); default ``D``, or the training data's.
        max_norm: inner product only: the norm rows are lifted to (default: the largest
            training row's, set by `fit`).

    Attributes (stacked float32 arrays; ``h = D / 2``, indexing ``[split]`` gives the
    reference's per-split values):
        Cs: (2, V, h) coarse centroids.
        Rs: (2, V, h, h) local rotations (rows are the rotated axes).
        mus: (2, V, h) mean residuals.
        subquantizers: (2, M/2, S, D/M) codebooks (`codebooks` is the (M, S, D/M) view).
        metric, dim, max_norm: as the arguments (``dim`` None until known).
    """

    num_coarse_splits = 2

    def __init__(self, V=8, M=4, subquantizer_clusters=256, parameters=None, metric="l2",
                 dim=None, max_norm=None):
        Cs, Rs, mus, codebooks = _stack_parameters(V, M, parameters)
        # As the reference: the parameters given decide V, M and S over the arguments.
        for p in (Cs, mus, Rs):
            if p is not None and p.ndim >= 2:
                V = p.shape[1]
                break
        if codebooks is not None and codebooks.ndim == 3:
            M, subquantizer_clusters = codebooks.shape[0], codebooks.shape[1]
        if int(V) < 1 or int(M) < 2 or int(M) % 2:
            raise ValueError(f"V must be >= 1 and M even and >= 2, got V={V}, M={M}")
        self.V = int(V)
        self.M = int(M)
        self.subquantizer_clusters = int(subquantizer_clusters)
        self.Cs, self.Rs, self.mus, self.codebooks = Cs, Rs, mus, codebooks
        self.metric = check_metric(metric)
        self.max_norm = None if max_norm is None else float(max_norm)
        self._dim = None if dim is None else int(dim)
        self._check_parameter_shapes()
        if (self._dim is not None and self.D is not None
                and model_dimension(self.metric, self._dim, self.M) != self.D):
            raise ValueError(f"a model of metric {self.metric} and M={self.M} over "
                             f"vectors of dimension {self._dim} has D="
                             f"{model_dimension(self.metric, self._dim, self.M)}, but its "
                             f"parameters are for D={self.D}")

    # ------------------------------------------------------------------ structure
    @property
    def num_fine_splits(self):
        return self.M // 2

    @property
    def D(self):
        """Vector dimension, or None before the coarse quantizers exist."""
        for p, axis in ((self.Cs, 2), (self.mus, 2), (self.Rs, 2)):
            if p is not None:
                return 2 * p.shape[axis]
        if self.codebooks is not None:
            return self.M * self.codebooks.shape[2]
        return None

    @property
    def dim(self):
        """Dimension of the input vectors (``D`` but for inner product), or None before
        it is known."""
        if self._dim is not None:
            return self._dim
        return self.D if self.metric != "inner_product" else None

    def metric_transform(self):
        """The `lopq.metric.Metric` of this model (rows and queries into the model
        space, distances back into the metric)."""
        return Metric(self.metric, self.dim, self.D, self.max_norm)

    def model_rows(self, X, name="vectors", min_rows=0):
        """Validate input rows X (n, dim) and map them into the model space of the
        metric: (n, D) float32 (L2: the checked rows themselves)."""
        X = check_rows(X, self.dim, name, min_rows=min_rows)
        return X if self.metric == "l2" else self.metric_transform().rows(X, name)

    def model_queries(self, Q, name="queries", min_rows=0):
        """As `model_rows` for queries (inner product pads them with zeros)."""
        Q = check_rows(Q, self.dim, name, min_rows=min_rows)
        return Q if self.metric == "l2" else self.metric_transform().queries(Q, name)

    def metric_distances(self, squared_l2, model_queries):
        """Squared L2 distances of the model space (any shape, one row per query in
        ``model_queries`` (q, D), or one query (D,)) as distances of the metric:
        ascending is nearer (see `lopq.metric`)."""
        if self.metric == "l2":
            return squared_l2
        Q = np.asarray(model_queries, dtype=np.float64)
        sq = np.einsum("...i,...i->...", Q, Q)
        d = np.asarray(squared_l2)
        if Q.ndim == 2 and d.ndim >= 1:
            sq = sq.reshape(-1, *([1] * (d.ndim - 1)))
        return self.metric_transform().distances(d, sq).astype(d.dtype, copy=False)

    @property
    def subquantizers(self):
        if self.codebooks is None:
            return None
        return self.codebooks.reshape(2, self.M // 2, *self.codebooks.shape[1:])

    @property
    def parameters(self):
        return self.Cs, self.Rs, self.mus, self.subquantizers

    def _check_parameter_shapes(self):
        D = self.D
        if D is None:
            return
        h = D // 2
        V, M = self.V, self.M
        expected = {"Cs": (2, V, h), "Rs": (2, V, h, h), "mus": (2, V, h),
                    "subquantizers": (M, self.subquantizer_clusters, D // M if D % M == 0 else -1)}
        for name, value in (("Cs", self.Cs), ("Rs", self.Rs), ("mus", self.mus),
                            ("subquantizers", self.codebooks)):
            if value is not None and value.shape != expected[name]:
                raise ValueError(f"parameter {name} has shape {value.shape}, expected "
                                 f"{expected[name]} for V={V}, M={M}, D={D}")

    def require_parameters(self, *names):
        """Raise ValueError unless the model has these parameters (e.g. ``"Cs", "Rs",
        "mus", "codebooks"``): one line telling to fit or load a complete model."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"the model has no {', '.join(missing)} yet: fit it or load "
                             "a complete model first")

    def get_split_parameters(self, split):
        """``(C, R, mu, subquantizers)`` of coarse split 0 or 1 (None where missing)."""
        def pick(p):
            return None if p is None else p[split]
        return pick(self.Cs), pick(self.Rs), pick(self.mus), pick(self.subquantizers)

    # ------------------------------------------------------------------ training
    def fit(self, data, kmeans_coarse_iters=10, kmeans_local_iters=20, n_init=10,
            subquantizer_sample_ratio=1.0, random_state=None, verbose=False, n_jobs=None,
            backend=None, rotation_refinement_iters=3, rotation_shrinkage=ROTATION_SHRINKAGE):
        """Fit the missing parameters on ``data`` (n, D); existing ones are reused.

        Keyword arguments are the reference's. ``n_jobs`` is the number of threads
        (None: one per core) that compare the ``rotation_shrinkage="auto"`` candidates (at
        most three), refine the two splits, and assign the k-means column groups (the two
        halves in step 0, the M subvectors in step 2) side by side; the model does not
        depend on it. When rotations and
        subquantizers are both trained here, ``rotation_refinement_iters`` rounds of local
        rotation refinement follow (see `lopq.training.refine_local_rotations`).
        ``rotation_shrinkage`` pseudo-points per dimension pull each local covariance
        toward the pooled one, so clusters with few rows still get a rotation (see
        `lopq.training.shrunk_covariances`). ``rotation_refinement_iters=0,
        rotation_shrinkage=0`` give exactly the reference's training. Returns self.
        """
        data = check_rows(data, self.dim, "training data")
        dim, max_norm = data.shape[1], self.max_norm
        if self.metric == "inner_product":
            D = model_dimension(self.metric, dim, self.M)
            if self.D is not None and self.D != D:
                raise ValueError(f"training data has dimension {dim}, but the model's "
                                 f"parameters are for D={self.D}")
            if max_norm is None:
                max_norm = largest_norm(data)
        data = Metric(self.metric, dim, model_dimension(self.metric, dim, self.M),
                      max_norm).rows(data, "training data")
        n, d = data.shape
        if d % 2:
            raise ValueError(f"data dimension D={d} must be even (two coarse splits)")
        if d % self.M:
            raise ValueError(f"M={self.M} subquantizers must divide the dimension D={d}")
        if self.Cs is None and n < self.V:
            raise ValueError(f"V={self.V} coarse clusters need at least {self.V} training "
                             f"rows, got {n}")
        if self.codebooks is None and n * subquantizer_sample_ratio < self.subquantizer_clusters:
            raise ValueError(f"{self.subquantizer_clusters} subquantizer clusters need at "
                             f"least that many training rows, got {n} (sample ratio "
                             f"{subquantizer_sample_ratio})")
        with progress_on_stderr(verbose):
            Cs, Rs, mus, subs = train_parameters(
                data, self.V, self.M, self.subquantizer_clusters,
                (self.Cs, self.Rs, self.mus, self.codebooks), kmeans_coarse_iters,
                kmeans_local_iters, n_init, subquantizer_sample_ratio, random_state,
                backend, rotation_refinement_iters, rotation_shrinkage, n_jobs)
        self.Cs, self.Rs, self.mus, self.codebooks = Cs, Rs, mus, subs
        self._dim, self.max_norm = dim, max_norm
        return self

    # ------------------------------------------------------------------ batched coding
    def encode(self, X, backend=None):
        """LOPQ codes of many vectors.

        Args:
            X: (n, dim) vectors (any float dtype; ``dim`` is ``D`` but for inner product).

        Returns:
            coarse: (n, 2) int32 coarse codes; fine: (n, M) uint8 (S <= 256) or uint16.
        """
        self.require_parameters("Cs", "Rs", "mus", "codebooks")
        X = self.model_rows(X, "vectors")
        n, h, half_m = X.shape[0], X.shape[1] // 2, self.M // 2
        coarse = np.empty((n, 2), dtype=np.int32)
        fine = np.empty((n, self.M), dtype=kernels.code_dtype(self.subquantizer_clusters))
        for split in range(2):
            coarse[:, split], fine[:, split * half_m:(split + 1) * half_m] = \
                kernels.encode_split(X[:, split * h:(split + 1) * h], self.Cs[split],
                                     self.Rs[split], self.mus[split],
                                     self.subquantizers[split], backend)
        return coarse, fine

    def project_rows(self, X, coarse=None, backend=None):
        """Coarse codes and locally rotated residuals of many rows at once.

        Args:
            X: (n, D) float32 rows.
            coarse: (n, 2) int coarse codes to project against (default: the nearest
                coarse centroids, computed here).

        Returns:
            coarse (n, 2) int32 and projected (n, D) float32: per split,
            ``R_c (x - C_c - mu_c)`` of the split's cluster c.
        """
        self.require_parameters("Cs", "Rs", "mus")
        h = X.shape[1] // 2
        if coarse is None:
            coarse = np.empty((X.shape[0], 2), dtype=np.int32)
            for split in range(2):
                coarse[:, split], _ = kernels.assign(X[:, split * h:(split + 1) * h],
                                                     self.Cs[split], backend)
        projected = np.empty(X.shape, dtype=np.float32)
        for split in range(2):
            projected[:, split * h:(split + 1) * h] = kernels.project_residuals(
                X[:, split * h:(split + 1) * h], coarse[:, split], self.Cs[split],
                self.Rs[split], self.mus[split], backend)
        return coarse, projected

    def decode(self, codes):
        """Reconstruct vectors from ``(coarse (n, 2), fine (n, M))``: (n, dim) float32
        (cosine: the unit vectors' reconstructions; inner product: without the added
        coordinates)."""
        self.require_parameters("Cs", "Rs", "mus", "codebooks")
        coarse, fine = (np.atleast_2d(np.asarray(c)) for c in codes)
        self.check_codes(coarse, fine)
        h = self.D // 2
        local = kernels.decode_fine(fine, self.codebooks)
        out = np.empty((coarse.shape[0], self.D), dtype=np.float32)
        for split in range(2):
            c = coarse[:, split]
            part = local[:, split * h:(split + 1) * h]
            half = out[:, split * h:(split + 1) * h]
            for cluster in np.unique(c):
                rows = c == cluster
                # R is orthogonal: rotating back is multiplying by R^T (row form: p @ R).
                half[rows] = (part[rows] @ self.Rs[split][cluster] + self.mus[split][cluster]
                              + self.Cs[split][cluster])
        return self.metric_transform().original(out)

    def check_codes(self, coarse, fine):
        """Raise ValueError unless ``coarse`` (n, 2) and ``fine`` (n, M) are codes of
        this model (shapes and value ranges)."""
        if coarse.shape[1:] != (2,) or fine.shape[1:] != (self.M,) or len(coarse) != len(fine):
            raise ValueError(f"codes must be coarse (n, 2) and fine (n, {self.M}), got "
                             f"{coarse.shape} and {fine.shape}")
        if coarse.size and (coarse.min() < 0 or coarse.max() >= self.V):
            raise ValueError(f"coarse codes must be in [0, {self.V})")
        if fine.size and (fine.min() < 0 or fine.max() >= self.subquantizer_clusters):
            raise ValueError(f"fine codes must be in [0, {self.subquantizer_clusters})")

    # ------------------------------------------------------------------ reference API
    # One vector at a time, as the reference. The vector is in the input space (``dim``);
    # predict/project read it as a data row, get_subquantizer_distances as a query (the
    # two differ for inner product only).
    def predict(self, x):
        """LOPQ code of one vector x (dim,): ``LOPQCode((c0, c1), (f0, ..., fM-1))`` of
        ints."""
        coarse, fine = self.encode(self._one(x, "vector", transform=False))
        return LOPQCode(tuple(int(c) for c in coarse[0]), tuple(int(f) for f in fine[0]))

    def predict_coarse(self, x):
        """Coarse codes ``(c0, c1)`` of one vector."""
        self.require_parameters("Cs")
        return self._coarse_of(self._one(x))

    def _coarse_of(self, xm):
        h = self.D // 2
        return tuple(int(kernels.assign(xm[:, s * h:(s + 1) * h], self.Cs[s])[0][0])
                     for s in range(2))

    def predict_fine(self, x, coarse_codes=None):
        """Fine codes ``(f0, ..., fM-1)`` of one vector (coarse codes computed if None)."""
        self.require_parameters("Cs", "Rs", "mus", "codebooks")
        projected = self.project(x, coarse_codes)
        codes = kernels.encode_fine(projected, self.codebooks)
        return tuple(int(f) for f in codes[0])

    def project(self, x, coarse_codes=None, coarse_split=None):
        """Projected residual of one vector: (D,) float32, or (D/2,) for ``coarse_split``."""
        self.require_parameters("Cs", "Rs", "mus")
        return self.project_model_space(self._one(x), coarse_codes, coarse_split)

    def project_model_space(self, xm, coarse_codes=None, coarse_split=None):
        """`project` of a vector already in the model space (D,) (see `model_rows`)."""
        xm = np.asarray(xm, dtype=np.float32).reshape(1, -1)
        if coarse_codes is None:
            coarse_codes = self._coarse_of(xm)
        coarse = np.asarray(coarse_codes, dtype=np.int32).reshape(1, 2)
        _, projected = self.project_rows(xm, coarse=coarse)
        if coarse_split is None:
            return projected[0]
        h = self.D // 2
        return projected[0, coarse_split * h:(coarse_split + 1) * h]

    def reconstruct(self, codes):
        """Approximate vector (dim,) of one code ``((c0, c1), (f0, ...))``."""
        coarse, fine = codes
        return self.decode((np.asarray([coarse]), np.asarray([fine])))[0]

    def get_subquantizer_distances(self, x, coarse_codes, coarse_split=None):
        """Squared distances of query x's projected subvectors to every subquantizer
        centroid, in the model space.

        Returns:
            list of M (or M/2 for one ``coarse_split``) arrays (S,) float32.
        """
        self.require_parameters("Cs", "Rs", "mus", "codebooks")
        return self.query_tables(self._one(x, "query", queries=True), coarse_codes,
                                 coarse_split)

    def query_tables(self, qm, coarse_codes, coarse_split=None):
        """`get_subquantizer_distances` of a query already in the model space (D,) (see
        `model_queries`)."""
        px = self.project_model_space(qm, coarse_codes, coarse_split)
        books = self.codebooks if coarse_split is None else self.subquantizers[coarse_split]
        tables = kernels.adc_tables(px.reshape(1, -1), books)[0]
        adjust = self.table_adjustment()
        if adjust is not None:  # inner product: see `table_adjustment`
            c0, c1 = (int(c) for c in coarse_codes)
            tables = tables - (adjust[coarse_split, (c0, c1)[coarse_split]]
                               if coarse_split is not None
                               else np.concatenate([adjust[0, c0], adjust[1, c1]]))
        return list(tables)

    def coarse_adjustment(self):
        """What inner-product search subtracts from each coarse distance
        ``|q_split - C[c]|^2`` so that cells are visited by ``q.C[c]`` (largest first)
        rather than by distance: ``|C[split, c]|^2``, (2, V) float32; None for L2 and
        cosine. Without it the traversal favours centroids of small norm, and at 16
        bytes on token embeddings recall@10 at a quota of 2000 of 28k rows stayed at 0.34
        (see the README)."""
        if self.metric != "inner_product":
            return None
        self.require_parameters("Cs")
        cached = getattr(self, "_coarse_adjustment", None)
        if cached is not None and cached[0] is self.Cs:
            return cached[1]
        adjust = np.ascontiguousarray(np.einsum("svh,svh->sv", self.Cs, self.Cs,
                                                dtype=np.float64), dtype=np.float32)
        self._coarse_adjustment = (self.Cs, adjust)
        return adjust

    def table_adjustment(self):
        """What inner-product search subtracts from each distance table, so that table
        sums are ``|q|^2 - 2 q.x_hat`` instead of ``|q' - x_hat'|^2``: (2, V, M/2, S)
        float32 per (split, coarse cluster), or None for L2 and cosine.

        Squared L2 distances in the model space would rank by ``|x_hat'|^2 - 2 q.x_hat``:
        the reconstruction's norm, whose quantisation error is as large as the signal at
        a few bytes per code, would decide the order. That norm is a per-code sum of the
        same shape as the tables: with ``b = C[c] + mu[c]`` and ``a = R[c] b`` (split by
        subquantizer ``j``), ``|x_hat_split|^2 = |b|^2 + sum_j (2 a_j.s_jk + |s_jk|^2)``
        (R orthogonal), so it is subtracted from the tables once (``|b|^2`` in row j=0)
        and every search path (compiled, grouped, numpy) ranks by the dot product itself.
        Computed once per model.
        """
        if self.metric != "inner_product":
            return None
        self.require_parameters("Cs", "Rs", "mus", "codebooks")
        key = tuple(id(p) for p in self.parameters)
        cached = getattr(self, "_adjustment", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        books = self.subquantizers.astype(np.float64)  # (2, M/2, S, ds)
        half_m, ds = books.shape[1], books.shape[3]
        b = self.Cs.astype(np.float64) + self.mus  # (2, V, h)
        a = np.einsum("svij,svj->svi", self.Rs.astype(np.float64), b)  # (2, V, h)
        a = a.reshape(2, self.V, half_m, ds)
        adjust = 2 * np.einsum("svjd,sjkd->svjk", a, books)
        adjust += np.einsum("sjkd,sjkd->sjk", books, books)[:, None]
        adjust[:, :, 0, :] += np.einsum("svh,svh->sv", b, b)[:, :, None]
        adjust = np.ascontiguousarray(adjust, dtype=np.float32)
        self._adjustment = (key, adjust)
        return adjust

    def get_cell_id_for_coarse_codes(self, coarse_codes):
        """Cell id ``c0 * V + c1``."""
        return coarse_codes[1] + coarse_codes[0] * self.V

    def get_coarse_codes_for_cell_id(self, cell_id):
        """Inverse of `get_cell_id_for_coarse_codes`."""
        return (int(cell_id) // self.V, int(cell_id) % self.V)

    def _one(self, x, name="vector", queries=False, transform=True):
        """One input vector (dim,) (or a one-row batch) as a (1, D) model-space row (a
        (1, dim) checked row without ``transform``)."""
        x = np.asarray(x)
        if x.ndim == 2 and x.shape[0] == 1:  # already a one-row batch
            x = x[0]
        if x.ndim != 1:
            raise ValueError(f"expected one vector of shape (D,), got shape {x.shape}; "
                             "use encode() for many")
        if not transform:
            return check_rows(x, self.dim, name)
        return (self.model_queries if queries else self.model_rows)(x, name, min_rows=1)

    # ------------------------------------------------------------------ formats
    def export_proto(self, f):
        """Write the model as `.lopq` protobuf to a path or binary file object."""
        data = self.to_proto_bytes()
        if hasattr(f, "write"):
            f.write(data)
        else:
            with open(f, "wb") as out:
                out.write(data)

    @staticmethod
    def load_proto(filename):
        """Read a `.lopq` protobuf (path or binary file object) into an LOPQModel."""
        if hasattr(filename, "read"):
            data, source = filename.read(), getattr(filename, "name", "<file>")
        else:
            with open(filename, "rb") as f:
                data, source = f.read(), str(filename)
        return LOPQModel.from_proto_bytes(data, source)

    @staticmethod
    def from_proto_bytes(data, source="<bytes>"):
        """An LOPQModel from `.lopq` bytes (``source`` names them in errors)."""
        D, V, M, S, Cs, Rs, mus, subs, metric = formats.params_from_proto_bytes(
            data, source, with_metric=True)
        try:
            return LOPQModel(V, M, S, (Cs, Rs, mus, subs), **metric)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_proto_bytes(self):
        """The `.lopq` bytes of this model (an L2 model's are the reference's format)."""
        return formats.params_to_proto_bytes(
            self.D or 0, self.V, self.M, self.subquantizer_clusters,
            self.Cs, self.Rs, self.mus, self.codebooks, self.metric, self._dim,
            self.max_norm)

    def export_mat(self, filename):
        """Write the parameters as a MATLAB `.mat` file (needs scipy), in the reference's
        layout: Cs (2, V, D/2), Rs (2, V, D/2, D/2), mus (2, V, D/2), subs
        (2, M/2, S, D/M), V, M."""
        from scipy.io import savemat
        self.require_parameters("Cs", "Rs", "mus", "codebooks")
        savemat(filename, {"Cs": self.Cs, "Rs": self.Rs, "mus": self.mus,
                           "subs": self.subquantizers, "V": self.V, "M": self.M})

    @staticmethod
    def load_mat(filename):
        """Read a model written by `export_mat` or the reference's (needs scipy); subs
        may be (2, M/2, S, D/M) (the reference's layout) or (M, S, D/M) (lopq 0.1)."""
        from scipy.io import loadmat
        d = loadmat(filename)
        if not {"Cs", "Rs", "mus", "subs", "V", "M"} <= set(d):
            raise ValueError(f"{filename} is not an LOPQ .mat file (needs Cs, Rs, mus, "
                             "subs, V, M)")
        V, M = int(d["V"].ravel()[0]), int(d["M"].ravel()[0])
        subs = d["subs"]
        if subs.ndim == 4:
            subs = subs.reshape(-1, *subs.shape[2:])
        return LOPQModel(V, M, subs.shape[1], (d["Cs"], d["Rs"], d["mus"], subs))

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        state = {"V": self.V, "M": self.M, "subquantizer_clusters": self.subquantizer_clusters,
                 "Cs": self.Cs, "Rs": self.Rs, "mus": self.mus, "codebooks": self.codebooks}
        if self.metric != "l2":  # L2 pickles keep the keys they always had
            state.update(metric=self.metric, dim=self._dim, max_norm=self.max_norm)
        return state

    def __setstate__(self, state):
        # Also reads pickles of the reference model (per-split tuples, `subquantizers`).
        subs = state.get("codebooks", state.get("subquantizers"))
        self.V, self.M = int(state["V"]), int(state["M"])
        self.subquantizer_clusters = int(state.get("subquantizer_clusters", 256))
        self.Cs, self.Rs, self.mus, self.codebooks = _stack_parameters(
            self.V, self.M, (state.get("Cs"), state.get("Rs"), state.get("mus"), subs))
        if self.codebooks is not None:
            self.subquantizer_clusters = self.codebooks.shape[1]
        self.metric = check_metric(state.get("metric", "l2"))
        self._dim, self.max_norm = state.get("dim"), state.get("max_norm")

    def __repr__(self):
        metric = "" if self.metric == "l2" else f", metric={self.metric!r}, dim={self.dim}"
        return (f"LOPQModel(V={self.V}, M={self.M}, subquantizer_clusters="
                f"{self.subquantizer_clusters}, D={self.D}{metric})")


__all__ = ["LOPQModel", "LOPQCode", "eigenvalue_allocation",
           "accumulate_covariance_estimators", "compute_rotations_from_accumulators",
           "compute_residuals", "project_residuals_to_local", "check_rows"]


def train(data, V=8, M=4, subquantizer_clusters=256, parameters=None,
          kmeans_coarse_iters=10, kmeans_local_iters=20, n_init=10,
          subquantizer_sample_ratio=1.0, random_state=None, verbose=False, n_jobs=1,
          rotation_refinement_iters=3, rotation_shrinkage=ROTATION_SHRINKAGE):
    """Reference API: fit the missing ``parameters`` of an LOPQ model.

    The arguments bind positionally as in the reference (``verbose``, then ``n_jobs``:
    the threads of the ``"auto"`` shrinkage comparison, as in `LOPQModel.fit`).
    ``rotation_refinement_iters`` and ``rotation_shrinkage`` (additions, keyword only in
    practice) refine the rotations and shrink the local covariances as `LOPQModel.fit`
    does; both 0 train as the reference.

    Args:
        data: (n, D) training rows.
        parameters: ``(Cs, Rs, mus, subquantizers)``, any None, in the reference layout
            or stacked.

    Returns:
        ``((C0, C1), (R0, R1), (mu0, mu1), (subs0, subs1))``: per split, (V, D/2)
        centroids, (V, D/2, D/2) rotations, (V, D/2) mean residuals and a list of M/2
        (S, D/M) codebooks, float32, the reference's layout (``LOPQModel(parameters=``
        takes it).
    """
    model = LOPQModel(V, M, subquantizer_clusters, parameters)
    model.fit(data, kmeans_coarse_iters, kmeans_local_iters, n_init,
              subquantizer_sample_ratio, random_state, verbose, n_jobs,
              rotation_refinement_iters=rotation_refinement_iters,
              rotation_shrinkage=rotation_shrinkage)
    Cs, Rs, mus, subs = model.parameters
    return ((Cs[0], Cs[1]), (Rs[0], Rs[1]), (mus[0], mus[1]),
            (list(subs[0]), list(subs[1])))
