# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled query path of the inverted multi-index (ahead of time, releases the GIL).

One query: coarse distances per split, multi-sequence traversal of the V x V cells with a
binary heap, distance tables per visited coarse cluster (memoised per split), ADC scan of
the retrieved codes. `lopq.search` wraps it and ranks the distances.
"""

from libc.stdlib cimport free, malloc, qsort, realloc
from libc.math cimport INFINITY
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import os

import numpy as np

cdef extern from *:
    void __builtin_prefetch(const void *addr) nogil

cdef extern from "_fused_api.h" nogil:
    int lopq_select_isa(int allow_avx2)
    void lopq_query_table(const float *x, const float *centroid, const float *mu,
                          const float *RT, Py_ssize_t h, const float *booksT, int half_m,
                          Py_ssize_t S, float *r, float *px, float *table)
    int lopq_project_rows(const float *res, Py_ssize_t n, Py_ssize_t h, const float *RT,
                          Py_ssize_t hp, float *const *out)
    int lopq_tables_rows(const float *P, Py_ssize_t n, Py_ssize_t hp, const float *CBTm2,
                         Py_ssize_t half_m, Py_ssize_t ds, Py_ssize_t Sp,
                         const float *cb_sqnorm, Py_ssize_t S, float *tables)
    float lopq_residual_sqdist(const float *p, const float *const *rows,
                               Py_ssize_t half_m, Py_ssize_t ds)

#: The copy of the fused loops this module runs (see _cython.ISA).
ISA = "avx2" if lopq_select_isa(os.environ.get("LOPQ_PORTABLE", "") != "1") else "portable"

ctypedef fused code_t:
    unsigned char
    unsigned short

cdef inline double _now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + 1e-9 * t.tv_nsec


cdef struct Keyed:
    float dist
    int index

cdef int _compare_keyed(const void *a, const void *b) noexcept nogil:
    cdef float da = (<Keyed *>a).dist, db = (<Keyed *>b).dist
    if da < db:
        return -1
    if da > db:
        return 1
    return (<Keyed *>a).index - (<Keyed *>b).index

cdef struct HeapItem:
    float dist
    int i
    int j


cdef void _heap_push(HeapItem *heap, int *size, float dist, int i, int j) noexcept nogil:
    cdef int k = size[0], parent
    size[0] += 1
    while k > 0:
        parent = (k - 1) // 2
        if heap[parent].dist < dist or (heap[parent].dist == dist and
                                        (heap[parent].i < i or (heap[parent].i == i and
                                                                heap[parent].j <= j))):
            break
        heap[k] = heap[parent]
        k = parent
    heap[k].dist = dist
    heap[k].i = i
    heap[k].j = j


cdef int _less(HeapItem *a, HeapItem *b) noexcept nogil:
    if a.dist != b.dist:
        return a.dist < b.dist
    if a.i != b.i:
        return a.i < b.i
    return a.j < b.j


cdef HeapItem _heap_pop(HeapItem *heap, int *size) noexcept nogil:
    cdef HeapItem top = heap[0], last
    cdef int k = 0, child
    size[0] -= 1
    last = heap[size[0]]
    while True:
        child = 2 * k + 1
        if child >= size[0]:
            break
        if child + 1 < size[0] and _less(&heap[child + 1], &heap[child]):
            child += 1
        if not _less(&heap[child], &last):
            break
        heap[k] = heap[child]
        k = child
    heap[k] = last
    return top


cdef inline unsigned int _order_key(float f) noexcept nogil:
    # IEEE-754 bits mapped so that unsigned order is float order (negatives flipped whole,
    # positives with the sign bit set)
    cdef unsigned int bits
    memcpy(&bits, &f, sizeof(float))
    if bits & 0x80000000u:
        return ~bits
    return bits | 0x80000000u


cdef void _sort_keyed(Keyed *a, Keyed *tmp, int n) noexcept nogil:
    """Sort by (dist, index) for items given in index order: insertion sort when short,
    else a stable LSD radix sort on the float bits (4 byte passes, a pass skipped when
    every key shares its byte). Replaces qsort, whose comparator calls took a sixth of
    a V=1024 query."""
    cdef int i, k, p, b
    cdef unsigned int shift
    cdef unsigned int counts[256]
    cdef unsigned int total, c
    cdef Keyed item
    cdef Keyed *src = a
    cdef Keyed *dst = tmp
    cdef Keyed *swap
    if n <= 32:
        for i in range(1, n):
            item = a[i]
            k = i - 1
            while k >= 0 and a[k].dist > item.dist:  # strict: equal keys keep index order
                a[k + 1] = a[k]
                k -= 1
            a[k + 1] = item
        return
    for p in range(4):
        shift = 8 * p
        memset(counts, 0, sizeof(counts))
        for i in range(n):
            counts[(_order_key(src[i].dist) >> shift) & 255] += 1
        if counts[(_order_key(src[0].dist) >> shift) & 255] == <unsigned int>n:
            continue
        total = 0
        for b in range(256):
            c = counts[b]
            counts[b] = total
            total += c
        for i in range(n):
            b = (_order_key(src[i].dist) >> shift) & 255
            dst[counts[b]] = src[i]
            counts[b] += 1
        swap = src
        src = dst
        dst = swap
    if src != a:
        memcpy(a, src, n * sizeof(Keyed))


cdef int _sorted_coarse(const float *x, const float *CT, int V, int h, float *dist,
                        Keyed *out, Keyed *tmp, const float *adjust) noexcept nogil:
    # CT (h, V) transposed centroids: the loop over centroids is contiguous and
    # vectorises, each centroid still summing its h terms in order
    cdef int c, t
    cdef float xt, diff
    cdef const float *row
    for c in range(V):
        dist[c] = 0
    for t in range(h):
        xt = x[t]
        row = CT + <Py_ssize_t>t * V
        for c in range(V):
            diff = xt - row[c]
            dist[c] = dist[c] + diff * diff
    if adjust != NULL:  # inner product: |x - C[c]|^2 - |C[c]|^2 = |x|^2 - 2 x.C[c]
        for c in range(V):
            dist[c] = dist[c] - adjust[c]
    for c in range(V):
        out[c].dist = dist[c]
        out[c].index = c
    _sort_keyed(out, tmp, V)
    return 0


cdef inline void _table(const float *x, int c, const float *C, const float *RT,
                        const float *mu, const float *booksT, int h, int half_m, int S,
                        float *r, float *px, float *table) noexcept nogil:
    # px = R[c] @ (x - C[c] - mu[c]); table[j, s] = |px_j - books[j, s]|^2, from the
    # transposed rotation RT[c] = R[c]^T and codebooks booksT (M/2, ds, S)
    lopq_query_table(x, C + <Py_ssize_t>c * h, mu + <Py_ssize_t>c * h,
                     RT + <Py_ssize_t>c * h * h, h, booksT, half_m, S, r, px, table)


cdef inline void _adjust(float *table, const float *adjust, Py_ssize_t key,
                         Py_ssize_t table_size) noexcept nogil:
    # table -= adjust[key]: the per-(split, coarse cluster) term that turns an L2 table
    # into an inner-product one (`LOPQModel.table_adjustment`); adjust NULL: L2
    cdef Py_ssize_t t
    cdef const float *a
    if adjust == NULL:
        return
    a = adjust + key * table_size
    for t in range(table_size):
        table[t] = table[t] - a[t]


cdef int _grow(void **buf, Py_ssize_t *capacity, Py_ssize_t needed,
               size_t item) noexcept nogil:
    cdef Py_ssize_t cap = capacity[0]
    cdef void *grown
    if needed <= cap:
        return 0
    while cap < needed:
        cap = cap * 2 + 64
    grown = realloc(buf[0], cap * item)
    if grown == NULL:
        return -1
    buf[0] = grown
    capacity[0] = cap
    return 0


cdef struct Cell:
    int c0           # coarse cluster of each split
    int c1
    int t0           # the cell's distance tables (slots) of each split
    int t1
    long long lo     # its rows: fine[lo:hi]
    long long hi


cdef struct Work:
    Keyed *order0
    Keyed *order1
    Keyed *sort_tmp
    float *coarse_dist
    int *progress
    HeapItem *heap
    int *slot0
    int *slot1
    float *px
    float *rbuf
    float *tables
    Py_ssize_t table_cap
    Cell *cells
    Py_ssize_t cells_cap
    long long *rows
    float *dists
    Py_ssize_t rows_cap
    Py_ssize_t dists_cap
    Keyed *top


cdef int _work_init(Work *w, int V, int h) noexcept nogil:
    memset(w, 0, sizeof(Work))
    w.order0 = <Keyed *>malloc(V * sizeof(Keyed))
    w.order1 = <Keyed *>malloc(V * sizeof(Keyed))
    w.sort_tmp = <Keyed *>malloc(V * sizeof(Keyed))
    w.coarse_dist = <float *>malloc(V * sizeof(float))
    w.progress = <int *>malloc(V * sizeof(int))
    w.heap = <HeapItem *>malloc((V + 2) * sizeof(HeapItem))
    w.slot0 = <int *>malloc(V * sizeof(int))
    w.slot1 = <int *>malloc(V * sizeof(int))
    w.px = <float *>malloc(h * sizeof(float))
    w.rbuf = <float *>malloc(h * sizeof(float))
    if not (w.order0 and w.order1 and w.sort_tmp and w.coarse_dist and w.progress
            and w.heap and w.slot0 and w.slot1 and w.px and w.rbuf):
        return -1
    return 0


cdef void _work_free(Work *w) noexcept nogil:
    free(w.order0)
    free(w.order1)
    free(w.sort_tmp)
    free(w.coarse_dist)
    free(w.progress)
    free(w.heap)
    free(w.slot0)
    free(w.slot1)
    free(w.px)
    free(w.rbuf)
    free(w.tables)
    free(w.cells)
    free(w.rows)
    free(w.dists)
    free(w.top)


cdef int _traverse(Work *w, const float *x, const float *CsT, int V, int h,
                   const long long *offsets, long long quota, Cell **cells,
                   Py_ssize_t *n_cells, Py_ssize_t *cells_cap, Py_ssize_t *total_out,
                   int *visited_out, const float *coarse_adjust) noexcept nogil:
    """Multi-sequence traversal: appends the non-empty cells in visiting order to *cells
    until >= quota rows; counts every visited cell, empty or not."""
    cdef int heap_size = 0, visited = 0, c0, c1, c
    cdef Py_ssize_t total = 0
    cdef HeapItem item
    cdef long long lo, hi
    _sorted_coarse(x, CsT, V, h, w.coarse_dist, w.order0, w.sort_tmp, coarse_adjust)
    _sorted_coarse(x + h, CsT + <Py_ssize_t>V * h, V, h, w.coarse_dist, w.order1, w.sort_tmp,
                   coarse_adjust + V if coarse_adjust != NULL else NULL)
    for c in range(V):
        w.progress[c] = 0
    _heap_push(w.heap, &heap_size, w.order0[0].dist + w.order1[0].dist, 0, 0)
    while heap_size > 0 and total < quota:
        item = _heap_pop(w.heap, &heap_size)
        visited += 1
        w.progress[item.i] = item.j + 1
        # (i+1, j) once (i, j) and (i+1, j-1) are popped; (i, j+1) once (i-1, j+1) is.
        # A pushed cell is popped soon: prefetch its offsets (one cache miss per visited
        # cell otherwise, in a (V^2 + 1) array that outgrows the cache).
        if item.i + 1 < V and (item.j == 0 or w.progress[item.i + 1] >= item.j):
            _heap_push(w.heap, &heap_size, w.order0[item.i + 1].dist + w.order1[item.j].dist,
                       item.i + 1, item.j)
            __builtin_prefetch(offsets + <Py_ssize_t>w.order0[item.i + 1].index * V
                               + w.order1[item.j].index)
        if item.j + 1 < V and (item.i == 0 or w.progress[item.i - 1] >= item.j + 2):
            _heap_push(w.heap, &heap_size, w.order0[item.i].dist + w.order1[item.j + 1].dist,
                       item.i, item.j + 1)
            __builtin_prefetch(offsets + <Py_ssize_t>w.order0[item.i].index * V
                               + w.order1[item.j + 1].index)
        c0 = w.order0[item.i].index
        c1 = w.order1[item.j].index
        lo = offsets[<Py_ssize_t>c0 * V + c1]
        hi = offsets[<Py_ssize_t>c0 * V + c1 + 1]
        if hi <= lo:
            continue
        if _grow(<void **>cells, cells_cap, n_cells[0] + 1, sizeof(Cell)):
            return -1
        cells[0][n_cells[0]].c0 = c0
        cells[0][n_cells[0]].c1 = c1
        cells[0][n_cells[0]].lo = lo
        cells[0][n_cells[0]].hi = hi
        n_cells[0] += 1
        total += hi - lo
    total_out[0] = total
    visited_out[0] = visited
    return 0


cdef struct Direct:
    # Scoring without tables (`_scan`): pairs with direct[t] set have no table; their
    # rows' distances come from the pair's rotated residual px + t * hp and the codebooks.
    const char *direct
    const float *px
    Py_ssize_t hp
    const float *books       # (2, M/2, S, ds) codebooks
    Py_ssize_t ds
    const int *pair_key      # split * V + cluster of each pair (the adjustment's key)
    const float *adjust      # (2V, M/2, S) inner-product adjustment, or NULL


cdef inline float _direct_split(const Direct *dr, int t, int split, const code_t *code,
                                int half_m, int S, const float **rows) noexcept nogil:
    # |px_t - decoded codes|^2 of one split: the sum its table lookups would give
    cdef int j
    cdef Py_ssize_t S_ds = <Py_ssize_t>S * dr.ds
    cdef const float *books = dr.books + <Py_ssize_t>split * half_m * S_ds
    cdef const float *a
    cdef float out
    for j in range(half_m):
        rows[j] = books + j * S_ds + <Py_ssize_t>code[j] * dr.ds
    out = lopq_residual_sqdist(dr.px + <Py_ssize_t>t * dr.hp, rows, half_m, dr.ds)
    if dr.adjust != NULL:
        a = dr.adjust + <Py_ssize_t>dr.pair_key[t] * half_m * S
        for j in range(half_m):
            out = out - a[j * S + code[j]]
    return out


cdef int _scan(Work *w, const Cell *cells, Py_ssize_t n_cells, const float *tables,
               Py_ssize_t table_size, int half_m, int S, const code_t *fine,
               Py_ssize_t total, const Direct *dr=NULL) noexcept nogil:
    """ADC distances of every row of the cells into w.rows / w.dists (room for total).
    With ``dr``, a half of a cell whose pair has no table is scored directly."""
    cdef int M = 2 * half_m, j
    cdef Py_ssize_t k, n = 0
    cdef long long r
    cdef float acc, acc1, acc2, acc3
    cdef const float *t0
    cdef const float *t1
    cdef const code_t *code
    cdef const float *rows[256]
    cdef int direct0, direct1
    if _grow(<void **>&w.rows, &w.rows_cap, total, sizeof(long long)):
        return -1
    if _grow(<void **>&w.dists, &w.dists_cap, total, sizeof(float)):
        return -1
    for k in range(n_cells):
        if k + 1 < n_cells:  # the next cell's codes, while this one is scanned
            __builtin_prefetch(fine + cells[k + 1].lo * M)
        t0 = tables + cells[k].t0 * table_size
        t1 = tables + cells[k].t1 * table_size
        direct0 = 0
        direct1 = 0
        if dr != NULL:
            direct0 = dr.direct[cells[k].t0] != 0
            direct1 = dr.direct[cells[k].t1] != 0
        if direct0 or direct1:
            for r in range(cells[k].lo, cells[k].hi):
                code = fine + r * M
                acc = 0
                acc1 = 0
                if direct0:
                    acc = _direct_split(dr, cells[k].t0, 0, code, half_m, S, rows)
                else:
                    for j in range(half_m):
                        acc = acc + t0[j * S + code[j]]
                if direct1:
                    acc1 = _direct_split(dr, cells[k].t1, 1, code + half_m, half_m, S, rows)
                else:
                    for j in range(half_m):
                        acc1 = acc1 + t1[j * S + code[half_m + j]]
                w.rows[n] = r
                w.dists[n] = acc + acc1
                n += 1
            continue
        for r in range(cells[k].lo, cells[k].hi):
            code = fine + r * M
            # four independent sums (split x parity of j) quarter the chain of
            # dependent adds, the latency that bounds this loop
            acc = 0
            acc1 = 0
            acc2 = 0
            acc3 = 0
            j = 0
            while j + 1 < half_m:
                acc = acc + t0[j * S + code[j]]
                acc1 = acc1 + t1[j * S + code[half_m + j]]
                acc2 = acc2 + t0[(j + 1) * S + code[j + 1]]
                acc3 = acc3 + t1[(j + 1) * S + code[half_m + j + 1]]
                j += 2
            if j < half_m:
                acc = acc + t0[j * S + code[j]]
                acc1 = acc1 + t1[j * S + code[half_m + j]]
            w.rows[n] = r
            w.dists[n] = (acc + acc2) + (acc1 + acc3)
            n += 1
    return 0


cdef int _search_core(Work *w, const float *x, const float *Cs, const float *CsT,
                      const float *RTs, const float *mus, const float *booksT, int V, int h,
                      int half_m, int S, const long long *offsets, const code_t *fine,
                      long long quota, Py_ssize_t *total_out, int *visited_out,
                      double *seconds, const float *adjust,
                      const float *coarse_adjust) noexcept nogil:
    """One query: traverse, build its tables one at a time (memoised per split) and scan
    until >= quota rows; fills w.rows / w.dists. Adds the seconds spent traversing,
    building tables and scanning to seconds[0:3] unless it is NULL."""
    cdef Py_ssize_t n_tables = 0, table_size = half_m * S, k, n_cells = 0
    cdef Py_ssize_t split_c = <Py_ssize_t>V * h, split_r = <Py_ssize_t>V * h * h
    cdef Py_ssize_t split_b = <Py_ssize_t>half_m * (h // half_m) * S
    cdef int c0, c1, c, status
    cdef double t0 = _now() if seconds != NULL else 0, t1
    if _traverse(w, x, CsT, V, h, offsets, quota, &w.cells, &n_cells, &w.cells_cap,
                 total_out, visited_out, coarse_adjust):
        return -1
    if seconds != NULL:
        t1 = _now()
        seconds[0] += t1 - t0
        t0 = t1
    for c in range(V):
        w.slot0[c] = -1
        w.slot1[c] = -1
    if _grow(<void **>&w.tables, &w.table_cap, 2 * n_cells * table_size, sizeof(float)):
        return -1
    for k in range(n_cells):
        c0 = w.cells[k].c0
        c1 = w.cells[k].c1
        if w.slot0[c0] < 0:
            _table(x, c0, Cs, RTs, mus, booksT, h, half_m, S, w.rbuf, w.px,
                   w.tables + n_tables * table_size)
            _adjust(w.tables + n_tables * table_size, adjust, c0, table_size)
            w.slot0[c0] = <int>n_tables
            n_tables += 1
        if w.slot1[c1] < 0:
            _table(x + h, c1, Cs + split_c, RTs + split_r, mus + split_c, booksT + split_b,
                   h, half_m, S, w.rbuf, w.px, w.tables + n_tables * table_size)
            _adjust(w.tables + n_tables * table_size, adjust, V + c1, table_size)
            w.slot1[c1] = <int>n_tables
            n_tables += 1
        w.cells[k].t0 = w.slot0[c0]
        w.cells[k].t1 = w.slot1[c1]
    if seconds != NULL:
        t1 = _now()
        seconds[1] += t1 - t0
        t0 = t1
    status = _scan(w, w.cells, n_cells, w.tables, table_size, half_m, S, fine, total_out[0])
    if seconds != NULL:
        seconds[2] += _now() - t0
    return status


cdef inline int _worse(Keyed a, Keyed b) noexcept nogil:
    # a ranks after b: larger distance, or equal distance retrieved later
    return a.dist > b.dist or (a.dist == b.dist and a.index > b.index)


cdef void _sift_down(Keyed *heap, int size, int k) noexcept nogil:
    cdef int child
    cdef Keyed tmp
    while True:
        child = 2 * k + 1
        if child >= size:
            return
        if child + 1 < size and _worse(heap[child + 1], heap[child]):
            child += 1
        if not _worse(heap[child], heap[k]):
            return
        tmp = heap[k]
        heap[k] = heap[child]
        heap[child] = tmp
        k = child


cdef int _top_k(const float *dists, Py_ssize_t n, int limit, Keyed *heap) noexcept nogil:
    """The `limit` nearest of n distances (ties by position) in `heap`, sorted; returns
    how many."""
    cdef int size = 0, k
    cdef Py_ssize_t i
    cdef Keyed item
    for i in range(n):
        item.dist = dists[i]
        item.index = <int>i
        if size < limit:
            heap[size] = item
            size += 1
            if size == limit:
                for k in range(size // 2 - 1, -1, -1):
                    _sift_down(heap, size, k)
        elif _worse(heap[0], item):
            heap[0] = item
            _sift_down(heap, size, 0)
    qsort(heap, size, sizeof(Keyed), _compare_keyed)
    return size


cdef const float *_adjust_pointer(const float[:, :, :, ::1] adjust, int V, int half_m,
                                 int S) except? NULL:
    """The data of an (2, V, M/2, S) table adjustment, or NULL for None."""
    if adjust is None:
        return NULL
    if (adjust.shape[0] != 2 or adjust.shape[1] != V or adjust.shape[2] != half_m
            or adjust.shape[3] != S):
        raise ValueError(f"adjust must have shape (2, {V}, {half_m}, {S}), got "
                         f"({adjust.shape[0]}, {adjust.shape[1]}, {adjust.shape[2]}, "
                         f"{adjust.shape[3]})")
    return &adjust[0, 0, 0, 0]


cdef const float *_coarse_adjust_pointer(const float[:, ::1] adjust, int V) except? NULL:
    """The data of a (2, V) coarse-distance adjustment, or NULL for None."""
    if adjust is None:
        return NULL
    if adjust.shape[0] != 2 or adjust.shape[1] != V:
        raise ValueError(f"coarse_adjust must have shape (2, {V}), got ({adjust.shape[0]}, "
                         f"{adjust.shape[1]})")
    return &adjust[0, 0]


def search_many(const float[:, ::1] Q,          # IN (q, D) queries
                const float[:, :, ::1] Cs,       # IN (2, V, h)
                const float[:, :, ::1] CsT,      # IN (2, h, V) transposed centroids
                const float[:, :, :, ::1] RTs,   # IN (2, V, h, h) transposed rotations
                const float[:, :, ::1] mus,      # IN (2, V, h)
                const float[:, :, :, ::1] booksT,  # IN (2, M/2, ds, S) transposed codebooks
                const long long[::1] offsets,    # IN (V*V + 1,) cell offsets
                const code_t[:, ::1] fine,       # IN (n, M) codes grouped by cell
                long long quota, int limit,
                long long[:, ::1] out_rows,      # OUT (q, limit) row indices, -1 padded
                float[:, ::1] out_dists,         # OUT (q, limit) distances, inf padded
                int[::1] out_visited,            # OUT (q,) visited cells
                double[::1] out_seconds=None,    # OUT (3,) += traversal, tables, scan
                const float[:, :, :, ::1] adjust=None,  # IN (2, V, M/2, S) or None
                const float[:, ::1] coarse_adjust=None):  # IN (2, V) or None
    """Search many queries without the GIL: the `limit` nearest retrieved rows of each.
    ``adjust`` is subtracted from each (split, cluster) table and ``coarse_adjust`` from
    each coarse distance (inner-product models; see `LOPQModel.table_adjustment`)."""
    cdef int V = Cs.shape[1], h = Cs.shape[2], half_m = booksT.shape[1], S = booksT.shape[3]
    cdef Py_ssize_t q, total
    cdef int visited, found, k, failed = 0
    cdef Work w
    cdef double *seconds = NULL
    cdef const float *adj = _adjust_pointer(adjust, V, half_m, S)
    cdef const float *cadj = _coarse_adjust_pointer(coarse_adjust, V)
    if Q.shape[0] == 0:
        return
    if out_seconds is not None:
        if out_seconds.shape[0] < 3:
            raise ValueError("out_seconds must hold 3 values")
        seconds = &out_seconds[0]
    with nogil:
        if _work_init(&w, V, h) != 0:
            failed = 1
        else:
            w.top = <Keyed *>malloc(limit * sizeof(Keyed))
            if w.top == NULL:
                failed = 1
        for q in range(Q.shape[0]):
            if failed:
                break
            if _search_core(&w, &Q[q, 0], &Cs[0, 0, 0], &CsT[0, 0, 0], &RTs[0, 0, 0, 0],
                            &mus[0, 0, 0], &booksT[0, 0, 0, 0], V, h, half_m, S,
                            &offsets[0], &fine[0, 0],
                            quota, &total, &visited, seconds, adj, cadj) != 0:
                failed = 1
                break
            found = _top_k(w.dists, total, limit, w.top)
            for k in range(limit):
                if k < found:
                    out_rows[q, k] = w.rows[w.top[k].index]
                    out_dists[q, k] = w.top[k].dist
                else:
                    out_rows[q, k] = -1
                    out_dists[q, k] = INFINITY
            out_visited[q] = visited
        _work_free(&w)
    if failed:
        raise MemoryError("out of memory in the search kernel")


def search_one(const float[::1] x,              # IN (D,) query
               const float[:, :, ::1] Cs,       # IN (2, V, h)
               const float[:, :, ::1] CsT,      # IN (2, h, V) transposed centroids
               const float[:, :, :, ::1] RTs,   # IN (2, V, h, h) transposed rotations
               const float[:, :, ::1] mus,      # IN (2, V, h)
               const float[:, :, :, ::1] booksT,  # IN (2, M/2, ds, S) transposed codebooks
               const long long[::1] offsets,    # IN (V*V + 1,) cell offsets
               const code_t[:, ::1] fine,       # IN (n, M) codes grouped by cell
               long long quota,
               const float[:, :, :, ::1] adjust=None,  # IN (2, V, M/2, S) or None
               const float[:, ::1] coarse_adjust=None):  # IN (2, V) or None
    """Retrieve whole cells in multi-sequence order until >= quota rows; ADC distances.

    Returns:
        rows (r,) int64 retrieved row indices in retrieval order, dists (r,) float32,
        visited cells.
    """
    cdef int V = Cs.shape[1], h = Cs.shape[2], half_m = booksT.shape[1], S = booksT.shape[3]
    cdef Py_ssize_t total = 0
    cdef int visited = 0, failed = 0
    cdef Work w
    cdef long long[::1] rows_view
    cdef float[::1] dists_view
    cdef const float *adj = _adjust_pointer(adjust, V, half_m, S)
    cdef const float *cadj = _coarse_adjust_pointer(coarse_adjust, V)
    with nogil:
        if _work_init(&w, V, h) != 0:
            failed = 1
        elif _search_core(&w, &x[0], &Cs[0, 0, 0], &CsT[0, 0, 0], &RTs[0, 0, 0, 0],
                          &mus[0, 0, 0], &booksT[0, 0, 0, 0], V, h, half_m, S,
                          &offsets[0], &fine[0, 0],
                          quota, &total, &visited, NULL, adj, cadj) != 0:
            failed = 1
    try:
        if failed:
            raise MemoryError("out of memory in the search kernel")
        out_rows = np.empty(total, dtype=np.int64)
        out_dists = np.empty(total, dtype=np.float32)
        if total:
            rows_view = out_rows
            dists_view = out_dists
            memcpy(&rows_view[0], w.rows, total * sizeof(long long))
            memcpy(&dists_view[0], w.dists, total * sizeof(float))
        return out_rows, out_dists, visited
    finally:
        _work_free(&w)


cdef class OneQuery:
    """One index's search operands held as typed views, with a work space kept between
    calls: `search` of one query converts only the query and allocates only its
    results (`search_many` converts 14 arguments and sets up its work space per call,
    about 7 us on Oxford5k, an eighth of a query). Not thread-safe: one per thread.

    Args: those of `search_many` (the index's ``offsets`` and uint8 or uint16 ``fine``
    included: build a new one when the index changes).
    """
    cdef const float[:, :, ::1] Cs
    cdef const float[:, :, ::1] CsT
    cdef const float[:, :, :, ::1] RTs
    cdef const float[:, :, ::1] mus
    cdef const float[:, :, :, ::1] booksT
    cdef const long long[::1] offsets
    cdef const unsigned char[:, ::1] fine8
    cdef const unsigned short[:, ::1] fine16
    cdef const float[:, :, :, ::1] adjust
    cdef const float[:, ::1] coarse_adjust
    cdef const float *adj
    cdef const float *cadj
    cdef int V, h, half_m, S, wide
    cdef Work w
    cdef Py_ssize_t top_cap
    cdef bint ready

    def __cinit__(self):
        memset(&self.w, 0, sizeof(Work))
        self.ready = False
        self.top_cap = 0

    def __init__(self, const float[:, :, ::1] Cs, const float[:, :, ::1] CsT,
                 const float[:, :, :, ::1] RTs, const float[:, :, ::1] mus,
                 const float[:, :, :, ::1] booksT, const long long[::1] offsets, fine,
                 const float[:, :, :, ::1] adjust=None,
                 const float[:, ::1] coarse_adjust=None):
        self.Cs, self.CsT, self.RTs, self.mus, self.booksT = Cs, CsT, RTs, mus, booksT
        self.offsets = offsets
        self.V, self.h = Cs.shape[1], Cs.shape[2]
        self.half_m, self.S = booksT.shape[1], booksT.shape[3]
        if offsets.shape[0] != <Py_ssize_t>self.V * self.V + 1:
            raise ValueError(f"offsets must hold V*V + 1 = {self.V * self.V + 1} values, "
                             f"got {offsets.shape[0]}")
        self.wide = fine.dtype == np.uint16
        if self.wide:
            self.fine16 = fine
        else:
            self.fine8 = fine
        if len(fine) == 0:
            raise ValueError("OneQuery needs a non-empty index")
        self.adj = _adjust_pointer(adjust, self.V, self.half_m, self.S)
        self.cadj = _coarse_adjust_pointer(coarse_adjust, self.V)
        self.adjust, self.coarse_adjust = adjust, coarse_adjust  # keep them alive
        if _work_init(&self.w, self.V, self.h) != 0:
            _work_free(&self.w)
            memset(&self.w, 0, sizeof(Work))
            raise MemoryError("out of memory in the search kernel")
        self.ready = True

    def __dealloc__(self):
        _work_free(&self.w)

    def search(self, const float[::1] x, long long quota, int limit):
        """The ``limit`` (>= 1) nearest retrieved rows of query x (D,) float32, as
        `search_many` ranks them: (rows int64, dists float32, visited cells)."""
        cdef Py_ssize_t total = 0
        cdef int visited = 0, failed = 0, found = 0, k
        cdef void *grown
        cdef long long[::1] rows_view
        cdef float[::1] dists_view
        if not self.ready:
            raise ValueError("OneQuery was not initialised")
        if x.shape[0] != 2 * self.h:
            raise ValueError(f"the query has dimension {x.shape[0]}, expected {2 * self.h}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if limit > self.top_cap:
            grown = realloc(self.w.top, limit * sizeof(Keyed))
            if grown == NULL:
                raise MemoryError("out of memory in the search kernel")
            self.w.top = <Keyed *>grown
            self.top_cap = limit
        with nogil:
            if self.wide:
                failed = _search_core(&self.w, &x[0], &self.Cs[0, 0, 0], &self.CsT[0, 0, 0],
                                      &self.RTs[0, 0, 0, 0], &self.mus[0, 0, 0],
                                      &self.booksT[0, 0, 0, 0], self.V, self.h,
                                      self.half_m, self.S, &self.offsets[0],
                                      &self.fine16[0, 0], quota, &total, &visited, NULL,
                                      self.adj, self.cadj)
            else:
                failed = _search_core(&self.w, &x[0], &self.Cs[0, 0, 0], &self.CsT[0, 0, 0],
                                      &self.RTs[0, 0, 0, 0], &self.mus[0, 0, 0],
                                      &self.booksT[0, 0, 0, 0], self.V, self.h,
                                      self.half_m, self.S, &self.offsets[0],
                                      &self.fine8[0, 0], quota, &total, &visited, NULL,
                                      self.adj, self.cadj)
            if not failed:
                found = _top_k(self.w.dists, total, limit, self.w.top)
        if failed:
            raise MemoryError("out of memory in the search kernel")
        out_rows = np.empty(found, dtype=np.int64)
        out_dists = np.empty(found, dtype=np.float32)
        if found:
            rows_view = out_rows
            dists_view = out_dists
            for k in range(found):
                rows_view[k] = self.w.rows[self.w.top[k].index]
                dists_view[k] = self.w.top[k].dist
        return out_rows, out_dists, visited


#: Rotated residuals one block of search_cells_grouped may hold (bytes): queries join the
#: block until their (query, half-cluster) pairs fill it. Larger blocks read each
#: rotation once for more queries; this one stays within the last-level cache.
BLOCK_BUDGET = 16 << 20


cdef struct Block:
    # the block's queries: cells w.cells[cell_start[q]:cell_start[q + 1]], pairs
    # [pair_start[q], pair_start[q + 1]) of which the first split0_pairs[q] are split 0
    Py_ssize_t *cell_start
    Py_ssize_t *pair_start
    Py_ssize_t *split0_pairs
    Py_ssize_t *totals
    int *pair_key           # split * V + cluster
    int *pair_query
    Py_ssize_t key_cap
    Py_ssize_t query_cap
    int *order
    int *key_start
    float *res
    Py_ssize_t res_cap
    float *px
    Py_ssize_t px_cap
    float *tables
    Py_ssize_t tables_cap
    float **ptrs
    Py_ssize_t order_cap
    Py_ssize_t ptrs_cap
    char *direct            # per pair of the current query: scored without a table
    long long *pair_rows    # per pair of the current query: rows of its cells
    Py_ssize_t direct_cap
    Py_ssize_t pair_rows_cap
    double t_tables
    double t_scan


cdef int _block_init(Block *b, int max_block, int V) noexcept nogil:
    memset(b, 0, sizeof(Block))
    b.cell_start = <Py_ssize_t *>malloc((max_block + 1) * sizeof(Py_ssize_t))
    b.pair_start = <Py_ssize_t *>malloc((max_block + 1) * sizeof(Py_ssize_t))
    b.split0_pairs = <Py_ssize_t *>malloc(max_block * sizeof(Py_ssize_t))
    b.totals = <Py_ssize_t *>malloc(max_block * sizeof(Py_ssize_t))
    b.key_start = <int *>malloc((2 * V + 1) * sizeof(int))
    if not (b.cell_start and b.pair_start and b.split0_pairs and b.totals and b.key_start):
        return -1
    return 0


cdef void _block_free(Block *b) noexcept nogil:
    free(b.cell_start)
    free(b.pair_start)
    free(b.split0_pairs)
    free(b.totals)
    free(b.pair_key)
    free(b.pair_query)
    free(b.order)
    free(b.key_start)
    free(b.res)
    free(b.px)
    free(b.tables)
    free(b.ptrs)
    free(b.direct)
    free(b.pair_rows)


cdef int _number_pairs(Work *w, Block *b, int qi, Py_ssize_t *n_pairs, int V) noexcept nogil:
    """Number query qi's (query, half-cluster) pairs from its cells (split 0 first) and
    point each cell at its two tables, relative to the query's first pair."""
    cdef Py_ssize_t k, first_pair = n_pairs[0]
    cdef Py_ssize_t need = first_pair + 2 * (b.cell_start[qi + 1] - b.cell_start[qi])
    cdef int c
    if (_grow(<void **>&b.pair_key, &b.key_cap, need, sizeof(int))
            or _grow(<void **>&b.pair_query, &b.query_cap, need, sizeof(int))):
        return -1
    for c in range(V):
        w.slot0[c] = -1
        w.slot1[c] = -1
    b.pair_start[qi] = first_pair
    for k in range(b.cell_start[qi], b.cell_start[qi + 1]):
        c = w.cells[k].c0
        if w.slot0[c] < 0:
            w.slot0[c] = <int>(n_pairs[0] - first_pair)
            b.pair_key[n_pairs[0]] = c
            b.pair_query[n_pairs[0]] = qi
            n_pairs[0] += 1
        w.cells[k].t0 = w.slot0[c]
    b.split0_pairs[qi] = n_pairs[0] - first_pair
    for k in range(b.cell_start[qi], b.cell_start[qi + 1]):
        c = w.cells[k].c1
        if w.slot1[c] < 0:
            w.slot1[c] = <int>(n_pairs[0] - first_pair)
            b.pair_key[n_pairs[0]] = V + c
            b.pair_query[n_pairs[0]] = qi
            n_pairs[0] += 1
        w.cells[k].t1 = w.slot1[c]
    b.pair_start[qi + 1] = n_pairs[0]
    return 0


cdef int _score_block(Work *w, Block *b, const float *Q, Py_ssize_t D, int nq,
                      Py_ssize_t n_pairs, const float *Cs, const float *RTp, const float *mus,
                      const float *CBTm2, const float *cb_sqnorm, int V, int h, Py_ssize_t hp,
                      int half_m, Py_ssize_t ds, Py_ssize_t Sp, int S, const code_t *fine,
                      int limit, long long *out_rows, float *out_dists,
                      const float *adjust, const float *books,
                      Py_ssize_t direct_below) noexcept nogil:
    """Tables and scan of a block of nq queries (rows of Q, D floats each) whose cells
    and pairs are numbered: rotations grouped by half-cluster, then per query its tables,
    its scan and its `limit` nearest into out_rows / out_dists (nq, limit). With
    ``books`` (2, M/2, S, ds), a pair whose cells hold fewer than ``direct_below`` rows
    gets no table: its rows are scored from its rotated residual directly."""
    cdef Py_ssize_t table_size = <Py_ssize_t>half_m * S, k, g, i, t, last, ps, n0, nqp
    cdef Py_ssize_t split_c = <Py_ssize_t>V * h, split_b = <Py_ssize_t>half_m * ds * Sp
    cdef int key, split, c, qi, kk, found, any_direct
    cdef Direct dr
    cdef const float *x
    cdef const float *centre
    cdef const float *mean
    cdef double t0 = _now()
    # 1. group the pairs by half-cluster; rotate each group's residuals together
    if (_grow(<void **>&b.order, &b.order_cap, n_pairs + 1, sizeof(int))
            or _grow(<void **>&b.ptrs, &b.ptrs_cap, n_pairs + 1, sizeof(float *))
            or _grow(<void **>&b.px, &b.px_cap, n_pairs * hp, sizeof(float))):
        return -1
    for key in range(2 * V + 1):
        b.key_start[key] = 0
    for k in range(n_pairs):
        b.key_start[b.pair_key[k] + 1] += 1
    for key in range(2 * V):
        b.key_start[key + 1] += b.key_start[key]
    for k in range(n_pairs):  # counting sort; key_start[key] ends at its group's end
        b.order[b.key_start[b.pair_key[k]]] = <int>k
        b.key_start[b.pair_key[k]] += 1
    g = 0
    for key in range(2 * V):
        last = b.key_start[key]
        if last == g:
            continue
        split = key // V
        c = key % V
        if _grow(<void **>&b.res, &b.res_cap, (last - g) * h, sizeof(float)):
            return -1
        centre = Cs + split * split_c + <Py_ssize_t>c * h
        mean = mus + split * split_c + <Py_ssize_t>c * h
        for i in range(g, last):
            x = Q + b.pair_query[b.order[i]] * D + split * h
            for t in range(h):
                b.res[(i - g) * h + t] = x[t] - centre[t] - mean[t]
            b.ptrs[i] = b.px + b.order[i] * hp
        if lopq_project_rows(b.res, last - g, h,
                             RTp + (split * <Py_ssize_t>V + c) * h * hp, hp, b.ptrs + g):
            return -1
        g = last
    b.t_tables += _now() - t0
    # 2. per query: its tables, the scan while they are in cache, its top `limit`
    for qi in range(nq):
        t0 = _now()
        ps = b.pair_start[qi]
        nqp = b.pair_start[qi + 1] - ps
        n0 = b.split0_pairs[qi]
        if _grow(<void **>&b.tables, &b.tables_cap, nqp * table_size, sizeof(float)):
            return -1
        any_direct = 0
        if books != NULL and direct_below > 0:
            # a table costs S x h multiply-adds, a row scored directly h: pairs with few
            # rows are cheaper without one
            if (_grow(<void **>&b.direct, &b.direct_cap, nqp, sizeof(char))
                    or _grow(<void **>&b.pair_rows, &b.pair_rows_cap, nqp,
                             sizeof(long long))):
                return -1
            for k in range(nqp):
                b.pair_rows[k] = 0
            for k in range(b.cell_start[qi], b.cell_start[qi + 1]):
                b.pair_rows[w.cells[k].t0] += w.cells[k].hi - w.cells[k].lo
                b.pair_rows[w.cells[k].t1] += w.cells[k].hi - w.cells[k].lo
            for k in range(nqp):
                b.direct[k] = b.pair_rows[k] < direct_below
                any_direct = any_direct or b.direct[k]
        if not any_direct:
            if (lopq_tables_rows(b.px + ps * hp, n0, hp, CBTm2, half_m, ds, Sp, cb_sqnorm,
                                 S, b.tables)
                    or lopq_tables_rows(b.px + (ps + n0) * hp, nqp - n0, hp,
                                        CBTm2 + split_b, half_m, ds, Sp,
                                        cb_sqnorm + half_m * Sp, S,
                                        b.tables + n0 * table_size)):
                return -1
        else:
            for k in range(nqp):
                if b.direct[k]:
                    continue
                split = k >= n0
                if lopq_tables_rows(b.px + (ps + k) * hp, 1, hp, CBTm2 + split * split_b,
                                    half_m, ds, Sp, cb_sqnorm + split * half_m * Sp, S,
                                    b.tables + k * table_size):
                    return -1
        if adjust != NULL:
            for k in range(nqp):
                if not (any_direct and b.direct[k]):
                    _adjust(b.tables + k * table_size, adjust, b.pair_key[ps + k],
                            table_size)
        b.t_tables += _now() - t0
        t0 = _now()
        if any_direct:
            dr.direct = b.direct
            dr.px = b.px + ps * hp
            dr.hp = hp
            dr.books = books
            dr.ds = ds
            dr.pair_key = b.pair_key + ps
            dr.adjust = adjust
        if _scan(w, w.cells + b.cell_start[qi], b.cell_start[qi + 1] - b.cell_start[qi],
                 b.tables, table_size, half_m, S, fine, b.totals[qi],
                 &dr if any_direct else NULL):
            return -1
        found = _top_k(w.dists, b.totals[qi], limit, w.top)
        for kk in range(limit):
            if kk < found:
                out_rows[qi * limit + kk] = w.rows[w.top[kk].index]
                out_dists[qi * limit + kk] = w.top[kk].dist
            else:
                out_rows[qi * limit + kk] = -1
                out_dists[qi * limit + kk] = INFINITY
        b.t_scan += _now() - t0
    return 0


def search_cells_grouped(const float[:, ::1] Q,          # IN (q, D) queries
                         const long long[::1] cell_ptr,   # IN (q + 1,) each query's cells
                         const int[:, ::1] cells,         # IN (c, 2) coarse pair of a cell
                         const long long[:, ::1] ranges,  # IN (c, 2) its rows fine[lo:hi]
                         const float[:, :, ::1] Cs,       # IN (2, V, h)
                         const float[:, :, :, ::1] RTp,   # IN (2, V, h, hp) R^T, padded
                         const float[:, :, ::1] mus,      # IN (2, V, h)
                         const float[:, :, :, ::1] CBTm2,  # IN (2, M/2, ds, Sp) -2 books^T
                         const float[:, :, ::1] cb_sqnorm,  # IN (2, M/2, Sp) squared norms
                         int S,                           # IN codebook size (S <= Sp)
                         const code_t[:, ::1] fine,       # IN (n, M) codes
                         int limit, int max_block,
                         long long[:, ::1] out_rows,      # OUT (q, limit) rows, -1 padded
                         float[:, ::1] out_dists,         # OUT (q, limit) distances, inf padded
                         double[::1] out_seconds,         # OUT (3,) += 0, tables, scan
                         const float[:, :, :, ::1] adjust=None,  # IN (2, V, M/2, S) or None
                         const float[:, :, :, ::1] books=None,   # IN (2, M/2, S, ds) or None
                         Py_ssize_t direct_below=0):
    """The `limit` nearest rows of given cells for each query, with the rotations of a
    block of queries computed together.

    Queries join a block (at most ``max_block`` of them and `BLOCK_BUDGET` bytes of
    rotated residuals) with their cells; their (query, half-cluster) pairs are numbered
    (split 0 first) and grouped by half-cluster, and each group's residuals are rotated
    in one GEMM-shaped pass (`lopq_project_rows`): each rotation is read once per block
    instead of once per query, which is what the one-query path spends its time on at
    large D and V. Then per query: its tables from its rotated residuals
    (`lopq_tables_rows`, codebooks shared by the split), the ADC scan while they are in
    cache, its top ``limit``. With ``books`` (the codebooks), a (query, half-cluster)
    pair whose cells hold fewer than ``direct_below`` rows gets no table: each of its
    rows is scored from the rotated residual and its decoded codewords (h multiply-adds
    a row, against S x h for a table), the same distance up to float rounding. The
    cells come from `visited_cells` (`search_batch`: the
    retrieval of `search_many`, distances equal up to float rounding) or from elsewhere (a
    Spark partition holds some cells of the index; its queries say which they visit).
    """
    cdef int V = Cs.shape[1], h = Cs.shape[2], half_m = CBTm2.shape[1]
    cdef Py_ssize_t ds = CBTm2.shape[2], Sp = CBTm2.shape[3], hp = RTp.shape[3]
    cdef Py_ssize_t D = Q.shape[1], max_pairs = max(2, BLOCK_BUDGET // (4 * hp))
    cdef Py_ssize_t n_cells, n_pairs, first, k, lo, hi
    cdef int failed = 0, nq
    cdef Work w
    cdef Block b
    cdef const float *adj = _adjust_pointer(adjust, V, half_m, S)
    cdef const float *books_ptr = NULL
    if Q.shape[0] == 0:
        return
    if books is not None and direct_below > 0:
        if (books.shape[0] != 2 or books.shape[1] != half_m or books.shape[2] != S
                or books.shape[3] != ds or half_m > 256):
            raise ValueError(f"books must be (2, {half_m}, {S}, {ds}) (M/2 <= 256), got "
                             f"({books.shape[0]}, {books.shape[1]}, {books.shape[2]}, {books.shape[3]})")
        books_ptr = &books[0, 0, 0, 0]
    if max_block < 1:
        raise ValueError(f"max_block must be >= 1, got {max_block}")
    if cell_ptr.shape[0] != Q.shape[0] + 1 or cells.shape[0] != ranges.shape[0]:
        raise ValueError("cell_ptr must have one more entry than queries, and cells and "
                         "ranges one row per cell")
    if cell_ptr[0] != 0 or cell_ptr[Q.shape[0]] != cells.shape[0]:
        raise ValueError("cell_ptr must run from 0 to the number of cells")
    for k in range(cells.shape[0]):
        if not (0 <= cells[k, 0] < V and 0 <= cells[k, 1] < V):
            raise ValueError(f"cell {k}: coarse clusters {cells[k, 0]}, {cells[k, 1]} out of "
                             f"range for V={V}")
        if not (0 <= ranges[k, 0] <= ranges[k, 1] <= fine.shape[0]):
            raise ValueError(f"cell {k}: rows {ranges[k, 0]}:{ranges[k, 1]} out of range for "
                             f"{fine.shape[0]} codes")
    with nogil:
        failed = _work_init(&w, V, h) != 0
        failed = _block_init(&b, max_block, V) != 0 or failed
        if not failed:
            w.top = <Keyed *>malloc(limit * sizeof(Keyed))
            failed = w.top == NULL
        first = 0
        while first < Q.shape[0] and not failed:
            n_cells = 0
            n_pairs = 0
            nq = 0
            while first + nq < Q.shape[0] and nq < max_block and n_pairs < max_pairs:
                lo = cell_ptr[first + nq]
                hi = cell_ptr[first + nq + 1]
                if _grow(<void **>&w.cells, &w.cells_cap, n_cells + hi - lo, sizeof(Cell)):
                    failed = 1
                    break
                b.cell_start[nq] = n_cells
                b.totals[nq] = 0
                for k in range(lo, hi):
                    w.cells[n_cells].c0 = cells[k, 0]
                    w.cells[n_cells].c1 = cells[k, 1]
                    w.cells[n_cells].lo = ranges[k, 0]
                    w.cells[n_cells].hi = ranges[k, 1]
                    b.totals[nq] += ranges[k, 1] - ranges[k, 0]
                    n_cells += 1
                b.cell_start[nq + 1] = n_cells
                if _number_pairs(&w, &b, nq, &n_pairs, V):
                    failed = 1
                    break
                nq += 1
            if failed:
                break
            if _score_block(&w, &b, &Q[first, 0], D, nq, n_pairs, &Cs[0, 0, 0],
                            &RTp[0, 0, 0, 0], &mus[0, 0, 0], &CBTm2[0, 0, 0, 0],
                            &cb_sqnorm[0, 0, 0], V, h, hp, half_m, ds, Sp, S, &fine[0, 0],
                            limit, &out_rows[first, 0], &out_dists[first, 0], adj,
                            books_ptr, direct_below):
                failed = 1
            first += nq
        _work_free(&w)
        _block_free(&b)
    out_seconds[1] += b.t_tables
    out_seconds[2] += b.t_scan
    if failed:
        raise MemoryError("out of memory in the search kernel")


def visited_cells(const float[:, ::1] Q,          # IN (q, D) queries
                  const float[:, :, ::1] CsT,      # IN (2, h, V) transposed centroids
                  const long long[::1] offsets,    # IN (V*V + 1,) cell offsets (from sizes)
                  long long quota,
                  const float[:, ::1] coarse_adjust=None):  # IN (2, V) or None
    """The non-empty cells each query's multi-sequence visits until >= quota rows (the
    traversal of `search`).

    Returns:
        cell_ptr (q + 1,) int64, cells (c, 2) int32 coarse pairs in visiting order.
    """
    cdef int V = CsT.shape[2], h = CsT.shape[1], failed = 0, visited
    cdef Py_ssize_t n_cells = 0, q, total, k
    cdef Work w
    cdef int[:, ::1] out
    cdef const float *cadj = _coarse_adjust_pointer(coarse_adjust, V)
    cell_ptr = np.zeros(Q.shape[0] + 1, dtype=np.int64)
    cdef long long[::1] ptr = cell_ptr
    with nogil:
        failed = _work_init(&w, V, h) != 0
        for q in range(Q.shape[0]):
            if failed:
                break
            if _traverse(&w, &Q[q, 0], &CsT[0, 0, 0], V, h, &offsets[0], quota, &w.cells,
                         &n_cells, &w.cells_cap, &total, &visited, cadj):
                failed = 1
            ptr[q + 1] = n_cells
    try:
        if failed:
            raise MemoryError("out of memory in the search kernel")
        cells = np.empty((n_cells, 2), dtype=np.int32)
        out = cells
        with nogil:
            for k in range(n_cells):
                out[k, 0] = w.cells[k].c0
                out[k, 1] = w.cells[k].c1
        return cell_ptr, cells
    finally:
        _work_free(&w)


def rotated_tables(const float[:, ::1] residuals,   # IN (n, h) residuals of one cluster
                   const float[:, ::1] RTp,         # IN (h, hp) R_c^T, columns padded
                   const float[:, :, ::1] CBTm2,    # IN (half_m, ds, Sp) -2 books^T
                   const float[:, ::1] cb_sqnorm,   # IN (half_m, Sp) books' squared norms
                   Py_ssize_t S):
    """The two kernels of the grouped batch path on one cluster's rows, for tests and
    benchmarks: rotation of the residuals (`lopq_project_rows`), then their ADC tables
    (`lopq_tables_rows`). Numpy reference: `reference.rotated_tables`.

    Returns:
        P (n, h) float32 rotated residuals, tables (n, half_m, S) float32.
    """
    cdef Py_ssize_t n = residuals.shape[0], h = residuals.shape[1], hp = RTp.shape[1]
    cdef Py_ssize_t half_m = CBTm2.shape[0], ds = CBTm2.shape[1], Sp = CBTm2.shape[2], i
    if RTp.shape[0] != h or hp < h or half_m * ds != h or cb_sqnorm.shape[0] != half_m \
            or cb_sqnorm.shape[1] != Sp or not 0 < S <= Sp:
        raise ValueError("rotated_tables: shapes do not match (residuals (n, h), RTp (h, hp),"
                         " CBTm2 (half_m, ds, Sp) with half_m * ds = h, cb_sqnorm (half_m, Sp))")
    padded = np.zeros((max(n, 1), hp), dtype=np.float32)
    tables = np.zeros((n, half_m, S), dtype=np.float32)
    cdef float[:, ::1] pv = padded
    cdef float[:, :, ::1] tv = tables
    cdef float **rows = <float **>malloc(sizeof(float *) * max(n, 1))
    cdef int failed = 0
    if rows == NULL:
        raise MemoryError("out of memory in rotated_tables")
    try:
        if n:
            with nogil:
                for i in range(n):
                    rows[i] = &pv[i, 0]
                failed = (lopq_project_rows(&residuals[0, 0], n, h, &RTp[0, 0], hp, rows)
                          or lopq_tables_rows(&pv[0, 0], n, hp, &CBTm2[0, 0, 0], half_m, ds,
                                              Sp, &cb_sqnorm[0, 0], S, &tv[0, 0, 0]))
        if failed:
            raise MemoryError("out of memory in rotated_tables")
        return padded[:n, :h].copy(), tables
    finally:
        free(rows)
