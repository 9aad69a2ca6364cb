"""Reference-compatible helpers: xvecs I/O, split iteration, parallel code computation.

Same names, arguments and return types as the reference's ``lopq.utils``; the array
formats themselves live in `lopq.formats` (``load_xvecs(path, kind)`` there returns the
file's own dtype).
"""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import formats

#: The reference's ``base_type`` codes: (xvecs kind, dtype of the returned array).
_BASE_TYPES = {"f": ("fvecs", np.float64), "i": ("ivecs", np.int64), "b": ("bvecs", np.float64)}


def _base_type(base_type):
    if base_type not in _BASE_TYPES:
        raise ValueError(f"base_type must be 'f' (fvecs), 'i' (ivecs) or 'b' (bvecs), "
                         f"got {base_type!r}")
    return _BASE_TYPES[base_type]


def iterate_splits(x, splits):
    """Yield ``(chunk, index)`` for ``splits`` equal chunks of vector x (reference API)."""
    split_size = len(x) // splits
    for split in range(splits):
        yield x[split * split_size:(split + 1) * split_size], split


def concat_new_first(arrs):
    """Stack a list of same-shape arrays along a new first axis (reference API)."""
    return np.stack([np.asarray(a) for a in arrs], axis=0)


def predict_cluster(x, centroids):
    """Index of the centroid (row of ``centroids`` (V, D)) nearest to x (D,)."""
    return ((np.asarray(x) - np.asarray(centroids)) ** 2).sum(axis=1).argmin(axis=0)


def load_xvecs(filename, base_type="f", max_num=None):
    """Read an fvecs (``'f'``), ivecs (``'i'``) or bvecs (``'b'``) file (reference API).

    Returns:
        (N, D) float64 (``'f'``, ``'b'``) or int64 (``'i'``) rows, the first ``max_num``
        if given, squeezed like the reference (one column gives a 1-D array).
    """
    kind, dtype = _base_type(base_type)
    rows = formats.load_xvecs(filename, kind)
    if max_num is not None:
        rows = rows[:max_num]
    return np.squeeze(rows.astype(dtype))


def save_xvecs(data, filename, base_type="f"):
    """Write rows of ``data`` (or scalars, as 1-D records) as fvecs/ivecs/bvecs
    (reference API; note the argument order, data first)."""
    kind, _ = _base_type(base_type)
    rows = np.asarray(data)
    if rows.ndim == 1:
        rows = rows[:, None]
    formats.save_xvecs(filename, rows, kind)


def parmap(f, X, nprocs=os.cpu_count()):
    """``[f(x) for x in X]`` on ``nprocs`` workers, in input order (reference API).

    Threads, not processes: the kernels release the GIL, and ``f`` may be a closure.
    """
    items = list(X)
    if nprocs is None or nprocs <= 1 or len(items) <= 1:
        return [f(x) for x in items]
    with ThreadPoolExecutor(max_workers=nprocs) as pool:
        return list(pool.map(f, items))


def get_chunk_ranges(N, num_procs):
    """``[(start, end), ...]``: N items in ``num_procs`` contiguous chunks as even as
    possible, the first chunk taking the remainder (reference API)."""
    per_chunk = N // num_procs
    sizes = [per_chunk] * num_procs
    sizes[0] += N - per_chunk * num_procs
    bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def compute_codes_parallel(data, model, num_procs=4):
    """Codes of every row of ``data`` (n, D) as a list of `LOPQCode` (reference API).

    The batched compiled `LOPQModel.encode` replaces the reference's process pool;
    ``num_procs`` is accepted for compatibility.
    """
    from .model import LOPQCode
    coarse, fine = model.encode(data)
    return [LOPQCode(tuple(c), tuple(f)) for c, f in zip(coarse.tolist(), fine.tolist())]
