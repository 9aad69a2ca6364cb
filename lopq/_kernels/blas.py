"""Stacks of small matrix products and decompositions on one BLAS thread.

numpy's stacked ``eigh``/``svd`` call LAPACK once per matrix; on a 64 x 64 matrix a
multi-threaded BLAS spends more time waking and synchronising its threads than
computing, and much more when other processes share the cores (measured on 2 cores
beside two busy processes: a stack of 16 SVDs of 64 x 64 took 40 ms with OpenBLAS's 2
threads, 8-17 ms with one; the rotation refinement of an Oxford5k fit went from 10.5 s
of SVD to a fraction of it).
"""

import contextlib

#: Matrices up to this side are decomposed on one BLAS thread.
SMALL_MATRIX = 256


def small_matrices(side):
    """A context in which LAPACK calls on ``side x side`` matrices run single-threaded
    (no-op for larger matrices, or without threadpoolctl)."""
    if side > SMALL_MATRIX:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # e.g. lopq shipped to executors as a bare zip
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


#: GEMMs of fewer multiply-adds than this gain nothing from more BLAS threads.
SMALL_GEMM = 1 << 22


def small_gemms(multiply_adds, calls):
    """A context in which ``calls`` GEMMs of about ``multiply_adds`` each run on one BLAS
    thread when they are small and many (setting the limit costs about a millisecond)."""
    if multiply_adds > SMALL_GEMM or calls < 4:
        return contextlib.nullcontext()
    return small_matrices(0)
