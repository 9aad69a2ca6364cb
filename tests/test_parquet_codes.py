"""compute_codes.py from tables: Parquet files read by the executors with pyarrow
(lopq.spark.parquet), and every other table through a DataFrame; on the shared local
SparkContext with synthetic data."""

import json
import re

import numpy as np
import pytest
from spark_helpers import assert_codes_equal_encode, run_driver

from lopq import LOPQModel

pytestmark = pytest.mark.spark
pytest.importorskip("pyspark")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DIRECT = "executors read them with pyarrow"


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    X = (rng.standard_normal((1500, 16)) + 3 * rng.integers(0, 4, (1500, 1))).astype(np.float32)
    model = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X, n_init=1, random_state=0)
    return X, model


def vectors(X, value_type=pa.float32()):
    n, d = X.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(X.ravel(), value_type))


def write_files(folder, X, ids, files=3, row_group_size=200, value_type=pa.float64()):
    """``key int64, emb list<double>`` rows over ``files`` Parquet files."""
    folder.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(len(X)), files)):
        table = pa.table({"key": pa.array(ids[rows], pa.int64()),
                          "emb": vectors(X[rows], value_type)})
        pq.write_table(table, str(folder / f"part-{i}.parquet"), row_group_size=row_group_size)


def model_file(model, tmp_path):
    path = tmp_path / "model.lopq"
    model.export_proto(str(path))
    return str(path)


def compute_codes(tmp_path, capsys, model, data_path, *extra):
    out = tmp_path / "codes"
    code, streams = run_driver("compute_codes", [
        "--data", str(data_path), "--output", str(out), "--model_proto",
        model_file(model, tmp_path), "--output_format", "parquet", *extra], capsys)
    return code, streams, out


def test_parquet_files_are_encoded_by_the_executors_as_encode_does(sc, data, tmp_path,
                                                                   capsys):
    X, model = data
    ids = np.arange(len(X)) * 7 + 11
    write_files(tmp_path / "table", X, ids)
    code, streams, out = compute_codes(tmp_path, capsys, model, tmp_path / "table",
                                       "--vector_col", "emb", "--id_col", "key")
    assert code != 0 and "this is a Parquet file" in streams.err  # a folder: say the format
    code, streams, out = compute_codes(tmp_path, capsys, model, tmp_path / "table",
                                       "--vector_col", "emb", "--id_col", "key",
                                       "--data_format", "parquet")
    assert code == 0, streams.err
    assert DIRECT in streams.err and f"wrote codes of {len(X)} vectors" in streams.out
    # 3 files of 500 rows in row groups of 200: 3 row groups each, one part file each.
    assert sorted(p.name for p in out.iterdir()) == \
        ["_SUCCESS"] + [f"part-{i:05d}.snappy.parquet" for i in range(9)]
    table = pq.read_table(str(out))
    assert table.schema.names == ["id", "coarse", "fine"]
    assert table.schema.field("id").type == pa.int64()  # ids keep their type
    rows = table.to_pydict()
    codes = {key: (c, f) for key, c, f in zip(rows["id"], rows["coarse"], rows["fine"])}
    assert len(codes) == len(rows["id"])
    assert_codes_equal_encode(model, X, ids.tolist(), codes)


def test_bad_rows_stop_the_job_or_are_skipped(sc, data, tmp_path, capsys):
    X, model = data
    X = X[:50].copy()
    X[7, 3] = np.inf
    emb = vectors(X).to_pylist()
    emb[20] = None          # a null vector
    emb[30] = emb[30][:5]   # another length than the model's
    folder = tmp_path / "table"
    folder.mkdir()
    pq.write_table(pa.table({"id": [f"v{i}" for i in range(50)],
                             "features": pa.array(emb, pa.list_(pa.float32()))}),
                   str(folder / "x.parquet"), row_group_size=20)
    code, streams, out = compute_codes(tmp_path, capsys, model, folder, "--data_format",
                                       "parquet")
    assert code != 0 and DIRECT in streams.err
    # Row groups fail in parallel: the line names whichever bad row failed first.
    assert re.search(r"column 'features', row with id (v7: the vector has NaN or infinite "
                     r"values|v20: the vector is null|v30: vector of length 5, the model "
                     r"is for vectors of dimension 16) \(pass --skip_bad_records",
                     streams.err), streams.err
    assert not out.exists() and not list(tmp_path.glob(".codes*"))
    code, streams, out = compute_codes(tmp_path, capsys, model, folder, "--skip_bad_records",
                                       "--data_format", "parquet")
    assert code == 0, streams.err
    assert "skipped 3 malformed record(s)" in streams.out
    kept = [i for i in range(50) if i not in (7, 20, 30)]
    rows = pq.read_table(str(out)).to_pydict()
    codes = {key: (c, f) for key, c, f in zip(rows["id"], rows["coarse"], rows["fine"])}
    assert_codes_equal_encode(model, X[kept], [f"v{i}" for i in kept], codes)


def test_an_empty_table_is_refused_without_output(sc, data, tmp_path, capsys):
    _, model = data
    folder = tmp_path / "table"
    folder.mkdir()
    pq.write_table(pa.table({"id": pa.array([], pa.string()),
                             "features": pa.array([], pa.list_(pa.float32()))}),
                   str(folder / "x.parquet"))
    code, streams, out = compute_codes(tmp_path, capsys, model, folder, "--data_format",
                                       "parquet")
    assert code != 0 and "no vectors in --data" in streams.err
    assert not out.exists()


def test_other_tables_go_through_a_dataframe_with_the_same_codes(sc, data, tmp_path, capsys):
    X, model = data
    X = X[:300]
    path = tmp_path / "rows.json"
    path.write_text("".join(json.dumps({"id": f"j{i}", "features": x.tolist()}) + "\n"
                            for i, x in enumerate(X.astype(float))))
    code, streams, out = compute_codes(tmp_path, capsys, model, path, "--data_format",
                                       "json")
    assert code == 0, streams.err
    assert DIRECT not in streams.err
    rows = pq.read_table(str(out)).to_pydict()
    codes = {key: (c, f) for key, c, f in zip(rows["id"], rows["coarse"], rows["fine"])}
    assert_codes_equal_encode(model, X, [f"j{i}" for i in range(len(X))], codes)


def test_row_groups_leaves_what_pyarrow_cannot_encode_to_spark(sc, data, tmp_path):
    from lopq.spark.parquet import row_groups
    X, _ = data
    write_files(tmp_path / "table", X[:100], np.arange(100), files=2, row_group_size=30)
    units = row_groups(sc, str(tmp_path / "table"), "emb", "key")
    assert [(u.rows, u.group) for u in units] == [(30, 0), (20, 1)] * 2
    assert sorted(u.index for u in units) == [0, 1, 2, 3]
    assert row_groups(sc, str(tmp_path / "table"), "nope", "key") is None
    assert row_groups(sc, str(tmp_path / "table"), "key", "key") is None  # not a list
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "x.parquet").write_text("not parquet\n")
    assert row_groups(sc, str(tmp_path / "text"), "emb", "key") is None
    # Files that disagree on the vector type: Spark reconciles them, not us.
    pq.write_table(pa.table({"key": pa.array([1], pa.int64()),
                             "emb": vectors(X[:1], pa.float32())}),
                   str(tmp_path / "table" / "part-9.parquet"))
    assert row_groups(sc, str(tmp_path / "table"), "emb", "key") is None


def test_a_retried_task_replaces_its_part_files(data, tmp_path):
    from lopq.spark.parquet import RowGroup, _encode_row_groups
    X, model = data
    write_files(tmp_path / "table", X[:90], np.arange(90), files=1, row_group_size=40)
    path = str(tmp_path / "table" / "part-0.parquet")
    units = [RowGroup(5 + g, path, g, 40) for g in range(3)]

    class Shipped:
        value = model
    out = tmp_path / "out"
    out.mkdir()
    task = _encode_row_groups(Shipped, str(out), "emb", "key", False)
    first = list(task(iter(units)))
    again = list(task(iter(units)))  # a second attempt of the same task
    assert first == again == [(40, 0), (40, 0), (10, 0)]
    assert sorted(p.name for p in out.iterdir()) == \
        [f"part-{i:05d}.snappy.parquet" for i in (5, 6, 7)]
    assert pq.read_table(str(out)).num_rows == 90


def test_tasks_balance_the_cores_and_cap_their_rows():
    from lopq.spark import parquet
    from lopq.spark.parquet import RowGroup, _tasks
    sizes = [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 5]
    units = [RowGroup(i, "f", i, n) for i, n in enumerate(sizes)]
    tasks = _tasks(units, 3)
    assert len(tasks) == 3
    assert sorted(u.index for t in tasks for u in t) == list(range(len(sizes)))
    loads = [sum(u.rows for u in t) for t in tasks]
    assert loads == sorted(loads, reverse=True) and loads[0] - loads[-1] <= max(sizes)
    assert _tasks(units[:2], 8) == [[units[0]], [units[1]]]  # never more than row groups
    cap = parquet.TASK_ROWS
    big = [RowGroup(i, "f", i, cap // 2) for i in range(9)]
    assert len(_tasks(big, 2)) == 5  # 4.5 caps of rows: 5 tasks, not 2


# ------------------------------------------------------------ training reads (load_blocks)
READ = "with pyarrow on the executors"


def loaded_rows(blocks):
    ids, X = [], []
    for block_ids, block in blocks.collect():
        ids += [] if block_ids is None else list(block_ids)
        X.append(block)
    return ids, np.concatenate(X)


def test_training_reads_parquet_files_with_pyarrow_row_for_row(sc, data, tmp_path, caplog):
    """load_blocks (train_model.py, train_pca.py, search.py --data) on local Parquet
    files: the executors read the row groups (the log says so), every row arrives once
    with its id, float64 files become float32 rows."""
    import logging

    from lopq.spark.data import load_blocks
    X, _ = data
    write_files(tmp_path / "table", X, np.arange(len(X)) + 1000)
    with caplog.at_level(logging.INFO, logger="lopq"):
        blocks, n, D = load_blocks(sc, str(tmp_path / "table"), data_format="parquet",
                                   vector_col="emb", id_col="key", with_ids=True)
    assert READ in caplog.text
    assert (n, D) == X.shape
    ids, got = loaded_rows(blocks)
    order = np.argsort(ids)
    np.testing.assert_array_equal(np.asarray(ids)[order], np.arange(len(X)) + 1000)
    np.testing.assert_array_equal(got[order], X)
    # Training needs no id column.
    write_files(tmp_path / "no_ids", X[:300], np.arange(300))
    for f in (tmp_path / "no_ids").iterdir():
        pq.write_table(pq.read_table(str(f)).drop(["key"]), str(f))
    blocks, n, D = load_blocks(sc, str(tmp_path / "no_ids"), data_format="parquet",
                               vector_col="emb")
    assert (n, D) == (300, 16)
    _, got = loaded_rows(blocks)
    np.testing.assert_array_equal(np.sort(got, axis=0), np.sort(X[:300], axis=0))


def test_parquet_sampling_is_seeded_and_a_subset(sc, data, tmp_path):
    from lopq.spark.data import load_blocks
    X, _ = data
    write_files(tmp_path / "table", X, np.arange(len(X)))

    def sample(seed):
        blocks, n, _ = load_blocks(sc, str(tmp_path / "table"), data_format="parquet",
                                   vector_col="emb", id_col="key", with_ids=True,
                                   sampling_ratio=0.3, seed=seed)
        ids, got = loaded_rows(blocks)
        assert n == len(ids)
        np.testing.assert_array_equal(got, X[ids])
        return sorted(ids)

    first = sample(4)
    assert first == sample(4) != sample(5)
    # 1500 Bernoulli(0.3) draws: 450 expected, sd 17.7
    assert 350 < len(first) < 550


def test_parquet_training_bad_rows_are_named_or_skipped(sc, data, tmp_path):
    from lopq.spark.data import load_blocks
    from lopq.spark.errors import DataError
    X, _ = data
    X = X[:50].copy()
    X[7, 3] = np.nan
    emb = vectors(X).to_pylist()
    emb[20] = None
    folder = tmp_path / "table"
    folder.mkdir()
    pq.write_table(pa.table({"id": [f"v{i}" for i in range(50)],
                             "features": pa.array(emb, pa.list_(pa.float32()))}),
                   str(folder / "x.parquet"), row_group_size=20)
    with pytest.raises(DataError) as err:
        load_blocks(sc, str(folder), data_format="parquet")
    message = str(err.value)
    assert message.startswith(f"2 malformed record(s) in --data {folder} (column "
                              "'features'), e.g. column 'features', row with id 'v7': the "
                              "vector has NaN or infinite values"), message
    assert "'v20': the vector is null" in message and "--skip_bad_records" in message
    _, n, D = load_blocks(sc, str(folder), data_format="parquet", skip_bad_records=True)
    assert (n, D) == (48, 16)
