/* One compiled copy of the fused kernels: the including file defines LOPQ_ISA (the
 * suffix of its entry points) and, for AVX2, sets the target before this include. */
#include "_fused.h"

#define LOPQ_DEFINE(ret, name, params, args, RETURN)                                       \
    __attribute__((visibility("hidden"))) ret LOPQ_CAT(name, LOPQ_ISA) params {            \
        RETURN name args;                                                                  \
    }
LOPQ_ENTRIES(LOPQ_DEFINE)
