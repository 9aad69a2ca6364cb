"""What an executor says about itself: one line on stderr (the executor's log) per Python
worker, naming the kernel backend its tasks run and where lopq came from.

Registered with `lopq._kernels.call_on_first_use` by ``lopq/__init__.py`` whenever
PySpark is loaded (every executor's Python worker), so the kernels stay free of Spark.
"""

import os
import sys


def announce_backend(name):
    """The hook: in a Spark task, write the line and return True; elsewhere (the driver,
    a user's own process) return False and stay silent."""
    from pyspark import TaskContext
    if TaskContext.get() is None:
        return False
    from .. import _kernels
    line = f"lopq executor: kernel backend {name}"
    if name == "cython" and _kernels.isa():
        line += f" (C loops {_kernels.isa()})"
    line += f", lopq from {os.path.dirname(os.path.dirname(os.path.dirname(__file__)))}"
    if name == "numba" and not os.environ.get("LOPQ_KERNELS"):
        line += ("; for the compiled cython backend install lopq on the nodes or ship a "
                 "packed environment with --archives (README: Deployment), not --py-files")
    sys.stderr.write(line + "\n")  # one write: workers share the executor's stderr
    sys.stderr.flush()
    return True
