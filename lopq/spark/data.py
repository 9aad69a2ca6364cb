"""Data entering the Spark jobs: the default text format or a UDF, turned once into a
cached RDD of float32 row blocks.

A *block* is a tuple ``(ids, X)``: ``ids`` a list of record ids (None for training data
without ids) and ``X`` an ``(b, D) float32`` matrix. Every later pass is a
``mapPartitions`` over blocks.
"""

import importlib
import logging

import numpy as np

from ..formats import VectorLineDecoder
from .errors import MAX_EXAMPLES, DataError  # noqa: F401 (DataError: lopq.spark.data's API)

logger = logging.getLogger(__name__)

#: Rows per block: big enough for efficient kernels, small enough to bound task memory.
ROWS_PER_CACHED_BLOCK = 8192
#: Partitions per core of the cached blocks (input splits beyond that are coalesced).
PARTITIONS_PER_CORE = 4


#: Lines decoded together by `lopq.formats.VectorLineDecoder` (one numpy array a run).
LINES_PER_DECODE = 2048


class _Buffer:
    """The rows of one dimension waiting to fill a block: chunks of ids and arrays."""

    def __init__(self):
        self.ids, self.chunks, self.rows = [], [], 0

    def add(self, ids, X):
        self.ids.extend(ids)
        self.chunks.append(X)
        self.rows += X.shape[0]

    def take(self, rows):
        """The first ``rows`` rows as one (ids, float32 block); the rest stay."""
        X = np.concatenate(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        ids, self.ids = self.ids[:rows], self.ids[rows:]
        block, rest = X[:rows], X[rows:]
        self.chunks = [rest] if len(rest) else []
        self.rows -= rows
        return ids, np.ascontiguousarray(block, dtype=np.float32)


def _blocks_from_records(records, with_ids, block_rows):
    """Group the checked records of one partition into blocks, one dimension per block.

    ``records`` yields single records ``(id, vector, error, where)``, ``where`` = (split,
    position) of the record in its input, and runs of decoded lines
    ``("run", ids, X (k, D), split, positions)``. Yields ``(ids, X, report)``:
    ``report`` is None except in the last tuple of the partition (which carries no
    rows), where it is ``(bad_count, bad_examples, {dim: [rows, (where, id) of the
    first]})``. Which dimension is right is decided on the driver, from every
    partition's counts.
    """
    buffers, bad, examples, dims = {}, 0, [], {}

    def reject(where, key, error):
        nonlocal bad
        bad += 1
        if len(examples) < MAX_EXAMPLES:
            examples.append((where, key, error))

    def accept(ids, X, first_where):
        dim = X.shape[1]
        if dim not in dims:
            dims[dim] = [0, (first_where, ids[0])]
            buffers[dim] = _Buffer()
        dims[dim][0] += X.shape[0]
        buffer = buffers[dim]
        buffer.add(ids, X)
        while buffer.rows >= block_rows:
            ids, block = buffer.take(block_rows)
            yield (ids if with_ids else None, block, None)

    for item in records:
        if len(item) == 5:  # a run of lines decoded together: checked as one array
            _, keys, X, split, positions = item
            if X.shape[1] == 0:
                good = np.zeros(len(keys), dtype=bool)
                error = "the vector is empty (0 values)"
            else:
                good = np.isfinite(X).all(axis=1)
                error = "the vector has NaN or infinite values"
            for i in np.flatnonzero(~good):
                reject((split, positions[i]), keys[i], error)
            if not good.all():
                keep = np.flatnonzero(good)
                keys, X, positions = [keys[i] for i in keep], X[keep], \
                    [positions[i] for i in keep]
            if len(keys):
                yield from accept(keys, X, (split, positions[0]))
            continue
        key, vector, error, where = item
        if error is None:
            if not vector.shape[0]:
                error = "the vector is empty (0 values)"
            elif not np.all(np.isfinite(vector)):
                error = "the vector has NaN or infinite values"
        if error is not None:
            reject(where, key, error)
            continue
        yield from accept([key], vector[None, :], where)
    for buffer in buffers.values():
        if buffer.rows:
            ids, block = buffer.take(buffer.rows)
            yield (ids if with_ids else None, block, None)
    yield (None, np.empty((0, 0), dtype=np.float32), (bad, examples, dims))


def _parse_split(sampling_ratio, seed):
    """Parse (a Bernoulli sample of) the lines of one input split into checked records:
    runs of lines decoded together (`lopq.formats.VectorLineDecoder`, which reads the
    array bytes of lines whose pickle matches a layout it verified once), and single
    records for the lines it hands to the per-line decoder (bad lines among them, with
    that decoder's messages).

    Sampling here, seeded by the split, keeps each line's position for error messages
    and parses only the sampled lines.
    """
    base_seed = 0 if seed is None else int(seed)

    def parse(split, lines):
        rng = np.random.RandomState((base_seed * 1000003 + split) % (2 ** 32)) \
            if sampling_ratio < 1.0 else None
        decoder = VectorLineDecoder()
        chunk, positions = [], []
        for position, line in enumerate(lines):
            if rng is not None and rng.random_sample() >= sampling_ratio:
                continue
            if not line.strip():
                continue
            chunk.append(line)
            positions.append(position)
            if len(chunk) == LINES_PER_DECODE:
                yield from _decoded(decoder, chunk, positions, split)
                chunk, positions = [], []
        if chunk:
            yield from _decoded(decoder, chunk, positions, split)
    return parse


def _decoded(decoder, lines, positions, split):
    for item in decoder.decode(lines):
        if item[0] == "rows":
            _, first, keys, X = item
            yield "run", keys, X, split, positions[first:first + len(keys)]
            continue
        _, index, key, vector, error = item
        if error is not None:
            error = f"{error} (the line starts {lines[index][:40]!r})"
        yield key, vector, error, (split, positions[index])


def _check_vector(value):
    try:
        vector = np.asarray(dense_vector(value))
    except Exception:  # noqa: BLE001
        return None, f"a {type(value).__name__}, not an array"
    if vector.ndim != 1 or vector.dtype.kind not in "fiu":
        return None, f"a {type(value).__name__} of dtype {vector.dtype} and shape " \
                     f"{vector.shape}, expected a 1-D numeric array"
    return vector, None


def dense_vector(value):
    """A pyspark ML/MLlib Vector (dense or sparse, via ``toArray``) or a one-row scipy
    sparse matrix (via ``toarray``) as a dense 1-D array; anything else unchanged."""
    if hasattr(value, "toArray"):
        return value.toArray()
    if hasattr(value, "toarray") and getattr(value, "ndim", 1) == 2:
        return value.toarray().ravel()
    return value


def _udf_records(with_ids):
    def records(split, items):
        for position, item in enumerate(items):
            where = (split, position)
            if with_ids:
                if not (isinstance(item, tuple) and len(item) == 2):
                    yield None, None, (f"the UDF returned a {type(item).__name__}; "
                                       "compute_codes needs (id, array) pairs"), where
                    continue
                key, value = item
            else:
                key, value = None, item
            vector, error = _check_vector(value)
            yield key, vector, error, where
    return records


def load_udf(module_name):
    """Import a data UDF module by name and return its ``udf`` function."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DataError(f"--data_udf {module_name!r}: cannot import it ({err}); ship the "
                        "module with spark-submit --py-files and pass its module name "
                        "(without .py)") from None
    except Exception as err:  # noqa: BLE001 - the module's own code failed
        raise DataError(f"--data_udf {module_name!r}: importing it raised "
                        f"{type(err).__name__}: {err}") from None
    udf = getattr(module, "udf", None)
    if not callable(udf):
        raise DataError(f"--data_udf {module_name!r} has no function named `udf(sc, "
                        "data_path, sampling_ratio, seed)`")
    return udf


def _text_splits(lines):
    """``[(file uri, byte offset, length)]`` of each input split of a ``sc.textFile`` RDD
    (to turn (split, position) into a file and line, and to read local files directly);
    [] when the RDD does not expose them."""
    try:
        rdd = lines._jrdd.rdd()
        while rdd.getClass().getSimpleName() != "HadoopRDD":
            rdd = rdd.dependencies().head().rdd()
        splits = []
        for partition in rdd.partitions():
            split = partition.inputSplit().value()
            splits.append((str(split.getPath()), int(split.getStart()),
                           int(split.getLength())))
        return splits
    except Exception:  # noqa: BLE001 - locations only improve messages
        return []


def _local_text_splits(sc, splits):
    """``[(local path, start, length)]`` of ``splits`` when every file is uncompressed on
    a file system the executors open as local files (a local disk or a shared mount, as
    ``file:`` input already requires); else None (Spark reads the lines)."""
    from . import fs
    if not splits:
        return None
    try:
        jvm = sc._jvm
        codecs = jvm.org.apache.hadoop.io.compress.CompressionCodecFactory(
            sc._jsc.hadoopConfiguration())
        local, paths = [], {}
        for uri, start, length in splits:
            if uri not in paths:
                codec = codecs.getCodec(jvm.org.apache.hadoop.fs.Path(uri))
                paths[uri] = None if codec is not None else fs.local_path(sc, uri)
            if paths[uri] is None:
                return None
            local.append((paths[uri], start, length))
        return local
    except Exception:  # noqa: BLE001 - anything unexpected: Spark reads the lines
        return None


#: Bytes read at a time by `split_lines`.
READ_CHUNK_BYTES = 8 << 20


def _after_terminator(buf, i, eof):
    """Index just after the first line terminator (LF, CR or CRLF) at or after ``i`` in
    ``buf``; ``len(buf)`` at the end of the file without one; None when more bytes are
    needed to tell."""
    lf, cr = buf.find(b"\n", i), buf.find(b"\r", i)
    if cr == -1 or (lf != -1 and lf < cr):
        return lf + 1 if lf != -1 else (len(buf) if eof else None)
    if cr + 1 < len(buf):
        return cr + 2 if buf[cr + 1] == 10 else cr + 1
    return cr + 1 if eof else None


def _decoded_lines(data):
    """The lines of ``data`` (complete lines, terminators included) as strings, invalid
    UTF-8 replaced (as Hadoop's Text does)."""
    if b"\r" not in data:
        lines = data.decode("utf-8", "replace").split("\n")
        lines.pop()  # after the last terminator
        return lines
    return [line.decode("utf-8", "replace") for line in data.splitlines()]


def split_lines(path, start, length, chunk_bytes=READ_CHUNK_BYTES):
    """The lines of the input split ``[start, start + length)`` of a local text file, as
    Hadoop's ``LineRecordReader`` reads them for ``sc.textFile``: a split that does not
    start the file skips through its first line terminator (that line belongs to the
    split before), and every line that starts at or before the split's end is read whole.
    Terminators are LF, CR or CRLF; a UTF-8 byte order mark opening the file is dropped.

    Yields:
        lists of str, in order.
    """
    first = start == 0  # the file's first line: drop a byte order mark opening it
    for lines in _split_line_chunks(path, start, length, chunk_bytes):
        if first and lines:
            if lines[0].startswith("\ufeff"):
                lines[0] = lines[0][1:]
            first = False
        yield lines


def _split_line_chunks(path, start, length, chunk_bytes):
    end = start + length
    with open(path, "rb") as f:
        f.seek(start)
        offset, pending = start, b""  # file offset of pending[0]
        skipping, eof = start != 0, False
        while not eof:
            data = f.read(chunk_bytes)
            eof = not data
            pending += data
            if skipping:
                cut = _after_terminator(pending, 0, eof)
                if cut is None:
                    continue
                offset, pending, skipping = offset + cut, pending[cut:], False
            if offset > end or (eof and not pending):
                return
            if not pending:
                continue
            if offset + len(pending) > end:  # the split's last line starts in pending
                cut = _after_terminator(pending, end - offset, eof)
                if cut is None:
                    continue
                yield _decoded_lines(pending[:cut] if cut < len(pending) or
                                     pending.endswith((b"\n", b"\r"))
                                     else pending + b"\n")
                return
            # whole lines so far (a trailing CR may be the first half of a CRLF)
            body = pending[:-1] if pending.endswith(b"\r") and not eof else pending
            cut = max(body.rfind(b"\n"), body.rfind(b"\r")) + 1
            if eof and cut < len(pending):
                pending, cut = pending + b"\n", len(pending) + 1
            if cut:
                yield _decoded_lines(pending[:cut])
                offset, pending = offset + cut, pending[cut:]

def _describe_text_record(locations):
    def describe(where, key):
        split, position = where
        if split < len(locations):
            uri, start = locations[split]
            line = f"line {position + 1}" if start == 0 else \
                f"line {position + 1} after byte {start}"
            text = f"{uri}, {line}"
        else:
            text = f"input split {split}, line {position + 1}"
        return text + (f" (id {key!r})" if key is not None else "")
    return describe


def _describe_udf_record(where, key):
    split, position = where
    return f"record {position + 1} of the UDF's partition {split}" + (
        f" (id {key!r})" if key is not None else "")


def merge_reports(a, b):
    dims = dict(a[2])
    for dim, (count, first) in b[2].items():
        if dim in dims:
            dims[dim] = [dims[dim][0] + count, dims[dim][1]]
        else:
            dims[dim] = [count, first]
    return a[0] + b[0], (a[1] + b[1])[:MAX_EXAMPLES], dims


def load_blocks(sc, data_path, sampling_ratio=1.0, seed=None, data_udf=None,
                with_ids=False, skip_bad_records=False, block_rows=ROWS_PER_CACHED_BLOCK,
                data_format="text", vector_col="features", id_col="id", flag="--data",
                row_files=False, cache=True):
    """Load vectors into a cached RDD of blocks and check them once.

    Args:
        sc: SparkContext or SparkSession (the caller's; never replaced).
        data_path: ``--data``: with ``data_format="text"`` (default), lines of
            ``id<TAB>base64(pickle(ndarray))``, plain or compressed, a file, a folder or
            a glob; otherwise a table Spark reads with that format (parquet, orc, json,
            ...).
        sampling_ratio, seed: ``--sampling_ratio`` in (0, 1], ``--seed``.
        data_udf: module name of a UDF, or None.
        with_ids: keep record ids (compute_codes).
        skip_bad_records: drop malformed records (and vectors whose dimension differs
            from the most common one), logging their count, instead of failing.
        data_format, vector_col, id_col: ``--data_format``, ``--vector_col``,
            ``--id_col`` for tables.
        flag: the flag that named ``data_path``, for messages (``--rerank_data``, ...).
        row_files: in local mode (`lopq.spark.rows.local_files_default`), also write
            each partition as a row file while the data is checked, for the training's
            passes (`lopq.spark.rows.BlockRows` takes them over): the rows are in
            Python then, so this costs a write instead of a job that moves every cached
            block from the JVM into Python again (measured on 1M x 128 rows,
            `local[2]`: about 3 s).
        cache: keep the blocks cached by Spark. ``False`` with ``row_files`` in local
            mode leaves the row files the only copy of the rows (the check job writes
            them; nothing is pickled into the JVM: 1.2 s of 4.4 s loading 1M x 128
            Parquet rows on `local[2]`, and no second copy in the driver's memory): for
            callers whose every pass goes through `lopq.spark.rows.BlockRows`, since
            any other job over the returned blocks reads and parses the input again.
            Ignored without row files.

    Returns:
        (blocks RDD of ``(ids, X)`` with X (b, D) float32, n rows, D).

    Raises:
        DataError naming the flag, the file and the record: malformed records, mixed
        dimensions, a missing or empty input, no vectors after sampling.
    """
    from pyspark import RDD

    from .session import as_context
    sc = as_context(sc)
    if not 0.0 < sampling_ratio <= 1.0:
        raise DataError(f"--sampling_ratio must be in (0, 1], got {sampling_ratio}")
    where = f"{flag} {data_path}" + (f" (--data_udf {data_udf})" if data_udf else "")
    from .rows import loading_row_folder
    row_folder = loading_row_folder(sc) if row_files else None
    # Parquet files the executors can open are read with pyarrow, as compute_codes.py
    # reads them; other tables go through a DataFrame.
    units = _parquet_units(sc, data_path, vector_col, id_col, with_ids) \
        if data_format == "parquet" and not data_udf else None
    if data_udf:
        udf = load_udf(data_udf)
        try:
            source = udf(sc, data_path, sampling_ratio, seed)
        except Exception as err:  # noqa: BLE001 - the user's code: show its own error
            raise DataError(f"--data_udf {data_udf!r}: udf() raised "
                            f"{type(err).__name__}: {err}") from None
        if not isinstance(source, RDD):
            raise DataError(f"--data_udf {data_udf!r}: udf() returned a "
                            f"{type(source).__name__}, expected an RDD of "
                            + ("(id, numpy array) pairs" if with_ids else "numpy arrays"))
        records = _resized(sc, source.mapPartitionsWithIndex(_udf_records(with_ids)))
        parsed = records.mapPartitions(
            lambda items: _blocks_from_records(items, with_ids, block_rows))
        describe = _describe_udf_record
    elif units is not None:
        from .frames import describe_frame_record
        from .parquet import row_group_blocks
        # As many partitions as text of the same size gets (`_resized`): one per row
        # group up to PARTITIONS_PER_CORE per core. One per core made 500k-row row
        # files whose passes ran 1.3-1.5x slower than over 125k-row files (1M x 128,
        # `local[2]`, the same rows in one application).
        parsed = _resized(sc, row_group_blocks(
            sc, units, vector_col, id_col, with_ids, block_rows, sampling_ratio, seed,
            partitions=PARTITIONS_PER_CORE * sc.defaultParallelism))
        return checked_blocks(sc, parsed, describe_frame_record(vector_col, id_col),
                              f"{where} (column {vector_col!r})", skip_bad_records,
                              sampling_ratio, row_folder, cache)
    elif data_format != "text":
        from pyspark.sql import SparkSession
        df = read_table(SparkSession.builder.getOrCreate(), sc, data_path, data_format,
                        flag)
        # Ids name bad records in messages; compute_codes needs them.
        ids = id_col if with_ids or id_col in df.columns else None
        return load_frame_blocks(sc, df, vector_col, ids, sampling_ratio, seed,
                                 skip_bad_records, where, with_ids=with_ids,
                                 row_folder=row_folder, cache=cache)
    else:
        records, describe, _ = text_records(sc, data_path, sampling_ratio, seed, flag)
        parsed = text_blocks(_resized(sc, records), with_ids, block_rows)
    return checked_blocks(sc, parsed, describe, where, skip_bad_records, sampling_ratio,
                          row_folder, cache)


def text_records(sc, data_path, sampling_ratio=1.0, seed=None, flag="--data"):
    """The parsed records of default-format text at ``data_path``, one partition per
    input split (see `_parse_split`; `_blocks_from_records` makes blocks of them).

    Returns:
        (records RDD, ``describe(where, key)`` naming a record's file and line, True when
        the executors read local files themselves).
    """
    from . import fs
    try:
        fs.input_files(sc, data_path, flag)
    except FileNotFoundError as err:
        raise DataError(str(err)) from None
    lines = sc.textFile(data_path, minPartitions=sc.defaultParallelism)
    splits = _text_splits(lines)
    describe = _describe_text_record([(uri, start) for uri, start, _ in splits])
    local = _local_text_splits(sc, splits)
    parse = _parse_split(sampling_ratio, seed)
    if local is None:
        return lines.mapPartitionsWithIndex(parse), describe, False
    # Local files: the executors read the very same splits themselves, so the lines
    # never cross from the JVM into Python.
    logger.info("reading %d input split(s) of local files on the executors", len(local))

    def read(split, items):
        for path, start, length in items:  # one split per partition
            yield from parse(split, (line for chunk in split_lines(path, start, length)
                                     for line in chunk))

    return sc.parallelize(local, len(local)).mapPartitionsWithIndex(read), describe, True


def text_blocks(records, with_ids, block_rows=ROWS_PER_CACHED_BLOCK):
    """`text_records` as ``(ids, X, report)`` blocks, partition by partition."""
    return records.mapPartitions(lambda items: _blocks_from_records(items, with_ids,
                                                                    block_rows))


def _parquet_units(sc, data_path, vector_col, id_col, with_ids):
    """`parquet.row_groups` of ``data_path``, or None where Spark must read it (and
    name what is wrong: a missing path, a column of another type, ...)."""
    from .parquet import row_groups
    try:
        return row_groups(sc, data_path, vector_col, id_col, id_required=with_ids) or None
    except (FileNotFoundError, ValueError, ImportError):
        return None


def read_table(spark, sc, data_path, data_format, flag="--data"):
    """``spark.read.format(data_format).load(data_path)``, with one-line errors naming
    ``flag``."""
    from . import fs
    try:
        fs.input_files(sc, data_path, flag)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(str(err)) from None
    try:
        return spark.read.format(data_format).load(data_path)
    except Exception as err:  # noqa: BLE001 - Spark's reader: one line, with the flag
        raise DataError(f"{flag} {data_path} cannot be read as --data_format "
                        f"{data_format}: {_first_line(err)}") from None


def load_frame_blocks(sc, df, vector_col="features", id_col=None, sampling_ratio=1.0,
                      seed=None, skip_bad_records=False, where=None, with_ids=None,
                      row_folder=None, cache=True):
    """`load_blocks` for a DataFrame: Arrow batches of ``vector_col`` (and ``id_col``)
    as cached float32 blocks (``row_folder``, ``cache``: see `checked_blocks`). Returns
    (blocks RDD of ``(ids, X)``, n, D)."""
    from .frames import describe_frame_record, frame_block_source
    from .session import as_context
    sc = as_context(sc)
    with_ids = id_col is not None if with_ids is None else with_ids
    parsed = _resized(sc, frame_block_source(df, vector_col, id_col, with_ids,
                                             sampling_ratio, seed))
    where = where or "the DataFrame"
    return checked_blocks(sc, parsed, describe_frame_record(vector_col, id_col or "id"),
                          f"{where} (column {vector_col!r})", skip_bad_records,
                          sampling_ratio, row_folder, cache)


def _first_line(err):
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _resized(sc, records):
    parallelism = sc.defaultParallelism
    if records.getNumPartitions() < parallelism:
        return records.repartition(parallelism)
    if records.getNumPartitions() > PARTITIONS_PER_CORE * parallelism:
        # Every pass pays a per-task cost; tasks stream their blocks, so big partitions
        # cost no memory in the Python workers.
        return records.coalesce(PARTITIONS_PER_CORE * parallelism)
    return records


def checked_blocks(sc, parsed, describe, where, skip_bad_records, sampling_ratio=1.0,
                   row_folder=None, cache=True):
    """Cache ``parsed`` blocks ``(ids, X, report)``, add up their reports, and either
    raise a DataError naming the bad records or return (blocks ``(ids, X)``, n, D).

    With ``row_folder``, the checking job also writes each partition's rows there
    (`lopq.spark.rows.write_partition_file`); those of dimension D are handed to the
    training's row source with the blocks (`lopq.spark.rows.ROW_FILES_ATTRIBUTE`).
    Without ``cache`` (and with ``row_folder``) the blocks are not cached: the files are
    the copy the training reads (see `load_blocks`)."""
    from pyspark import StorageLevel

    from .errors import python_cause
    from .rows import write_partition_file
    if cache or row_folder is None:
        # Spill to local disk rather than re-read the input on every pass when the
        # cache does not fit in memory.
        parsed = parsed.persist(StorageLevel.MEMORY_AND_DISK)
    sc.setJobDescription("lopq: load and check data")

    def reports(index, items):
        arrays = []
        for _, X, report in items:
            if report is not None:
                yield report
            if row_folder is not None:
                arrays.append(X)
        if row_folder is not None:
            write_partition_file(row_folder, index, arrays)

    def discard_files():
        if row_folder is not None:
            import shutil
            shutil.rmtree(row_folder, ignore_errors=True)

    try:
        report = parsed.mapPartitionsWithIndex(reports).fold((0, [], {}), merge_reports)
    except Exception as err:  # noqa: BLE001 - a task failed: say where, in one line
        parsed.unpersist()
        discard_files()
        cause = python_cause(err)
        if cause is None:
            raise
        raise DataError(f"reading {where} failed: {cause}") from None
    try:
        n, D = verdict(report, describe, where, skip_bad_records, sampling_ratio)
    except DataError:
        parsed.unpersist()
        discard_files()
        raise
    # A narrow map over the cached parse: no recomputation, no second cached copy.
    blocks = parsed.filter(lambda b: b[1].shape[0] > 0 and b[1].shape[1] == D).map(
        lambda b: (b[0], b[1]))
    if row_folder is not None:
        from .rows import ROW_FILES_ATTRIBUTE, LoadedRowFiles, keep_row_files
        setattr(blocks, ROW_FILES_ATTRIBUTE, LoadedRowFiles(
            row_folder, keep_row_files(row_folder, blocks.getNumPartitions(), D)))
    logger.info("loaded %d vectors of dimension %d in %d partitions", n, D,
                blocks.getNumPartitions())
    _warn_if_spilled(sc, parsed)
    return blocks, n, D


def verdict(report, describe, where, skip_bad_records, sampling_ratio=1.0):
    """What the merged ``report`` ``(bad count, examples, {dim: [rows, first]})`` of
    some input says: (rows kept, their dimension D, the most common one), a warning
    logged for what is skipped; or a DataError naming the bad records (without
    ``skip_bad_records``), the mixed dimensions, or the empty input."""
    bad, examples, dims = report
    quoted = "; ".join(f"{describe(w, key)}: {error}" for w, key, error in examples)
    if bad and not skip_bad_records:
        raise DataError(f"{bad} malformed record(s) in {where}, e.g. {quoted}. Fix them, "
                        "or pass --skip_bad_records to drop them.")
    D = max(dims, key=lambda d: dims[d][0]) if dims else None
    if len(dims) > 1:
        listed = ", ".join(f"{dims[d][0]} of dimension {d} (the first: "
                           f"{describe(*dims[d][1])})" for d in sorted(dims))
        if not skip_bad_records:
            raise DataError(f"vectors of different dimensions in {where}: {listed}. Every "
                            "vector must have the same dimension (or pass "
                            "--skip_bad_records to keep the most common one).")
        bad += sum(dims[d][0] for d in dims if d != D)
        quoted = (quoted + "; " if quoted else "") + listed
    n = dims[D][0] if dims else 0
    if bad:
        logger.warning("skipped %d malformed record(s) in %s, e.g. %s", bad, where, quoted)
    if n == 0:
        raise DataError(f"no vectors in {where}" + (" after sampling" if sampling_ratio < 1
                                                     else ""))
    return n, D


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
