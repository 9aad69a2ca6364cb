/* The fused kernels as the Cython modules call them: each entry point runs the AVX2/FMA
 * copy (_fused_avx2.c) when the CPU has both and lopq_select_isa allowed it, else the
 * portable copy (_fused_portable.c). One wheel then runs on every x86-64, at full speed
 * where it can. */
#ifndef LOPQ_FUSED_API_H
#define LOPQ_FUSED_API_H
#include "_fused_entries.h"

#define LOPQ_DECLARE(ret, name, params, args, RETURN)                                      \
    ret LOPQ_CAT(name, portable) params;                                                   \
    ret LOPQ_CAT(name, avx2) params;
LOPQ_ENTRIES(LOPQ_DECLARE)

/* 1 while the AVX2 copy runs. */
static int lopq_use_avx2 = 0;

/* Use the AVX2 copy when `allow` and the CPU supports AVX2 and FMA; returns the choice. */
static int lopq_select_isa(int allow) {
#ifdef LOPQ_X86
    __builtin_cpu_init();
    lopq_use_avx2 = allow && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    (void)allow;
    lopq_use_avx2 = 0;
#endif
    return lopq_use_avx2;
}

#define LOPQ_DISPATCH(ret, name, params, args, RETURN)                                     \
    static inline ret name params {                                                        \
        if (lopq_use_avx2) {                                                             \
            RETURN LOPQ_CAT(name, avx2) args;                                              \
        } else {                                                                           \
            RETURN LOPQ_CAT(name, portable) args;                                          \
        }                                                                                  \
    }
LOPQ_ENTRIES(LOPQ_DISPATCH)

#endif
