"""The storage part of `lopq.search.LOPQSearcher`: LOPQ codes grouped by cell.

Codes are kept in flat arrays sorted by multi-index cell ``c0 * V + c1``:
``cell_offsets (V*V + 1,) int64`` (the rows of cell ``i`` are
``cell_offsets[i]:cell_offsets[i + 1]``), ``coarse (n, 2) int32``, ``fine (n, M)``
uint8/uint16 and ``ids (n,)`` (any hashable ids). Added codes wait in a list and are
merged, stably, on the next read, so many small ``add_*`` calls cost one sort.
"""

import itertools

import numpy as np

from . import _kernels as kernels
from .model import check_rows


class CellIndex:
    """Codes of one `LOPQModel` grouped by cell (the searcher's index storage).

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

    def add_data(self, data, ids=None, num_procs=1):
        """Encode rows of ``data`` (n, dim) and index them under ``ids`` (default
        0..n-1)."""
        coarse, fine = self.model.encode(check_rows(data, self.model.dim, "data",
                                                    min_rows=0))
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

    def remove_ids(self, ids):
        """Drop every indexed item whose id is in ``ids`` (an iterable of ids); the
        others keep their cells and order, so the index answers as one built without
        the removed items. Returns the number of rows removed (an id indexed twice
        counts twice; ids not in the index are ignored)."""
        self._merge_pending()
        drop = set(ids)
        if not drop or not len(self.ids):
            return 0
        keep = np.fromiter((i not in drop for i in self.ids.tolist()), dtype=bool,
                           count=len(self.ids))
        removed = int(len(keep) - keep.sum())
        if removed:
            cells = self.coarse[:, 0].astype(np.int64) * self.model.V + self.coarse[:, 1]
            counts = np.bincount(cells[keep], minlength=self.model.V ** 2)
            # Filtering keeps the rows sorted by cell: only the offsets change.
            self.coarse = np.ascontiguousarray(self.coarse[keep])
            self.fine = np.ascontiguousarray(self.fine[keep])
            self.ids = np.asarray(self.ids)[keep]
            self.cell_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            self._arrays_replaced()
        return removed

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
        self._arrays_replaced()
        return order

    def _arrays_replaced(self):
        """Drop what was derived from the old code arrays (the per-thread contexts of
        one-query search hold views of them)."""
        contexts = getattr(self, "_query_contexts", None)
        if contexts:
            contexts.clear()

    def get_cell(self, cell):
        """Items ``(id, LOPQCode)`` of the cell with coarse codes ``(c0, c1)``."""
        from .model import LOPQCode  # the named tuple the reference returns
        self._merge_pending()
        lo, hi = self._cell_range(cell)
        ids = self.ids[lo:hi].tolist()  # Python ints whether in memory or memory-mapped
        return [(ids[k], LOPQCode(tuple(c), tuple(f))) for k, (c, f) in
                enumerate(zip(self.coarse[lo:hi].tolist(), self.fine[lo:hi].tolist()))]

    def _cell_range(self, cell):
        cell_id = int(cell[0]) * self.model.V + int(cell[1])
        return int(self.cell_offsets[cell_id]), int(self.cell_offsets[cell_id + 1])
