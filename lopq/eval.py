"""Evaluation: exact ground truth in blocks, recall@R, distortion, cell histograms."""

import time

import numpy as np

from . import _kernels as kernels

#: Query rows per block of the exact search: bounds the (block, n) distance matrix.
GT_BLOCK_ROWS = 1024


def exact_neighbors(queries, base, k=1, block_rows=GT_BLOCK_ROWS):
    """Exact k nearest neighbours of each query among ``base`` by squared L2.

    Args:
        queries: (q, D); base: (n, D).

    Returns:
        (q, k) int64 indices into base, nearest first.
    """
    Q = np.asarray(queries, dtype=np.float64)
    B = np.asarray(base, dtype=np.float64)
    b_sq = (B * B).sum(axis=1)
    k = min(k, B.shape[0])
    # A block's distances are (rows, n) float64, and the elementwise passes over them
    # are memory-bound: blocks near 32 MB are faster than 256 MB ones (1000 x 34,000
    # rows, k=100: 1.35 s against 3.25 s, the same results); at least 32 rows (up to
    # 256 MB) keep the product matrix-shaped when n is large.
    n = max(1, B.shape[0])
    block_rows = max(1, min(block_rows, max((1 << 22) // n, min(32, (1 << 25) // n))))
    out = np.empty((Q.shape[0], k), dtype=np.int64)
    for start in range(0, Q.shape[0], block_rows):
        q = Q[start:start + block_rows]
        d = b_sq[None, :] - 2.0 * (q @ B.T)
        if k == 1:
            out[start:start + len(q), 0] = np.argmin(d, axis=1)
            continue
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d, part, axis=1), axis=1, kind="stable")
        out[start:start + len(q)] = np.take_along_axis(part, order, axis=1)
    return out


def compute_all_neighbors(data1, data2=None, just_nn=True, exclude_self=False):
    """Reference API: nearest neighbour (``just_nn``) or all neighbours sorted by
    Euclidean distance, of each row of ``data1`` among the rows of ``data2``.

    As in the reference, ``data2=None`` searches ``data1`` itself, so a row's nearest
    neighbour is the row itself (or an identical row of lower index): the reference's
    observable behaviour, kept. ``exclude_self=True`` (an addition) gives each row's
    nearest *other* row, an exact duplicate included.

    Returns:
        (m1,) int64 indices (``just_nn``) or (m1, m2) int64 indices, nearest first,
        lowest index first among equal distances.
    """
    same = data2 is None
    data2 = data1 if same else data2
    if just_nn:
        return nearest_neighbor(data1, data2, exclude_self=same and exclude_self)
    n2 = np.shape(data2)[0]
    nns = exact_neighbors(data1, data2, k=n2)
    if same and exclude_self:
        rows = np.arange(nns.shape[0])[:, None]
        return nns[nns != rows].reshape(nns.shape[0], n2 - 1)
    return nns


#: Candidates by the GEMM form whose distances are recomputed exactly (differences).
EXACT_CANDIDATES = 8


def nearest_neighbor(queries, base, exclude_self=False, block_rows=GT_BLOCK_ROWS):
    """Index of each query's nearest row of ``base`` by exact squared distance, lowest
    index among exact ties (identical rows tie at exactly 0, as with ``cdist``).

    Candidates come from the fast GEMM form; the best few are recomputed as sums of
    squared differences, so rounding of the GEMM form cannot break a tie.

    Args:
        queries: (q, D); base: (n, D); exclude_self: queries are ``base`` itself and row
            i may not answer query i.

    Returns:
        (q,) int64.
    """
    Q = np.asarray(queries, dtype=np.float64)
    B = np.asarray(base, dtype=np.float64)
    k = min(EXACT_CANDIDATES + int(exclude_self), B.shape[0])
    candidates = exact_neighbors(Q, B, k=k, block_rows=block_rows)
    out = np.empty(Q.shape[0], dtype=np.int64)
    for i, row in enumerate(candidates):
        if exclude_self:
            row = row[row != i]
        exact = ((B[row] - Q[i]) ** 2).sum(axis=1)
        best = row[exact == exact.min()]
        out[i] = best.min()
    return out


def recall_at(ranked_ids, true_nn, thresholds=(1, 10, 100, 1000)):
    """Fraction of queries whose true neighbour is within the first R ranked results.

    Args:
        ranked_ids: (q, r) ranked result ids (pad with -1), or a list of sequences.
        true_nn: (q,) the true nearest neighbour of each query.

    Returns:
        (len(thresholds),) float64 recall@R.
    """
    recall = np.zeros(len(thresholds))
    for ranked, nn in zip(ranked_ids, true_nn):
        hits = np.flatnonzero(np.asarray(ranked) == nn)
        if hits.size:
            recall += hits[0] < np.asarray(thresholds)
    return recall / max(len(true_nn), 1)


def get_recall(searcher, queries, nns, thresholds=(1, 10, 100, 1000), normalize=True,
               verbose=False):
    """Reference API: recall@thresholds of ``searcher.search(q, quota=thresholds[-1])``.

    Returns:
        (recall (len(thresholds),), mean or total seconds per query).
    """
    thresholds = list(thresholds)
    recall = np.zeros(len(thresholds))
    query_time = 0.0
    for i, q in enumerate(queries):
        start = time.perf_counter()
        results, _ = searcher.search(q, thresholds[-1])
        query_time += time.perf_counter() - start
        ids = [r.id for r in results]
        for j, r in enumerate(thresholds):
            recall[j] += nns[i] in ids[:r]
        if verbose and i % 50 == 0:
            print(f"{i} / {len(queries)}: recall {recall / (i + 1)}")
    if normalize:
        n = max(len(queries), 1)
        return recall / n, query_time / n
    return recall, query_time


def rank_by_lopq_distance(model, queries, coarse, fine, limit=None):
    """Exhaustive ranking of all coded items by LOPQ asymmetric distance.

    Args:
        queries: (q, D); coarse (n, 2), fine (n, M): the items' codes.

    Returns:
        (q, limit) int64 item indices, nearest first.
    """
    queries = kernels.as_float32_rows(queries)
    if model.metric != "l2":  # queries of the input space, ranked in the model's metric
        queries = model.model_queries(queries)
    adjust = model.table_adjustment()
    n = coarse.shape[0]
    limit = n if limit is None else min(limit, n)
    h = model.D // 2
    out = np.empty((len(queries), limit), dtype=np.int64)
    # Per split, where each item's table entries sit in the flattened (V, M/2, S) tables
    # of a query: computed once, then every query gathers its distances with one take.
    half_m, S = model.subquantizers.shape[1], model.subquantizers.shape[2]
    slots = [((coarse[:, split].astype(np.int64)[:, None] * half_m + np.arange(half_m))
              * S + fine[:, split * half_m:(split + 1) * half_m]) for split in range(2)]
    for qi, x in enumerate(queries):
        dists = np.zeros(n, dtype=np.float32)
        for split in range(2):
            # One table per coarse cluster of this split: project x in every local frame.
            r = x[split * h:(split + 1) * h][None, :] - model.Cs[split] - model.mus[split]
            local = np.einsum("vij,vj->vi", model.Rs[split], r).astype(np.float32)
            tables = kernels.adc_tables(local, model.subquantizers[split])  # (V, M/2, S)
            if adjust is not None:
                tables = tables - adjust[split]
            dists += tables.ravel()[slots[split]].sum(axis=1)
        if limit < n:  # the `limit` nearest, then their order; ties keep index order
            kth = np.partition(dists, limit - 1)[limit - 1]
            candidates = np.flatnonzero(dists <= kth)
            out[qi] = candidates[np.argsort(dists[candidates], kind="stable")][:limit]
        else:
            out[qi] = np.argsort(dists, kind="stable")
    return out


def get_subquantizer_distortion(data, model):
    """Reference API: mean squared quantization error of each subquantizer on the
    projected residuals of ``data`` (n, D).

    Returns:
        (M,) float64: split 0's subquantizers, then split 1's (the reference's layout;
        its code assumed M = 8, this works for every M).
    """
    X = kernels.as_float32_rows(data)
    _, projected = model.project_rows(X)
    fine = kernels.encode_fine(projected, model.codebooks)
    rec = kernels.decode_fine(fine, model.codebooks)
    ds = model.D // model.M
    diff = (projected.astype(np.float64) - rec).reshape(len(X), model.M, ds)
    return (diff ** 2).sum(axis=2).mean(axis=0)


def relative_reconstruction_error(data, model):
    """``sum |x - decode(encode(x))|^2 / sum |x - mean|^2`` over rows of data."""
    X = kernels.as_float32_rows(data)
    rec = model.decode(model.encode(X))
    total = ((X - X.mean(axis=0)) ** 2).sum(dtype=np.float64)
    return float(((X - rec) ** 2).sum(dtype=np.float64) / total)


def _cells(data, model):
    coarse, _ = model.encode(data)
    return coarse[:, 0].astype(np.int64) * model.V + coarse[:, 1]


def get_cell_histogram(data, model):
    """Reference API: ``np.histogram(cell ids, bins=range(V ** 2))[0]``.

    That is V^2 - 1 bins, the last counting both of the two highest cells, exactly what
    the reference returns. `get_cell_counts` gives one count per cell.
    """
    return np.histogram(_cells(data, model), bins=range(model.V ** 2))[0]


def get_cell_counts(data, model):
    """Rows of ``data`` in each of the V^2 cells: (V * V,) int64, cell ``c0 * V + c1``."""
    return np.bincount(_cells(data, model), minlength=model.V * model.V)


def get_proportion_nns_with_same_coarse_codes(data, model, nns=None):
    """Reference API: fraction of rows whose nearest neighbour ``nns[i]`` has the same
    coarse codes.

    With ``nns=None`` the neighbours are ``compute_all_neighbors(data)``, where each
    row is its own nearest neighbour (the reference's behaviour, so the result is 1.0);
    pass ``nns=compute_all_neighbors(data, exclude_self=True)`` for the useful measure.
    """
    if nns is None:
        nns = compute_all_neighbors(data)
    coarse, _ = model.encode(data)
    return float(np.mean(np.all(coarse == coarse[np.asarray(nns)], axis=1)))


def get_proportion_of_reconstructions_with_same_codes(data, model):
    """Reference API: fraction of rows whose reconstruction encodes to the same code."""
    coarse, fine = model.encode(data)
    again_coarse, again_fine = model.encode(model.decode((coarse, fine)))
    same = np.all(coarse == again_coarse, axis=1) & np.all(fine == again_fine, axis=1)
    return float(np.mean(same))


def train_test_split(data, test_size=0.2, random_state=40):
    """The reference protocol's split, identical to scikit-learn's
    ``train_test_split(data, test_size=test_size, random_state=random_state)`` without
    needing scikit-learn: returns (train, test)."""
    n = len(data)
    n_test = int(np.ceil(test_size * n))
    permutation = np.random.RandomState(random_state).permutation(n)
    return data[permutation[n_test:]], data[permutation[:n_test]]


def get_recall_batch(searcher, queries, nns, thresholds=(1, 10, 100, 1000), threads=None):
    """Batched `get_recall`: `LOPQSearcher.search_batch` with ``quota=thresholds[-1]``.

    Returns:
        (recall (len(thresholds),), mean seconds per query of wall time).
    """
    thresholds = list(thresholds)
    start = time.perf_counter()
    results = searcher.search_batch(queries, quota=thresholds[-1], threads=threads)
    elapsed = time.perf_counter() - start
    recall = recall_at([ids for ids, _ in results], nns, thresholds)
    return recall, elapsed / max(len(queries), 1)
