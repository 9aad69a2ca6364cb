"""Recall of an index too large to check by hand: exact neighbours of sampled queries,
computed on the executors, against what the LOPQ search of the same queries returns.

`evaluate` samples N of the indexed vectors as queries (with a seed), finds each one's
exact nearest vectors among all of them in the model's metric (every partition scores
its blocks against the broadcast queries with one GEMM per block and keeps a running
top k; the partial results are merged in a tree, so no task ever holds all vectors),
searches the codes with `lopq.spark.search.ShardedIndex` at each quota, and reports
recall@R: the fraction of queries whose exact nearest neighbour (the query itself
excluded, from both sides) is among the first R results, with a 95% Wilson interval.
"""

import logging
import math

import numpy as np

from .search import ShardedIndex, id_value
from .session import as_context

logger = logging.getLogger(__name__)

#: Exact neighbours kept per query (recall@R needs R of them at most).
TRUTH_K = 100


def wilson_interval(hits, n, z=1.96):
    """95% Wilson score interval ``(low, high)`` of a proportion hits/n (0, 0 for n=0)."""
    if n == 0:
        return 0.0, 0.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def exact_distances(metric, Q, X):
    """(q, b) float32 distances of the metric (ascending is nearer) between queries Q
    (q, d) and rows X (b, d): one GEMM."""
    Q = np.asarray(Q, dtype=np.float32)
    X = np.asarray(X, dtype=np.float32)
    if metric == "cosine":
        qn = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-30)
        xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-30)
        return 1.0 - qn @ xn.T
    if metric == "inner_product":
        return -(Q @ X.T)
    sq_q = np.einsum("ij,ij->i", Q, Q)[:, None]
    sq_x = np.einsum("ij,ij->i", X, X)[None, :]
    return np.maximum(sq_q + sq_x - 2 * (Q @ X.T), 0)


def _merge_top(a, b, k):
    """Two (dists (q, k'), ids (q, k')) partial results -> the k nearest per query."""
    if a is None:
        return b
    if b is None:
        return a
    dists = np.concatenate([a[0], b[0]], axis=1)
    ids = np.concatenate([a[1], b[1]], axis=1)
    order = np.argsort(dists, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dists, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _partition_top(queries_bc, metric, k):
    def run(blocks):
        Q, qids = queries_bc.value
        best = None
        for ids, X in blocks:
            keys = np.empty(len(ids), dtype=object)
            keys[:] = [id_value(i) for i in ids]
            d = exact_distances(metric, Q, X)
            d[keys[None, :] == qids[:, None]] = np.inf  # the query itself
            kk = min(k, d.shape[1])
            part = np.argpartition(d, kk - 1, axis=1)[:, :kk]
            local = (np.take_along_axis(d, part, axis=1), keys[part])
            best = _merge_top(best, local, k)
        if best is not None:
            yield best
    return run


def sample_queries(blocks, n_rows, sample, seed=None):
    """About ``sample`` rows of the ``(ids, X)`` blocks, then exactly ``sample`` (or all
    rows, if fewer), chosen with ``seed``: (ids (s,) object, X (s, d) float32)."""
    fraction = min(1.0, 1.5 * sample / max(n_rows, 1) + 1e-9)
    seed = 0 if seed is None else int(seed)

    def pick(index, items):
        rng = np.random.default_rng([seed, index])
        for ids, X in items:
            keep = np.flatnonzero(rng.random(len(ids)) < fraction)
            if keep.size:
                yield [id_value(ids[i]) for i in keep], X[keep]

    picked = blocks.mapPartitionsWithIndex(pick).collect()
    if not picked:
        raise ValueError("no rows to sample queries from")
    ids = np.empty(sum(len(p[0]) for p in picked), dtype=object)
    ids[:] = [i for p in picked for i in p[0]]
    X = np.concatenate([p[1] for p in picked]).astype(np.float32)
    if len(ids) > sample:
        choice = np.sort(np.random.default_rng(seed).choice(len(ids), sample, replace=False))
        ids, X = ids[choice], X[choice]
    return ids, X


def exact_neighbours(sc, blocks, metric, query_ids, Q, k=TRUTH_K, depth=2):
    """The k exact nearest rows of each query among all ``blocks`` (``(ids, X)``),
    itself excluded: (dists (q, k) float32 ascending, ids (q, k) object), computed on the
    executors."""
    sc = as_context(sc)
    queries_bc = sc.broadcast((np.ascontiguousarray(Q, dtype=np.float32), query_ids))
    try:
        sc.setJobDescription("lopq evaluate: exact neighbours of the sampled queries")
        return blocks.mapPartitions(_partition_top(queries_bc, metric, k)).treeReduce(
            lambda a, b: _merge_top(a, b, k), depth=depth)
    finally:
        queries_bc.unpersist()


def evaluate(sc, model, codes, blocks, n_rows, sample, quotas, ranks=(1, 10, 100),
             seed=None):
    """Recall of the LOPQ search of ``codes`` against exact search over ``blocks``.

    Args:
        model: the `LOPQModel` of the codes (its metric is the one evaluated).
        codes: RDD of code arrays (`lopq.spark.search.load_codes`).
        blocks: RDD of ``(ids, X)`` blocks of the original vectors (the same ids).
        n_rows: rows in ``blocks``; sample: queries to sample; quotas: search quotas.
        ranks: the R of recall@R.

    Returns:
        dict: ``metric``, ``queries`` (their ids), ``exact_nearest`` (each one's exact
        nearest id and distance) and ``results``: per quota, ``recall@R`` with its
        95% ``interval`` per R and ``found`` (the search's first ids per query).
    """
    sc = as_context(sc)
    k = max(ranks)
    qids, Q = sample_queries(blocks, n_rows, sample, seed)
    logger.info("evaluate: %d sampled queries, exact %d nearest of each over %d rows",
                len(qids), k, n_rows)
    truth_d, truth_ids = exact_neighbours(sc, blocks, model.metric, qids, Q, k)
    nearest = truth_ids[:, 0]
    has_truth = np.isfinite(truth_d[:, 0])
    index = ShardedIndex(sc, model, codes)
    queries = sc.parallelize([(list(qids[lo:lo + 256]), Q[lo:lo + 256])
                              for lo in range(0, len(qids), 256)],
                             max(1, min(len(qids) // 256 + 1, sc.defaultParallelism)))
    results = []
    try:
        for quota in quotas:
            sc.setJobDescription(f"lopq evaluate: search at quota {quota}")
            found = dict(index.search(queries, k, quota, exclude_self=True).collect())
            lists = [list(found.get(q, (None, []))[1]) for q in qids.tolist()]
            row = {"quota": int(quota)}
            for R in ranks:
                hits = sum(1 for want, got, ok in zip(nearest, lists, has_truth)
                           if ok and want in got[:R])
                total = int(has_truth.sum())
                low, high = wilson_interval(hits, total)
                row[f"recall@{R}"] = hits / total if total else 0.0
                row[f"recall@{R}_interval"] = [low, high]
            row["found"] = [got[:k] for got in lists]
            results.append(row)
            logger.info("evaluate: quota %d: %s", quota, ", ".join(
                f"recall@{R} {row[f'recall@{R}']:.3f}" for R in ranks))
    finally:
        index.unpersist()
    return {"metric": model.metric, "rows": int(n_rows), "sample": int(len(qids)),
            "ranks": list(ranks), "queries": qids.tolist(),
            "exact_nearest": [[i, float(d)] for i, d in zip(nearest.tolist(),
                                                             truth_d[:, 0].tolist())],
            "results": results}
