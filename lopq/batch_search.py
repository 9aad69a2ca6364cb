"""The batch part of `lopq.search.LOPQSearcher`: many queries at once.

`search_batch` splits the queries over threads (the compiled kernels release the GIL);
when the rotations outgrow the cache, each thread builds the distance tables of a block
of queries grouped by coarse cluster. `score_cells` is the same scan on cells a caller
chose (the Spark search routes each query to the cells its traversal visits).
"""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _kernels as kernels


class BatchSearch:
    """`search_batch` and `score_cells` (mixed into `LOPQSearcher`, whose single-query
    path, ``_ranked`` and ``_distances_of_ranges``, they fall back on)."""

    #: Queries whose distance tables `search_batch` builds together (grouped by the
    #: coarse clusters they visit, one pass over each cluster's rotation per block).
    BATCH_BLOCK = 256
    #: `search_batch` groups tables when the rotations take at least this many bytes;
    #: smaller ones stay in cache, where one query at a time is faster. Measured on one
    #: core (queries/s, one-query / grouped): Oxford5k V=16 h=64 (0.5 MB) 22.5k / 15.7k;
    #: MiniLM V=16 h=192 (4.7 MB) 64.5k / 17.6k at quota 1000; 200k x 128 V=256 (8.4 MB)
    #: 19.7k / 21.8k; MiniLM V=64 (18.9 MB) 11.6k / 14.1k; MiniLM V=256 (75 MB) 751 / 3,224.
    GROUPED_MIN_ROTATION_BYTES = 8 << 20
    #: In the grouped path, a (query, half-cluster) pair whose visited cells hold fewer
    #: than this many rows per subquantizer centroid gets no distance table: its rows are
    #: scored from the rotated residual (h multiply-adds a row, against S x h for a
    #: table). 0 (the default) builds every table. Off by default: alone on Debian with
    #: PCA to 128-d, V=256, 1.0 ran 1.3-1.65x faster at quotas 250-1000, but in the
    #: search benchmark (two processes side by side) the gathered codewords made the
    #: scan slower than the tables it saved: MiniLM 384-d V=256 quota 250, 8.6k -> 4.5k
    #: q/s; Debian PCA-128 quota 32000, 205 -> 173 q/s.
    DIRECT_ROWS_PER_CENTROID = 0

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
        Q = self.model.model_queries(queries, "queries")
        if quota is None or quota <= 0:
            raise ValueError(f"quota must be a positive number of items, got {quota!r}")
        results = self._search_batch_model_space(Q, quota, limit, threads)
        if self.model.metric == "l2":
            return results
        return [(ids, self.model.metric_distances(d, q)) for (ids, d), q in zip(results, Q)]

    def _search_batch_model_space(self, Q, quota, limit, threads):
        """`search_batch` of queries already in the model space, squared L2 distances."""
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
        adjust, coarse_adjust = m.table_adjustment(), m.coarse_adjustment()
        CsT, RTs, booksT = self._transposed()
        grouped = self.uses_grouped_tables()
        if grouped:
            RTp, CBTm2, sqnorm = self._grouped()
            books, direct_below = self._direct_operands()
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
                                                        int(quota), coarse_adjust)
                    cell_ids = cells[:, 0].astype(np.int64) * m.V + cells[:, 1]
                    ranges = np.stack([self.cell_offsets[cell_ids],
                                       self.cell_offsets[cell_ids + 1]], axis=1)
                    seconds[slot, 0] += time.perf_counter() - start
                    compiled.search_cells_grouped(
                        Q[a:b], ptr, cells, ranges, m.Cs, RTp, m.mus, CBTm2, sqnorm,
                        m.subquantizer_clusters, self.fine, int(limit), self.BATCH_BLOCK,
                        rows[a:b], dists[a:b], seconds[slot], adjust, books,
                        direct_below)
            else:
                compiled.search_many(Q[lo:hi], m.Cs, CsT, RTs, m.mus, booksT,
                                     self.cell_offsets, self.fine, int(quota), int(limit),
                                     rows[lo:hi], dists[lo:hi], visited[lo:hi], seconds[slot],
                                     adjust, coarse_adjust)

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
        Q = self.model.model_queries(queries, "queries")
        rows, dists = self.score_cells_model_space(Q, cell_lists, limit)
        return rows, self.model.metric_distances(dists, Q)

    def score_cells_model_space(self, Q, cell_lists, limit):
        """`score_cells` of queries already in the model space (q, D) float32 (see
        `LOPQModel.model_queries`): distances are squared L2 in that space."""
        self._merge_pending()
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
            books, direct_below = self._direct_operands()
            m = self.model
            compiled.search_cells_grouped(
                np.ascontiguousarray(Q), ptr, np.ascontiguousarray(cells),
                np.ascontiguousarray(np.stack([lo, hi], axis=1)), m.Cs, RTp, m.mus, CBTm2,
                sqnorm, m.subquantizer_clusters, self.fine, int(limit), self.BATCH_BLOCK,
                rows, dists, np.zeros(3), m.table_adjustment(), books, direct_below)
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

    def _grouped(self):
        """What the grouped table kernel reads, computed once: rotations transposed with
        columns padded to the vector width (2, V, h, hp), and per split ``-2 books^T``
        (2, M/2, ds, Sp) with the codebooks' squared norms (2, M/2, Sp)."""
        if self._grouped_cache is None:
            self._grouped_cache = kernels.grouped_table_operands(self.model.Rs,
                                                                self.model.subquantizers)
        return self._grouped_cache

    def _direct_operands(self):
        """The codebooks (2, M/2, S, ds) float32 and the row count below which a pair of
        the grouped path is scored without a table (`DIRECT_ROWS_PER_CENTROID`)."""
        m = self.model
        below = int(np.ceil(self.DIRECT_ROWS_PER_CENTROID * m.subquantizer_clusters))
        if below <= 0 or m.M // 2 > 256:
            return None, 0
        return np.ascontiguousarray(m.subquantizers, dtype=np.float32), below
