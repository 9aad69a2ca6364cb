"""Hot-path kernels with a selectable backend.

`reference` (numpy) is the specification; `cython` (default when built) and `numba`
compute the same functions faster. Choose with the ``LOPQ_KERNELS`` environment variable
(``numpy|numba|cython``) or the ``backend=`` argument of each function here.

The functions in this module are the boundary: they accept any array-like (float64,
non-contiguous, read-only) and hand the backend float32 C-contiguous arrays.
"""

import importlib
import os

import numpy as np

from . import reference

BACKENDS = ("numpy", "numba", "cython")
_MODULES = {"numpy": "lopq._kernels.reference", "numba": "lopq._kernels.numba_kernels",
            "cython": "lopq._kernels.cython_kernels"}


def default_backend():
    """The backend named by ``LOPQ_KERNELS``, else ``cython`` if it is built, else
    ``numba``."""
    name = os.environ.get("LOPQ_KERNELS", "").strip().lower()
    if name:
        return name
    global _DEFAULT
    if _DEFAULT is None:
        try:
            importlib.import_module(_MODULES["cython"])
            _DEFAULT = "cython"
        except ImportError:
            _DEFAULT = "numba"
    return _DEFAULT


_DEFAULT = None


def get_backend(name=None):
    """The kernel module for ``name`` (default: `default_backend()`)."""
    name = (name or default_backend()).lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: choose one of {', '.join(BACKENDS)} "
                         "(argument backend= or environment variable LOPQ_KERNELS)")
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as err:
        raise ImportError(f"kernel backend {name!r} is not available ({err}); "
                          "install lopq with `pip install .` to build it, "
                          "or set LOPQ_KERNELS=numba") from err
    if not _announced and _first_use_hooks:
        _announce(name)
    return module


def compiled_search():
    """The compiled query path (`_search`) when the default backend is ``cython`` and it
    is built, else None (search then runs its numpy path, which computes the same)."""
    global _SEARCH
    if default_backend() != "cython":
        return None
    if _SEARCH is None:  # imported once: one query's search is tens of microseconds
        try:
            from . import _search
        except ImportError:  # e.g. lopq imported from a zip
            return None
        _SEARCH = _search
    return _SEARCH


_SEARCH = None


def grouped_table_operands(Rs, books):
    """The grouped table kernel's operands for rotations ``Rs`` (2, V, h, h) and
    codebooks ``books`` (2, M/2, S, ds): see `cython_kernels.grouped_table_operands`."""
    from . import cython_kernels
    return cython_kernels.grouped_table_operands(Rs, books)


_announced = False
_first_use_hooks = []


def call_on_first_use(hook):
    """Call ``hook(backend_name)`` when a kernel backend is resolved in this process, until
    a hook returns True (it has said what it wanted to). Layers above use it to report
    the backend (`lopq.spark.executor`); the kernels know nothing of them."""
    _first_use_hooks.append(hook)


def _announce(name):
    global _announced
    _announced = any([hook(name) for hook in _first_use_hooks])


def isa():
    """The instruction set of the compiled C loops (``avx2`` or ``portable``), or None
    when the Cython extension is not built."""
    try:
        from . import _cython
    except ImportError:
        return None
    return _cython.ISA


def as_float32_rows(X):
    """X as a float32 C-contiguous 2-D array (copying only when needed)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim == 1:
        X = X.reshape(1, -1)
    return X


def _unit_column_stride(X):
    """X as float32 rows whose columns are contiguous (rows may be strided), copying only
    when needed."""
    X = np.asarray(X)
    if X.dtype == np.float32 and X.ndim == 2 and X.strides[1] == 4 and X.strides[0] % 4 == 0:
        return X
    return as_float32_rows(X)


def _labels32(labels):
    return np.ascontiguousarray(labels, dtype=np.int32)


def assign(X, C, backend=None):
    """Nearest centroid of each row: X (n, d), C (k, d) -> (labels (n,) int32,
    sqdist (n,) float32)."""
    return get_backend(backend).assign(as_float32_rows(X), as_float32_rows(C))


def project_residuals(X, labels, C, R, mu, backend=None):
    """P[i] = R[l] @ (X[i] - C[l] - mu[l]) with l = labels[i]: (n, d) float32."""
    return get_backend(backend).project_residuals(
        as_float32_rows(X), _labels32(labels), as_float32_rows(C),
        np.ascontiguousarray(R, dtype=np.float32), as_float32_rows(mu))


def encode_split(X, C, R, mu, codebooks, backend=None):
    """Coarse labels and fine codes of one coarse split, without materialising the
    projected residuals in row order.

    Args:
        X: (n, h) rows of this split; C (V, h); R (V, h, h); mu (V, h);
        codebooks: (M/2, S, h/(M/2)) this split's subquantizers.

    Returns:
        labels (n,) int32, codes (n, M/2) uint8/uint16.
    """
    # A column slice of the caller's float32 array is passed as it is: the fused encoder
    # reads it in place.
    return get_backend(backend).encode_split(
        _unit_column_stride(X), as_float32_rows(C), np.ascontiguousarray(R, dtype=np.float32),
        as_float32_rows(mu), np.ascontiguousarray(codebooks, dtype=np.float32))


def encode_fine(P, codebooks, backend=None):
    """Subquantizer codes of projected residuals P (n, m*ds) with codebooks (m, S, ds):
    (n, m) uint8 (S <= 256) or uint16."""
    return get_backend(backend).encode_fine(
        as_float32_rows(P), np.ascontiguousarray(codebooks, dtype=np.float32))


def decode_fine(codes, codebooks):
    """Subquantizer centroids of codes: (n, m) -> (n, m*ds) float32."""
    return reference.decode_fine(np.asarray(codes), np.asarray(codebooks, dtype=np.float32))


def accumulate_covariance(residuals, labels, V, backend=None):
    """Per-cluster (A (V,d,d) float64, sums (V,d) float64, counts (V,) int64)."""
    return get_backend(backend).accumulate_covariance(as_float32_rows(residuals),
                                                      _labels32(labels), V)


def covariance_statistics_float64(data, C):
    """Nearest centroids and residual statistics in float64, with the numpy reference
    (the reference implementation's precision, for float64 callers): A (V, d, d) summed
    residual outer products, sums (V, d), counts (V,) int64, assignments (n,) int32,
    residuals (n, d) float64."""
    data64 = np.ascontiguousarray(data, dtype=np.float64)
    C64 = np.ascontiguousarray(C, dtype=np.float64)
    assignments, _ = reference.assign(data64, C64)
    residuals = data64 - C64[assignments]
    A, sums, counts = reference.accumulate_covariance(residuals, assignments, C64.shape[0])
    return A, sums, counts, assignments, residuals


def group_rows(labels, k):
    """Rows grouped by label: (order (n,) int64 stable, offsets (k + 1,) int64)."""
    return reference.group_rows(labels, k)


def kmeanspp(X, first, uniforms, backend=None):
    """Greedy k-means++ centres (k, d) float32 of rows X; see `reference.kmeanspp`."""
    return get_backend(backend).kmeanspp(as_float32_rows(X), int(first),
                                         np.ascontiguousarray(uniforms, dtype=np.float64))


def cluster_sums(X, labels, k, backend=None):
    """Per-cluster (sums (k,d) float64, counts (k,) int64)."""
    return get_backend(backend).cluster_sums(as_float32_rows(X), _labels32(labels), k)


def adc_tables(P, codebooks, backend=None):
    """Distance tables (q, m, S) float32 of projected queries P (q, m*ds)."""
    return get_backend(backend).adc_tables(
        as_float32_rows(P), np.ascontiguousarray(codebooks, dtype=np.float32))


def adc_scan(table, codes, backend=None):
    """Distances (n,) float32 of codes (n, m) to one query's table (m, S)."""
    return get_backend(backend).adc_scan(
        np.ascontiguousarray(table, dtype=np.float32), np.ascontiguousarray(codes))


code_dtype = reference.code_dtype
