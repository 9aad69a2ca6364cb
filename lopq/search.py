"""Search over LOPQ codes with the inverted multi-index.

`multisequence` walks the V x V cells of the two coarse splits in non-decreasing
distance to a query; `LOPQSearcher` retrieves whole cells in that order until a quota of
items is reached, then ranks them by LOPQ asymmetric distance (the reference semantics).

Codes are stored grouped by cell in flat arrays: ``cell_offsets (V*V + 1,) int64``,
``fine (n, M) uint8/uint16`` and ``coarse (n, 2) int32`` in cell order, with the ids in a
side array (any hashable ids).
"""

import heapq
import itertools
import json
import os
import pickle
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import _kernels as kernels
from .formats import safe_load_pickle
from .model import LOPQModel, check_rows

INDEX_FORMAT = "lopq-index"
INDEX_VERSION = 1

Result = namedtuple("Result", ["id", "code"])
# Named "Result" as the reference names its with_dists results (their repr matches).
ResultWithDist = namedtuple("Result", ["id", "code", "dist"])


def multisequence(x, coarse_centroids):
    """Cells of the inverted multi-index in non-decreasing distance to x.

    Args:
        x: (D,) query.
        coarse_centroids: the two coarse quantizers, (2, V, D/2) (or a pair of (V, D/2)).

    Yields:
        ``(distance, (c0, c1))``: every one of the V^2 cells exactly once, where distance
        is ``|x_0 - C0[c0]|^2 + |x_1 - C1[c1]|^2``.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    h = x.shape[0] // 2
    dists, orders = [], []
    for split in range(2):
        C = np.asarray(coarse_centroids[split], dtype=np.float64)
        d = ((x[split * h:(split + 1) * h] - C) ** 2).sum(axis=1)
        order = np.argsort(d, kind="stable")
        orders.append(order)
        dists.append(d[order])
    V0, V1 = len(orders[0]), len(orders[1])
    # Heap over positions (i, j) in the two sorted lists. A position is pushed once both
    # its predecessors (i-1, j) and (i, j-1) have been popped, so each is pushed once.
    heap = [(dists[0][0] + dists[1][0], 0, 0)]
    popped = set()
    while heap:
        dist, i, j = heapq.heappop(heap)
        yield float(dist), (int(orders[0][i]), int(orders[1][j]))
        popped.add((i, j))
        if i + 1 < V0 and (j == 0 or (i + 1, j - 1) in popped):
            heapq.heappush(heap, (dists[0][i + 1] + dists[1][j], i + 1, j))
        if j + 1 < V1 and (i == 0 or (i - 1, j + 1) in popped):
            heapq.heappush(heap, (dists[0][i] + dists[1][j + 1], i, j + 1))


class LOPQSearcherBase:
    """The reference's searcher interface over any store of cells (reference API).

    Subclasses provide ``add_codes(codes, ids=None)`` and ``get_cell(cell)`` (the
    ``[(id, LOPQCode), ...]`` of one cell); this class retrieves whole cells in
    multi-sequence order until a quota and ranks them by LOPQ asymmetric distance, in
    plain Python and numpy. `LOPQSearcher` overrides the hot paths with flat arrays and
    a compiled kernel, with the same results.

    Attributes:
        model: the `lopq.LOPQModel` whose codes are indexed.
    """

    model = None

    def add_data(self, data, ids=None, num_procs=1):
        """Encode rows of ``data`` (n, D) and index them under ``ids`` (default 0..n-1).
        ``num_procs`` is accepted for compatibility: encoding is batched and compiled."""
        data = check_rows(data, self.model.D, "data", min_rows=0)
        coarse, fine = self.model.encode(data)
        self.add_codes(_codes_as_tuples(coarse, fine), ids)

    def add_codes(self, codes, ids=None):
        """Index an iterable of ``((c0, c1), (f0, ...))`` codes under ``ids``."""
        raise NotImplementedError

    def get_cell(self, cell):
        """Items ``[(id, LOPQCode), ...]`` of cell ``(c0, c1)``."""
        raise NotImplementedError

    def get_result_quota(self, x, quota=10):
        """Items of whole cells in multi-sequence order until at least ``quota``.

        Returns:
            (items, visited): list of ``(id, LOPQCode)`` and the number of cells visited.
        """
        x = self._query(x)
        retrieved, visited = [], 0
        for _, cell in multisequence(x, self.model.Cs):
            retrieved += self.get_cell(cell)
            visited += 1
            if len(retrieved) >= quota:
                break
        return retrieved, visited

    def _split_table(self, x, split, code, memo):
        """(M/2, S) distance table of query x in the frame of coarse cluster ``code`` of
        ``split``, memoised in ``memo[split]`` (one table per cluster and query)."""
        if code not in memo[split]:
            coarse = (code, code)  # only this split's code matters for coarse_split
            memo[split][code] = np.stack(self.model.get_subquantizer_distances(
                x, coarse, coarse_split=split))
        return memo[split][code]

    def compute_distances(self, x, items):
        """``[(dist, item), ...]`` for items ``(id, code)`` (reference API)."""
        x = self._query(x)
        memo = [{}, {}]
        out = []
        for item in items:
            (c0, c1), fine = item[1]
            table = np.concatenate([self._split_table(x, 0, int(c0), memo),
                                    self._split_table(x, 1, int(c1), memo)])
            dist = kernels.adc_scan(table, np.asarray(fine).reshape(1, -1))[0]
            out.append((float(dist), item))
        return out

    def search(self, x, quota=10, limit=None, with_dists=False):
        """Nearest items of query x by LOPQ distance among the cells needed for ``quota``.

        Args:
            x: (D,) query.
            quota: items to retrieve (whole cells in multi-sequence order).
            limit: results to return; None returns at most ``quota`` (the reference's
                ``limit = quota``), though whole cells may retrieve more.

        Returns:
            (results, visited): results ranked by distance (ties in retrieval order) as
            ``Result(id, code)`` or, with ``with_dists``, ``Result(id, code, dist)``.
        """
        retrieved, visited = self.get_result_quota(x, quota)
        scored = sorted(self.compute_distances(x, retrieved), key=lambda t: t[0])
        scored = scored[:quota if limit is None else limit]
        if with_dists:
            return [ResultWithDist(item[0], item[1], dist) for dist, item in scored], visited
        return [Result(item[0], item[1]) for _, item in scored], visited

    def _query(self, x):
        x = np.asarray(x)
        if x.ndim != 1:
            raise ValueError(f"a query must be one vector of shape (D,), got {x.shape}")
        return check_rows(x, self.model.D, "query")[0]


def _codes_as_tuples(coarse, fine):
    from .model import LOPQCode
    return [LOPQCode(tuple(c), tuple(f)) for c, f in zip(coarse.tolist(), fine.tolist())]


class LOPQSearcher(LOPQSearcherBase):
    """In-memory inverted multi-index over LOPQ codes (reference API).

    Args:
        model: a complete `lopq.LOPQModel`.
    """

    def __init__(self, model):
        model.require_parameters("Cs", "Rs", "mus", "codebooks")
        self.model = model
        V, M = model.V, model.M
        self._pending = []  # (ids list, coarse (n,2), fine (n,M)) not yet merged
        self.cell_offsets = np.zeros(V * V + 1, dtype=np.int64)
        self.coarse = np.empty((0, 2), dtype=np.int32)
        self.fine = np.empty((0, M), dtype=kernels.code_dtype(model.subquantizer_clusters))
        self.ids = np.empty(0, dtype=object)
        self._transposed_cache = None
        self._grouped_cache = None
        #: Seconds the last `search_batch` spent traversing the multi-index, building
        #: distance tables and scanning codes (summed over its threads), when it ran a
        #: compiled path; else None.
        self.last_batch_profile = None

    # ------------------------------------------------------------------ building
    def add_data(self, data, ids=None, num_procs=1):
        """Encode rows of ``data`` (n, D) and index them under ``ids`` (default 0..n-1)."""
        data = check_rows(data, self.model.D, "data", min_rows=0)
        coarse, fine = self.model.encode(data)
        self._add_arrays(coarse, fine, ids)

    def add_codes(self, codes, ids=None):
        """Index codes: a list of ``((c0, c1), (f0, ...))`` or a pair of arrays
        ``(coarse (n, 2), fine (n, M))``."""
        if isinstance(codes, tuple) and len(codes) == 2 and isinstance(codes[0], np.ndarray):
            coarse, fine = codes
        else:
            codes = list(codes)
            coarse = np.asarray([c[0] for c in codes], dtype=np.int32).reshape(-1, 2)
            fine = np.asarray([c[1] for c in codes]).reshape(len(codes), -1)
        coarse = np.asarray(coarse, dtype=np.int32).reshape(-1, 2)
        fine = np.asarray(fine).reshape(len(coarse), -1)
        self.model.check_codes(coarse, fine)
        self._add_arrays(coarse, fine.astype(self.fine.dtype), ids)

    def _add_arrays(self, coarse, fine, ids):
        n = coarse.shape[0]
        start = self.size
        if ids is None:
            ids = list(range(start, start + n))
        elif hasattr(ids, "__len__"):
            ids = list(ids)
        else:  # an iterator, possibly unbounded (the reference's itertools.count())
            ids = list(itertools.islice(ids, n))
        if len(ids) != n:
            raise ValueError(f"got {len(ids)} ids for {n} vectors/codes: pass one id each")
        self._pending.append((ids, coarse, fine))

    @property
    def size(self):
        return len(self.ids) + sum(len(p[0]) for p in self._pending)

    def _merge_pending(self):
        if not self._pending:
            return
        ids = np.empty(self.size, dtype=object)
        ids[:len(self.ids)] = self.ids
        pos = len(self.ids)
        for batch_ids, _, _ in self._pending:
            ids[pos:pos + len(batch_ids)] = batch_ids
            pos += len(batch_ids)
        coarse = np.concatenate([self.coarse] + [p[1] for p in self._pending])
        fine = np.concatenate([self.fine] + [p[2] for p in self._pending])
        self._pending = []
        self._set_arrays(coarse, fine, ids)

    @classmethod
    def from_arrays(cls, model, coarse, fine, ids):
        """A searcher over codes computed elsewhere, stored in cell order at once.

        Args:
            model: the `LOPQModel` of the codes.
            coarse: (n, 2) int coarse codes; fine: (n, M) fine codes.
            ids: (n,) array of item ids.
        """
        searcher = cls(model)
        searcher._set_arrays(coarse, fine, ids)
        return searcher

    def _set_arrays(self, coarse, fine, ids):
        V = self.model.V
        cells = coarse[:, 0].astype(np.int64) * V + coarse[:, 1]
        order = np.argsort(cells, kind="stable")
        self.coarse = np.ascontiguousarray(coarse[order])
        self.fine = np.ascontiguousarray(fine[order])
        self.ids = ids[order]
        counts = np.bincount(cells, minlength=V * V)
        self.cell_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return order

    # ------------------------------------------------------------------ querying
    def get_cell(self, cell):
        """Items ``(id, LOPQCode)`` of the cell with coarse codes ``(c0, c1)``."""
        from .model import LOPQCode
        self._merge_pending()
        lo, hi = self._cell_range(cell)
        ids = self.ids[lo:hi].tolist()  # Python ints whether in memory or memory-mapped
        return [(ids[k], LOPQCode(tuple(c), tuple(f))) for k, (c, f) in
                enumerate(zip(self.coarse[lo:hi].tolist(), self.fine[lo:hi].tolist()))]

    def _cell_range(self, cell):
        cell_id = int(cell[0]) * self.model.V + int(cell[1])
        return int(self.cell_offsets[cell_id]), int(self.cell_offsets[cell_id + 1])

    def _retrieve_ranges(self, x, quota):
        """Row ranges of whole cells in multi-sequence order until >= quota rows."""
        if quota is None or quota <= 0:
            raise ValueError(f"quota must be a positive number of items, got {quota!r}")
        self._merge_pending()
        ranges, total, visited = [], 0, 0
        for _, cell in multisequence(x, self.model.Cs):
            visited += 1
            lo, hi = self._cell_range(cell)
            if hi > lo:
                ranges.append((cell, lo, hi))
                total += hi - lo
            if total >= quota:
                break
        return ranges, visited

    def get_result_quota(self, x, quota=10):
        """Items of whole cells in multi-sequence order until at least ``quota``.

        Returns:
            (items, visited): list of ``(id, LOPQCode)`` and the number of cells visited.
        """
        x = self._query(x)
        ranges, visited = self._retrieve_ranges(x, quota)
        items = []
        for cell, _, _ in ranges:
            items += self.get_cell(cell)
        return items, visited

    def _distances_of_ranges(self, x, ranges):
        """LOPQ asymmetric distances of the rows in ``ranges`` (the numpy path)."""
        memo = [{}, {}]
        out = [kernels.adc_scan(np.concatenate([self._split_table(x, 0, c0, memo),
                                                self._split_table(x, 1, c1, memo)]),
                                self.fine[lo:hi])
               for (c0, c1), lo, hi in ranges]
        return np.concatenate(out) if out else np.empty(0, dtype=np.float32)

    def _retrieve_scored(self, x, quota):
        """Rows retrieved for ``quota`` in retrieval order, their LOPQ distances, and the
        number of visited cells."""
        if quota is None or quota <= 0:
            raise ValueError(f"quota must be a positive number of items, got {quota!r}")
        self._merge_pending()
        compiled = kernels.compiled_search()
        if compiled is not None and self.fine.dtype in (np.uint8, np.uint16):
            m = self.model
            CsT, RTs, booksT = self._transposed()
            return compiled.search_one(x, m.Cs, CsT, RTs, m.mus, booksT,
                                       self.cell_offsets, self.fine, int(quota))
        ranges, visited = self._retrieve_ranges(x, quota)
        rows = (np.concatenate([np.arange(lo, hi) for _, lo, hi in ranges])
                if ranges else np.empty(0, dtype=np.int64))
        return rows, self._distances_of_ranges(x, ranges), visited

    def _transposed(self):
        """Coarse centroids, rotations and codebooks transposed for the compiled path
        (computed once)."""
        if self._transposed_cache is None:
            m = self.model
            self._transposed_cache = (
                np.ascontiguousarray(m.Cs.transpose(0, 2, 1)),
                np.ascontiguousarray(m.Rs.transpose(0, 1, 3, 2)),
                np.ascontiguousarray(m.subquantizers.transpose(0, 1, 3, 2)))
        return self._transposed_cache

    def _grouped(self):
        """What the grouped table kernel reads, computed once: rotations transposed with
        columns padded to the vector width (2, V, h, hp), and per split ``-2 books^T``
        (2, M/2, ds, Sp) with the codebooks' squared norms (2, M/2, Sp)."""
        if self._grouped_cache is None:
            from ._kernels import cython_kernels
            m = self.model
            RT = m.Rs.transpose(0, 1, 3, 2)
            RTp = np.zeros(RT.shape[:3] + (cython_kernels._padded(RT.shape[3]),),
                           dtype=np.float32)
            RTp[..., :RT.shape[3]] = RT
            CBTm2, sqnorm = cython_kernels.score_columns(m.subquantizers)
            self._grouped_cache = RTp, CBTm2, sqnorm
        return self._grouped_cache

    def _ranked(self, x, quota, limit):
        rows, dists, visited = self._retrieve_scored(x, quota)
        if limit is not None and limit < len(dists):
            # Select the `limit` nearest first, then order them; ties keep retrieval order.
            kth = np.partition(dists, limit - 1)[limit - 1]
            candidates = np.flatnonzero(dists <= kth)
            order = candidates[np.argsort(dists[candidates], kind="stable")][:limit]
        else:
            order = np.argsort(dists, kind="stable")
        return rows[order], dists[order], visited

    def search(self, x, quota=10, limit=None, with_dists=False):
        """`LOPQSearcherBase.search` (same arguments and results) on the flat arrays, with
        the compiled query path when it is built."""
        from .model import LOPQCode
        x = self._query(x)
        rows, dists, visited = self._ranked(x, quota, quota if limit is None else limit)
        results = []
        coarse, fine = self.coarse[rows].tolist(), self.fine[rows].tolist()
        ids = self.ids[rows].tolist()  # Python ints whether in memory or memory-mapped
        for k, item_id in enumerate(ids):
            code = LOPQCode(tuple(coarse[k]), tuple(fine[k]))
            if with_dists:
                results.append(ResultWithDist(item_id, code, float(dists[k])))
            else:
                results.append(Result(item_id, code))
        return results, visited

    #: Queries whose distance tables `search_batch` builds together (grouped by the
    #: coarse clusters they visit, one pass over each cluster's rotation per block).
    BATCH_BLOCK = 256
    #: `search_batch` groups tables when the rotations take at least this many bytes;
    #: smaller ones stay in cache, where one query at a time is faster. Measured on one
    #: core (queries/s, one-query / grouped): Oxford5k V=16 h=64 (0.5 MB) 22.5k / 15.7k;
    #: MiniLM V=16 h=192 (4.7 MB) 64.5k / 17.6k at quota 1000; 200k x 128 V=256 (8.4 MB)
    #: 19.7k / 21.8k; MiniLM V=64 (18.9 MB) 11.6k / 14.1k; MiniLM V=256 (75 MB) 751 / 3,224.
    GROUPED_MIN_ROTATION_BYTES = 8 << 20

    def uses_grouped_tables(self):
        """Whether `search_batch` builds the tables of a block of queries together."""
        m = self.model
        return m.Rs.nbytes >= self.GROUPED_MIN_ROTATION_BYTES

    def search_batch(self, queries, quota=10, limit=None, threads=None):
        """Search many queries, threaded across cores (the kernel releases the GIL).

        When the rotations outgrow the cache (`uses_grouped_tables`), each thread takes
        blocks of `BATCH_BLOCK` queries, traverses their multi-index cells, then rotates
        the residuals of every (query, coarse cluster) pair grouped by cluster,
        GEMM-style, builds each query's tables and scans. Results are those of `search`
        with the same quota and limit; distances agree to float rounding (the grouped
        tables come from the expanded square), so exact near-ties may swap.

        Args:
            queries: (q, D) array.
            quota: items to retrieve per query (whole cells, as `search`).
            limit: results kept per query (default: all retrieved).
            threads: worker threads (default: all cores).

        Returns:
            list of (ids, dists) per query: the item ids ranked by distance (an array)
            and their (k,) float32 distances.
        """
        self._merge_pending()
        Q = check_rows(queries, self.model.D, "queries", min_rows=0)
        if quota is None or quota <= 0:
            raise ValueError(f"quota must be a positive number of items, got {quota!r}")
        threads = max(1, min(threads or os.cpu_count() or 1, len(Q)))
        compiled = kernels.compiled_search()
        if (compiled is None or limit is None or self.fine.dtype not in (np.uint8, np.uint16)
                or len(self.ids) == 0):
            def one(x):
                rows, dists, _ = self._ranked(x, quota, limit)
                return self.ids[rows], dists
            if threads == 1:
                return [one(x) for x in Q]
            with ThreadPoolExecutor(threads) as pool:
                return list(pool.map(one, Q))

        m = self.model
        CsT, RTs, booksT = self._transposed()
        grouped = self.uses_grouped_tables()
        if grouped:
            RTp, CBTm2, sqnorm = self._grouped()
        rows = np.empty((len(Q), limit), dtype=np.int64)
        dists = np.empty((len(Q), limit), dtype=np.float32)
        visited = np.empty(len(Q), dtype=np.int32)
        seconds = np.zeros((threads, 3))

        def chunk(bounds):
            lo, hi = bounds
            slot = int(np.searchsorted(edges, lo, side="right")) - 1
            if grouped:  # traverse a block, then its grouped tables and scan
                for a in range(lo, hi, self.BATCH_BLOCK):
                    b = min(hi, a + self.BATCH_BLOCK)
                    start = time.perf_counter()
                    ptr, cells = compiled.visited_cells(Q[a:b], CsT, self.cell_offsets,
                                                        int(quota))
                    cell_ids = cells[:, 0].astype(np.int64) * m.V + cells[:, 1]
                    ranges = np.stack([self.cell_offsets[cell_ids],
                                       self.cell_offsets[cell_ids + 1]], axis=1)
                    seconds[slot, 0] += time.perf_counter() - start
                    compiled.search_cells_grouped(
                        Q[a:b], ptr, cells, ranges, m.Cs, RTp, m.mus, CBTm2, sqnorm,
                        m.subquantizer_clusters, self.fine, int(limit), self.BATCH_BLOCK,
                        rows[a:b], dists[a:b], seconds[slot])
            else:
                compiled.search_many(Q[lo:hi], m.Cs, CsT, RTs, m.mus, booksT,
                                     self.cell_offsets, self.fine, int(quota), int(limit),
                                     rows[lo:hi], dists[lo:hi], visited[lo:hi], seconds[slot])

        edges = np.linspace(0, len(Q), threads + 1).astype(int)
        spans = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
        if len(spans) == 1:
            chunk(spans[0])
        else:
            with ThreadPoolExecutor(len(spans)) as pool:
                list(pool.map(chunk, spans))
        self.last_batch_profile = dict(zip(("traversal", "tables", "scan"),
                                           seconds.sum(axis=0).tolist()))
        out = []
        for r, d in zip(rows, dists):
            keep = r >= 0
            out.append((self.ids[r[keep]], d[keep]))
        return out

    def score_cells(self, queries, cell_lists, limit):
        """The ``limit`` nearest indexed rows of given cells, per query: the tables and
        scan of `search_batch` on cells chosen by the caller (`lopq.spark.search` routes
        each query to the cells its traversal visits).

        Args:
            queries: (q, D) float32.
            cell_lists: q arrays of cell ids ``c0 * V + c1`` (cells without rows are
                skipped).
            limit: results per query.

        Returns:
            rows (q, limit) int64 indices into this searcher's arrays, -1 padded, and
            dists (q, limit) float32, inf padded; nearest first.
        """
        self._merge_pending()
        Q = check_rows(queries, self.model.D, "queries", min_rows=0)
        V = self.model.V
        rows = np.full((len(Q), limit), -1, dtype=np.int64)
        dists = np.full((len(Q), limit), np.inf, dtype=np.float32)
        lists = [np.asarray(c, dtype=np.int64).ravel() for c in cell_lists]
        if len(lists) != len(Q):
            raise ValueError(f"got {len(lists)} cell lists for {len(Q)} queries")
        flat = np.concatenate(lists) if lists else np.empty(0, dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= V * V):
            raise ValueError(f"cell ids must be in [0, {V * V}) for V={V}")
        lo, hi = self.cell_offsets[flat], self.cell_offsets[flat + 1]
        keep = hi > lo
        query_of = np.repeat(np.arange(len(Q)), [len(c) for c in lists])
        ptr = np.concatenate([[0], np.cumsum(np.bincount(query_of[keep],
                                                         minlength=len(Q)))]).astype(np.int64)
        flat, lo, hi = flat[keep], lo[keep], hi[keep]
        cells = np.stack([flat // V, flat % V], axis=1).astype(np.int32)
        compiled = kernels.compiled_search()
        if compiled is not None and self.fine.dtype in (np.uint8, np.uint16) and len(Q):
            RTp, CBTm2, sqnorm = self._grouped()
            m = self.model
            compiled.search_cells_grouped(
                np.ascontiguousarray(Q), ptr, np.ascontiguousarray(cells),
                np.ascontiguousarray(np.stack([lo, hi], axis=1)), m.Cs, RTp, m.mus, CBTm2,
                sqnorm, m.subquantizer_clusters, self.fine, int(limit), self.BATCH_BLOCK,
                rows, dists, np.zeros(3))
            return rows, dists
        for q, x in enumerate(Q):
            ranges = [((int(c0), int(c1)), int(a), int(b)) for (c0, c1), a, b in
                      zip(cells[ptr[q]:ptr[q + 1]], lo[ptr[q]:ptr[q + 1]],
                          hi[ptr[q]:ptr[q + 1]])]
            if not ranges:
                continue
            found = np.concatenate([np.arange(a, b) for _, a, b in ranges])
            d = self._distances_of_ranges(x, ranges)
            best = np.argsort(d, kind="stable")[:limit]
            rows[q, :len(best)] = found[best]
            dists[q, :len(best)] = d[best]
        return rows, dists

    # ------------------------------------------------------------------ persistence
    def save(self, path):
        """Write the index to directory ``path`` (created; must not hold an index)."""
        self._merge_pending()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if (path / "index.json").exists():
            raise ValueError(f"{path} already holds an index: choose another directory")
        int_ids = self.ids.size == 0 or all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in self.ids)
        self.model.export_proto(str(path / "model.lopq"))
        np.save(path / "cell_offsets.npy", self.cell_offsets)
        np.save(path / "coarse.npy", self.coarse)
        np.save(path / "fine.npy", self.fine)
        if int_ids:
            np.save(path / "ids.npy", self.ids.astype(np.int64))
        else:
            with open(path / "ids.pkl", "wb") as f:
                pickle.dump(list(self.ids), f, protocol=4)
        meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "V": self.model.V,
                "M": self.model.M, "D": self.model.D, "size": int(len(self.ids)),
                "fine_dtype": str(self.fine.dtype), "ids": "int64" if int_ids else "pickle"}
        (path / "index.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path, mmap=True):
        """Open an index written by `save`; with ``mmap`` the arrays stay on disk."""
        path = Path(path)
        try:
            meta = json.loads((path / "index.json").read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not an lopq index directory (index.json: "
                             f"{err})") from None
        if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
            raise ValueError(f"{path}/index.json is not an lopq index of version "
                             f"{INDEX_VERSION}: {meta}")
        mode = "r" if mmap else None
        try:
            model = LOPQModel.load_proto(str(path / "model.lopq"))
            offsets = np.load(path / "cell_offsets.npy", mmap_mode=mode)
            coarse = np.load(path / "coarse.npy", mmap_mode=mode)
            fine = np.load(path / "fine.npy", mmap_mode=mode)
            if meta["ids"] == "int64":
                ids = np.load(path / "ids.npy", mmap_mode=mode)
            else:
                with open(path / "ids.pkl", "rb") as f:
                    ids = np.empty(meta["size"], dtype=object)
                    ids[:] = safe_load_pickle(f.read(), "an index's id list")
        except (OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
            raise ValueError(f"{path}: the index is truncated or damaged ({err})") from None
        n, V = meta["size"], model.V
        if (offsets.shape != (V * V + 1,) or fine.shape != (n, model.M) or len(ids) != n
                or coarse.shape != (n, 2) or int(offsets[-1]) != n):
            raise ValueError(f"{path}: array shapes do not match index.json (size {n}, "
                             f"V={V}, M={model.M}); the index is truncated or damaged")
        searcher = cls(model)
        searcher.cell_offsets, searcher.coarse, searcher.fine, searcher.ids = (
            offsets, coarse, fine, ids)
        return searcher

    @classmethod
    def from_codes(cls, model, path):
        """Build an index from `compute_codes` output (text part files of
        ``id<TAB>[[c0, c1], [f0, ...]]``) on the local file system, without the original
        vectors. For HDFS/S3 paths, parsed by the executors, see
        `lopq.spark.codes.searcher_from_codes`.

        Args:
            path: a folder of ``part-*`` files or one file.

        Raises:
            ValueError: naming the file, line and text of a bad line, or part files whose
                codes come from models of different M.
        """
        from .formats import merge_code_parts, parse_code_lines
        p = Path(path)
        files = sorted(p.glob("part-*")) if p.is_dir() else [p]
        if not files:
            raise ValueError(f"no part files in {path}")
        parts = [parse_code_lines(f.read_text().splitlines(), str(f)) for f in files]
        ids, coarse, fine = merge_code_parts(parts, path)
        searcher = cls(model)
        searcher.add_codes((coarse, fine), ids)
        return searcher


class LOPQSearcherLMDB(LOPQSearcherBase):
    """A persistent index in an LMDB database (reference API; needs ``pip install lmdb``).

    Each item is one key ``cell (2 x uint16, little-endian) + str(id)`` whose value is
    its fine codes (uint8, or uint16 little-endian when S > 256). Items of a cell come
    back in key order. Searching ranks in Python (`LOPQSearcherBase`); for speed load
    the codes into a `LOPQSearcher` instead.

    Args:
        model: the `lopq.LOPQModel` of the codes.
        lmdb_path: folder of the database, created if missing.
        id_lambda: rebuilds an id from the bytes of ``str(id)`` (default ``int``; e.g.
            ``lambda b: b.decode()`` for string ids).
        map_size: the largest size the database may grow to, bytes (sparse on disk).
    """

    def __init__(self, model, lmdb_path, id_lambda=int, map_size=4096000000):
        try:
            import lmdb
        except ImportError:
            raise ImportError("LOPQSearcherLMDB needs the lmdb package: pip install lmdb") \
                from None
        model.require_parameters("Cs", "Rs", "mus", "codebooks")
        if model.V > 65536:
            raise ValueError(f"LOPQSearcherLMDB stores cells as uint16: V={model.V} is "
                             "above 65536")
        self.model = model
        self.lmdb_path = lmdb_path
        self.id_lambda = id_lambda
        self._fine_dtype = np.dtype("<u1" if model.subquantizer_clusters <= 256 else "<u2")
        self.env = lmdb.open(str(lmdb_path), map_size=map_size, max_dbs=1)
        self.index_db = self.env.open_db(b"index")

    def encode_cell(self, cell):
        """Key prefix of cell ``(c0, c1)``: 4 bytes."""
        return np.asarray(cell, dtype="<u2").tobytes()

    def decode_cell(self, cell_bytes):
        return tuple(int(c) for c in np.frombuffer(cell_bytes, dtype="<u2"))

    def encode_fine_codes(self, fine):
        return np.asarray(fine, dtype=self._fine_dtype).tobytes()

    def decode_fine_codes(self, fine_bytes):
        return tuple(int(f) for f in np.frombuffer(fine_bytes, dtype=self._fine_dtype))

    def add_codes(self, codes, ids=None):
        """Index codes ``((c0, c1), (f0, ...))`` under ``ids`` (default: 0, 1, ... in
        this call, as the reference; an iterator may be unbounded)."""
        if isinstance(codes, tuple) and len(codes) == 2 and isinstance(codes[0], np.ndarray):
            codes = _codes_as_tuples(*codes)
        ids = itertools.count() if ids is None else ids
        with self.env.begin(db=self.index_db, write=True) as txn:
            for item_id, code in zip(ids, codes):
                key = self.encode_cell(code[0]) + str(item_id).encode()
                txn.put(key, self.encode_fine_codes(code[1]))
        self.env.sync()

    def get_cell(self, cell):
        """Items ``[(id, LOPQCode), ...]`` of cell ``(c0, c1)``."""
        from .model import LOPQCode
        prefix = self.encode_cell(cell)
        items = []
        with self.env.begin(db=self.index_db) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    items.append((self.id_lambda(key[4:]),
                                  LOPQCode(tuple(cell), self.decode_fine_codes(value))))
        return items

    @property
    def size(self):
        with self.env.begin(db=self.index_db) as txn:
            return txn.stat(self.index_db)["entries"]

    def close(self):
        self.env.close()
