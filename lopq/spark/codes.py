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


def code_rows_frame(sc, blocks, model, with_cell=False):
    """A DataFrame ``id string, coarse array<int>, fine array<int>(, cell int)`` of the
    codes of blocks with ids (text input: the ids are strings already)."""
    from pyspark.sql import SparkSession
    from pyspark.sql.types import (
        ArrayType,
        IntegerType,
        StringType,
        StructField,
        StructType,
    )
    model_bc = sc.broadcast(model)

    def rows(items):
        m = model_bc.value
        for ids, X in items:
            coarse, fine = m.encode(X)
            cells = (coarse[:, 0].astype("int64") * m.V + coarse[:, 1]).tolist()
            for key, c, f, cell in zip(ids, coarse.tolist(), fine.tolist(), cells):
                yield (str(key), c, f, cell) if with_cell else (str(key), c, f)

    fields = [StructField("id", StringType(), False),
              StructField("coarse", ArrayType(IntegerType(), False), False),
              StructField("fine", ArrayType(IntegerType(), False), False)]
    if with_cell:
        fields.append(StructField("cell", IntegerType(), False))
    spark = SparkSession.builder.getOrCreate()
    return spark.createDataFrame(blocks.mapPartitions(rows), StructType(fields))


def _list_array(values, width):
    """An Arrow ``list<int32>`` column of ``values`` (n, width)."""
    import numpy as np
    import pyarrow as pa
    n = values.shape[0]
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32)[:n + 1])
    return pa.ListArray.from_arrays(offsets, pa.array(values.astype(np.int32).ravel()))


def _encode_batches(model_bc, vector_col, shown_col, id_col, keep, coarse_col, fine_col,
                    cell_col, skip_bad_records, skipped, encoded_rows):
    """mapInArrow function: each batch with its codes appended as list<int> columns."""
    def run(batches):
        import numpy as np
        import pyarrow as pa

        from .frames import arrow_matrix
        model = model_bc.value
        for batch in batches:
            names = batch.schema.names
            groups, bad, _ = arrow_matrix(batch.column(names.index(vector_col)))
            rows = [r for r, X in groups if X.shape[1] == model.D]
            wrong = [(int(r[0]), f"vector of length {X.shape[1]}, the model is for "
                      f"D={model.D}") for r, X in groups if X.shape[1] != model.D]
            problems = bad + wrong
            if problems:
                if not skip_bad_records:
                    row, reason = problems[0]
                    where = (f"row with {id_col} {batch.column(names.index(id_col))[row]}"
                             if id_col in names else f"row {row} of an Arrow batch")
                    raise ValueError(f"column {shown_col!r}, {where}: {reason} (pass "
                                     "--skip_bad_records to drop such rows)")
                skipped.add(batch.num_rows - sum(len(r) for r in rows))
            if rows:
                order = np.concatenate(rows)
                X = np.concatenate([X for r, X in groups if X.shape[1] == model.D])
                sort = np.argsort(order, kind="stable")  # keep the input row order
                order, X = order[sort], X[sort]
            else:
                order, X = np.empty(0, dtype=np.int64), np.empty((0, model.D), np.float32)
            coarse, fine = model.encode(X)
            encoded_rows.add(X.shape[0])
            taken = batch.take(pa.array(order))
            columns = [taken.column(names.index(c)) for c in keep]
            columns += [_list_array(coarse, 2), _list_array(fine, model.M)]
            out_names = list(keep) + [coarse_col, fine_col]
            if cell_col:
                columns.append(pa.array((coarse[:, 0].astype(np.int64) * model.V
                                         + coarse[:, 1]).astype(np.int32)))
                out_names.append(cell_col)
            yield pa.RecordBatch.from_arrays(columns, out_names)
    return run


def encode_frame(df, model, vector_col="features", keep=None, coarse_col="coarse",
                 fine_col="fine", id_col=None, cell_col=None, skip_bad_records=False):
    """LOPQ codes of a DataFrame's vector column, computed on Arrow batches.

    Args:
        df: DataFrame with ``vector_col`` (array<float>, array<double> or ML Vector).
        model: a complete `LOPQModel`.
        keep: columns to carry over (default: all of df's).
        coarse_col, fine_col: names of the appended ``array<int>`` code columns (2 and
            M values).
        id_col: column naming a bad row in errors.
        cell_col: if given, also an ``int`` column of the cell ``c0 * V + c1``.
        skip_bad_records: drop rows that cannot be encoded (null, empty, NaN/inf, other
            length than the model's D) instead of failing on the first.

    Returns:
        (DataFrame of ``keep + [coarse_col, fine_col(, cell_col)]``, accumulators
        ``(dropped rows, encoded rows)``, filled once an action has run).
    """
    from pyspark.sql.types import ArrayType, IntegerType, StructField, StructType

    from .frames import vector_column
    model._require("Cs", "Rs", "mus", "codebooks")
    keep = list(df.columns if keep is None else keep)
    # An ML Vector column is read through an array<float> copy; the original is kept.
    shown_col = vector_col
    source = vector_column(df, vector_col, converted_name="__lopq_vector")
    if "__lopq_vector" in source.columns:
        vector_col = "__lopq_vector"
    for name in (coarse_col, fine_col) + ((cell_col,) if cell_col else ()):
        if name in keep:
            raise ValueError(f"the input already has a column {name!r}: choose another "
                             "name for the codes")
    needed = list(dict.fromkeys(keep + [vector_col] + ([id_col] if id_col in df.columns
                                                          else [])))
    source = source.select(*needed)
    fields = [source.schema[name] for name in keep]
    fields += [StructField(coarse_col, ArrayType(IntegerType(), False), False),
               StructField(fine_col, ArrayType(IntegerType(), False), False)]
    if cell_col:
        fields.append(StructField(cell_col, IntegerType(), False))
    spark_context = df.sparkSession.sparkContext
    skipped = spark_context.accumulator(0)
    encoded_rows = spark_context.accumulator(0)
    model_bc = spark_context.broadcast(model)
    encoded = source.mapInArrow(
        _encode_batches(model_bc, vector_col, shown_col, id_col, keep, coarse_col, fine_col,
                        cell_col, skip_bad_records, skipped, encoded_rows), StructType(fields))
    return encoded, (skipped, encoded_rows)
