"""Locally Optimized Product Quantization (Kalantidis & Avrithis, CVPR 2014).

Train with `LOPQModel.fit` (or the Spark jobs in ``spark/``), encode with
`LOPQModel.encode`, search with `LOPQSearcher`.
"""

from .model import LOPQCode, LOPQModel
from .search import LOPQSearcher

__version__ = "0.1.0"
__all__ = ["LOPQModel", "LOPQCode", "LOPQSearcher", "__version__"]
