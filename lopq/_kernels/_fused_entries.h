/* The fused kernels' entry points, listed once (see _fused_api.h): each row gives the
 * return type, the name, the parameters, the arguments, and `return` or nothing. */
#ifndef LOPQ_FUSED_ENTRIES_H
#define LOPQ_FUSED_ENTRIES_H
#include <stddef.h>

/* Floats per vector register: 8 on every path (AVX2 registers, or two SSE ones). */
#define LOPQ_W 8

#if defined(__x86_64__) || defined(__i386__)
#define LOPQ_X86 1
#endif

#define LOPQ_ENTRIES(ENTRY)                                                                \
    ENTRY(int, lopq_assign_fused,                                                          \
          (const float *X, ptrdiff_t n, ptrdiff_t d, ptrdiff_t row_stride,                 \
           const float *CTm2, ptrdiff_t kp, const float *c_sqnorm, const float *C,         \
           int *labels, ptrdiff_t label_stride, float *sqdist),                            \
          (X, n, d, row_stride, CTm2, kp, c_sqnorm, C, labels, label_stride, sqdist),      \
          return)                                                                          \
    ENTRY(int, lopq_encode_grouped,                                                        \
          (const float *X, ptrdiff_t h, ptrdiff_t row_stride, const long long *order,      \
           const long long *offsets, ptrdiff_t V, const float *shift, const float *RT,     \
           ptrdiff_t hp, const float *CBTm2, ptrdiff_t m, ptrdiff_t ds, ptrdiff_t Sp,      \
           const float *cb_sqnorm, int *codes),                                            \
          (X, h, row_stride, order, offsets, V, shift, RT, hp, CBTm2, m, ds, Sp,           \
           cb_sqnorm, codes),                                                              \
          return)                                                                          \
    ENTRY(int, lopq_argmin_scores,                                                         \
          (const float *G, ptrdiff_t b, ptrdiff_t k, const float *c_sqnorm,                \
           const float *X, ptrdiff_t d, const float *C, int *labels, float *sqdist),       \
          (G, b, k, c_sqnorm, X, d, C, labels, sqdist), return)                            \
    ENTRY(void, lopq_query_table,                                                          \
          (const float *x, const float *centroid, const float *mu, const float *RT,        \
           ptrdiff_t h, const float *booksT, int half_m, ptrdiff_t S, float *r, float *px, \
           float *table),                                                                  \
          (x, centroid, mu, RT, h, booksT, half_m, S, r, px, table), )                    \
    ENTRY(int, lopq_project_rows,                                                          \
          (const float *res, ptrdiff_t n, ptrdiff_t h, const float *RT, ptrdiff_t hp,      \
           float *const *out),                                                             \
          (res, n, h, RT, hp, out), return)                                                \
    ENTRY(int, lopq_tables_rows,                                                           \
          (const float *P, ptrdiff_t n, ptrdiff_t hp, const float *CBTm2, ptrdiff_t half_m, \
           ptrdiff_t ds, ptrdiff_t Sp, const float *cb_sqnorm, ptrdiff_t S, float *tables), \
          (P, n, hp, CBTm2, half_m, ds, Sp, cb_sqnorm, S, tables), return)                \
    ENTRY(float, lopq_residual_sqdist,                                                     \
          (const float *p, const float *const *rows, ptrdiff_t half_m, ptrdiff_t ds),      \
          (p, rows, half_m, ds), return)

#define LOPQ_CAT2(a, b) a##_##b
#define LOPQ_CAT(a, b) LOPQ_CAT2(a, b)

#endif
