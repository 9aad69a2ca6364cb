"""``njit`` that never lets numba's disk cache break an import.

Inside a ``--py-files`` zip numba may find no place to cache (older numba refuses
outright); the kernels then compile per process instead of failing.
"""

import numba


def njit(**options):
    def decorate(func):
        try:
            return numba.njit(**options)(func)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(**dict(options, cache=False))(func)
    return decorate
