"""Outputs and inputs through the Hadoop FileSystem API (local paths, ``file://``,
``hdfs://``, ``s3a://``), written to a temporary name and renamed: a failed job leaves
no partial output."""

import contextlib
import os
import uuid


def _jvm_path(sc, path):
    jvm = sc._jvm
    p = jvm.org.apache.hadoop.fs.Path(path)
    fs = p.getFileSystem(sc._jsc.hadoopConfiguration())
    fs.setWriteChecksum(False)
    fs.setVerifyChecksum(False)
    return fs, p


def exists(sc, path):
    fs, p = _jvm_path(sc, path)
    return bool(fs.exists(p))


def input_files(sc, path, flag="--data"):
    """The data files a ``sc.textFile(path)`` would read: ``[(uri, bytes), ...]``.

    ``path`` may be a file, a folder (its visible files, as Hadoop reads them) or a glob.
    Raises FileNotFoundError / ValueError naming ``flag`` when there is nothing to read.
    """
    fs, p = _jvm_path(sc, path)
    statuses = fs.globStatus(p)
    if statuses is None or len(statuses) == 0:
        raise FileNotFoundError(f"{flag} {path} does not exist")
    files = []
    for status in statuses:
        children = fs.listStatus(status.getPath()) if status.isDirectory() else [status]
        for child in children:
            name = child.getPath().getName()
            if child.isFile() and not name.startswith(("_", ".")):
                files.append((child.getPath().toString(), int(child.getLen())))
    if not files:
        raise ValueError(f"{flag} {path} is an empty folder: it holds no data files")
    if not any(size for _, size in files):
        raise ValueError(f"{flag} {path} is empty (0 bytes)")
    return files


def check_output_path(sc, path, overwrite, flag):
    """Refuse an existing output unless ``overwrite``: raises ValueError naming the flag."""
    if path and exists(sc, path) and not overwrite:
        raise ValueError(f"{flag} {path} already exists: choose another path or pass "
                         "--overwrite to replace it")


def _tmp_sibling(p, sc):
    jvm = sc._jvm
    return jvm.org.apache.hadoop.fs.Path(p.getParent(),
                                         f".{p.getName()}.tmp-{uuid.uuid4().hex[:12]}")


def write_bytes(sc, path, data, overwrite=False):
    """Write ``data`` to ``path`` atomically (temporary sibling, then rename)."""
    fs, p = _jvm_path(sc, path)
    parent = p.getParent()
    if parent is not None and not fs.exists(parent):
        fs.mkdirs(parent)
    with atomic_output(sc, path, overwrite) as tmp:
        out = fs.create(sc._jvm.org.apache.hadoop.fs.Path(tmp), True)
        try:
            chunk = 1 << 20
            for start in range(0, len(data), chunk):
                out.write(bytearray(data[start:start + chunk]))
        finally:
            out.close()


def _discard(fs, tmp):
    if fs.exists(tmp):
        fs.delete(tmp, True)


def _commit(fs, tmp, p, path, overwrite):
    """Rename the finished temporary output onto ``path`` (replacing it only when
    ``overwrite``); on refusal or failure the temporary output is removed."""
    if fs.exists(p):
        if not overwrite:
            _discard(fs, tmp)
            raise ValueError(f"{path} already exists: pass --overwrite to replace it")
        fs.delete(p, True)
    if not fs.rename(tmp, p):
        _discard(fs, tmp)
        raise OSError(f"could not rename the temporary output to {path}")


def read_bytes(sc, path):
    """All bytes of a file: a local file, a file shipped with ``--files``, or a Hadoop
    path."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read()
    from pyspark import SparkFiles
    try:
        shipped = SparkFiles.get(os.path.basename(path))
        if os.path.isfile(shipped):
            with open(shipped, "rb") as f:
                return f.read()
    except Exception:  # noqa: BLE001 - not shipped: try the Hadoop path below
        pass
    fs, p = _jvm_path(sc, path)
    if not fs.exists(p):
        raise FileNotFoundError(f"{path} does not exist (looked for a local file, a file "
                                "shipped with --files, and a Hadoop path)")
    stream = fs.open(p)
    try:
        size = fs.getFileStatus(p).getLen()
        buf = sc._gateway.new_array(sc._jvm.byte, 1 << 20)
        parts = []
        read = 0
        while read < size:
            k = stream.read(buf)
            if k <= 0:
                break
            parts.append(bytes(buf)[:k])
            read += k
        return b"".join(parts)
    finally:
        stream.close()


@contextlib.contextmanager
def atomic_output(sc, path, overwrite=False):
    """Yields a temporary sibling path (a string) to write ``path``'s content into; on a
    clean exit it is renamed onto ``path`` (replacing it only when ``overwrite``), on an
    exception it is removed."""
    fs, p = _jvm_path(sc, path)
    tmp = _tmp_sibling(p, sc)
    try:
        yield tmp.toString()
    except BaseException:
        _discard(fs, tmp)
        raise
    _commit(fs, tmp, p, path, overwrite)


def write_part_file(out_dir, name, write):
    """``write(file)`` into ``out_dir/name`` under a hidden name, then a rename: a retried
    or speculative task attempt replaces the part file instead of adding a second one."""
    import os
    partial = os.path.join(out_dir, f".{name}-{uuid.uuid4().hex}.tmp")
    write(partial)
    os.replace(partial, os.path.join(out_dir, name))


def finish_part_folder(out_dir):
    """Drop what killed task attempts left (``write_part_file``'s hidden files) and mark
    the local folder complete with ``_SUCCESS``, as Spark's writers do."""
    import os
    for name in os.listdir(out_dir):
        if name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))
    open(os.path.join(out_dir, "_SUCCESS"), "wb").close()


def local_path(sc, path):
    """The local file-system path of ``path`` (a plain path or a ``file:`` URI), or
    None when it lives on another file system (HDFS, S3...)."""
    fs, p = _jvm_path(sc, path)
    uri = fs.makeQualified(p).toUri()
    return uri.getPath() if uri.getScheme() == "file" else None


def save_text_atomically(sc, rdd, path, overwrite=False):
    """``rdd.saveAsTextFile`` into a temporary folder, renamed to ``path`` on success."""
    with atomic_output(sc, path, overwrite) as tmp:
        rdd.saveAsTextFile(tmp)


def save_frame_atomically(sc, df, path, overwrite=False, partition_by=None, check=None):
    """Write ``df`` as Parquet into a temporary folder, renamed to ``path`` on success.

    ``check(tmp_path)``, if given, runs before the rename and may raise to discard the
    output (e.g. nothing was written).
    """
    with atomic_output(sc, path, overwrite) as tmp:
        writer = df.write
        if partition_by:
            writer = writer.partitionBy(partition_by)
        writer.parquet(tmp)
        if check is not None:
            check(tmp)
