"""Encoding ``(id, vector)`` blocks on Spark: the compute_codes job."""

import logging

from ..formats import format_code_lines
from .errors import DataError
from .metric import blocks_for_metric, judge_zero_rows
from .session import as_context

logger = logging.getLogger(__name__)


def _encode_partition(model_bc, per_line):
    def partition(items):
        model = model_bc.value
        for ids, X in items:
            text = format_code_lines(ids, *model.encode(X))
            if text:
                yield from text.split("\n") if per_line else (text,)
    return partition


def code_lines(sc, blocks, model):
    """RDD of ``id<TAB>[[c0, c1], [f0, ..., fM-1]]`` lines for blocks with ids."""
    sc = as_context(sc)
    return blocks.mapPartitions(_encode_partition(sc.broadcast(model), True))


def code_text(sc, blocks, model):
    """The same lines, one newline-joined string per block: what ``saveAsTextFile``
    writes (each element, then a newline) is byte for byte the file of `code_lines`,
    without a Python object per row."""
    sc = as_context(sc)
    return blocks.mapPartitions(_encode_partition(sc.broadcast(model), False))


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
            # Per row: createDataFrame over an RDD takes one tuple per row (Spark converts
            # each); the Parquet output of compute_codes writes row groups with pyarrow.
            for key, c, f, cell in zip(ids, coarse.tolist(), fine.tolist(), cells):
                yield (str(key), c, f, cell) if with_cell else (str(key), c, f)

    fields = [StructField("id", StringType(), False),
              StructField("coarse", ArrayType(IntegerType(), False), False),
              StructField("fine", ArrayType(IntegerType(), False), False)]
    if with_cell:
        fields.append(StructField("cell", IntegerType(), False))
    spark = SparkSession.builder.getOrCreate()
    return spark.createDataFrame(blocks.mapPartitions(rows), StructType(fields))


def searcher_from_codes(sc, model, path, searcher_class=None):
    """A searcher (default `lopq.LOPQSearcher`) over `compute_codes` text output at any
    Hadoop path: the executors parse their partitions and only code arrays reach the
    driver.

    Raises:
        ValueError: naming the partition, line and text of a bad line, or parts whose
            codes come from models of different M.
    """
    from ..formats import merge_code_parts, parse_code_lines
    from ..search import LOPQSearcher
    from .errors import python_cause
    sc = as_context(sc)
    source = str(path)
    try:
        parts = sc.textFile(source).mapPartitionsWithIndex(
            lambda i, lines: [parse_code_lines(lines, f"{source} (partition {i})")]
        ).collect()
    except Exception as err:  # noqa: BLE001 - a bad line fails a Spark task
        cause = python_cause(err)
        if cause is None:
            raise
        raise ValueError(cause) from None
    ids, coarse, fine = merge_code_parts(parts, source)
    searcher = (searcher_class or LOPQSearcher)(model)
    searcher.add_codes((coarse, fine), ids)
    return searcher


def _list_array(values, width):
    """An Arrow ``list<int32>`` column of ``values`` (n, width)."""
    import numpy as np
    import pyarrow as pa
    n = values.shape[0]
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32)[:n + 1])
    return pa.ListArray.from_arrays(offsets, pa.array(values.astype(np.int32).ravel()))


#: Bytes of float32 vectors encoded per kernel call on Arrow input. Each call prepares
#: every cluster's rotation (V x (D/2)^2 floats) and streams it once, so small calls
#: pay more per row: with two processes encoding at once (V=256, D=128), 8192-row calls
#: ran 15-30% slower than 65,536-row calls. 64 MB is 131,072 rows at D=128.
ENCODE_BLOCK_BYTES = 64 << 20


def encode_block_rows(D):
    """Rows per kernel call on Arrow input for vectors of dimension D."""
    return max(8192, ENCODE_BLOCK_BYTES // (4 * D))


def regrouped(batches, rows):
    """Arrow record batches joined, in order, into batches of at least ``rows`` rows
    (the last one may hold fewer): few rows per kernel call cost more per row."""
    pending, count = [], 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield _joined(pending)
            pending, count = [], 0
    if pending:
        yield _joined(pending)


def _joined(batches):
    import pyarrow as pa
    if len(batches) == 1:
        return batches[0]
    joined = pa.Table.from_batches(batches).combine_chunks().to_batches()
    return joined[0] if joined else batches[0].slice(0, 0)


def encode_arrow_batch(batch, model, vector_col, keep, code_names, shown_col=None,
                       id_col=None, cell_col=None, skip_bad_records=False):
    """LOPQ codes of one Arrow record batch: its ``keep`` columns with the codes appended.

    Args:
        batch: ``pyarrow.RecordBatch`` holding ``vector_col`` (list of float or double)
            and the ``keep`` columns.
        model: a complete `LOPQModel`.
        code_names: names of the appended ``list<int32>`` columns (coarse: 2 values,
            fine: M values).
        shown_col, id_col: how errors name the column and the bad row.
        cell_col: if given, also an ``int32`` column of the cell ``c0 * V + c1``.
        skip_bad_records: drop rows that cannot be encoded (null, empty, NaN/inf, another
            length than the model's D) instead of raising ValueError on the first.

    Returns:
        (``pyarrow.RecordBatch`` of the encoded rows in input order, rows dropped).
    """
    import numpy as np
    import pyarrow as pa

    from .frames import arrow_matrix
    names = batch.schema.names
    groups, bad, _ = arrow_matrix(batch.column(names.index(vector_col)))
    good = [(r, X) for r, X in groups if X.shape[1] == model.dim]
    wrong = [(int(r[0]), f"vector of length {X.shape[1]}, the model is for vectors of "
                         f"dimension {model.dim}")
             for r, X in groups if X.shape[1] != model.dim]
    if model.metric == "cosine":  # a zero vector has no direction
        good, zero = _split_zero_rows(good)
        wrong += [(int(r), "the vector has norm 0 (cosine is undefined for it)")
                  for r in zero]
    problems = bad + wrong
    if problems and not skip_bad_records:
        row, reason = problems[0]
        where = (f"row with {id_col} {batch.column(names.index(id_col))[row]}"
                 if id_col in names else f"row {row} of an Arrow batch")
        raise ValueError(f"column {shown_col or vector_col!r}, {where}: {reason} (pass "
                         "--skip_bad_records to drop such rows)")
    if len(good) == 1 and good[0][1].shape[0] == batch.num_rows:
        X, taken = good[0][1], batch  # every row is good: nothing to reorder
    elif good:
        order = np.concatenate([r for r, _ in good])
        X = np.concatenate([X for _, X in good])
        sort = np.argsort(order, kind="stable")  # keep the input row order
        X, taken = X[sort], batch.take(pa.array(order[sort]))
    else:
        X, taken = np.empty((0, model.dim), np.float32), batch.slice(0, 0)
    coarse, fine = model.encode(X)
    columns = [taken.column(names.index(c)) for c in keep]
    columns += [_list_array(coarse, 2), _list_array(fine, model.M)]
    out_names = list(keep) + list(code_names)
    if cell_col:
        columns.append(pa.array((coarse[:, 0].astype(np.int64) * model.V
                                 + coarse[:, 1]).astype(np.int32)))
        out_names.append(cell_col)
    return pa.RecordBatch.from_arrays(columns, out_names), batch.num_rows - X.shape[0]


def _split_zero_rows(groups):
    """``(rows, X)`` groups without their zero rows, and the row numbers of those."""
    import numpy as np
    kept, zero = [], []
    for rows, X in groups:
        nonzero = np.einsum("ij,ij->i", X, X) > 0
        if not nonzero.all():
            zero.extend(rows[~nonzero].tolist())
            rows, X = rows[nonzero], X[nonzero]
        if len(rows):
            kept.append((rows, X))
    return kept, zero


def _encode_batches(model_bc, vector_col, shown_col, id_col, keep, coarse_col, fine_col,
                    cell_col, skip_bad_records, skipped, encoded_rows):
    """mapInArrow function: each batch with its codes appended as list<int> columns."""
    def run(batches):
        model = model_bc.value
        for batch in regrouped(batches, encode_block_rows(model.dim)):
            out, dropped = encode_arrow_batch(batch, model, vector_col, keep,
                                              (coarse_col, fine_col), shown_col, id_col,
                                              cell_col, skip_bad_records)
            skipped.add(dropped)
            encoded_rows.add(out.num_rows)
            yield out
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
    model.require_parameters("Cs", "Rs", "mus", "codebooks")
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


def compute_codes(sc, data_path, model, output, data_options, output_format="text",
                  overwrite=False, partition_by_cell=False):
    """The compute_codes job: encode ``data_path`` with ``model`` and write ``output``.

    The route is chosen here, for ``spark/compute_codes.py`` and the benchmarks alike:
    a table in and Parquet out runs on Arrow batches (local Parquet files read by the
    executors directly, `lopq.spark.parquet`); everything else loads row blocks and
    writes text lines (the reference's format) or a Parquet table of codes.

    Args:
        data_path: ``--data``; data_options: `lopq.spark.cli.data_options` of the data
            flags (``with_ids=True``).
        output_format: ``"text"`` or ``"parquet"``; partition_by_cell: Parquet output
            partitioned by cell.

    Returns:
        (rows written, malformed rows skipped).

    Raises:
        DataError for bad input (nothing is written), including data of another
        dimension than the model's.
    """
    from . import fs
    from .data import load_blocks
    sc = as_context(sc)
    if output_format == "parquet" and data_options["data_format"] != "text" \
            and not data_options["data_udf"]:
        return _table_to_table(sc, data_path, model, output, data_options, overwrite,
                               partition_by_cell)
    if output_format == "text" and data_options["data_format"] == "text" \
            and not data_options["data_udf"] and fs.local_path(sc, output):
        done = _local_text_to_text(sc, data_path, model, output, data_options, overwrite)
        if done is not None:
            return done
    blocks, n, D = load_blocks(sc, data_path, **data_options)
    _check_model_dim(model, D, data_path)
    blocks, _, dropped = blocks_for_metric(sc, blocks, model.metric, f"--data {data_path}",
                                           data_options["skip_bad_records"])
    sc.setJobDescription("lopq compute_codes: encode and write")
    if output_format == "text":
        fs.save_text_atomically(sc, code_text(sc, blocks, model), output, overwrite)
    else:
        fs.save_frame_atomically(sc, code_rows_frame(sc, blocks, model, partition_by_cell),
                                 output, overwrite, "cell" if partition_by_cell else None)
    return n - dropped, dropped


def _check_model_dim(model, D, data_path):
    if D != model.dim:
        raise DataError(f"the model is for vectors of dimension {model.dim} but --data "
                        f"{data_path} has vectors of dimension {D}")


def _encode_and_write_splits(model_bc, out_dir, skip_zero_rows):
    """Task function over `text_blocks` (one input split per partition): encode the
    blocks of the model's dimension, write them as ``part-<split>`` (each line of
    `format_code_lines`, then a newline, as ``saveAsTextFile`` writes them), and yield
    ``(rows written, report, zero rows, the first zero row's id)``."""
    def run(split, items):
        from . import fs
        from .metric import _block_norms, _without_zero_rows
        model = model_bc.value
        cosine = model.metric == "cosine"
        report, rows, zero, first_zero, texts = None, 0, 0, None, []
        for ids, X, block_report in items:
            if block_report is not None:
                report = block_report
                continue
            if X.shape[1] != model.dim:  # counted in the report; the driver decides
                continue
            if cosine:  # norm-0 rows: refused on the driver, or dropped and counted
                n_zero, first, _ = _block_norms((ids, X))
                if n_zero:
                    zero += n_zero
                    first_zero = first if first_zero is None else first_zero
                    if not skip_zero_rows:
                        continue
                    ids, X = _without_zero_rows((ids, X))
                    if not len(ids):
                        continue
            texts.append(format_code_lines(ids, *model.encode(X)))
            rows += len(ids)
        def write(path):
            with open(path, "w", encoding="utf-8", newline="") as f:
                for text in texts:
                    f.write(text)
                    f.write("\n")

        if rows:
            fs.write_part_file(out_dir, f"part-{split:05d}", write)
        yield rows, report, zero, first_zero
    return run


def _local_text_to_text(sc, data_path, model, output, options, overwrite):
    """Text in, text out, in one pass, when the executors read the input files and
    write the output folder themselves (local or shared file systems): each task reads
    one input split, encodes it and writes its part file; nothing is cached and no line
    crosses the JVM. Bad input is judged on the driver from every task's report, with
    the messages of `load_blocks`, before the output is committed (on an error it is
    discarded). Returns (rows written, rows dropped), or None when Spark must read the
    input (another file system, compressed files)."""
    import os

    from . import fs
    from .data import merge_reports, text_blocks, text_records, verdict
    from .errors import python_cause
    where = f"--data {data_path}"
    records, describe, local = text_records(sc, data_path, options["sampling_ratio"],
                                            options["seed"])
    if not local:
        return None
    skip = options["skip_bad_records"]
    model_bc = sc.broadcast(model)
    try:
        with fs.atomic_output(sc, output, overwrite) as tmp:
            tmp_dir = fs.local_path(sc, tmp)
            os.makedirs(tmp_dir)
            sc.setJobDescription("lopq compute_codes: read, encode and write text splits")
            try:
                # blocks as large as Arrow input's: few rows per encode call cost
                # more per row (see ENCODE_BLOCK_BYTES)
                blocks = text_blocks(records, True, encode_block_rows(model.dim))
                results = blocks.mapPartitionsWithIndex(
                    _encode_and_write_splits(model_bc, tmp_dir, skip)).collect()
            except Exception as err:  # noqa: BLE001 - a task failed: say where, in one line
                cause = python_cause(err)
                if cause is None:
                    raise
                raise DataError(f"reading {where} failed: {cause}") from None
            report = (0, [], {})
            for _, part, _, _ in results:
                if part is not None:
                    report = merge_reports(report, part)
            n, D = verdict(report, describe, where, skip, options["sampling_ratio"])
            logger.info("loaded %d vectors of dimension %d in %d input split(s)", n, D,
                        len(results))
            _check_model_dim(model, D, data_path)
            zero = sum(z for _, _, z, _ in results)
            dropped = judge_zero_rows(zero, next((f for _, _, z, f in results if z), None),
                                       model.metric, where, skip)
            fs.finish_part_folder(tmp_dir)
        return sum(rows for rows, _, _, _ in results), dropped
    finally:
        model_bc.unpersist()


def _table_to_table(sc, data_path, model, output, options, overwrite, partition_by_cell):
    """Parquet (or any table) in, Parquet out: codes on Arrow batches, no Python row
    objects; local Parquet files are read by the executors directly (lopq.spark.parquet).
    Returns (rows written, malformed rows skipped)."""
    from pyspark.sql import SparkSession

    from . import fs
    from .data import read_table
    from .frames import vector_column
    from .parquet import encode_parquet_files, row_groups
    vector_col, id_col = options["vector_col"], options["id_col"]
    sampling_ratio = options["sampling_ratio"]
    if options["data_format"] == "parquet" and sampling_ratio == 1.0 \
            and not partition_by_cell and fs.local_path(sc, output):
        units = row_groups(sc, data_path, vector_col, id_col)
        if units is not None:
            sc.setJobDescription("lopq compute_codes: encode Parquet row groups")
            return encode_parquet_files(
                sc, units, model, output, overwrite, vector_col, id_col,
                options["skip_bad_records"], f"--data {data_path}")
    spark = SparkSession.builder.getOrCreate()
    df = read_table(spark, sc, data_path, options["data_format"])
    vector_column(df, vector_col)  # a missing or non-vector column, said in one line
    if id_col not in df.columns:
        raise DataError(f"--id_col {id_col!r}: no such column in --data {data_path} "
                        f"(columns: {', '.join(df.columns)})")
    if sampling_ratio < 1.0:
        df = df.sample(False, sampling_ratio, options["seed"])
    encoded, (skipped, written) = encode_frame(
        df.select(id_col, vector_col), model, vector_col, keep=[id_col], id_col=id_col,
        cell_col="cell" if partition_by_cell else None,
        skip_bad_records=options["skip_bad_records"])
    if id_col != "id":
        encoded = encoded.withColumnRenamed(id_col, "id")

    def refuse_empty(tmp):
        if not written.value:
            raise DataError(f"no vectors in --data {data_path}"
                            + (" after sampling" if sampling_ratio < 1 else ""))

    sc.setJobDescription("lopq compute_codes: encode Arrow batches and write Parquet")
    fs.save_frame_atomically(sc, encoded, output, overwrite,
                             "cell" if partition_by_cell else None, refuse_empty)
    return written.value, skipped.value
