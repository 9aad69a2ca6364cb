"""A faithful Python 3 port of the reference implementation's per-vector hot paths, kept
as the baseline the benchmarks compare against (one vector at a time through numpy,
pure-Python multi-index searcher). Not used by the library."""

import heapq
from collections import defaultdict

import numpy as np


def iterate_splits(x, splits):
    split_size = len(x) // splits
    for split in range(splits):
        yield x[split * split_size:(split + 1) * split_size], split


def predict_cluster(x, centroids):
    return ((x - centroids) ** 2).sum(axis=1).argmin(axis=0)


class ReferenceModel:
    """The reference LOPQModel's predict path on per-split parameter lists."""

    def __init__(self, model):
        self.V, self.M = model.V, model.M
        self.Cs = [np.asarray(c, dtype=np.float64) for c in model.Cs]
        self.Rs = [np.asarray(r, dtype=np.float64) for r in model.Rs]
        self.mus = [np.asarray(m, dtype=np.float64) for m in model.mus]
        self.subquantizers = [[np.asarray(s, dtype=np.float64) for s in split]
                              for split in model.subquantizers]

    def predict_coarse(self, x):
        return tuple(predict_cluster(cx, self.Cs[split]) for cx, split in iterate_splits(x, 2))

    def project(self, x, coarse_codes, coarse_split=None):
        px = []
        if coarse_split is None:
            split_iter = iterate_splits(x, 2)
        else:
            split_iter = [(np.split(x, 2)[coarse_split], coarse_split)]
        for cx, split in split_iter:
            cluster = coarse_codes[split]
            r = cx - self.Cs[split][cluster]
            px.append(np.dot(self.Rs[split][cluster], r - self.mus[split][cluster]))
        return np.concatenate(px)

    def predict_fine(self, x, coarse_codes=None):
        if coarse_codes is None:
            coarse_codes = self.predict_coarse(x)
        px = self.project(x, coarse_codes)
        fine = []
        for cx, split in iterate_splits(px, 2):
            fine += [predict_cluster(fx, self.subquantizers[split][sub])
                     for fx, sub in iterate_splits(cx, self.M // 2)]
        return tuple(fine)

    def predict(self, x):
        coarse = self.predict_coarse(x)
        return coarse, self.predict_fine(x, coarse)

    def get_subquantizer_distances(self, x, coarse_codes, coarse_split=None):
        px = self.project(x, coarse_codes, coarse_split)
        split_iter = iterate_splits(px, 2) if coarse_split is None else [(px, coarse_split)]
        dists = []
        for cx, split in split_iter:
            dists += [((fx - self.subquantizers[split][sub]) ** 2).sum(axis=1)
                      for fx, sub in iterate_splits(cx, self.M // 2)]
        return dists


def multisequence(x, centroids):
    splits = len(centroids)
    V = centroids[0].shape[0]
    cluster_dists, sorted_inds = [], []
    for cx, split in iterate_splits(x, splits):
        dists = ((cx - centroids[split]) ** 2).sum(axis=1)
        cluster_dists.append(dists)
        sorted_inds.append(np.argsort(dists))

    def cell_for_inds(inds):
        return tuple(sorted_inds[s][i] for s, i in enumerate(inds))

    def dist_for_cell(cell):
        return sum(cluster_dists[s][i] for s, i in enumerate(cell))

    h = [(dist_for_cell(cell_for_inds((0, 0))), (0, 0))]
    traversed = set()
    while h:
        d, inds = heapq.heappop(h)
        yield d, cell_for_inds(inds)
        traversed.add(inds)
        if inds[1] == 0 or (inds[0] + 1, inds[1] - 1) in traversed:
            c = (inds[0] + 1, inds[1])
            if c[0] < V:
                heapq.heappush(h, (dist_for_cell(cell_for_inds(c)), c))
        if inds[0] == 0 or (inds[0] - 1, inds[1] + 1) in traversed:
            c = (inds[0], inds[1] + 1)
            if c[1] < V:
                heapq.heappush(h, (dist_for_cell(cell_for_inds(c)), c))


class ReferenceSearcher:
    """The reference LOPQSearcher: dict of cell -> list of (id, code), Python ranking."""

    def __init__(self, model):
        self.model = model
        self.index = defaultdict(list)

    def add_codes(self, codes, ids=None):
        ids = range(len(codes)) if ids is None else ids
        for item_id, code in zip(ids, codes):
            self.index[code[0]].append((item_id, code))

    def get_result_quota(self, x, quota=10):
        retrieved, visited = [], 0
        for _, cell in multisequence(x, self.model.Cs):
            retrieved += self.index[cell]
            visited += 1
            if len(retrieved) >= quota:
                break
        return retrieved, visited

    def compute_distances(self, x, items):
        memo = [[None, None], [None, None]]

        def split_dists(coarse_code, split):
            if memo[split][0] != coarse_code[split]:
                memo[split][0] = coarse_code[split]
                memo[split][1] = self.model.get_subquantizer_distances(
                    x, coarse_code, coarse_split=split)
            return memo[split][1]

        results = []
        for item in items:
            coarse, fine = item[1]
            d0 = split_dists(coarse, 0)
            d1 = split_dists(coarse, 1)
            half = len(fine) // 2
            dist = sum(d0[i][fc] for i, fc in enumerate(fine[:half])) + \
                sum(d1[i][fc] for i, fc in enumerate(fine[half:]))
            results.append((dist, item))
        return results

    def search(self, x, quota=10, limit=None):
        retrieved, visited = self.get_result_quota(x, quota)
        results = sorted(self.compute_distances(x, retrieved), key=lambda d: d[0])
        return results[:limit], visited
