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
    int lopq_tables_grouped(const float *res, Py_ssize_t n, Py_ssize_t h, const float *RT,
                            Py_ssize_t hp, const float *CBTm2, Py_ssize_t half_m,
                            Py_ssize_t ds, Py_ssize_t Sp, const float *cb_sqnorm,
                            Py_ssize_t S, float *const *tables)

#: The copy of the fused loops this module runs (see _cython.ISA).
ISA = "avx2" if lopq_select_isa(os.environ.get("LOPQ_PORTABLE", "") != "1") else "portable"

ctypedef fused code_t:
    unsigned char
    unsigned short

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
                        Keyed *out, Keyed *tmp) noexcept nogil:
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
                   int *visited_out) noexcept nogil:
    """Multi-sequence traversal: appends the non-empty cells in visiting order to *cells
    until >= quota rows; counts every visited cell, empty or not."""
    cdef int heap_size = 0, visited = 0, c0, c1, c
    cdef Py_ssize_t total = 0
    cdef HeapItem item
    cdef long long lo, hi
    _sorted_coarse(x, CsT, V, h, w.coarse_dist, w.order0, w.sort_tmp)
    _sorted_coarse(x + h, CsT + <Py_ssize_t>V * h, V, h, w.coarse_dist, w.order1, w.sort_tmp)
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


cdef int _scan(Work *w, const Cell *cells, Py_ssize_t n_cells, const float *tables,
               Py_ssize_t table_size, int half_m, int S, const code_t *fine,
               Py_ssize_t total) noexcept nogil:
    """ADC distances of every row of the cells into w.rows / w.dists (room for total)."""
    cdef int M = 2 * half_m, j
    cdef Py_ssize_t k, n = 0
    cdef long long r
    cdef float acc, acc1, acc2, acc3
    cdef const float *t0
    cdef const float *t1
    cdef const code_t *code
    if _grow(<void **>&w.rows, &w.rows_cap, total, sizeof(long long)):
        return -1
    if _grow(<void **>&w.dists, &w.dists_cap, total, sizeof(float)):
        return -1
    for k in range(n_cells):
        if k + 1 < n_cells:  # the next cell's codes, while this one is scanned
            __builtin_prefetch(fine + cells[k + 1].lo * M)
        t0 = tables + cells[k].t0 * table_size
        t1 = tables + cells[k].t1 * table_size
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
                      long long quota,
                      Py_ssize_t *total_out, int *visited_out) noexcept nogil:
    """One query: traverse, build its tables one at a time (memoised per split) and scan
    until >= quota rows; fills w.rows / w.dists."""
    cdef Py_ssize_t n_tables = 0, table_size = half_m * S, k, n_cells = 0
    cdef Py_ssize_t split_c = <Py_ssize_t>V * h, split_r = <Py_ssize_t>V * h * h
    cdef Py_ssize_t split_b = <Py_ssize_t>half_m * (h // half_m) * S
    cdef int c0, c1, c
    if _traverse(w, x, CsT, V, h, offsets, quota, &w.cells, &n_cells, &w.cells_cap,
                 total_out, visited_out):
        return -1
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
            w.slot0[c0] = <int>n_tables
            n_tables += 1
        if w.slot1[c1] < 0:
            _table(x + h, c1, Cs + split_c, RTs + split_r, mus + split_c, booksT + split_b,
                   h, half_m, S, w.rbuf, w.px, w.tables + n_tables * table_size)
            w.slot1[c1] = <int>n_tables
            n_tables += 1
        w.cells[k].t0 = w.slot0[c0]
        w.cells[k].t1 = w.slot1[c1]
    return _scan(w, w.cells, n_cells, w.tables, table_size, half_m, S, fine, total_out[0])


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
                int[::1] out_visited):           # OUT (q,) visited cells
    """Search many queries without the GIL: the `limit` nearest retrieved rows of each."""
    cdef int V = Cs.shape[1], h = Cs.shape[2], half_m = booksT.shape[1], S = booksT.shape[3]
    cdef Py_ssize_t q, total
    cdef int visited, found, k, failed = 0
    cdef Work w
    if Q.shape[0] == 0:
        return
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
                            quota, &total, &visited) != 0:
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
               long long quota):
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
    with nogil:
        if _work_init(&w, V, h) != 0:
            failed = 1
        elif _search_core(&w, &x[0], &Cs[0, 0, 0], &CsT[0, 0, 0], &RTs[0, 0, 0, 0],
                          &mus[0, 0, 0], &booksT[0, 0, 0, 0], V, h, half_m, S,
                          &offsets[0], &fine[0, 0],
                          quota, &total, &visited) != 0:
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


cdef inline double _now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + 1e-9 * t.tv_nsec


#: Distance tables one block of search_many_grouped may hold (bytes): the block's queries
#: stop being added when their tables reach it (they are written, then read once by the
#: scan, and should stay in the last-level cache).
TABLE_BUDGET = 16 << 20


def search_many_grouped(const float[:, ::1] Q,          # IN (q, D) queries
                        const float[:, :, ::1] Cs,       # IN (2, V, h)
                        const float[:, :, ::1] CsT,      # IN (2, h, V) transposed centroids
                        const float[:, :, :, ::1] RTp,   # IN (2, V, h, hp) R^T, padded columns
                        const float[:, :, ::1] mus,      # IN (2, V, h)
                        const float[:, :, :, ::1] CBTm2,  # IN (2, M/2, ds, Sp) -2 books^T
                        const float[:, :, ::1] cb_sqnorm,  # IN (2, M/2, Sp) squared norms
                        int S,                           # IN codebook size (S <= Sp)
                        const long long[::1] offsets,    # IN (V*V + 1,) cell offsets
                        const code_t[:, ::1] fine,       # IN (n, M) codes grouped by cell
                        long long quota, int limit, int max_block,
                        long long[:, ::1] out_rows,      # OUT (q, limit) row indices, -1 padded
                        float[:, ::1] out_dists,         # OUT (q, limit) distances, inf padded
                        int[::1] out_visited,            # OUT (q,) visited cells
                        double[::1] out_seconds):        # OUT (3,) += traversal, tables, scan
    """`search_many` with the distance tables of a block of queries built together: the
    block's (query, half-cluster) pairs are grouped by half-cluster, and each group's
    rotations and tables run as one GEMM-shaped pass (`lopq_tables_grouped`), so a
    rotation is read from memory once per block instead of once per query. Blocks hold
    at most ``max_block`` queries and `TABLE_BUDGET` bytes of tables. Same retrieval as
    `search_many`; distances equal up to float rounding (tables from the expanded
    square)."""
    cdef int V = Cs.shape[1], h = Cs.shape[2], half_m = CBTm2.shape[1]
    cdef Py_ssize_t ds = CBTm2.shape[2], Sp = CBTm2.shape[3], hp = RTp.shape[3]
    cdef Py_ssize_t table_size = <Py_ssize_t>half_m * S
    cdef Py_ssize_t max_pairs = max(2, TABLE_BUDGET // (4 * table_size))
    cdef Py_ssize_t n_cells, n_pairs, k, g, i, t, first, last, qi, nq
    cdef Py_ssize_t key_cap = 0, query_cap = 0, res_cap = 0, tables_cap = 0
    cdef int visited, found, key, split, c, failed = 0, kk
    cdef Work w
    cdef int *pair_key = NULL
    cdef int *pair_query = NULL
    cdef int *order = NULL
    cdef int *key_start = NULL
    cdef Py_ssize_t *cell_start = NULL
    cdef Py_ssize_t *totals = NULL
    cdef int *visits = NULL
    cdef float *res = NULL
    cdef float *tables = NULL
    cdef float **ptrs = NULL
    cdef const float *x
    cdef const float *centre
    cdef const float *mean
    cdef double t0, t_traverse = 0, t_tables = 0, t_scan = 0
    if Q.shape[0] == 0:
        return
    if max_block < 1:
        raise ValueError(f"max_block must be >= 1, got {max_block}")
    with nogil:
        if _work_init(&w, V, h) != 0:
            failed = 1
        else:
            w.top = <Keyed *>malloc(limit * sizeof(Keyed))
            cell_start = <Py_ssize_t *>malloc((max_block + 1) * sizeof(Py_ssize_t))
            totals = <Py_ssize_t *>malloc(max_block * sizeof(Py_ssize_t))
            visits = <int *>malloc(max_block * sizeof(int))
            key_start = <int *>malloc((2 * V + 1) * sizeof(int))
            if not (w.top and cell_start and totals and visits and key_start):
                failed = 1
        first = 0
        while first < Q.shape[0] and not failed:
            # 1. traverse the block's queries; number each query's half-clusters (pairs)
            t0 = _now()
            n_cells = 0
            n_pairs = 0
            nq = 0
            while first + nq < Q.shape[0] and nq < max_block and n_pairs < max_pairs:
                x = &Q[first + nq, 0]
                cell_start[nq] = n_cells
                if _traverse(&w, x, &CsT[0, 0, 0], V, h, &offsets[0], quota, &w.cells,
                             &n_cells, &w.cells_cap, &totals[nq], &visits[nq]):
                    failed = 1
                    break
                for c in range(V):
                    w.slot0[c] = -1
                    w.slot1[c] = -1
                k = n_pairs + 2 * (n_cells - cell_start[nq])  # at most 2 new pairs a cell
                if (_grow(<void **>&pair_key, &key_cap, k, sizeof(int))
                        or _grow(<void **>&pair_query, &query_cap, k, sizeof(int))):
                    failed = 1
                    break
                for k in range(cell_start[nq], n_cells):
                    c = w.cells[k].c0
                    if w.slot0[c] < 0:
                        w.slot0[c] = <int>n_pairs
                        pair_key[n_pairs] = c
                        pair_query[n_pairs] = <int>nq
                        n_pairs += 1
                    c = w.cells[k].c1
                    if w.slot1[c] < 0:
                        w.slot1[c] = <int>n_pairs
                        pair_key[n_pairs] = V + c
                        pair_query[n_pairs] = <int>nq
                        n_pairs += 1
                    w.cells[k].t0 = w.slot0[w.cells[k].c0]
                    w.cells[k].t1 = w.slot1[w.cells[k].c1]
                nq += 1
            if failed:
                break
            cell_start[nq] = n_cells
            t_traverse += _now() - t0
            # 2. group the pairs by half-cluster; one tables pass per group
            t0 = _now()
            order = <int *>realloc(order, (n_pairs + 1) * sizeof(int))
            ptrs = <float **>realloc(ptrs, (n_pairs + 1) * sizeof(float *))
            if (order == NULL or ptrs == NULL
                    or _grow(<void **>&tables, &tables_cap, n_pairs * table_size,
                             sizeof(float))):
                failed = 1
                break
            for key in range(2 * V + 1):
                key_start[key] = 0
            for k in range(n_pairs):
                key_start[pair_key[k] + 1] += 1
            for key in range(2 * V):
                key_start[key + 1] += key_start[key]
            for k in range(n_pairs):  # counting sort; key_start[key] ends at its group's end
                order[key_start[pair_key[k]]] = <int>k
                key_start[pair_key[k]] += 1
            g = 0
            for key in range(2 * V):
                last = key_start[key]
                if last == g:
                    continue
                split = key // V
                c = key % V
                if _grow(<void **>&res, &res_cap, (last - g) * h, sizeof(float)):
                    failed = 1
                    break
                centre = &Cs[split, c, 0]
                mean = &mus[split, c, 0]
                for i in range(g, last):
                    x = &Q[first + pair_query[order[i]], split * h]
                    for t in range(h):
                        res[(i - g) * h + t] = x[t] - centre[t] - mean[t]
                    ptrs[i] = tables + order[i] * table_size
                if lopq_tables_grouped(res, last - g, h, &RTp[split, c, 0, 0], hp,
                                       &CBTm2[split, 0, 0, 0], half_m, ds, Sp,
                                       &cb_sqnorm[split, 0, 0], S, ptrs + g):
                    failed = 1
                    break
                g = last
            if failed:
                break
            t_tables += _now() - t0
            # 3. scan each query's cells with its tables, keep its `limit` nearest
            t0 = _now()
            for qi in range(nq):
                if _scan(&w, w.cells + cell_start[qi], cell_start[qi + 1] - cell_start[qi],
                         tables, table_size, half_m, S, &fine[0, 0], totals[qi]):
                    failed = 1
                    break
                found = _top_k(w.dists, totals[qi], limit, w.top)
                for kk in range(limit):
                    if kk < found:
                        out_rows[first + qi, kk] = w.rows[w.top[kk].index]
                        out_dists[first + qi, kk] = w.top[kk].dist
                    else:
                        out_rows[first + qi, kk] = -1
                        out_dists[first + qi, kk] = INFINITY
                out_visited[first + qi] = visits[qi]
            t_scan += _now() - t0
            first += nq
        _work_free(&w)
        free(pair_key)
        free(pair_query)
        free(order)
        free(key_start)
        free(cell_start)
        free(totals)
        free(visits)
        free(res)
        free(tables)
        free(ptrs)
    out_seconds[0] += t_traverse
    out_seconds[1] += t_tables
    out_seconds[2] += t_scan
    if failed:
        raise MemoryError("out of memory in the search kernel")
