"""Baselines for the benchmarks, written from the algorithm: what a straightforward LOPQ
implementation does, one vector or one item at a time. They stand for the reference
implementation's approach (per-vector numpy encoding, a dict-of-cells searcher ranking
in Python); the reference's own measured figures are cited in the README as numbers.
"""

from collections import defaultdict
from itertools import count

import numpy as np

from lopq.search import LOPQSearcherBase


class PerVectorEncoder:
    """Encodes one vector at a time in float64 numpy: nearest coarse centroid per half,
    the rotated residual ``R_c (x - C_c - mu_c)``, nearest codeword per subvector."""

    def __init__(self, model):
        self.Cs = np.asarray(model.Cs, dtype=np.float64)
        self.Rs = np.asarray(model.Rs, dtype=np.float64)
        self.mus = np.asarray(model.mus, dtype=np.float64)
        self.books = np.asarray(model.subquantizers, dtype=np.float64)  # (2, M/2, S, ds)

    def encode_one(self, x):
        """``((c0, c1), (f0, ..., fM-1))`` of one vector x (D,)."""
        half = len(x) // 2
        ds = self.books.shape[3]
        coarse, fine = [], []
        for split in range(2):
            part = x[split * half:(split + 1) * half]
            cell = int(np.argmin(((self.Cs[split] - part) ** 2).sum(axis=1)))
            local = self.Rs[split, cell] @ (part - self.Cs[split, cell] - self.mus[split, cell])
            for j, book in enumerate(self.books[split]):
                fine.append(int(np.argmin(((book - local[j * ds:(j + 1) * ds]) ** 2).sum(1))))
            coarse.append(cell)
        return tuple(coarse), tuple(fine)


class DictSearcher(LOPQSearcherBase):
    """An inverted multi-index as a dict of cells holding ``(id, code)`` lists; retrieval
    and ranking are `LOPQSearcherBase`'s plain-Python path."""

    def __init__(self, model):
        self.model = model
        self.cells = defaultdict(list)

    def add_codes(self, codes, ids=None):
        for item_id, code in zip(count() if ids is None else ids, codes):
            self.cells[tuple(code[0])].append((item_id, code))

    def get_cell(self, cell):
        return self.cells.get(tuple(cell), [])
