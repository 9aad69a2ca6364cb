"""Search over LOPQ codes with the inverted multi-index.

`multisequence` walks the V x V cells of the two coarse splits in non-decreasing
distance to a query; `LOPQSearcher` retrieves whole cells in that order until a quota of
items is reached, then ranks them by LOPQ asymmetric distance (the reference semantics).

`LOPQSearcher` is assembled from its parts: index storage (`lopq.index.CellIndex`:
codes grouped by cell in flat arrays), the single-query path (here), many queries at
once (`lopq.batch_search.BatchSearch`) and the index directory on disk
(`lopq.index_files.IndexFiles`).
"""

import heapq
import itertools
import threading
from collections import namedtuple

import numpy as np

from . import _kernels as kernels
from .batch_search import BatchSearch
from .index import CellIndex
from .index_files import INDEX_FORMAT, INDEX_VERSION, IndexFiles  # noqa: F401 (public names)
from .model import LOPQCode, check_rows

Result = namedtuple("Result", ["id", "code"])
# Named "Result" as the reference names its with_dists results (their repr matches).
ResultWithDist = namedtuple("Result", ["id", "code", "dist"])


def multisequence(x, coarse_centroids, coarse_adjust=None):
    """Cells of the inverted multi-index in non-decreasing distance to x.

    Args:
        x: (D,) query.
        coarse_centroids: the two coarse quantizers, (2, V, D/2) (or a pair of (V, D/2)).
        coarse_adjust: optional (2, V) subtracted from each split's centroid distances
            (inner-product models: `LOPQModel.coarse_adjustment`).

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
        if coarse_adjust is not None:
            d = d - np.asarray(coarse_adjust[split], dtype=np.float64)
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
        data = check_rows(data, self.model.dim, "data", min_rows=0)
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
        for _, cell in multisequence(x, self.model.Cs, self.model.coarse_adjustment()):
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
            memo[split][code] = np.stack(self.model.query_tables(
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
            out.append((float(self.model.metric_distances(dist, x)), item))
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
        """One query (dim,) checked and mapped into the model space: (D,) float32."""
        m = self.model
        if (type(x) is np.ndarray and x.dtype.char == "f" and x.ndim == 1
                and x.flags.c_contiguous and x.shape[0] == m.dim and m.metric == "l2"):
            # the usual serving call: only finiteness is left to check
            if np.isfinite(x).all():
                return x
        x = np.asarray(x)
        if x.ndim != 1:
            raise ValueError(f"a query must be one vector of shape (D,), got {x.shape}")
        return m.model_queries(x, "query", min_rows=1)[0]


def _codes_as_tuples(coarse, fine):
    from .model import LOPQCode
    return [LOPQCode(tuple(c), tuple(f)) for c, f in zip(coarse.tolist(), fine.tolist())]


class LOPQSearcher(CellIndex, BatchSearch, IndexFiles, LOPQSearcherBase):
    """In-memory inverted multi-index over LOPQ codes (reference API): storage from
    `CellIndex`, `search_batch`/`score_cells` from `BatchSearch`, `save`/`load`/
    `from_codes` from `IndexFiles`; `search` and `get_result_quota` here.

    Args:
        model: a complete `lopq.LOPQModel`.
    """

    def __init__(self, model):
        CellIndex.__init__(self, model)
        self._transposed_cache = None
        self._grouped_cache = None
        #: per thread: (fine, cell_offsets, `OneQuery`) of `search`'s compiled path
        self._query_contexts = {}
        #: Seconds the last `search_batch` spent traversing the multi-index, building
        #: distance tables and scanning codes (summed over its threads), when it ran a
        #: compiled path; else None.
        self.last_batch_profile = None

    # ------------------------------------------------------------------ querying
    def _retrieve_ranges(self, x, quota):
        """Row ranges of whole cells in multi-sequence order until >= quota rows."""
        if quota is None or quota <= 0:
            raise ValueError(f"quota must be a positive number of items, got {quota!r}")
        self._merge_pending()
        ranges, total, visited = [], 0, 0
        for _, cell in multisequence(x, self.model.Cs, self.model.coarse_adjustment()):
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
                                       self.cell_offsets, self.fine, int(quota),
                                       m.table_adjustment(), m.coarse_adjustment())
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
        the compiled query path when it is built: the ``limit`` nearest are selected in
        the kernel (as `search_batch` does) and the results are built by C-level maps,
        not a Python loop (one query of Oxford5k, limit 100: result objects cost more
        than the search)."""
        x = self._query(x)
        limit = quota if limit is None else limit
        rows, dists, visited = self._top_rows(x, quota, limit)
        # zip(*[it] * k) cuts a flat list into k-tuples without a list per row
        coarse = iter(self.coarse[rows].ravel().tolist())
        fine = iter(self.fine[rows].ravel().tolist())
        codes = map(tuple.__new__, itertools.repeat(LOPQCode),
                    zip(zip(coarse, coarse), zip(*[fine] * self.fine.shape[1])))
        ids = self.ids[rows].tolist()  # Python ints whether in memory or memory-mapped
        if with_dists:
            dists = self.model.metric_distances(dists, x).tolist()
            return list(map(tuple.__new__, itertools.repeat(ResultWithDist),
                            zip(ids, codes, dists))), visited
        return list(map(tuple.__new__, itertools.repeat(Result), zip(ids, codes))), visited

    def search_arrays(self, x, quota=10, limit=None):
        """One query, arrays out: what ``search_batch(x[None], quota, limit)[0]`` returns,
        without the batch's set-up (the serving path: one call per request).

        `search` builds a ``Result`` per item; this returns the ids and distances as
        arrays, which costs about as much per query as `search_batch` does.

        Args:
            x: (D,) query.
            quota: items to retrieve (whole cells in multi-sequence order).
            limit: results kept (default: all retrieved, as `search_batch`).

        Returns:
            (ids, dists): the ids ranked by distance (an array, ties in retrieval order)
            and their float32 distances in the model's metric.
        """
        x = self._query(x)
        if limit is None:
            rows, dists, _ = self._ranked(x, quota, None)
        else:
            rows, dists, _ = self._top_rows(x, quota, limit)
        return self.ids[rows], self.model.metric_distances(dists, x)

    def _top_rows(self, x, quota, limit):
        """The ``limit`` nearest rows of one model-space query (D,) float32 among the
        cells needed for ``quota``: (rows int64, squared L2 float32, visited cells),
        nearest first, ties in retrieval order (`_ranked`'s order)."""
        if self._pending:
            self._merge_pending()
        limit = min(limit, len(self.fine))  # never more than the index holds
        compiled = kernels.compiled_search()
        # dtype.char: uint8 "B", uint16 "H" (cheaper than comparing dtypes, per query)
        if (compiled is not None and 0 < limit < 2 ** 31 and self.fine.dtype.char in "BH"
                and quota is not None and quota > 0):
            return self._one_query(compiled).search(x, int(quota), int(limit))
        if limit < 0:
            raise ValueError(f"limit must be None or at least 0, got {limit!r}")
        if limit == 0:  # nothing to rank; the quota is still checked, cells counted
            _, visited = self._retrieve_ranges(x, quota)
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32), visited
        return self._ranked(x, quota, limit)  # also raises for a bad quota

    def _one_query(self, compiled):
        """This thread's `OneQuery` of the current index arrays (the kernel's operands
        converted once; a new one when the arrays were replaced)."""
        thread = threading.get_ident()
        entry = self._query_contexts.get(thread)
        if entry is None or entry[0] is not self.fine or entry[1] is not self.cell_offsets:
            m = self.model
            CsT, RTs, booksT = self._transposed()
            context = compiled.OneQuery(m.Cs, CsT, RTs, m.mus, booksT, self.cell_offsets,
                                        self.fine, m.table_adjustment(),
                                        m.coarse_adjustment())
            entry = self._query_contexts[thread] = (self.fine, self.cell_offsets, context)
        return entry[2]


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
