"""Locally Optimized Product Quantization (Kalantidis & Avrithis, CVPR 2014).

Train with `LOPQModel.fit` (or the Spark jobs in ``spark/``), encode with
`LOPQModel.encode`, search with `LOPQSearcher`.
"""

from . import model, search, utils
from .model import LOPQCode, LOPQModel
from .search import LOPQSearcher, multisequence

__version__ = "0.1.0"
__all__ = ["LOPQModel", "LOPQCode", "LOPQSearcher", "multisequence", "model", "search",
           "utils", "__version__"]
