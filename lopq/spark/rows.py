"""The training's row source on Spark: cached row blocks, one job per pass.

`BlockRows` offers the interface of `lopq.rows` (``n_rows``, ``dim``, ``take``,
``subset``, ``lloyd_pass``, ``covariance_pass``, ``projected``, ``release``) over an RDD
of ``(ids, X)`` blocks, so `lopq.training.train_sequence` runs on it unchanged. Rows
have a global order (partition by partition, block by block), fixed once the blocks are
cached: ``take`` returns exactly the rows an in-memory array would, so the same seed
draws the same samples as `LOPQModel.fit` does. Centres and models travel as
broadcasts; every pass returns statistics sized by the model, reduced by
``treeAggregate``.

In local mode (``local[N]``: the driver and its executors share one file system) the
rows are also written once, one ``.npy`` file per partition, under Spark's temporary
folder, and every later pass reads them memory-mapped: a pass over JVM-cached blocks
first moves every block from the JVM into Python (measured on 1M x 128 rows, 8
partitions, `local[2]`: 0.7-0.85 s of a 2 s Lloyd pass), a mapped file moves nothing.
Samples are then read on the driver from the same files. Lost files are written again
from the cached blocks; on a cluster the passes read the cached blocks as before.
"""

import logging
import os
import uuid
from typing import NamedTuple

import numpy as np

from ..kmeans import as_lloyd_step, lloyd_statistics, merge_lloyd_statistics
from ..rows import centroid_tag, covariance_statistics, project_rows
from .session import as_context


def _add(a, b):
    return tuple(x + y for x, y in zip(a, b))


#: With ``depth=None``, partition statistics are summed on the driver when all of them
#: together hold at most this many bytes; above it, ``treeAggregate`` at depth 2. One
#: level saves the shuffle stage of a tree (measured on 1M x 128 rows in 8 partitions,
#: `local[2]`: a count pass takes 0.7-0.85 s collected, 0.9-1.1 s at depth 2).
DRIVER_AGGREGATION_BYTES = 64 << 20


def _statistics_bytes(zero):
    """Bytes of a pass's statistics (the arrays in ``zero``)."""
    return sum(getattr(x, "nbytes", 0) for x in zero)


def _partition_rows(items):
    yield sum(X.shape[0] for _, X in items)


def _row_file(folder, index):
    return os.path.join(folder, f"{index}.npy")


def _write_row_file(folder, index, X):
    """Write one partition's rows (n, D) float32 as ``<folder>/<index>.npy``, whole or
    not at all (a hidden name, then a rename)."""
    os.makedirs(folder, exist_ok=True)
    path = _row_file(folder, index)
    hidden = os.path.join(folder, f".{index}.{uuid.uuid4().hex}.tmp")
    with open(hidden, "wb") as f:
        np.save(f, np.ascontiguousarray(X, dtype=np.float32))
    os.replace(hidden, path)


def write_partition_file(folder, index, arrays):
    """Write a partition's row arrays, in order, as its row file when they share one
    dimension (nothing otherwise: the file is then written from the blocks when a pass
    needs it). An empty partition gets a (0, 0) file."""
    arrays = [X for X in arrays if X.shape[0] > 0]
    if len({X.shape[1] for X in arrays}) > 1:
        return
    X = (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)) if arrays \
        else np.empty((0, 0), np.float32)
    _write_row_file(folder, index, X)


def new_row_folder():
    """A fresh folder name for row files, under Spark's temporary folder (removed when
    the application ends, if not before by `BlockRows.release`)."""
    from pyspark import SparkFiles
    return os.path.join(SparkFiles.getRootDirectory(), f"lopq-rows-{uuid.uuid4().hex}")


def loading_row_folder(sc):
    """Where a loading job writes row files for the training (`load_blocks` with
    ``row_files=True``): a new folder in local mode (`local_files_default`), else None."""
    return new_row_folder() if local_files_default(sc) else None


class LoadedRowFiles(NamedTuple):
    """Row files written while the blocks were loaded, handed to `BlockRows` with them
    (the blocks RDD's `ROW_FILES_ATTRIBUTE`): their folder, and the rows per partition
    when every partition's file is there (else None: counted by a job)."""
    folder: str
    partition_rows: list


#: The attribute of a blocks RDD (set by `lopq.spark.data.checked_blocks`) holding its
#: `LoadedRowFiles`.
ROW_FILES_ATTRIBUTE = "_lopq_row_files"


def keep_row_files(folder, partitions, D):
    """After loading: the files of ``partitions`` partitions under ``folder`` whose rows
    are of dimension ``D`` (or none); any other is removed, to be rewritten from the
    blocks. Returns rows per partition when every file is there and valid, else None."""
    rows = []
    for index in range(partitions):
        path = _row_file(folder, index)
        try:
            shape = np.load(path, mmap_mode="r").shape
        except (OSError, ValueError):
            shape = None
        if shape is None or len(shape) != 2 or (shape[0] and shape[1] != D):
            if shape is not None:
                os.remove(path)
            rows.append(None)
        else:
            rows.append(shape[0])
    return None if None in rows else rows


def _labels_file(folder, tag, index):
    return os.path.join(folder, f"labels-{tag}-{index}.npy")


def _write_labels_file(folder, tag, index, labels):
    """A partition's coarse labels (n, 2) int32 for centroids of `centroid_tag` ``tag``,
    whole or not at all."""
    hidden = os.path.join(folder, f".labels.{uuid.uuid4().hex}.tmp")
    with open(hidden, "wb") as f:
        np.save(f, labels)
    os.replace(hidden, _labels_file(folder, tag, index))


def _read_labels_file(folder, tag, index, rows):
    """The partition's coarse labels for ``tag`` when its covariance pass left them and
    they fit its ``rows`` rows, else None (then assigned again)."""
    try:
        labels = np.load(_labels_file(folder, tag, index), mmap_mode="r")
    except (OSError, ValueError):
        return None
    return labels if labels.shape == (rows, 2) and labels.dtype == np.int32 else None


def _read_row_file(folder, index):
    """One partition's rows, memory-mapped copy-on-write (the kernels may ask for
    writeable buffers; nothing is written): (n, D) float32."""
    return np.load(_row_file(folder, index), mmap_mode="c")


#: Rows per kernel call of a pass: cached blocks are joined up to this many (16 MB of
#: float32 at D=128) because small calls cost more per row (measured: the covariance
#: statistics of 8,192 rows run at 295k rows/s, of 65,536 rows at 462k rows/s).
PASS_ROWS = 32768


def joined_blocks(items, rows=PASS_ROWS):
    """The X of ``(ids, X)`` blocks joined, in order, into arrays of at least ``rows``
    rows (the last may hold fewer)."""
    pending, count = [], 0
    for _, X in items:
        pending.append(X)
        count += X.shape[0]
        if count >= rows:
            yield pending[0] if len(pending) == 1 else np.concatenate(pending)
            pending, count = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


def file_chunks(X, rows=PASS_ROWS):
    """Consecutive row slices of a partition's (n, D) rows, ``rows`` at a time (views)."""
    for start in range(0, X.shape[0], rows):
        yield X[start:start + rows]


def _mapped_file_chunks(folder, index, X, function):
    """``function(chunk, labels)`` of each `file_chunks` chunk of partition ``index``'s
    rows ``X``: with the chunk's coarse labels when the function has a ``labels_tag``
    whose labels file the partition has (`BlockRows.covariance_pass`), else None."""
    tag = getattr(function, "labels_tag", None)
    labels = None if tag is None else _read_labels_file(folder, tag, index, X.shape[0])
    for start in range(0, X.shape[0], PASS_ROWS):
        yield function(X[start:start + PASS_ROWS],
                       None if labels is None else labels[start:start + PASS_ROWS])


#: Spark configuration key: "false" keeps local-mode training on the JVM-cached blocks
#: (no row files), "true" asks for them (local mode only: a cluster's executors do not
#: share the driver's temporary folder).
ROW_FILES_CONF = "spark.lopq.rowFiles"


def local_files_default(sc):
    """Whether training sources write row files by default: in local mode, where the
    driver and the executors see the same files, unless `ROW_FILES_CONF` is "false"."""
    setting = sc.getConf().get(ROW_FILES_CONF, "true").strip().lower()
    if setting not in ("true", "false"):
        raise ValueError(f"{ROW_FILES_CONF}={setting!r}: expected true or false")
    return setting == "true" and sc.master.startswith("local")


def _accumulate(total, part):
    """``total += part`` element-wise, in place (``part`` when ``total`` is None): a pass
    sums its partition's statistics without allocating a new total per block."""
    if total is None:
        return part
    for t, p in zip(total, part):
        t += p
    return total


class BlockRows:
    """A row source over cached row blocks.

    Args:
        sc: SparkContext or SparkSession.
        blocks: RDD of ``(ids, X)``, X (b, D) float32, cached by the caller (or
            ``owned=True``: this source unpersists it on `release`).
        depth: ``treeAggregate`` depth; None (default): one level (the driver sums
            the partitions' statistics) when they hold at most
            `DRIVER_AGGREGATION_BYTES` together, else 2.
        partition_rows: rows per partition, when known (else one job counts them).
        dim: D, when known.
        owned: the blocks were cached by this source (`release` unpersists them).
        broadcast: a broadcast the blocks' lineage reads, unpersisted with them.
        row_files: passes read one memory-mapped ``.npy`` file per partition (written
            on first use, removed by `release`); None (default): in local mode only
            (`local_files_default`).
    """

    #: Every Lloyd pass is a Spark job: log each at INFO, as the drivers' progress.
    log_level = logging.INFO

    def __init__(self, sc, blocks, depth=None, partition_rows=None, dim=None, owned=False,
                 backend=None, broadcast=None, row_files=None):
        self.sc = as_context(sc)
        if row_files is None:
            row_files = local_files_default(self.sc)
        self._folder = None
        if row_files:
            # the files the loading wrote, if any (this source then owns them); else a
            # new folder, written on first use
            loaded = getattr(blocks, ROW_FILES_ATTRIBUTE, None)
            self._folder = new_row_folder() if loaded is None else loaded.folder
            if partition_rows is None and loaded is not None:
                partition_rows = loaded.partition_rows
        # (parent, function of a chunk of the parent's rows): this source's rows, mapped
        # from the parent's files; `_store` them in files of its own, or map each pass
        self._derive = None
        self._store = True
        self.blocks = blocks
        self.depth = depth
        self.backend = backend
        self.owned = owned
        self._broadcast = broadcast  # what the blocks' lineage reads: freed with them
        if partition_rows is None:
            self.sc.setJobDescription("lopq training: rows per partition")
            partition_rows = blocks.mapPartitions(_partition_rows).collect()
        self.partition_rows = np.asarray(partition_rows, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.partition_rows)])
        self._dim = dim

    @property
    def n_rows(self):
        return int(self.offsets[-1])

    @property
    def dim(self):
        if self._dim is None:
            self._dim = int(self.blocks.map(lambda b: b[1].shape[1]).first())
        return self._dim

    def _aggregate(self, statistics, zero, merge):
        """Sum the per-partition ``statistics`` RDD (one item per partition) into
        ``zero``, at ``depth`` or as `DRIVER_AGGREGATION_BYTES` decides."""
        depth = self.depth
        if depth is None:
            together = _statistics_bytes(zero) * statistics.getNumPartitions()
            depth = 1 if together <= DRIVER_AGGREGATION_BYTES else 2
        return statistics.treeAggregate(zero, merge, merge, depth=depth)

    def _missing_files(self):
        return [p for p in range(len(self.partition_rows))
                if not os.path.exists(_row_file(self._folder, p))]

    def _file_groups(self, partitions=None):
        """The row partitions (all, or those listed) in at most one contiguous group per
        core, balanced by rows: the tasks of a pass over row files. A task costs about
        40 ms in local mode whatever it does (measured on `local[2]`: 8 empty tasks 0.25 s,
        2 tasks 0.1 s), and each returns a copy of the statistics: fewer, larger tasks."""
        partitions = list(range(len(self.partition_rows))) if partitions is None \
            else list(partitions)
        count = min(len(partitions), max(1, self.sc.defaultParallelism))
        if count == 0:
            return []
        weights = np.cumsum([self.partition_rows[p] + 1 for p in partitions])
        cuts = np.searchsorted(weights, weights[-1] * np.arange(1, count) / count)
        return [g.tolist() for g in np.split(np.asarray(partitions), cuts) if len(g)]

    def _markers(self, partitions=None):
        """An RDD of one item per `_file_groups` group (its partition indices), a
        partition each: tasks that read and write row files."""
        groups = self._file_groups(partitions)
        return self.sc.parallelize(groups, max(1, len(groups)))

    def _files_ready(self):
        """Whether passes read row files: in file mode, after writing any missing ones
        (from the parent's files when derived, else from the cached blocks)."""
        if self._folder is None:
            return False
        missing = self._missing_files()
        if not missing:
            return True
        folder = self._folder
        self.sc.setJobDescription(f"lopq training: rows of {len(missing)} partition(s) "
                                  "to local files")
        if self._derive is not None and self._derive[0]._files_ready():
            parent, function = self._derive[0]._folder, self._derive[1]

            def derive(group):
                for index in group:
                    X = _read_row_file(parent, index)
                    if X.shape[0]:
                        X = np.concatenate(list(_mapped_file_chunks(parent, index, X,
                                                                    function)))
                    _write_row_file(folder, index, X)
                    yield index

            self._markers(missing).flatMap(derive).collect()
        else:
            def write(index, items):
                write_partition_file(folder, index, [X for _, X in items])
                yield index

            self.sc.runJob(self.blocks.mapPartitionsWithIndex(write), list, missing)
        return True

    def _per_partition(self, function):
        """An RDD with one item per partition: ``function`` of the partition's rows as
        consecutive (<= `PASS_ROWS`, D) float32 arrays, read from the row files when
        there are, else joined from the cached blocks."""
        if self._mapped_each_pass():
            parent, rows = self._derive[0]._folder, self._derive[1]

            def mapped_chunks(group):
                for index in group:
                    yield from _mapped_file_chunks(parent, index,
                                                   _read_row_file(parent, index), rows)

            return self._markers().map(lambda group: function(mapped_chunks(group)))
        if self._files_ready():
            folder = self._folder

            def chunks(group):
                for index in group:
                    yield from file_chunks(_read_row_file(folder, index))

            return self._markers().map(lambda group: function(chunks(group)))
        return self.blocks.mapPartitions(lambda items: [function(joined_blocks(items))])

    def _mapped_each_pass(self):
        """Whether passes map the parent's row files rather than read files of this
        source's own (a derived source not stored, over a parent with files)."""
        return self._derive is not None and not self._store and \
            self._derive[0]._files_ready()

    def _local_indices(self, indices):
        """Per partition, the sorted local row indices among global ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        cuts = np.searchsorted(indices, self.offsets)
        return [indices[cuts[p]:cuts[p + 1]] - self.offsets[p]
                for p in range(len(self.partition_rows))]

    def _selected(self, indices, description):
        """An RDD of ``(ids, X)`` blocks holding only the rows at global ``indices``."""
        self.sc.setJobDescription(description)
        local = self.sc.broadcast(self._local_indices(indices))

        def select(index, items):
            wanted = local.value[index]
            start = 0
            for ids, X in items:
                lo, hi = np.searchsorted(wanted, [start, start + X.shape[0]])
                if hi > lo:
                    rows = wanted[lo:hi] - start
                    yield (None if ids is None else [ids[i] for i in rows]), X[rows]
                start += X.shape[0]

        return self.blocks.mapPartitionsWithIndex(select), local

    def take(self, indices):
        """Rows at sorted global ``indices``, collected (read on the driver from the row
        files when there are): (s, D) float32."""
        if self._mapped_each_pass():
            return self._derive[1](self._derive[0].take(indices), None)
        if self._files_ready():
            parts = [_read_row_file(self._folder, p)[local]
                     for p, local in enumerate(self._local_indices(indices)) if len(local)]
            if not parts:
                return np.empty((0, self.dim), dtype=np.float32)
            return np.ascontiguousarray(np.concatenate(parts))
        selected, local = self._selected(indices, "lopq training: sample")
        parts = selected.map(lambda b: b[1]).collect()
        local.unpersist()
        if not parts:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.concatenate(parts)

    def subset(self, indices):
        """A `BlockRows` of the rows at sorted global ``indices``: with row files, its
        files are cut from this source's files in one job (the blocks, which may not be
        cached, are not read); else its blocks are cached."""
        from pyspark import StorageLevel
        selected, local = self._selected(indices, "lopq training: subset of rows")
        counts = [len(part) for part in self._local_indices(indices)]
        files = self._files_ready()
        if not files:
            selected = selected.persist(StorageLevel.MEMORY_AND_DISK)
        source = BlockRows(self.sc, selected, self.depth, counts, self._dim, owned=True,
                           backend=self.backend, broadcast=local,
                           row_files=self._folder is not None)
        if files:
            parent, folder = self._folder, source._folder

            def cut(group):
                for index in group:
                    _write_row_file(folder, index,
                                    _read_row_file(parent, index)[local.value[index]])
                    yield index

            self.sc.setJobDescription("lopq training: subset of rows to local files")
            self._markers().flatMap(cut).collect()
        return source

    def lloyd_pass(self, centers):
        self.sc.setJobDescription(f"lopq k-means: Lloyd pass of {centers.shape[0]} group(s), "
                                  f"k={centers.shape[1]}")
        backend = self.backend
        shipped = self.sc.broadcast(np.ascontiguousarray(centers, dtype=np.float32))
        G, k, dg = centers.shape
        zero = (np.zeros((G, k, dg)), np.zeros((G, k), dtype=np.int64), np.zeros(G),
                [[] for _ in range(G)])

        def partition(chunks):
            total = zero
            for X in chunks:
                total = merge_lloyd_statistics(total,
                                               lloyd_statistics(X, shipped.value, backend))
            return total

        statistics = self._aggregate(self._per_partition(partition), zero,
                                     merge_lloyd_statistics)
        shipped.unpersist()
        return as_lloyd_step(statistics)

    def covariance_pass(self, Cs):
        """Per coarse cluster, the residual statistics of both splits (see
        `lopq.rows.covariance_statistics`). With row files of its own, each partition's
        coarse labels are kept beside its file, for the projection passes over the same
        ``Cs`` (`projected`): they then assign no row again (measured on 1M x 128,
        `local[2]`: an assignment of both halves costs about 0.45 s a pass)."""
        self.sc.setJobDescription("lopq rotations (step 1): covariance accumulators")
        backend = self.backend
        shipped = self.sc.broadcast(np.ascontiguousarray(Cs, dtype=np.float32))
        V, h = Cs.shape[1], Cs.shape[2]
        zero = (np.zeros((2, V, h, h)), np.zeros((2, V, h)), np.zeros((2, V), dtype=np.int64))

        def partition(chunks):
            total = None
            for X in chunks:
                total = _accumulate(total, covariance_statistics(X, shipped.value, backend))
            return zero if total is None else total

        if not self._mapped_each_pass() and self._files_ready():
            folder, tag = self._folder, centroid_tag(Cs)

            def labelled(group):
                total = None
                for index in group:
                    X = _read_row_file(folder, index)
                    labels = np.empty((X.shape[0], 2), dtype=np.int32)
                    for start in range(0, X.shape[0], PASS_ROWS):
                        total = _accumulate(total, covariance_statistics(
                            X[start:start + PASS_ROWS], shipped.value, backend,
                            labels_out=labels[start:start + PASS_ROWS]))
                    _write_labels_file(folder, tag, index, labels)
                return zero if total is None else total

            per_partition = self._markers().map(labelled)
        else:
            per_partition = self._per_partition(partition)
        statistics = self._aggregate(per_partition, zero, _add)
        shipped.unpersist()
        return statistics

    def projected(self, Cs, Rs, mus, passes=None):
        """A cached `BlockRows` of the projected residuals (same partitions and order).

        ``passes=1`` (a source read once, as the refinement's last codebook step reads
        it): with row files, the pass projects the parent's files chunk by chunk rather
        than writing the projections to files first (measured on 1M x 128, `local[2]`:
        writing them costs more than a pass)."""
        from pyspark import StorageLevel
        backend = self.backend
        shipped = self.sc.broadcast(tuple(np.ascontiguousarray(p, dtype=np.float32)
                                          for p in (Cs, Rs, mus)))

        def partition(items):
            Cs, Rs, mus = shipped.value
            for ids, X in items:
                yield ids, project_rows(X, Cs, Rs, mus, backend)

        def project_chunk(X, labels):
            Cs, Rs, mus = shipped.value
            return project_rows(X, Cs, Rs, mus, backend, labels)

        projected = self.blocks.mapPartitions(partition)
        if self._folder is None:  # with row files the lineage only rewrites lost files
            projected = projected.persist(StorageLevel.MEMORY_AND_DISK)
        source = BlockRows(self.sc, projected, self.depth, self.partition_rows, self._dim,
                           owned=True, backend=backend, broadcast=shipped,
                           row_files=self._folder is not None)
        project_chunk.labels_tag = centroid_tag(Cs)
        source._derive = (self, project_chunk)
        source._store = passes != 1
        return source

    def release(self):
        """Remove this source's row files; unpersist what it cached itself (never the
        caller's blocks)."""
        if self._folder is not None:
            import shutil
            shutil.rmtree(self._folder, ignore_errors=True)
        if self.owned:
            self.blocks.unpersist()
            if self._broadcast is not None:
                self._broadcast.unpersist()
