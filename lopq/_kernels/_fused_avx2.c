/* The fused kernels for x86-64 with AVX2 and FMA (8-wide registers), chosen at run time
 * by _fused_api.h. Elsewhere this is a second copy of the portable code, so that every
 * platform links the same entry points. */
#include "_fused_entries.h"
#ifdef LOPQ_X86
#pragma GCC target("avx2,fma")
#endif
#define LOPQ_ISA avx2
#include "_fused_variant.h"
