"""Data entering the Spark jobs: the default text format or a UDF, turned once into a
cached RDD of float32 row blocks.

A *block* is a tuple ``(ids, X)``: ``ids`` a list of record ids (None for training data
without ids) and ``X`` an ``(b, D) float32`` matrix. Every later pass is a
``mapPartitions`` over blocks.
"""

import importlib
import logging

import numpy as np

from ..formats import decode_vector_line

logger = logging.getLogger(__name__)

#: Rows per block: big enough for efficient kernels, small enough to bound task memory.
BLOCK_ROWS = 8192
#: Partitions per core of the cached blocks (input splits beyond that are coalesced).
PARTITIONS_PER_CORE = 4
#: Bad records quoted in an error message.
MAX_EXAMPLES = 3


class DataError(ValueError):
    """Input data that cannot be used, with a message for the user."""


def _blocks_from_records(records, with_ids, block_rows, partition):
    """Group ``(id, vector)`` records of one partition into blocks.

    Yields ``(ids, X, bad_count, bad_examples)``; the bad-record fields are only
    non-empty in the last tuple of the partition, which may carry no rows.
    """
    ids, rows, bad, examples = [], [], 0, []
    dim = None
    for position, (key, vector, error) in enumerate(records):
        if error is None:
            if dim is None:
                dim = vector.shape[0]
            if vector.shape[0] != dim:
                error = f"vector of dimension {vector.shape[0]}, others have {dim}"
            elif not np.all(np.isfinite(vector)):
                error = "vector has NaN or infinite values"
        if error is not None:
            bad += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(f"partition {partition}, record {position}: {error}")
            continue
        ids.append(key)
        rows.append(vector)
        if len(rows) == block_rows:
            yield (ids if with_ids else None, np.asarray(rows, dtype=np.float32), 0, [])
            ids, rows = [], []
    X = (np.asarray(rows, dtype=np.float32) if rows
         else np.empty((0, dim or 0), dtype=np.float32))
    yield (ids if with_ids else None, X, bad, examples)


def _parse_lines(lines):
    for line in lines:
        if not line.strip():
            continue
        try:
            key, vector = decode_vector_line(line)
            yield key, vector, None
        except ValueError as err:
            yield None, None, f"{err} (line starts {line[:40]!r})"


def _check_vector(value):
    try:
        vector = np.asarray(value)
    except Exception:  # noqa: BLE001
        return None, f"a {type(value).__name__}, not an array"
    if vector.ndim != 1 or vector.dtype.kind not in "fiu":
        return None, f"a {type(value).__name__} of dtype {vector.dtype} and shape " \
                     f"{vector.shape}, expected a 1-D numeric array"
    return vector, None


def _udf_records(with_ids):
    def records(items):
        for item in items:
            if with_ids:
                if not (isinstance(item, tuple) and len(item) == 2):
                    yield None, None, (f"the UDF returned a {type(item).__name__}; "
                                       "compute_codes needs (id, array) pairs")
                    continue
                key, value = item
            else:
                key, value = None, item
            vector, error = _check_vector(value)
            yield key, vector, error
    return records


def load_udf(module_name):
    """Import a data UDF module by name and return its ``udf`` function."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DataError(f"--data_udf {module_name!r}: cannot import it ({err}); ship the "
                        "module with spark-submit --py-files and pass its module name "
                        "(without .py)") from None
    udf = getattr(module, "udf", None)
    if not callable(udf):
        raise DataError(f"--data_udf {module_name!r} has no function named `udf(sc, "
                        "data_path, sampling_ratio, seed)`")
    return udf


def load_blocks(sc, data_path, sampling_ratio=1.0, seed=None, data_udf=None,
                with_ids=False, skip_bad_records=False, block_rows=BLOCK_ROWS):
    """Load vectors into a cached RDD of blocks and check them once.

    Args:
        sc: SparkContext.
        data_path: ``--data`` (default format: ``id<TAB>base64(pickle(ndarray))`` lines).
        sampling_ratio, seed: ``--sampling_ratio``, ``--seed``.
        data_udf: module name of a UDF, or None for the default format.
        with_ids: keep record ids (compute_codes).
        skip_bad_records: drop malformed records with a warning instead of failing.

    Returns:
        (blocks RDD of ``(ids, X)``, n rows, D).

    Raises:
        DataError naming the problem (malformed records, mixed dimensions, no data).
    """
    from pyspark import RDD
    if not 0.0 < sampling_ratio <= 1.0:
        raise DataError(f"--sampling_ratio must be in (0, 1], got {sampling_ratio}")
    parallelism = sc.defaultParallelism
    if data_udf:
        udf = load_udf(data_udf)
        source = udf(sc, data_path, sampling_ratio, seed)
        if not isinstance(source, RDD):
            raise DataError(f"--data_udf {data_udf!r}: udf() returned a "
                            f"{type(source).__name__}, expected an RDD of "
                            + ("(id, numpy array) pairs" if with_ids else "numpy arrays"))
        records = _udf_records(with_ids)
    else:
        source = sc.textFile(data_path, minPartitions=parallelism)
        if sampling_ratio < 1.0:
            source = source.sample(False, sampling_ratio, seed)
        records = _parse_lines
    if source.getNumPartitions() < parallelism:
        source = source.repartition(parallelism)
    elif source.getNumPartitions() > PARTITIONS_PER_CORE * parallelism:
        # Every pass pays a per-task cost; tasks stream their blocks, so big partitions
        # cost no memory in the Python workers.
        source = source.coalesce(PARTITIONS_PER_CORE * parallelism)

    def to_blocks(index, items):
        return _blocks_from_records(records(items), with_ids, block_rows, index)

    from pyspark import StorageLevel
    # Spill to local disk rather than re-parse the input on every pass when the cache
    # does not fit in memory.
    parsed = source.mapPartitionsWithIndex(to_blocks).persist(StorageLevel.MEMORY_AND_DISK)
    sc.setJobDescription("lopq: load and check data")
    summary = parsed.map(lambda b: (b[1].shape[0], {b[1].shape[1]} if b[1].shape[0] else set(),
                                    b[2], b[3])).fold(
        (0, set(), 0, []), lambda a, b: (a[0] + b[0], a[1] | b[1], a[2] + b[2],
                                         (a[3] + b[3])[:MAX_EXAMPLES]))
    n, dims, bad, examples = summary
    where = f"--data {data_path}" + (f" (--data_udf {data_udf})" if data_udf else "")
    if bad and not skip_bad_records:
        parsed.unpersist()
        raise DataError(f"{bad} malformed record(s) in {where}, e.g. " + "; ".join(examples)
                        + ". Fix them, or pass --skip_bad_records to drop them.")
    if bad:
        logger.warning("skipped %d malformed record(s) in %s, e.g. %s", bad, where,
                       "; ".join(examples))
    if len(dims) > 1:
        parsed.unpersist()
        raise DataError(f"vectors of mixed dimensions {sorted(dims)} in {where}: every "
                        "vector must have the same dimension")
    if n == 0:
        parsed.unpersist()
        raise DataError(f"no vectors in {where}" + (" after sampling" if sampling_ratio < 1
                                                     else ""))
    # A narrow map over the cached parse: no recomputation, no second cached copy.
    blocks = parsed.filter(lambda b: b[1].shape[0] > 0).map(lambda b: (b[0], b[1]))
    D = dims.pop()
    logger.info("loaded %d vectors of dimension %d in %d partitions", n, D,
                blocks.getNumPartitions())
    _warn_if_spilled(sc, parsed)
    return blocks, n, D


def _warn_if_spilled(sc, rdd):
    """Say so when the cached blocks did not fit in memory (every pass then reads disk)."""
    try:
        for info in sc._jsc.sc().getRDDStorageInfo():
            if info.id() == rdd.id() and info.diskSize() > 0:
                logger.warning(
                    "%.0f MB of the cached data spilled to disk: every pass reads it back. "
                    "Give Spark more memory (spark-submit --driver-memory in local mode, "
                    "--executor-memory on a cluster).", info.diskSize() / 2 ** 20)
    except Exception:  # noqa: BLE001 - storage info is advisory only
        pass
