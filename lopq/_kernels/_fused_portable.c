/* The fused kernels for any CPU of the target (on x86-64: SSE2, the baseline). */
#define LOPQ_ISA portable
#include "_fused_variant.h"
