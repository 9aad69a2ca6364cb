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


def compute_all_neighbors(data1, data2=None, just_nn=True):
    """Reference API: nearest neighbour (just_nn) or all neighbours sorted, of each row of
    data1 among data2 (data1 itself, excluding each row, when data2 is None)."""
    same = data2 is None
    data2 = data1 if same else data2
    n2 = np.shape(data2)[0]
    if just_nn:
        nns = exact_neighbors(data1, data2, k=2 if same else 1)
        return nns[:, 1] if same else nns[:, 0]
    nns = exact_neighbors(data1, data2, k=n2)
    return nns[:, 1:] if same else nns


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
    queries = kernels.rows32(queries)
    n = coarse.shape[0]
    limit = n if limit is None else min(limit, n)
    h = model.D // 2
    out = np.empty((len(queries), limit), dtype=np.int64)
    for qi, x in enumerate(queries):
        dists = np.zeros(n, dtype=np.float32)
        for split in range(2):
            books = model.subquantizers[split]
            # One table per coarse cluster of this split: project x in every local frame.
            r = x[split * h:(split + 1) * h][None, :] - model.Cs[split] - model.mus[split]
            local = np.einsum("vij,vj->vi", model.Rs[split], r).astype(np.float32)
            tables = kernels.adc_tables(local, books)  # (V, M/2, S)
            codes = fine[:, split * books.shape[0]:(split + 1) * books.shape[0]]
            tab = tables[coarse[:, split]]  # (n, M/2, S)
            dists += np.take_along_axis(tab, codes[:, :, None].astype(np.int64),
                                        axis=2)[:, :, 0].sum(axis=1)
        order = np.argsort(dists, kind="stable")
        out[qi] = order[:limit]
    return out


def get_subquantizer_distortion(data, model):
    """Reference API: mean squared error of each subquantizer on ``data`` (n, D).

    Returns:
        (M/2, M/2) per split (two arrays of length M/2), as the reference.
    """
    X = kernels.rows32(data)
    coarse, projected = model._coarse_and_projection(X)
    fine = kernels.encode_fine(projected, model.codebooks)
    rec = kernels.decode_fine(fine, model.codebooks)
    ds = model.D // model.M
    err = ((projected - rec) ** 2).reshape(len(X), model.M, ds).sum(axis=2).mean(axis=0)
    return err[:model.M // 2], err[model.M // 2:]


def relative_reconstruction_error(data, model):
    """``sum |x - decode(encode(x))|^2 / sum |x - mean|^2`` over rows of data."""
    X = kernels.rows32(data)
    rec = model.decode(model.encode(X))
    total = ((X - X.mean(axis=0)) ** 2).sum(dtype=np.float64)
    return float(((X - rec) ** 2).sum(dtype=np.float64) / total)


def get_cell_histogram(data, model):
    """Reference API: number of rows of data in each of the V^2 cells, (V*V,) int64."""
    coarse, _ = model.encode(data)
    cells = coarse[:, 0].astype(np.int64) * model.V + coarse[:, 1]
    return np.bincount(cells, minlength=model.V * model.V)


def get_proportion_nns_with_same_coarse_codes(data, nns, model):
    """Reference API: fraction of rows whose nearest neighbour (index nns[i]) has the same
    coarse codes."""
    coarse, _ = model.encode(data)
    return float(np.mean(np.all(coarse == coarse[np.asarray(nns)], axis=1)))


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
