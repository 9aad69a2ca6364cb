"""Batch nearest-neighbour search and near-duplicate joins on Spark, routed by cells.

`LOPQSearcher.search(x, quota, limit=k)` on codes that do not fit one machine, for a batch
of queries. A batch runs as:

1. **Cell sizes.** One pass counts the codes of each of the V*V cells (a V*V int64 array on
   the driver, broadcast).
2. **Shards.** Cells in id order are packed into shards of about ``rows_per_shard``
   codes; a cell with more codes than that (a skewed cell) is split over several shards,
   its codes assigned by a hash of their id. One shard is one partition of the join.
3. **Routing.** Each query runs the searcher's multi-sequence traversal on the global
   cell sizes (the compiled `visited_cells`) and lists the cells it visits until the
   quota; it is sent once to each shard holding some of them, with that shard's cells.
   No query goes to a shard it does not visit; no code goes to more than one shard.
4. **Scoring.** Codes and routed queries meet in one shuffle; each partition indexes its
   codes by cell (an `LOPQSearcher`) and scores its queries on exactly their cells with
   the grouped-table kernel of `search_batch` (`search_cells_grouped`).
5. **Merge.** The shards' top k of each query block are merged as arrays
   (``reduceByKey`` on the block), then written one record per query.

Retrieval is the searcher's (whole cells in multi-sequence order until the quota);
distances are the same LOPQ distances up to float rounding, so equal-distance ties may
come out in another order.
"""

import logging
import zlib

import numpy as np

from ..formats import code_id
from ..metric import candidate_distances
from ..model import LOPQModel
from .errors import DataError
from .session import as_context

logger = logging.getLogger(__name__)

#: Codes per shard (one task of the scoring stage) when the caller does not say.
ROWS_PER_SHARD = 250_000
#: Candidates per query and shard kept for exact re-ranking when the caller does not say,
#: as a multiple of k.
RERANK_FACTOR = 4
#: Up to this many codes, re-ranking vectors go straight to their shards by a broadcast
#: map of (id hash, shard) pairs (12 bytes per code on every executor: 240 MB at the
#: most); beyond it they are joined by buckets of ids first, which moves them twice.
MAP_JOIN_MAX_CODES = 20_000_000


# ---------------------------------------------------------------------------- codes
def _check_code_arrays(ids, coarse, fine, V, M, S, where):
    if len(ids) == 0:
        return
    if fine.shape[1] != M:
        raise DataError(f"{where}: codes of {fine.shape[1]} fine values, but the model has "
                        f"M={M}: the codes come from another model")
    for name, values, bound in (("coarse", coarse, V), ("fine", fine, S)):
        bad = np.flatnonzero(((values < 0) | (values >= bound)).any(axis=1))
        if bad.size:
            raise DataError(f"{where}: id {ids[bad[0]]!r} has {name} codes "
                            f"{values[bad[0]].tolist()} out of range for the model "
                            f"({'V' if name == 'coarse' else 'S'}={bound}): the codes come "
                            "from another model")


def id_value(key):
    """Code ids as `LOPQSearcher.from_codes` gives them: ints where the text is one
    (`lopq.formats.code_id`)."""
    return code_id(key)


def load_codes(sc, path, model, codes_format="text"):
    """The codes of `compute_codes` output as an RDD of per-partition arrays
    ``(ids list, coarse (n, 2) int32, fine (n, M) uint8/uint16)``, checked against the
    model (M, V and S) on the executors.

    Args:
        path: a folder of text part files (``id<TAB>[[c0, c1], [f...]]``) or, with
            ``codes_format="parquet"``, a table with ``id``, ``coarse``, ``fine`` columns;
            or several, comma-separated, each possibly a glob (a growing index: each
            day's `compute_codes` output with the same model). Every one must exist.
    """
    from ..formats import parse_code_lines
    from ..search import kernels
    sc = as_context(sc)
    V, M, S = model.V, model.M, model.subquantizer_clusters
    dtype = kernels.code_dtype(S)
    source = str(path)
    sources = [p.strip() for p in source.split(",") if p.strip()]
    if not sources:
        raise DataError("--codes is empty: give a folder, a glob, or several separated "
                        "by commas")
    if codes_format == "text":
        from . import fs
        for one in sources:
            try:
                fs.input_files(sc, one, "--codes")
            except (FileNotFoundError, ValueError) as err:
                raise DataError(str(err)) from None

        def parse(index, lines):
            where = f"--codes {source} (partition {index})"
            keys, coarse, fine = parse_code_lines(lines, where)
            if not keys:
                return
            ids = [id_value(k) for k in keys]
            _check_code_arrays(ids, coarse, fine, V, M, S, where)
            yield ids, coarse.astype(np.int32), fine.astype(dtype)
        return sc.textFile(",".join(sources)).mapPartitionsWithIndex(parse)
    from pyspark.sql import SparkSession

    from .data import read_table
    spark = SparkSession.builder.getOrCreate()
    df = None
    for one in sources:
        part = read_table(spark, sc, one, codes_format, "--codes")
        missing = [c for c in ("id", "coarse", "fine") if c not in part.columns]
        if missing:
            raise DataError(f"--codes {one}: no column(s) {', '.join(missing)} (columns: "
                            f"{', '.join(part.columns)}); expected compute_codes output")
        part = part.select("id", "coarse", "fine")
        df = part if df is None else df.unionByName(part)

    def rows(index, items):
        where = f"--codes {source} (partition {index})"
        ids, coarse, fine = [], [], []
        # Per row: a DataFrame reaches Python as one Row object at a time (no columnar
        # hand-over for an RDD of a DataFrame); the codes become arrays per partition.
        for row in items:
            ids.append(id_value(row[0]))
            coarse.append(row[1])
            fine.append(row[2])
        if not ids:
            return
        try:
            coarse = np.asarray(coarse, dtype=np.int64).reshape(len(ids), 2)
            fine = np.asarray(fine, dtype=np.int64).reshape(len(ids), -1)
        except (ValueError, TypeError):
            raise DataError(f"{where}: coarse must hold 2 ints and fine M ints in every "
                            "row") from None
        _check_code_arrays(ids, coarse, fine, V, M, S, where)
        yield ids, coarse.astype(np.int32), fine.astype(dtype)
    return df.select("id", "coarse", "fine").rdd.mapPartitionsWithIndex(rows)


def cell_sizes(codes, V):
    """Codes per cell, (V*V,) int64, from an RDD of `load_codes` arrays."""
    def count(parts):
        total = np.zeros(V * V, dtype=np.int64)
        for _, coarse, _ in parts:
            total += np.bincount(coarse[:, 0].astype(np.int64) * V + coarse[:, 1],
                                 minlength=V * V)
        yield total
    return codes.mapPartitions(count).treeReduce(np.add, depth=2)


# ---------------------------------------------------------------------------- shards
def plan_shards(sizes, rows_per_shard=ROWS_PER_SHARD):
    """Pack cells into shards of about ``rows_per_shard`` codes.

    Args:
        sizes: (V*V,) codes per cell.

    Returns:
        first (V*V,) int64 first shard of each cell, count (V*V,) int64 shards of each
        cell (1, or more for a cell larger than ``rows_per_shard``), number of shards.
    """
    rows_per_shard = max(1, int(rows_per_shard))
    first = np.zeros(len(sizes), dtype=np.int64)
    count = np.ones(len(sizes), dtype=np.int64)
    shard, fill = 0, 0
    for cell in np.flatnonzero(sizes):
        size = int(sizes[cell])
        if size > rows_per_shard:  # a skewed cell: shards of its own
            if fill:
                shard, fill = shard + 1, 0
            first[cell] = shard
            count[cell] = -(-size // rows_per_shard)
            shard += int(count[cell])
            continue
        if fill and fill + size > rows_per_shard:
            shard, fill = shard + 1, 0
        first[cell] = shard
        fill += size
    return first, count, shard + (1 if fill else 0) or 1


def _shard_of_codes(ids, cells, first, count):
    """Shard of each code: its cell's, or for a split cell one of its shards by id hash."""
    shards = first[cells].copy()
    split = np.flatnonzero(count[cells] > 1)
    for i in split:
        shards[i] += zlib.crc32(str(ids[i]).encode("utf-8")) % int(count[cells[i]])
    return shards


# ---------------------------------------------------------------------------- routing
def visited_cells(model, Q, offsets, quota):
    """The non-empty cells each query visits until >= quota codes, in visiting order:
    ``cell_ptr (q + 1,) int64``, ``cells (c, 2) int32`` (the compiled traversal of
    `LOPQSearcher.search`; its Python multi-sequence when the extension is missing)."""
    from ..search import kernels, multisequence
    compiled = kernels.compiled_search()
    Q = np.ascontiguousarray(Q, dtype=np.float32)
    if compiled is not None:
        CsT = np.ascontiguousarray(model.Cs.transpose(0, 2, 1))
        return compiled.visited_cells(Q, CsT, offsets, int(quota), model.coarse_adjustment())
    V = model.V
    ptr, cells = [0], []
    for x in Q:
        total = 0
        for _, (c0, c1) in multisequence(x, model.Cs, model.coarse_adjustment()):
            size = offsets[c0 * V + c1 + 1] - offsets[c0 * V + c1]
            if size:
                cells.append((c0, c1))
                total += size
            if total >= quota:
                break
        ptr.append(len(cells))
    return np.asarray(ptr, dtype=np.int64), np.asarray(cells, dtype=np.int32).reshape(-1, 2)


def route_block(ptr, cells, V, first, count):
    """Where a block's queries go: for each shard some visit, the queries (block rows)
    and their cells there, in visiting order.

    Args:
        ptr (q + 1,), cells (c, 2): `visited_cells` of the block.
        first, count: (V*V,) the shard plan (`plan_shards`).

    Yields:
        (shard, rows (r,) int64 block rows, cell_ptr (r + 1,) int64, cell_ids (c',) int64).
    """
    cell_ids = cells[:, 0].astype(np.int64) * V + cells[:, 1]
    query = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    copies = count[cell_ids]  # a split cell goes to each of its shards
    which = np.repeat(np.arange(len(cell_ids)), copies)
    starts = np.cumsum(copies) - copies
    shard = first[cell_ids][which] + (np.arange(len(which)) - np.repeat(starts, copies))
    order = np.lexsort((np.arange(len(which)), query[which], shard))
    shard, query, cell = shard[order], query[which][order], cell_ids[which][order]
    bounds = np.flatnonzero(np.diff(shard)) + 1
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(shard)]])):
        if hi <= lo:
            continue
        q = query[lo:hi]
        new_query = np.concatenate([[True], q[1:] != q[:-1]])
        rows = q[new_query]
        cell_ptr = np.concatenate([np.flatnonzero(new_query), [hi - lo]]).astype(np.int64)
        yield int(shard[lo]), rows, cell_ptr, cell[lo:hi]


def _route_queries(model_bc, plan_bc, quota):
    """Query blocks to the shards they visit: ``(shard, ("q", block, rows, keys, X,
    cell_ptr, cell_ids))`` with ``block = (partition, block number)`` naming the block for
    the merge, ``rows`` (r,) int64 the block rows routed there and ``keys`` their ids."""
    def run(partition, blocks):
        model = model_bc.value
        offsets, first, count = plan_bc.value
        for number, (ids, X) in enumerate(blocks):
            # Into the model space of the metric (cosine: unit rows; inner product:
            # padded): the traversal and the scoring are L2 there.
            X = np.ascontiguousarray(model.model_queries(X, "queries"), dtype=np.float32)
            ptr, cells = visited_cells(model, X, offsets, quota)
            keys = np.empty(len(ids), dtype=object)
            # as the codes' ids (self join); per key: ids are Python objects (str or int)
            keys[:] = [id_value(key) for key in ids]
            for shard, rows, cell_ptr, cell_ids in route_block(ptr, cells, model.V, first,
                                                               count):
                yield shard, ("q", (partition, number), rows, keys[rows], X[rows],
                              cell_ptr, cell_ids)
    return run


def _route_codes(plan_bc, V, vectors=False):
    def run(parts):
        _, first, count = plan_bc.value
        for part in parts:
            ids, coarse, fine = part[:3]
            cells = coarse[:, 0].astype(np.int64) * V + coarse[:, 1]
            for shard, rows in _groups(_shard_of_codes(ids, cells, first, count)):
                item = ("c", [ids[i] for i in rows], coarse[rows], fine[rows])
                if vectors:
                    item += (part[3][rows],)
                yield shard, item
    return run


# ---------------------------------------------------------------------------- scoring
def _index_storage():
    """Memory, spilling to local disk: an evicted shard is read back, not rebuilt from the
    codes' shuffle (1B codes of M=16 take about 28 GB cached, see the README)."""
    from pyspark import StorageLevel
    return StorageLevel.MEMORY_AND_DISK


def _shard_partition(shard):
    """The partitioner of shards: shard i is partition i. One function object for the
    index and every batch of queries, so that their union is partition-aware (no
    shuffle of the index)."""
    return shard


def _index_partition(model_bc, vectors=None):
    """All codes of one shard as one record, sorted by cell (an `LOPQSearcher`'s arrays,
    so that each batch of queries indexes them without sorting again).

    ``vectors``: None; ``"attached"`` (each code item carries its rows' vectors); or
    ``"join"`` (vector items ``("v", keys, hashes, home, rows, X)`` came to the shard beside the
    codes: each code takes its id's first vector, a code without one is left out)."""
    def run(records):
        parts, places = _split_items(records)
        if not parts:
            return
        ids = [i for p in parts for i in p[1]]
        code_keys = _id_keys(ids) if vectors == "join" else None
        ids = _object_array(ids)
        coarse = np.concatenate([p[2] for p in parts])
        fine = np.concatenate([p[3] for p in parts])
        at = None  # the vectors' row of each code, in X
        if vectors == "attached":
            X = np.concatenate([p[4] for p in parts])
            at = np.arange(len(X))
        elif vectors == "join":
            keys, hashes, homes, rows, X = _vector_columns(places)
            at = _first_vectors(keys, hashes, homes, rows, code_keys, _key_hashes(code_keys))
            hit = np.flatnonzero(at >= 0)
            if not hit.size:
                return
            ids, coarse, fine, at = ids[hit], coarse[hit], fine[hit], at[hit]
        V = model_bc.value.V
        order = np.argsort(coarse[:, 0].astype(np.int64) * V + coarse[:, 1], kind="stable")
        yield -1, ("i", ids[order], coarse[order], fine[order],
                   None if at is None else X[at[order]].astype(np.float32, copy=False))
    return run


def _nearest_columns(dists, ids, k):
    """Each row's k smallest distances (stable: equal distances keep their column order),
    with the ids in the same places: ``(dists (r, k), ids (r, k))``."""
    best = np.argsort(dists, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dists, best, axis=1), np.take_along_axis(ids, best, axis=1)


def _score_partition(model_bc, k, exclude_self, max_distance, candidates):
    """Score the queries routed to one shard on its index record. Yields one record per
    query block: ``(block, (rows (r,), keys (r,), dists (r, k) float32 inf-padded,
    ids (r, k) object))``, nearest first."""
    from ..search import LOPQSearcher

    def run(records):
        model = model_bc.value
        index, items = None, []
        for _, item in records:
            if item[0] == "i":
                index = item
            else:
                items.append(item)
        if not items or index is None:
            return
        _, ids, coarse, fine, vectors = index
        # already in cell order: the stable sort of from_arrays leaves it as it is
        searcher = LOPQSearcher.from_arrays(model, coarse, fine, ids)
        keys = np.concatenate([item[3] for item in items])
        Q = np.concatenate([item[4] for item in items])
        cell_lists = [cells for item in items
                      for cells in np.split(item[6], item[5][1:-1])]
        limit = k + (1 if exclude_self else 0)
        rerank = vectors is not None
        rows, dists = searcher.score_cells_model_space(
            Q, cell_lists, max(limit, candidates) if rerank else limit)
        dists = model.metric_distances(dists, Q)  # distances of the model's metric
        missing = rows < 0
        rows = np.where(missing, 0, rows)
        if rerank:  # exact distances of the candidates, 1024 queries at a time
            originals = model.metric_transform().original(Q)
            for lo in range(0, len(Q), 1024):
                dists[lo:lo + 1024] = candidate_distances(
                    model.metric, originals[lo:lo + 1024], vectors[rows[lo:lo + 1024]])
        found = searcher.ids[rows]
        drop = missing
        if exclude_self:
            drop = drop | (found == keys[:, None])
        if max_distance is not None:
            drop = drop | (dists > max_distance)
        dists = np.where(drop, np.float32(np.inf), dists).astype(np.float32)
        dists, found = _nearest_columns(dists, found, k)
        lo = 0
        for item in items:
            hi = lo + len(item[2])
            yield item[1], (item[2], keys[lo:hi], dists[lo:hi], found[lo:hi])
            lo = hi
    return run


def _merge_blocks(k):
    """Merge two shards' results for one query block: per query (row of the block) the
    k nearest of both, vectorised over the block."""
    def merge(a, b):
        rows = np.concatenate([a[0], b[0]])
        keys = np.concatenate([a[1], b[1]])
        dists = np.concatenate([a[2], b[2]])
        ids = np.concatenate([a[3], b[3]])
        unique_rows, first, which = np.unique(rows, return_index=True, return_inverse=True)
        which = which.ravel()
        slot = np.zeros(len(keys), dtype=np.int64)  # 0 for a query's first row, 1 ...
        order = np.argsort(which, kind="stable")
        starts = np.searchsorted(which[order], np.arange(len(first)))
        slot[order] = np.arange(len(keys)) - starts[which[order]]
        width = int(slot.max()) + 1
        wide_d = np.full((len(first), width * k), np.inf, dtype=np.float32)
        wide_i = np.empty((len(first), width * k), dtype=object)
        columns = slot[:, None] * k + np.arange(k)[None, :]
        wide_d[which[:, None], columns] = dists
        wide_i[which[:, None], columns] = ids
        best_d, best_i = _nearest_columns(wide_d, wide_i, k)
        return unique_rows, keys[first], best_d, best_i
    return merge


def _block_columns(block):
    """A merged block's ``(keys, dists, ids)``."""
    _, (_, keys, dists, ids) = block
    return keys, dists, ids


def query_records(columns):
    """A block's ``(keys, dists, ids)`` as ``(query_id, (dists (<=k,) float32, ids
    list))`` records; queries with no neighbour are absent."""
    keys, dists, ids = columns
    for key, d, found in zip(keys, dists, ids):
        keep = np.isfinite(d)
        if keep.any():
            yield key, (d[keep], list(found[keep]))


class ShardedIndex:
    """Codes grouped by cell into shards, one cached partition each, searched by batches
    of queries that are routed to the shards they visit (the index is not shuffled
    again: queries are partitioned like it and meet it in a partition-aware union).

    Args:
        sc: SparkContext or SparkSession.
        model: the `LOPQModel` the codes come from.
        codes: RDD of ``(ids, coarse, fine)`` arrays (`load_codes`).
        rows_per_shard: codes per shard (a larger cell is split over several).
        rerank_vectors: optional RDD of ``(ids, X)`` blocks, the indexed items' original
            vectors: searches then re-rank candidates by exact squared distance.
    """

    def __init__(self, sc, model, codes, rows_per_shard=ROWS_PER_SHARD,
                 rerank_vectors=None):
        sc = as_context(sc)
        self.sc, self.model = sc, model
        V = model.V
        sc.setJobDescription("lopq search: cell sizes")
        sizes = cell_sizes(codes, V)
        if sizes.sum() == 0:
            raise DataError("the codes are empty: nothing to search")
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        first, count, self.n_shards = plan_shards(sizes, rows_per_shard)
        logger.info("search: %d codes in %d non-empty cells, %d shard(s) of <= %d codes",
                    int(sizes.sum()), int(np.count_nonzero(sizes)), self.n_shards,
                    rows_per_shard)
        self.model_bc = sc.broadcast(model)
        self.plan_bc = sc.broadcast((offsets, first, count))
        join, self.map_bc = None, None
        shards = self.n_shards
        # Each side is partitioned where it is made, then the sides meet in a
        # partition-aware union: a union before partitionBy would send every record
        # through the JVM and back into Python once more (1.8 s of 512 MB of vectors).
        routed = codes.mapPartitions(_route_codes(self.plan_bc, V)).partitionBy(
            shards, _shard_partition)
        if rerank_vectors is not None and sizes.sum() <= MAP_JOIN_MAX_CODES:
            # The vectors go straight to their codes' shards, by a map of id hashes.
            join = "join"
            sc.setJobDescription("lopq search: the shards of the codes' ids")
            self.map_bc = sc.broadcast(_shard_map(codes.mapPartitions(
                _code_shard_hashes(self.plan_bc, V)).collect()))
            routed = _partition_aware_union(routed, rerank_vectors.mapPartitionsWithIndex(
                _route_vectors(self.map_bc)).partitionBy(shards, _shard_partition))
        elif rerank_vectors is not None:
            join = "attached"
            routed = _with_vectors(codes, rerank_vectors).mapPartitions(
                _route_codes(self.plan_bc, V, vectors=True)).partitionBy(
                    shards, _shard_partition)
        sc.setJobDescription("lopq search: shard the codes")
        self.index = (routed.mapPartitions(_index_partition(self.model_bc, join),
                                           preservesPartitioning=True)
                      .persist(_index_storage()))
        # Materialised by a count in the JVM: RDD.count() would stream every shard back
        # into Python to count one record.
        self.index._jrdd.count()

    def search(self, queries, k, quota, exclude_self=False, max_distance=None,
               rerank_candidates=None):
        """RDD of ``(query_id, (dists (<=k,) float32, ids list))``, nearest first, for
        query blocks ``(ids, X)``; queries with no neighbour are absent.
        ``rerank_candidates``: with re-ranking vectors, the LOPQ-nearest candidates per
        query and shard that get exact distances (default ``RERANK_FACTOR * k``)."""
        return self.search_blocks(queries, k, quota, exclude_self, max_distance,
                                  rerank_candidates).flatMap(query_records)

    def search_blocks(self, queries, k, quota, exclude_self=False, max_distance=None,
                      rerank_candidates=None):
        """The results of `search` a block of queries per record, for writers that
        work on columns: ``(keys (r,), dists (r, k) float32 inf-padded, ids (r, k)
        object)``, nearest first; a query with no neighbour has an all-inf row."""
        if int(k) <= 0:
            raise ValueError(f"--k must be a positive number of neighbours, got {k}")
        if int(quota) <= 0:
            raise ValueError(f"--quota must be a positive number of codes, got {quota}")
        limit = int(k) + (1 if exclude_self else 0)
        candidates = RERANK_FACTOR * limit if rerank_candidates is None \
            else int(rerank_candidates)
        if candidates < int(k):
            raise ValueError(f"--rerank_candidates must be at least --k ({k}), got "
                             f"{rerank_candidates}")
        routed = queries.mapPartitionsWithIndex(_route_queries(self.model_bc, self.plan_bc,
                                                               int(quota)))
        routed = routed.partitionBy(self.n_shards, _shard_partition)
        joined = _partition_aware_union(self.index, routed)
        scored = joined.mapPartitions(_score_partition(self.model_bc, int(k), exclude_self,
                                                       max_distance, candidates))
        return scored.reduceByKey(_merge_blocks(int(k))).map(_block_columns)

    def unpersist(self):
        self.index.unpersist()
        self.model_bc.unpersist()
        self.plan_bc.unpersist()
        if self.map_bc is not None:
            self.map_bc.unpersist()


def search_codes(sc, model, codes, queries, k, quota, rows_per_shard=ROWS_PER_SHARD,
                 exclude_self=False, rerank_vectors=None, max_distance=None,
                 rerank_candidates=None):
    """Routed batch search: for every query, its k nearest indexed ids (one
    `ShardedIndex`, one batch).

    Args:
        sc: SparkContext or SparkSession.
        model: the `LOPQModel` the codes come from.
        codes: RDD of ``(ids, coarse, fine)`` arrays (`load_codes`).
        queries: RDD of ``(ids, X)`` blocks, X (b, D) float32 (`lopq.spark.load_blocks`
            with ids).
        k: neighbours per query; quota: codes retrieved per query (whole cells).
        exclude_self: drop an indexed item whose id equals the query's (self join).
        rerank_vectors: optional RDD of ``(ids, X)`` blocks of the indexed items'
            original vectors: the candidates are re-ranked by exact squared distance.
        max_distance: keep only neighbours at most this far (squared, as LOPQ ranks).
        rerank_candidates: candidates per query and shard re-ranked exactly (default
            ``RERANK_FACTOR * k``).

    Returns:
        RDD of ``(query_id, (dists (<=k,) float32, ids list))``, nearest first; queries
        with no neighbour are absent. The index stays cached until the RDD is computed;
        call ``.collect()`` or save it, then nothing else needs releasing.
    """
    index = ShardedIndex(sc, model, codes, rows_per_shard, rerank_vectors)
    return index.search(queries, k, quota, exclude_self, max_distance, rerank_candidates)


def _partition_aware_union(a, b):
    """The union of two RDDs partitioned alike: partition i holds both sides' partition i
    (no shuffle)."""
    joined = a.union(b)
    if joined.getNumPartitions() != a.getNumPartitions():  # not partition-aware: a bug
        raise RuntimeError("the two sides of a union are not co-partitioned")
    return joined


def _with_vectors(codes, vectors):
    """Codes joined with their items' vectors by id, by buckets of ids: RDD of (ids,
    coarse, fine, X). The join for more codes than `MAP_JOIN_MAX_CODES` (the vectors
    cross the shuffle twice: to their bucket, then to their shard).

    Columnar: both sides are cut into blocks by a hash of the id, shuffled as blocks, and
    each bucket joins its blocks with one sort (`_first_vectors`: no Python object per
    row but the ids)."""
    buckets = max(codes.getNumPartitions(), vectors.getNumPartitions())
    keyed = _partition_aware_union(
        codes.mapPartitions(_code_buckets(buckets)).partitionBy(buckets, _bucket_partition),
        vectors.mapPartitionsWithIndex(_vector_buckets(buckets)).partitionBy(
            buckets, _bucket_partition))
    return keyed.mapPartitions(_join_bucket)


def _id_keys(ids):
    """Ids as a fixed-width unicode array, equal where `id_value` makes them equal (a
    numeric text and its int give the same key: ``"7"``, ``7`` and ``"007"`` are ``"7"``).

    Texts and ints are converted by numpy in one call; only a text that `id_value` could
    change (a leading ``0`` or ``-``, a character beyond ASCII) goes through it one by
    one."""
    if isinstance(ids, np.ndarray) and ids.dtype == object:
        ids = ids.tolist()
    if not len(ids):
        return np.empty(0, dtype="<U1")
    values = np.asarray(ids)
    if values.dtype.kind in "iu" and bool not in set(map(type, ids)):
        return values.astype(str)
    if values.dtype.kind != "U" or values.ndim != 1:  # other objects: one by one
        return np.array([id_value(key) for key in ids], dtype=str)
    chars = values.view(np.uint32).reshape(values.size, values.dtype.itemsize // 4)
    odd = np.flatnonzero((chars[:, 0] == ord("0")) | (chars[:, 0] == ord("-"))
                         | (chars > 127).any(axis=1))
    if odd.size:
        values = values.copy()  # a canonical form is never longer than its text
        values[odd] = [str(id_value(values[i].item())) for i in odd]
    return values


def _key_hashes(keys):
    """64-bit hashes (uint64) of unicode keys, the same on every executor (unlike Python's
    salted ``hash``): a polynomial in the characters (numpy pads them with zeros), its
    bits spread by splitmix64's finaliser (buckets take the low bits)."""
    chars = keys.view(np.uint32).reshape(keys.size, keys.dtype.itemsize // 4)
    h = np.zeros(keys.size, dtype=np.uint64)
    # Horner's rule from the last column: numpy's zero padding adds nothing, so a key
    # hashes the same in arrays of any width; a column at a time, no (n, width) uint64.
    for column in chars.T[::-1]:
        h *= np.uint64(1000003)
        h += column
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _groups(labels):
    """``(label, rows)`` for each distinct label, rows in their order."""
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for rows in np.split(order, bounds):
        if rows.size:
            yield int(labels[rows[0]]), rows


def _object_array(values):
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _first_vectors(keys, hashes, homes, rows, code_keys, code_hashes):
    """For each code key, the index (into ``keys``) of its vector, -1 where it has none.
    ``hashes`` are the keys' `_key_hashes`; ``homes`` and ``rows`` place each vector in
    the vectors' order (partition, row in it): an id given more than once takes the
    first. Matched by hash (one integer sort), then checked key by key; a code whose
    hash another key shares (a 64-bit collision) is matched by its key."""
    found = np.full(code_keys.size, -1, dtype=np.int64)
    if keys.size == 0:
        return found
    place = np.argsort((homes << 40) | rows)  # the vectors' order (< 2**40 rows a part)
    order = place[np.argsort(hashes[place], kind="stable")]
    at = np.minimum(np.searchsorted(hashes[order], code_hashes), keys.size - 1)
    same_hash = hashes[order[at]] == code_hashes
    candidate = order[at]
    exact = same_hash & (keys[candidate] == code_keys)
    found[exact] = candidate[exact]
    clash = np.flatnonzero(same_hash & ~exact)
    if clash.size:
        order = np.lexsort((rows, homes, keys))
        at = np.minimum(np.searchsorted(keys[order], code_keys[clash]), keys.size - 1)
        hit = keys[order[at]] == code_keys[clash]
        found[clash[hit]] = order[at[hit]]
    return found


def _vector_blocks(home, parts):
    """One partition of vector blocks ``(ids, X)`` -> ``(keys, hashes, rows, X)`` per
    block, rows counted across the partition's blocks."""
    row = 0
    for ids, X in parts:
        keys = _id_keys(ids)
        yield keys, _key_hashes(keys), np.arange(row, row + keys.size, dtype=np.int64), \
            np.asarray(X)
        row += keys.size


def _code_buckets(buckets):
    """Code blocks ``(ids, coarse, fine)`` -> ``(bucket, ("c", keys, hashes, ids, coarse,
    fine))``."""
    def run(parts):
        for ids, coarse, fine in parts:
            ids = _object_array(ids)
            keys = _id_keys(ids)
            hashes = _key_hashes(keys)
            for bucket, sel in _groups(hashes % np.uint64(buckets)):
                yield bucket, ("c", keys[sel], hashes[sel], ids[sel], coarse[sel], fine[sel])
    return run


def _vector_buckets(buckets):
    """Vector blocks -> ``(bucket, ("v", keys, hashes, home, rows, X))``."""
    def run(home, parts):
        for keys, hashes, rows, X in _vector_blocks(home, parts):
            for bucket, sel in _groups(hashes % np.uint64(buckets)):
                yield bucket, ("v", keys[sel], hashes[sel], home, rows[sel], X[sel])
    return run


def _bucket_partition(bucket):
    return bucket


def _split_items(items):
    """Shuffled ``(key, item)`` records -> (code items, vector items)."""
    codes, vectors = [], []
    for _, item in items:
        (codes if item[0] == "c" else vectors).append(item)
    return codes, vectors


def _vector_columns(items):
    """Vector items ``("v", keys, hashes, home, rows, X)`` -> ``(keys, hashes, homes, rows,
    X)``."""
    if not items:
        return (np.empty(0, dtype="<U1"), np.empty(0, dtype=np.uint64),
                np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), None)
    return (np.concatenate([v[1] for v in items]), np.concatenate([v[2] for v in items]),
            np.concatenate([np.full(len(v[4]), v[3], dtype=np.int64) for v in items]),
            np.concatenate([v[4] for v in items]), np.concatenate([v[5] for v in items]))


def _join_bucket(items):
    codes, vectors = _split_items(items)
    if not codes or not vectors:
        return
    keys, hashes, homes, rows, X = _vector_columns(vectors)
    for _, code_keys, code_hashes, ids, coarse, fine in codes:
        at = _first_vectors(keys, hashes, homes, rows, code_keys, code_hashes)
        hit = at >= 0
        if hit.any():
            yield (list(ids[hit]), coarse[hit], fine[hit],
                   X[at[hit]].astype(np.float32, copy=False))


def _code_shard_hashes(plan_bc, V):
    """Code blocks -> ``(hashes, shards)`` of their ids, for the map of `_route_vectors`."""
    def run(parts):
        _, first, count = plan_bc.value
        for ids, coarse, _ in parts:
            cells = coarse[:, 0].astype(np.int64) * V + coarse[:, 1]
            yield (_key_hashes(_id_keys(ids)),
                   _shard_of_codes(ids, cells, first, count).astype(np.int32))
    return run


def _shard_map(pairs):
    """``(hashes, shards)`` blocks -> the distinct (hash, shard) pairs sorted by hash."""
    hashes = np.concatenate([h for h, _ in pairs] or [np.empty(0, np.uint64)])
    shards = np.concatenate([s for _, s in pairs] or [np.empty(0, np.int32)])
    order = np.lexsort((shards, hashes))
    hashes, shards = hashes[order], shards[order]
    new = np.ones(hashes.size, dtype=bool)
    new[1:] = (hashes[1:] != hashes[:-1]) | (shards[1:] != shards[:-1])
    return hashes[new], shards[new]


def _route_vectors(map_bc):
    """Vector blocks -> ``(shard, ("v", keys, hashes, home, rows, X))`` to every shard holding a
    code whose id hashes as theirs (rows no code hashes as are dropped here; the exact
    match by key is the shard's)."""
    def run(home, parts):
        hashes, shards = map_bc.value
        for keys, h, rows, X in _vector_blocks(home, parts):
            by_hash = np.argsort(h)  # sorted needles: searchsorted walks the map once
            lo = np.searchsorted(hashes, h[by_hash], side="left")
            n = np.searchsorted(hashes, h[by_hash], side="right") - lo
            picked = np.repeat(by_hash, n)  # a row per shard that wants it
            starts = np.repeat(np.cumsum(n) - n, n)
            dest = shards[np.repeat(lo, n) + np.arange(picked.size) - starts]
            for shard, sel in _groups(dest):
                sel = picked[sel]
                yield shard, ("v", keys[sel], h[sel], home, rows[sel], X[sel])
    return run


def decoded_queries(codes, model):
    """The indexed items as queries: their LOPQ reconstructions, blocks ``(ids, X)``."""
    def run(parts):
        for ids, coarse, fine in parts:
            yield ids, model.decode((coarse, fine)).astype(np.float32)
    return codes.mapPartitions(run)


def check_model_for_search(model):
    if not isinstance(model, LOPQModel) or model.codebooks is None or model.Rs is None:
        raise DataError("the model is not fully trained (it lacks coarse quantizers, "
                        "rotations or subquantizers)")
