"""Locally Optimized Product Quantization (Kalantidis & Avrithis, CVPR 2014).

Train with `LOPQModel.fit` (or the Spark jobs in ``spark/``), encode with
`LOPQModel.encode`, search with `LOPQSearcher`.
"""

import sys as _sys

from . import _kernels, model, search, utils
from .model import LOPQCode, LOPQModel
from .search import LOPQSearcher, multisequence

if "pyspark" in _sys.modules:  # every Spark executor's Python worker: say which kernels run
    from .spark.executor import announce_backend as _announce_backend
    _kernels.call_on_first_use(_announce_backend)

__version__ = "0.1.0"
__all__ = ["LOPQModel", "LOPQCode", "LOPQSearcher", "multisequence", "model", "search",
           "utils", "__version__"]
