"""Distributed LOPQ on Spark: data as cached row blocks, compiled kernels per block.

Importable by executors: install lopq on the nodes (recommended) or ship it with
``spark-submit --py-files lopq.zip``.
"""

try:
    import pyspark  # noqa: F401
except ImportError:
    raise ImportError("lopq.spark needs PySpark: pip install 'lopq[spark]' (or put your "
                      "cluster's own pyspark on PYTHONPATH)") from None

from .codes import code_lines  # noqa: E402
from .data import DataError, load_blocks
from .kmeans import kmeans_column_groups
from .training import (
    apply_pca,
    pca_statistics,
    prepare_pca,
    train_coarse_on_blocks,
    train_model,
    train_rotations_on_blocks,
    train_subquantizers_on_blocks,
)

__all__ = ["DataError", "load_blocks", "kmeans_column_groups",
           "train_model", "train_coarse_on_blocks", "train_rotations_on_blocks",
           "train_subquantizers_on_blocks",
           "pca_statistics", "prepare_pca", "apply_pca", "code_lines"]
