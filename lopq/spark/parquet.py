"""Parquet in, Parquet out, with the rows never crossing the JVM.

`compute_codes.py --output_format parquet` on Parquet files that executors can open
(local or shared file systems): the driver lists the row groups from the file footers and
deals them into one task per core (more when a task would exceed TASK_ROWS rows); each
task reads its row groups with pyarrow in Arrow batches, encodes them and writes one
Parquet part file per row group.
Going through a DataFrame instead (``mapInArrow``) makes Spark decode the vectors into
its rows and convert them back to Arrow, which costs more than the encoding itself
(benchmarks/run.py --only spark). Anything else (other file systems, other formats,
sampling, partitioned output, ML Vector columns) takes the DataFrame path.
"""

import logging
import os

import numpy as np

from . import fs
from .errors import DataError

log = logging.getLogger(__name__)


class RowGroup:
    """Row group ``group`` of the Parquet file ``path`` (``rows`` rows); ``index`` names
    its part file."""

    __slots__ = ("index", "path", "group", "rows")

    def __init__(self, index, path, group, rows):
        self.index, self.path, self.group, self.rows = index, path, group, rows


def _is_vector_type(arrow_type):
    import pyarrow as pa
    return (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)) and \
        (pa.types.is_float32(arrow_type.value_type) or pa.types.is_float64(arrow_type.value_type))


def row_groups(sc, data_path, vector_col, id_col, id_required=True):
    """The row groups of the Parquet files at ``data_path`` when every file is local (or
    on a shared mount), holds a list-of-float ``vector_col`` and ``id_col`` (unless not
    ``id_required``), and all agree on their types; else None (the caller reads the data
    through Spark, which also gives the errors for missing or mistyped columns)."""
    import pyarrow.parquet as pq
    units, types = [], None
    for uri, _ in fs.input_files(sc, data_path):
        path = fs.local_path(sc, uri)
        if path is None:
            return None
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception:  # noqa: BLE001 - not Parquet: let Spark's reader say so
            return None
        schema = meta.schema.to_arrow_schema()
        if vector_col not in schema.names or (id_required and id_col not in schema.names):
            return None
        file_types = (schema.field(vector_col).type,
                      schema.field(id_col).type if id_col in schema.names else None)
        if not _is_vector_type(file_types[0]) or types not in (None, file_types):
            return None
        types = file_types
        units += [RowGroup(len(units) + g, path, g, meta.row_group(g).num_rows)
                  for g in range(meta.num_row_groups)]
    return units


def _read_row_groups(vector_col, id_col, with_ids, block_rows, sampling_ratio, seed):
    """Task function: the rows of each row group as ``(ids, X, report)`` blocks of at
    most ``block_rows`` rows (`lopq.spark.data.checked_blocks` adds up the reports).
    Sampling is a Bernoulli draw per row, seeded by the seed, the row group and the
    batch, so that a retried task reads the same rows."""
    base_seed = 0 if seed is None else int(seed)

    def run(units):
        import pyarrow.parquet as pq

        from .frames import batch_blocks
        for unit in units:
            reader = pq.ParquetFile(unit.path)
            ids = id_col if id_col in reader.schema_arrow.names else None
            columns = [vector_col] + ([ids] if ids is not None else [])
            for number, batch in enumerate(reader.iter_batches(
                    block_rows, row_groups=[unit.group], columns=columns, use_threads=False)):
                keep = None
                if sampling_ratio < 1.0:
                    rng = np.random.RandomState(
                        (base_seed * 1000003 + unit.index * 7919 + number) % (2 ** 32))
                    keep = rng.random_sample(batch.num_rows) < sampling_ratio
                yield from batch_blocks(batch, vector_col, ids, with_ids, keep)
    return run


def row_group_blocks(sc, units, vector_col, id_col, with_ids, block_rows,
                     sampling_ratio=1.0, seed=None, partitions=None):
    """An RDD of ``(ids, X, report)`` blocks read by the executors from ``units`` (from
    `row_groups`) with pyarrow: no row goes through Spark's own rows (see the module
    docstring). One partition per task of `_tasks`, at least ``partitions`` (default:
    one per core) where there are as many row groups."""
    tasks = _tasks(units, partitions or sc.defaultParallelism)
    log.info("reading %d rows in %d row groups with pyarrow on the executors",
             sum(u.rows for u in units), len(units))
    return sc.parallelize(tasks, len(tasks)).flatMap(lambda task: task).mapPartitions(
        _read_row_groups(vector_col, id_col, with_ids, block_rows, sampling_ratio, seed))


#: Parquet columns written with dictionary pages: the codes (few distinct values), not
#: the ids (unique: a dictionary is pure cost, 14% of the write). Both list layouts.
CODE_COLUMN_PATHS = [f"{name}.list.{item}" for name in ("coarse", "fine")
                     for item in ("element", "item")]


def _encode_row_groups(model_bc, out_dir, vector_col, id_col, skip_bad_records):
    """Task function: encode each row group, write ``part-<index>.snappy.parquet``.
    Yields ``(rows written, rows dropped)`` per row group."""
    def run(units):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .codes import encode_arrow_batch, encode_block_rows
        model = model_bc.value
        for unit in units:
            reader = pq.ParquetFile(unit.path)
            encoded, dropped = [], 0
            # One thread: a task has one core. Batches of encode_block_rows (a whole
            # row group of up to 131,072 rows at D=128): few rows per kernel call cost
            # more per row.
            for batch in reader.iter_batches(encode_block_rows(model.dim),
                                             row_groups=[unit.group],
                                             columns=[id_col, vector_col],
                                             use_threads=False):
                out, skipped = encode_arrow_batch(batch, model, vector_col, [id_col],
                                                  ("coarse", "fine"), vector_col, id_col,
                                                  skip_bad_records=skip_bad_records)
                encoded.append(out.rename_columns(["id", "coarse", "fine"]))
                dropped += skipped
            rows = sum(b.num_rows for b in encoded)
            if rows:
                table = pa.Table.from_batches(encoded)
                fs.write_part_file(out_dir, f"part-{unit.index:05d}.snappy.parquet",
                                   lambda path, table=table: pq.write_table(
                                       table, path, compression="snappy",
                                       use_dictionary=CODE_COLUMN_PATHS))
            yield rows, dropped
    return run


#: Rows per task at most: a failed task is redone at this granularity.
TASK_ROWS = 2_000_000


def _tasks(units, cores):
    """Row groups dealt into tasks: as few tasks as cores (each task costs a Spark
    round trip and a part of the cores' balance), more when a task would get over
    TASK_ROWS rows. Largest row groups first onto the least loaded task, and the
    tasks ordered largest first, so that the last ones to start are the short ones."""
    import heapq
    count = max(1, min(len(units), max(cores, -(-sum(u.rows for u in units) // TASK_ROWS))))
    heap = [(0, i, []) for i in range(count)]
    for unit in sorted(units, key=lambda u: -u.rows):
        rows, i, task = heapq.heappop(heap)
        task.append(unit)
        heapq.heappush(heap, (rows + unit.rows, i, task))
    return [task for _, _, task in sorted(heap, key=lambda t: (-t[0], t[1])) if task]


def encode_parquet_files(sc, units, model, output, overwrite, vector_col, id_col,
                         skip_bad_records=False, where="--data"):
    """Codes of the rows of ``units`` (from `row_groups`) as a Parquet table of ``id``,
    ``coarse`` and ``fine`` at ``output`` (written atomically). Returns
    ``(rows written, rows dropped)``."""
    out_dir = fs.local_path(sc, output)
    if out_dir is None:
        raise ValueError(f"--output {output} is not on a local file system")
    total = sum(u.rows for u in units)
    files = len({u.path for u in units})
    log.info("encoding %d rows in %d row groups of %d Parquet file(s); executors read them "
             "with pyarrow", total, len(units), files)
    model_bc = sc.broadcast(model)
    try:
        return _write_parts(sc, units, model_bc, output, overwrite, vector_col, id_col,
                            skip_bad_records, where)
    finally:
        model_bc.unpersist()


def _write_parts(sc, units, model_bc, output, overwrite, vector_col, id_col,
                 skip_bad_records, where):
    with fs.atomic_output(sc, output, overwrite) as tmp:
        tmp_dir = fs.local_path(sc, tmp)
        os.makedirs(tmp_dir)
        tasks = _tasks(units, sc.defaultParallelism)
        counts = sc.parallelize(tasks, len(tasks)).flatMap(lambda task: task).mapPartitions(
            _encode_row_groups(model_bc, tmp_dir, vector_col, id_col,
                               skip_bad_records)).collect()
        written = sum(rows for rows, _ in counts)
        dropped = sum(skipped for _, skipped in counts)
        if not written:
            raise DataError(f"no vectors in {where}")
        fs.finish_part_folder(tmp_dir)
    return written, dropped
