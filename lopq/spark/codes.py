"""Encoding ``(id, vector)`` blocks on Spark: the compute_codes job."""

from ..formats import format_code_line
from .session import as_context


def _encode_partition(model_bc):
    def partition(items):
        model = model_bc.value
        for ids, X in items:
            coarse, fine = model.encode(X)
            for key, c, f in zip(ids, coarse.tolist(), fine.tolist()):
                yield format_code_line(key, c, f)
    return partition


def code_lines(sc, blocks, model):
    """RDD of ``id<TAB>[[c0, c1], [f0, ..., fM-1]]`` lines for blocks with ids."""
    sc = as_context(sc)
    model_bc = sc.broadcast(model)
    return blocks.mapPartitions(_encode_partition(model_bc))
