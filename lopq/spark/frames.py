"""DataFrames into the kernels: Arrow record batches turned into float32 row blocks.

A vector column may be ``array<float>``, ``array<double>`` or a ``pyspark.ml.linalg``
``Vector`` (converted to ``array<float>`` on the JVM). Each Arrow batch becomes one
``(n, D) float32`` block through its flat values buffer, with no Python object per row;
the checks (nulls, lengths, NaN/inf) are vectorised per batch.
"""

import pickle

import numpy as np

from .errors import MAX_EXAMPLES, DataError

#: What a vector column may hold.
VECTOR_TYPES = "array<float>, array<double> or a pyspark.ml.linalg Vector"


def vector_column(df, column, flag="--vector_col", converted_name=None):
    """``df`` with ``column`` as ``array<float>`` (Vectors converted, into
    ``converted_name`` when given, else in place), or DataError naming the column and
    what it holds."""
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import ArrayType, DoubleType, FloatType
    fields = {f.name: f for f in df.schema.fields}
    if column not in fields:
        raise DataError(f"{flag} {column!r}: no such column (columns: "
                        f"{', '.join(fields) or 'none'})")
    dtype = fields[column].dataType
    if isinstance(dtype, VectorUDT):
        from pyspark.ml.functions import vector_to_array
        return df.withColumn(converted_name or column,
                             vector_to_array(df[column], "float32"))
    if isinstance(dtype, ArrayType) and isinstance(dtype.elementType, (FloatType, DoubleType)):
        return df
    raise DataError(f"{flag} {column!r} is {dtype.simpleString()}, expected {VECTOR_TYPES}")


def check_id_column(df, column, flag="--id_col"):
    if column is not None and column not in df.columns:
        raise DataError(f"{flag} {column!r}: no such column (columns: "
                        f"{', '.join(df.columns)})")


def arrow_matrix(values):
    """The good rows of a list column of one Arrow batch as float32 matrices, one per
    vector length (which length is right is decided on the driver, over all batches).

    A row is bad when it is null, empty, or holds null, NaN or infinite values.

    Returns:
        groups [(rows (k,) int64 indices into the batch, X (k, d) float32), ...] and
        bad [(row, reason), ...] (at most a few per kind) and n_bad.
    """
    import pyarrow as pa
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    n = len(values)
    if n == 0:
        return [], [], 0
    offsets = values.offsets.to_numpy()
    lengths = np.diff(offsets)
    flat = values.values
    data = flat.to_numpy(zero_copy_only=False)
    valid = ~values.is_null().to_numpy(zero_copy_only=False)
    bad = [(int(row), "the vector is null") for row in np.flatnonzero(~valid)[:MAX_EXAMPLES]]
    empty = valid & (lengths == 0)
    bad += [(int(row), "the vector is empty (0 values)")
            for row in np.flatnonzero(empty)[:MAX_EXAMPLES]]
    valid &= ~empty
    if flat.null_count:  # nulls inside a vector: their rows are bad
        inner = flat.is_null().to_numpy(zero_copy_only=False)
        with_null = np.zeros(n, dtype=bool)
        with_null[np.searchsorted(offsets, np.flatnonzero(inner), "right") - 1] = True
        bad += [(int(row), "the vector holds null values")
                for row in np.flatnonzero(with_null & valid)[:MAX_EXAMPLES]]
        valid &= ~with_null
        data = np.where(inner, 0.0, data)
    groups, not_finite = [], []
    for d in np.unique(lengths[valid]):
        rows = np.flatnonzero(valid & (lengths == d))
        start = offsets[rows[0]]
        if rows.size == n and offsets[-1] - start == n * d:  # one contiguous block
            X = data[start:start + n * d].reshape(n, d)
        else:
            X = data[offsets[rows][:, None] + np.arange(d)[None, :]]
        X = X.astype(np.float32, copy=False)
        finite = np.isfinite(X).all(axis=1)
        if not finite.all():
            not_finite.extend(rows[~finite].tolist())
            rows, X = rows[finite], X[finite]
        if rows.size:
            groups.append((rows, np.ascontiguousarray(X)))
    bad += [(row, "the vector has NaN or infinite values")
            for row in sorted(not_finite)[:MAX_EXAMPLES]]
    n_bad = int(n - sum(rows.size for rows, _ in groups))
    return groups, bad, n_bad


def batch_blocks(batch, vector_name, id_name, with_ids, keep=None):
    """One Arrow batch (or table) as ``(ids, X, report)`` blocks (see
    `data.checked_blocks`): a first block reporting the bad rows, then one block per
    vector length. ``keep``: an optional boolean mask of the rows to read (sampling)."""
    names = batch.schema.names
    if keep is not None:
        batch = batch.filter(keep)
    groups, bad, n_bad = arrow_matrix(batch.column(names.index(vector_name)))
    id_column = all_ids = None
    if id_name is not None and id_name in names:
        id_column = batch.column(names.index(id_name))
        # Python objects of every id only when the blocks keep them: messages name a
        # few rows, read one by one (measured on 1M string ids: 1.35 s of a 2.0 s read)
        if with_ids:
            all_ids = id_column.to_numpy(zero_copy_only=False)
    examples = [(None, None if id_column is None else id_column[row].as_py(),
                 reason if id_column is not None else
                 f"{reason} (row {row} of an Arrow batch)") for row, reason in bad]
    out = [(None, np.empty((0, 0), dtype=np.float32), (n_bad, examples[:MAX_EXAMPLES], {}))]
    for rows, X in groups:
        first = None if id_column is None else id_column[int(rows[0])].as_py()
        ids = all_ids[rows] if all_ids is not None else None
        out.append((ids, X, (0, [], {X.shape[1]: [X.shape[0], (None, first)]})))
    return out


def _frame_blocks(vector_name, id_name, with_ids):
    """mapInArrow function: each batch -> rows holding a pickled block and report."""
    import pyarrow as pa

    def run(batches):
        for batch in batches:
            payloads = [pickle.dumps(block, protocol=4)
                        for block in batch_blocks(batch, vector_name, id_name, with_ids)]
            yield pa.RecordBatch.from_arrays([pa.array(payloads, pa.binary())], ["block"])
    return run


def frame_block_source(df, vector_col, id_col=None, with_ids=False, sampling_ratio=1.0,
                       seed=None):
    """An RDD of ``(ids, X, report)`` blocks of a DataFrame (see `data.load_blocks`)."""
    from ..formats import safe_load_pickle
    df = vector_column(df, vector_col)
    check_id_column(df, id_col)
    columns = [vector_col] + ([id_col] if id_col is not None else [])
    df = df.select(*columns)
    if sampling_ratio < 1.0:
        df = df.sample(False, sampling_ratio, seed)
    blocks = df.mapInArrow(_frame_blocks(vector_col, id_col, with_ids), "block binary")
    return blocks.rdd.map(lambda row: safe_load_pickle(row[0], "a block"))


def describe_frame_record(vector_col, id_col):
    def describe(where, key):
        if key is None:
            return f"column {vector_col!r}"
        return f"column {vector_col!r}, row with {id_col} {key!r}"
    return describe
