"""The metric on Spark: one pass over cached blocks for what the metric needs to know.

Cosine cannot take a zero vector (it has no direction), and inner-product training
needs the largest row norm (`lopq.metric`). Both come from one cheap pass over the
cached ``(ids, X)`` blocks, before any output is written.
"""

import logging

import numpy as np

from ..metric import check_metric
from .errors import DataError

logger = logging.getLogger(__name__)


def _block_norms(block):
    ids, X = block
    sq = np.einsum("ij,ij->i", X, X, dtype=np.float64)
    zero = np.flatnonzero(sq == 0)
    first = None
    if zero.size and ids is not None:
        first = ids[int(zero[0])]
    return int(zero.size), first, float(np.sqrt(sq.max())) if len(sq) else 0.0


def _merge(a, b):
    return a[0] + b[0], a[1] if a[1] is not None else b[1], max(a[2], b[2])


def blocks_for_metric(sc, blocks, metric, where, skip_bad_records=False):
    """Check ``blocks`` ``(ids, X)`` for ``metric``; return (blocks the metric can
    take, largest row norm, rows dropped).

    L2 needs nothing: the blocks come back as they are (the norm None, 0 dropped), without
    a pass. Cosine: zero rows raise a DataError naming the count and the first id, or
    with ``skip_bad_records`` are dropped and counted in a warning.

    Args:
        where: how messages name the input (``"--data path"``).
    """
    check_metric(metric)
    if metric == "l2":
        return blocks, None, 0
    sc.setJobDescription(f"lopq: check rows for metric {metric}")
    n_zero, first, largest = blocks.map(_block_norms).fold((0, None, 0.0), _merge)
    dropped = judge_zero_rows(n_zero, first, metric, where, skip_bad_records)
    if dropped:
        blocks = blocks.map(_without_zero_rows).filter(lambda b: len(b[1]) > 0)
    return blocks, largest, dropped


def judge_zero_rows(n_zero, first, metric, where, skip_bad_records=False):
    """``n_zero`` rows of norm 0 (``first``: the first one's id, or None) under
    ``metric``: the rows to drop (cosine with ``skip_bad_records``, said in a warning),
    0 when the metric takes them, or a DataError naming the count and the first id."""
    if metric != "cosine" or not n_zero:
        return 0
    if not skip_bad_records:
        named = "" if first is None else f" (the first: id {first!r})"
        raise DataError(f"{n_zero} vector(s) of norm 0 in {where}{named}: cosine "
                        "similarity is undefined for them. Drop them, pass "
                        "--skip_bad_records, or use --metric l2.")
    logger.warning("skipped %d vector(s) of norm 0 in %s (cosine is undefined for "
                   "them)", n_zero, where)
    return n_zero


def _without_zero_rows(block):
    ids, X = block
    keep = np.einsum("ij,ij->i", X, X) > 0
    if keep.all():
        return block
    kept_ids = None if ids is None else [i for i, k in zip(ids, keep) if k]
    return kept_ids, X[keep]
