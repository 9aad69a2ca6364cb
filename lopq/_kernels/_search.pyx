# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled query path of the inverted multi-index (ahead of time, releases the GIL).

One query: coarse distances per split, multi-sequence traversal of the V x V cells with a
binary heap, distance tables per visited coarse cluster (memoised per split), ADC scan of
the retrieved codes. `lopq.search` wraps it and ranks the distances.
"""

from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcpy

import numpy as np

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


cdef int _sorted_coarse(const float *x, const float *C, int V, int h, Keyed *out) noexcept nogil:
    cdef int c, t
    cdef float acc, diff
    for c in range(V):
        acc = 0
        for t in range(h):
            diff = x[t] - C[c * h + t]
            acc = acc + diff * diff
        out[c].dist = acc
        out[c].index = c
    qsort(out, V, sizeof(Keyed), _compare_keyed)
    return 0


cdef void _table(const float *x, int c, const float *C, const float *RT, const float *mu,
                 const float *booksT, int h, int half_m, int S, float *r, float *px,
                 float *table) noexcept nogil:
    # px = R[c] @ (x - C[c] - mu[c]); table[j, s] = |px_j - books[j, s]|^2. Transposed
    # inputs (RT[c] = R[c]^T, booksT (M/2, ds, S)) keep every inner loop contiguous, so
    # the compiler vectorises them without reassociating sums.
    cdef int a, b, j, s, t, ds = h // half_m
    cdef float rb, pt, diff
    cdef const float *RTc = RT + <Py_ssize_t>c * h * h
    cdef const float *row
    cdef float *tab
    for b in range(h):
        r[b] = x[b] - C[c * h + b] - mu[c * h + b]
    for a in range(h):
        px[a] = 0
    for b in range(h):
        rb = r[b]
        row = RTc + b * h
        for a in range(h):
            px[a] = px[a] + row[a] * rb
    for j in range(half_m):
        tab = table + j * S
        for s in range(S):
            tab[s] = 0
        for t in range(ds):
            pt = px[j * ds + t]
            row = booksT + (<Py_ssize_t>(j * ds + t)) * S
            for s in range(S):
                diff = pt - row[s]
                tab[s] = tab[s] + diff * diff


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


def search_one(const float[::1] x,              # IN (D,) query
               const float[:, :, ::1] Cs,       # IN (2, V, h)
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
    cdef int M = 2 * half_m
    cdef Keyed *order0 = <Keyed *>malloc(V * sizeof(Keyed))
    cdef Keyed *order1 = <Keyed *>malloc(V * sizeof(Keyed))
    cdef int *progress = <int *>malloc(V * sizeof(int))
    cdef HeapItem *heap = <HeapItem *>malloc((V + 2) * sizeof(HeapItem))
    cdef int *slot0 = <int *>malloc(V * sizeof(int))
    cdef int *slot1 = <int *>malloc(V * sizeof(int))
    cdef float *px = <float *>malloc(h * sizeof(float))
    cdef float *rbuf = <float *>malloc(h * sizeof(float))
    cdef float *tables = NULL
    cdef Py_ssize_t table_cap = 0, n_tables = 0, table_size = half_m * S
    cdef long long *rows = NULL
    cdef float *dists = NULL
    cdef Py_ssize_t rows_cap = 0, dists_cap = 0, total = 0
    cdef int heap_size = 0, visited = 0, failed = 0, c0, c1, j, c
    cdef HeapItem item
    cdef long long lo, hi, r
    cdef float acc
    cdef const float *t0
    cdef const float *t1
    cdef long long[::1] rows_view
    cdef float[::1] dists_view
    if not (order0 and order1 and progress and heap and slot0 and slot1 and px and rbuf):
        failed = 1
    with nogil:
        if not failed:
            _sorted_coarse(&x[0], &Cs[0, 0, 0], V, h, order0)
            _sorted_coarse(&x[h], &Cs[1, 0, 0], V, h, order1)
            for c in range(V):
                progress[c] = 0
                slot0[c] = -1
                slot1[c] = -1
            _heap_push(heap, &heap_size, order0[0].dist + order1[0].dist, 0, 0)
        while not failed and heap_size > 0 and total < quota:
            item = _heap_pop(heap, &heap_size)
            visited += 1
            progress[item.i] = item.j + 1
            # (i+1, j) once (i, j) and (i+1, j-1) are popped; (i, j+1) once (i-1, j+1) is.
            if item.i + 1 < V and (item.j == 0 or progress[item.i + 1] >= item.j):
                _heap_push(heap, &heap_size, order0[item.i + 1].dist + order1[item.j].dist,
                           item.i + 1, item.j)
            if item.j + 1 < V and (item.i == 0 or progress[item.i - 1] >= item.j + 2):
                _heap_push(heap, &heap_size, order0[item.i].dist + order1[item.j + 1].dist,
                           item.i, item.j + 1)
            c0 = order0[item.i].index
            c1 = order1[item.j].index
            lo = offsets[<Py_ssize_t>c0 * V + c1]
            hi = offsets[<Py_ssize_t>c0 * V + c1 + 1]
            if hi <= lo:
                continue
            if slot0[c0] < 0 or slot1[c1] < 0:
                if _grow(<void **>&tables, &table_cap, (n_tables + 2) * table_size,
                         sizeof(float)):
                    failed = 1
                    break
            if slot0[c0] < 0:
                _table(&x[0], c0, &Cs[0, 0, 0], &RTs[0, 0, 0, 0], &mus[0, 0, 0],
                       &booksT[0, 0, 0, 0], h, half_m, S, rbuf, px,
                       tables + n_tables * table_size)
                slot0[c0] = <int>n_tables
                n_tables += 1
            if slot1[c1] < 0:
                _table(&x[h], c1, &Cs[1, 0, 0], &RTs[1, 0, 0, 0], &mus[1, 0, 0],
                       &booksT[1, 0, 0, 0], h, half_m, S, rbuf, px,
                       tables + n_tables * table_size)
                slot1[c1] = <int>n_tables
                n_tables += 1
            if _grow(<void **>&rows, &rows_cap, total + (hi - lo), sizeof(long long)):
                failed = 1
                break
            if _grow(<void **>&dists, &dists_cap, total + (hi - lo), sizeof(float)):
                failed = 1
                break
            t0 = tables + slot0[c0] * table_size
            t1 = tables + slot1[c1] * table_size
            for r in range(lo, hi):
                acc = 0
                for j in range(half_m):
                    acc = acc + t0[j * S + fine[r, j]] + t1[j * S + fine[r, half_m + j]]
                rows[total] = r
                dists[total] = acc
                total += 1
    try:
        if failed:
            raise MemoryError("out of memory in the search kernel")
        out_rows = np.empty(total, dtype=np.int64)
        out_dists = np.empty(total, dtype=np.float32)
        if total:
            rows_view = out_rows
            dists_view = out_dists
            memcpy(&rows_view[0], rows, total * sizeof(long long))
            memcpy(&dists_view[0], dists, total * sizeof(float))
        return out_rows, out_dists, visited
    finally:
        free(order0)
        free(order1)
        free(progress)
        free(heap)
        free(slot0)
        free(slot1)
        free(px)
        free(rbuf)
        free(tables)
        free(rows)
        free(dists)
