/* Fused kernels for small dimensions: nearest centroid (subquantizers, d <= 32), the
 * whole per-split encoding (residual, rotation, all subquantizers) without temporaries,
 * and a query's distance tables for search (`lopq_query_table`).
 *
 * One micro-kernel serves every product here: `lopq_block_scores` computes
 * init[c] + sum_t x_r[t] * CT[t, c] for LOPQ_ROWS rows at once, LOPQ_VW columns per vector
 * (GCC/Clang vector extensions: 8-wide AVX in _fused_avx2.c), so each column load
 * of CT feeds LOPQ_ROWS FMAs. Nearest-centroid search stores the scores |c|^2 - 2 x.c of a
 * row block in a small buffer while keeping a vector running minimum, then takes the
 * first column equal to that minimum: the lowest index wins exact ties, as np.argmin.
 * Measured here (Zen 4, 100k rows, 8 subquantizers of 256 x 8): 48 ms, against 78 ms for
 * a one-row loop with a per-lane index blend.
 *
 * Callers pass CT already multiplied by -2 (exact in floating point) and the column
 * count padded to a multiple of LOPQ_VW (padding columns: CT 0, norm NaN:
 * a NaN score never becomes the minimum nor equals it, so padding is never chosen, even
 * for a row whose real scores are all NaN; that row gets column 0, as np.argmin gives).
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "_fused_entries.h" /* LOPQ_W */
#if defined(__AVX__)
#include <immintrin.h>
#endif

/* LOPQ_VW floats per vector of this copy: 8 with AVX (one ymm register), else 4 (one
 * SSE/NEON register: 8-wide generic vectors there spill the register tiles, measured 25x
 * slower). Callers pad to LOPQ_W = 8, a multiple of both. */
#if defined(__AVX__)
#define LOPQ_VW 8
#else
#define LOPQ_VW 4
#endif

/* LOPQ_ROWS rows share each load of LOPQ_VW floats. */
#define LOPQ_ROWS 4
#define LOPQ_COLS 2
#define LOPQ_PREFETCH_ROWS 16
typedef float lopq_vf __attribute__((vector_size(LOPQ_VW * 4)));
typedef int lopq_vi __attribute__((vector_size(LOPQ_VW * 4)));

static inline lopq_vf lopq_load(const float *p) {
    lopq_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void lopq_store(float *p, lopq_vf v) { memcpy(p, &v, sizeof v); }

/* Lane-wise minimum; a NaN in `a` leaves `m` unchanged. */
static inline lopq_vf lopq_min(lopq_vf a, lopq_vf m) {
#if defined(__AVX__)
    return (lopq_vf)_mm256_min_ps((__m256)a, (__m256)m);
#else
    const lopq_vi less = a < m;
    return (lopq_vf)(((lopq_vi)a & less) | ((lopq_vi)m & ~less));
#endif
}

static inline float lopq_hmin(lopq_vf v) {
#if defined(__AVX__)
    __m128 m = _mm_min_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
#else
    float best = v[0];
    for (int l = 1; l < LOPQ_VW; l++) best = v[l] < best ? v[l] : best;
    return best;
#endif
}

/* First column of scores[0:k] equal to `value` (k a multiple of LOPQ_VW); 0 if none
 * (only when every score is NaN). */
static inline int lopq_first_equal(const float *scores, ptrdiff_t k, float value) {
    lopq_vf target;
    for (int l = 0; l < LOPQ_VW; l++) target[l] = value;
    for (ptrdiff_t c = 0; c < k; c += LOPQ_VW) {
        const lopq_vi eq = lopq_load(scores + c) == target;
#if defined(__AVX2__)
        const int mask = _mm256_movemask_ps((__m256)eq);
        if (mask) return (int)c + __builtin_ctz(mask);
#else
        for (int l = 0; l < LOPQ_VW; l++)
            if (eq[l]) return (int)c + l;
#endif
    }
    return 0;
}

/* out[r * k + c] = init[c] + sum_{t < d} rows[r][t] * CT[t * k + c] for r < LOPQ_ROWS and
 * c < k (k a multiple of LOPQ_VW; init NULL means 0). When minima is not NULL, also
 * minima[r] = min over c of out[r * k + c]. */
static inline __attribute__((always_inline)) void lopq_block_scores(
    const float *const *rows, const ptrdiff_t d,  /* IN LOPQ_ROWS row pointers, length d */
    const float *CT, ptrdiff_t k,                 /* IN (d, k) columns                  */
    const float *init,                            /* IN (k,) or NULL                    */
    float *out,                                   /* OUT (LOPQ_ROWS, k)                 */
    float *minima)                                /* OUT (LOPQ_ROWS,) or NULL           */
{
    lopq_vf run_min[LOPQ_ROWS];
    for (int r = 0; r < LOPQ_ROWS; r++)
        for (int l = 0; l < LOPQ_VW; l++) run_min[r][l] = INFINITY;
    ptrdiff_t cb = 0;
    /* LOPQ_COLS column vectors per step: each broadcast row value feeds LOPQ_COLS FMAs,
     * and LOPQ_COLS x LOPQ_ROWS independent accumulators hide the FMA latency. */
    for (; cb + LOPQ_COLS * LOPQ_VW <= k; cb += LOPQ_COLS * LOPQ_VW) {
        lopq_vf acc[LOPQ_COLS][LOPQ_ROWS];
        for (int u = 0; u < LOPQ_COLS; u++) {
            const lopq_vf start = init ? lopq_load(init + cb + u * LOPQ_VW) : (lopq_vf){0};
            for (int r = 0; r < LOPQ_ROWS; r++) acc[u][r] = start;
        }
        for (ptrdiff_t t = 0; t < d; t++) {
            lopq_vf column[LOPQ_COLS];
            for (int u = 0; u < LOPQ_COLS; u++) column[u] = lopq_load(CT + t * k + cb + u * LOPQ_VW);
            for (int r = 0; r < LOPQ_ROWS; r++) {
                const float xt = rows[r][t];
                for (int u = 0; u < LOPQ_COLS; u++) acc[u][r] += xt * column[u];
            }
        }
        for (int r = 0; r < LOPQ_ROWS; r++)
            for (int u = 0; u < LOPQ_COLS; u++) {
                lopq_store(out + r * k + cb + u * LOPQ_VW, acc[u][r]);
                if (minima) run_min[r] = lopq_min(acc[u][r], run_min[r]);
            }
    }
    for (; cb < k; cb += LOPQ_VW) {
        lopq_vf acc[LOPQ_ROWS];
        const lopq_vf start = init ? lopq_load(init + cb) : (lopq_vf){0};
        for (int r = 0; r < LOPQ_ROWS; r++) acc[r] = start;
        for (ptrdiff_t t = 0; t < d; t++) {
            const lopq_vf column = lopq_load(CT + t * k + cb);
            for (int r = 0; r < LOPQ_ROWS; r++) acc[r] += rows[r][t] * column;
        }
        for (int r = 0; r < LOPQ_ROWS; r++) {
            lopq_store(out + r * k + cb, acc[r]);
            if (minima) run_min[r] = lopq_min(acc[r], run_min[r]);
        }
    }
    if (minima)
        for (int r = 0; r < LOPQ_ROWS; r++) minima[r] = lopq_hmin(run_min[r]);
}

/* Nearest column for each of LOPQ_ROWS rows: labels[r] (and the scores left in scratch). */
static inline __attribute__((always_inline)) void lopq_block_nearest(
    const float *const *rows, const ptrdiff_t d, const float *CT, ptrdiff_t k,
    const float *c_sqnorm, float *scratch, int *labels)
{
    float minima[LOPQ_ROWS];
    lopq_block_scores(rows, d, CT, k, c_sqnorm, scratch, minima);
    for (int r = 0; r < LOPQ_ROWS; r++)
        labels[r] = lopq_first_equal(scratch + r * k, k, minima[r]);
}

/* Dispatch on d so the compiler unrolls the dimension loop for the common subvector
 * sizes (measured 2.6x faster at d = 8 than the generic loop). */
static inline void lopq_block_nearest_any(const float *const *rows, ptrdiff_t d,
                                          const float *CT, ptrdiff_t k, const float *c_sqnorm,
                                          float *scratch, int *labels)
{
    switch (d) {
    case 2: lopq_block_nearest(rows, 2, CT, k, c_sqnorm, scratch, labels); break;
    case 4: lopq_block_nearest(rows, 4, CT, k, c_sqnorm, scratch, labels); break;
    case 8: lopq_block_nearest(rows, 8, CT, k, c_sqnorm, scratch, labels); break;
    case 16: lopq_block_nearest(rows, 16, CT, k, c_sqnorm, scratch, labels); break;
    default: lopq_block_nearest(rows, d, CT, k, c_sqnorm, scratch, labels);
    }
}

/* Nearest centroid of every row. CTm2 is -2 C^T padded to kp columns (multiple of
 * LOPQ_VW); C (k, d) unpadded gives the exact squared distance when sqdist is not NULL.
 * Returns 0, or -1 when scratch memory could not be allocated. */
static inline int lopq_assign_fused(
    const float *X, ptrdiff_t n, ptrdiff_t d, ptrdiff_t row_stride, /* IN rows          */
    const float *CTm2, ptrdiff_t kp,              /* IN (d, kp) -2 * transposed centroids */
    const float *c_sqnorm,                        /* IN (kp,) squared norms, pad NaN    */
    const float *C,                               /* IN (k, d) centroids (for sqdist)    */
    int *labels, ptrdiff_t label_stride,          /* OUT nearest index per row           */
    float *sqdist)                                /* OUT squared distance or NULL        */
{
    float *scratch = malloc(sizeof(float) * LOPQ_ROWS * kp);
    if (!scratch) return -1;
    for (ptrdiff_t i = 0; i < n; i += LOPQ_ROWS) {
        const float *rows[LOPQ_ROWS];
        int best[LOPQ_ROWS];
        /* A short last block repeats its last row; only real rows are written. */
        for (int r = 0; r < LOPQ_ROWS; r++)
            rows[r] = X + (i + r < n ? i + r : n - 1) * row_stride;
        lopq_block_nearest_any(rows, d, CTm2, kp, c_sqnorm, scratch, best);
        for (int r = 0; r < LOPQ_ROWS && i + r < n; r++) {
            labels[(i + r) * label_stride] = best[r];
            if (sqdist) {
                const float *c = C + (ptrdiff_t)best[r] * d;
                float s = 0.0f;
                for (ptrdiff_t t = 0; t < d; t++) {
                    const float diff = rows[r][t] - c[t];
                    s += diff * diff;
                }
                sqdist[i + r] = s;
            }
        }
    }
    free(scratch);
    return 0;
}

/* Fine codes of one coarse split, rows taken cluster by cluster so that each cluster's
 * rotation stays in cache: for row i of cluster v,
 *     p = (X[i] - shift[v]) @ RT[v]          (RT[v] = R[v]^T, padded to hp columns)
 *     codes[i, j] = argmin_s |p_j - codebook[j, s]|^2   for the m subvectors p_j of ds dims.
 * Neither the residuals nor the projections are materialised beyond one row block.
 * Returns 0, or -1 when scratch memory could not be allocated. */
static inline int lopq_encode_grouped(
    const float *X, ptrdiff_t h, ptrdiff_t row_stride, /* IN rows of h dims               */
    const long long *order, const long long *offsets, ptrdiff_t V, /* IN rows by cluster  */
    const float *shift,                          /* IN (V, h) centroid + mean residual    */
    const float *RT, ptrdiff_t hp,               /* IN (V, h, hp) transposed rotations    */
    const float *CBTm2, ptrdiff_t m, ptrdiff_t ds, ptrdiff_t Sp, /* IN (m, ds, Sp) -2 C^T */
    const float *cb_sqnorm,                      /* IN (m, Sp) squared norms, pad NaN    */
    int *codes)                                  /* OUT (n, m) at each row's own index    */
{
    float *residual = malloc(sizeof(float) * LOPQ_ROWS * (h + hp + Sp));
    if (!residual) return -1;
    float *projected = residual + LOPQ_ROWS * h, *scratch = projected + LOPQ_ROWS * hp;
    for (ptrdiff_t v = 0; v < V; v++) {
        const ptrdiff_t lo = offsets[v], hi = offsets[v + 1];
        for (ptrdiff_t i = lo; i < hi; i += LOPQ_ROWS) {
            const float *subs[LOPQ_ROWS];
            long long index[LOPQ_ROWS];
            /* Rows come in cluster order, scattered in memory: fetch a few blocks ahead. */
            for (ptrdiff_t ahead = i + LOPQ_PREFETCH_ROWS;
                 ahead < i + LOPQ_PREFETCH_ROWS + LOPQ_ROWS && ahead < hi; ahead++) {
                for (ptrdiff_t line = 0; line < h; line += 16)
                    __builtin_prefetch(X + order[ahead] * row_stride + line);
                __builtin_prefetch(codes + order[ahead] * m, 1);
            }
            for (int r = 0; r < LOPQ_ROWS; r++) {
                index[r] = order[i + r < hi ? i + r : hi - 1];
                const float *x = X + index[r] * row_stride;
                float *res = residual + r * h;
                for (ptrdiff_t t = 0; t < h; t++) res[t] = x[t] - shift[v * h + t];
                subs[r] = res;
            }
            lopq_block_scores(subs, h, RT + v * h * hp, hp, NULL, projected, NULL);
            for (ptrdiff_t j = 0; j < m; j++) {
                int best[LOPQ_ROWS];
                for (int r = 0; r < LOPQ_ROWS; r++) subs[r] = projected + r * hp + j * ds;
                lopq_block_nearest_any(subs, ds, CBTm2 + j * ds * Sp, Sp, cb_sqnorm + j * Sp,
                                       scratch, best);
                for (int r = 0; r < LOPQ_ROWS && i + r < hi; r++)
                    codes[index[r] * m + j] = best[r];
            }
        }
    }
    free(residual);
    return 0;
}

/* Argmin over rows of a precomputed GEMM block G = X @ C^T: scores |c|^2 - 2 G[i, c]
 * with a vector running minimum, then the exact squared distance to the chosen
 * centroid. (Used for large d, where sgemm computes G faster than the loops above.)
 * Returns 0, or -1 when scratch memory could not be allocated. */
static inline int lopq_argmin_scores(
    const float *G, ptrdiff_t b, ptrdiff_t k,      /* IN (b, k) block             */
    const float *c_sqnorm,                         /* IN (k,)                     */
    const float *X, ptrdiff_t d,                   /* IN (b, d) the block's rows  */
    const float *C,                                /* IN (k, d) centroids         */
    int *labels, float *sqdist)                    /* OUT (b,), (b,)              */
{
    const ptrdiff_t kv = k - k % LOPQ_VW;
    float *scores = malloc(sizeof(float) * (kv + LOPQ_VW));
    if (!scores) return -1;
    for (ptrdiff_t i = 0; i < b; i++) {
        const float *g = G + i * k;
        lopq_vf run_min;
        for (int l = 0; l < LOPQ_VW; l++) run_min[l] = INFINITY;
        for (ptrdiff_t c = 0; c < kv; c += LOPQ_VW) {
            const lopq_vf s = lopq_load(c_sqnorm + c) - 2.0f * lopq_load(g + c);
            lopq_store(scores + c, s);
            run_min = lopq_min(s, run_min);
        }
        float best = lopq_hmin(run_min);
        int best_index = best < INFINITY ? lopq_first_equal(scores, kv, best) : 0;
        for (ptrdiff_t c = kv; c < k; c++) {  /* columns past the last full vector */
            const float s = c_sqnorm[c] - 2.0f * g[c];
            if (s < best) { best = s; best_index = (int)c; }
        }
        labels[i] = best_index;
        const float *x = X + i * d, *c = C + (ptrdiff_t)best_index * d;
        float s = 0.0f;
        for (ptrdiff_t t = 0; t < d; t++) {
            const float diff = x[t] - c[t];
            s += diff * diff;
        }
        sqdist[i] = s;
    }
    free(scores);
    return 0;
}

/* Accumulators per step of the query-table loops: independent FMA chains that hide the
 * FMA latency while each stays in one register. */
#define LOPQ_TABLE_BLOCKS 4

/* out[u * LOPQ_VW + l] (u < nb) = sum over t < d, in t order, of
 *   coef[t] * src[t * stride + u * LOPQ_VW + l]              (sqdiff 0: a matrix-vector product)
 *   (coef[t] - src[t * stride + u * LOPQ_VW + l])^2          (sqdiff 1: squared distances)
 * sqdiff is a constant at every call, so the inlined loop carries no branch. */
static inline __attribute__((always_inline)) void lopq_column_block(
    const float *src, ptrdiff_t stride, const float *coef, ptrdiff_t d, int nb, int sqdiff,
    float *out)
{
    lopq_vf acc[LOPQ_TABLE_BLOCKS];
    for (int u = 0; u < LOPQ_TABLE_BLOCKS; u++) acc[u] = (lopq_vf){0};
    for (ptrdiff_t t = 0; t < d; t++) {
        const float ct = coef[t];
        for (int u = 0; u < nb; u++) {
            const lopq_vf v = lopq_load(src + t * stride + u * LOPQ_VW);
            if (sqdiff) {
                const lopq_vf diff = ct - v;
                acc[u] += diff * diff;
            } else {
                acc[u] += v * ct;
            }
        }
    }
    for (int u = 0; u < nb; u++) lopq_store(out + u * LOPQ_VW, acc[u]);
}

/* LOPQ distance table of a query in the frame of coarse cluster c of one split:
 * px = R[c] @ (x - C[c] - mu[c]) and table[j * S + s] = sum_t (px[j*ds + t] -
 * books[j, s, t])^2, each sum taken in t order as the plain loops do. Register blocks of
 * LOPQ_TABLE_BLOCKS x LOPQ_VW outputs accumulate over the whole sum before one store
 * (the plain loops reloaded and stored px / table for every term). r, px: (h,) scratch. */
static inline void lopq_query_table(
    const float *x, const float *centroid, const float *mu,  /* IN (h,) each           */
    const float *RT, ptrdiff_t h,            /* IN (h, h) R[c]^T: RT[b * h + a] = R[a, b] */
    const float *booksT, int half_m, ptrdiff_t S,  /* IN (half_m, ds, S) codebooks^T   */
    float *r, float *px, float *table)       /* scratch (h,), (h,); OUT (half_m, S)     */
{
    const ptrdiff_t ds = h / half_m, step = LOPQ_TABLE_BLOCKS * LOPQ_VW;
    ptrdiff_t a, s, full;
    for (ptrdiff_t b = 0; b < h; b++) r[b] = x[b] - centroid[b] - mu[b];
    full = h - h % LOPQ_VW;
    for (a = 0; a + step <= full; a += step)
        lopq_column_block(RT + a, h, r, h, LOPQ_TABLE_BLOCKS, 0, px + a);
    for (; a < full; a += LOPQ_VW) lopq_column_block(RT + a, h, r, h, 1, 0, px + a);
    for (; a < h; a++) {
        float acc = 0;
        for (ptrdiff_t b = 0; b < h; b++) acc += RT[b * h + a] * r[b];
        px[a] = acc;
    }
    full = S - S % LOPQ_VW;
    for (int j = 0; j < half_m; j++) {
        const float *books = booksT + (ptrdiff_t)j * ds * S, *p = px + (ptrdiff_t)j * ds;
        float *tab = table + (ptrdiff_t)j * S;
        for (s = 0; s + step <= full; s += step)
            lopq_column_block(books + s, S, p, ds, LOPQ_TABLE_BLOCKS, 1, tab + s);
        for (; s < full; s += LOPQ_VW) lopq_column_block(books + s, S, p, ds, 1, 1, tab + s);
        for (; s < S; s++) {
            float acc = 0;
            for (ptrdiff_t t = 0; t < ds; t++) {
                const float diff = p[t] - books[t * S + s];
                acc += diff * diff;
            }
            tab[s] = acc;
        }
    }
}

/* Rotated residuals of n rows in the frame of one coarse cluster, one GEMM-shaped pass
 * per LOPQ_ROWS rows, so that R[c] is read once per row block, not once per row:
 *     out[i][0:hp] = res[i] @ RT         (RT = R[c]^T, columns padded to hp)
 * Returns 0, or -1 when scratch memory could not be allocated. */
static inline int lopq_project_rows(
    const float *res, ptrdiff_t n, ptrdiff_t h,   /* IN (n, h) residuals                 */
    const float *RT, ptrdiff_t hp,                /* IN (h, hp) R[c]^T, padded columns   */
    float *const *out)                            /* OUT n pointers to (hp,) rows        */
{
    float *projected = malloc(sizeof(float) * LOPQ_ROWS * hp);
    if (!projected) return -1;
    for (ptrdiff_t i = 0; i < n; i += LOPQ_ROWS) {
        const float *rows[LOPQ_ROWS];
        /* A short last block repeats its last row; only real rows are written. */
        for (int r = 0; r < LOPQ_ROWS; r++) rows[r] = res + (i + r < n ? i + r : n - 1) * h;
        lopq_block_scores(rows, h, RT, hp, NULL, projected, NULL);
        for (int r = 0; r < LOPQ_ROWS && i + r < n; r++)
            memcpy(out[i + r], projected + r * hp, sizeof(float) * hp);
    }
    free(projected);
    return 0;
}

/* Distance tables of n rotated residuals P (n, hp) of one split:
 *     tables[i, j, s] = max(0, |b_js|^2 - 2 p_j . b_js + |p_j|^2)     (i < n, j < half_m)
 * with CBTm2 = -2 books^T and cb_sqnorm their squared norms (`score_columns`), the
 * codebooks read once per LOPQ_ROWS rows. The expanded square differs from the one-query
 * loop's sum of squared differences (lopq_query_table) by float rounding only.
 * Returns 0, or -1 when scratch memory could not be allocated. */
static inline int lopq_tables_rows(
    const float *P, ptrdiff_t n, ptrdiff_t hp,    /* IN (n, hp) rotated residuals        */
    const float *CBTm2, ptrdiff_t half_m, ptrdiff_t ds, ptrdiff_t Sp, /* IN (half_m, ds, Sp) */
    const float *cb_sqnorm,                       /* IN (half_m, Sp)                     */
    ptrdiff_t S, float *tables)                   /* OUT (n, half_m, S)                  */
{
    float *scratch = malloc(sizeof(float) * LOPQ_ROWS * Sp);
    if (!scratch) return -1;
    for (ptrdiff_t i = 0; i < n; i += LOPQ_ROWS) {
        for (ptrdiff_t j = 0; j < half_m; j++) {
            const float *subs[LOPQ_ROWS];
            for (int r = 0; r < LOPQ_ROWS; r++)
                subs[r] = P + (i + r < n ? i + r : n - 1) * hp + j * ds;
            lopq_block_scores(subs, ds, CBTm2 + j * ds * Sp, Sp, cb_sqnorm + j * Sp, scratch,
                              NULL);
            for (int r = 0; r < LOPQ_ROWS && i + r < n; r++) {
                float norm = 0.0f;
                for (ptrdiff_t t = 0; t < ds; t++) norm += subs[r][t] * subs[r][t];
                const float *src = scratch + r * Sp;
                float *tab = tables + ((i + r) * half_m + j) * S;
                for (ptrdiff_t s = 0; s < S; s++) {
                    const float v = src[s] + norm;
                    tab[s] = v > 0.0f ? v : 0.0f;
                }
            }
        }
    }
    free(scratch);
    return 0;
}

/* sum_j |p[j ds:(j + 1) ds] - rows[j]|^2: one split's distance from a rotated residual p
 * (half_m * ds floats) to a decoded code (its half_m codewords, ds floats each), the
 * sum its ADC table entries would give. */
static inline float lopq_residual_sqdist(const float *p, const float *const *rows,
                                         ptrdiff_t half_m, ptrdiff_t ds) {
    lopq_vf acc = {0};
    float tail = 0.0f;
    for (ptrdiff_t j = 0; j < half_m; j++) {
        const float *pj = p + j * ds, *b = rows[j];
        ptrdiff_t t = 0;
        for (; t + LOPQ_VW <= ds; t += LOPQ_VW) {
            const lopq_vf d = lopq_load(pj + t) - lopq_load(b + t);
            acc += d * d;
        }
        for (; t < ds; t++) {
            const float d = pj[t] - b[t];
            tail += d * d;
        }
    }
    for (int l = 0; l < LOPQ_VW; l++) tail += acc[l];
    return tail;
}
