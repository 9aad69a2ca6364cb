"""lopq.spark.ml: the Estimator and Model on DataFrames, in Pipelines, saved and loaded;
compute_codes on Parquet; all on the shared local SparkContext."""

import numpy as np
import pytest
from spark_helpers import run_driver

from lopq import LOPQModel

pytestmark = pytest.mark.spark
pytest.importorskip("pyspark")
pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def spark(sc):
    from pyspark.sql import SparkSession
    return SparkSession.builder.getOrCreate()


def frame(spark, X, ids=None, vector_type="array"):
    from pyspark.ml.linalg import Vectors, VectorUDT
    from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType
    ids = [f"r{i}" for i in range(len(X))] if ids is None else ids
    if vector_type == "vector":
        rows = [(key, Vectors.dense(x.astype(float))) for key, x in zip(ids, X)]
        column = VectorUDT()
    else:
        rows = [(key, [float(v) for v in x]) for key, x in zip(ids, X)]
        column = ArrayType(FloatType())
    schema = StructType([StructField("id", StringType()), StructField("features", column)])
    return spark.createDataFrame(rows, schema)


def codes_by_id(df, coarse_col="coarse", fine_col="fine"):
    return {r["id"]: (tuple(r[coarse_col]), tuple(r[fine_col]))
            for r in df.select("id", coarse_col, fine_col).collect()}


@pytest.fixture(scope="module")
def oxford_frame(spark, oxford):
    train, _, _ = oxford
    return frame(spark, train), train


@pytest.fixture(scope="module")
def fitted_pipeline(oxford_frame):
    from pyspark.ml import Pipeline

    from lopq.spark.ml import LOPQ
    df, _ = oxford_frame
    return Pipeline(stages=[LOPQ(V=16, M=8, seed=3)]).fit(df)


def test_pipeline_transform_gives_the_fitted_models_codes(fitted_pipeline, oxford_frame):
    df, train = oxford_frame
    stage = fitted_pipeline.stages[-1]
    assert isinstance(stage.model, LOPQModel) and (stage.model.V, stage.model.M) == (16, 8)
    out = fitted_pipeline.transform(df)
    assert out.columns == ["id", "features", "coarse", "fine"]
    assert out.schema["coarse"].dataType.simpleString() == "array<int>"
    got = codes_by_id(out)
    coarse, fine = stage.model.encode(train)
    assert len(got) == len(train)
    for i in range(len(train)):
        assert got[f"r{i}"] == (tuple(coarse[i]), tuple(fine[i]))


def test_pipeline_model_save_and_load_round_trip(fitted_pipeline, oxford_frame, tmp_path):
    from pyspark.ml import PipelineModel
    df, _ = oxford_frame
    path = str(tmp_path / "pipeline")
    fitted_pipeline.save(path)
    stage_dirs = list((tmp_path / "pipeline" / "stages").iterdir())
    assert (stage_dirs[0] / "model.lopq").is_file()  # the .lopq file inside the folder
    loaded = PipelineModel.load(path)
    for a, b in zip(loaded.stages[-1].model.parameters,
                    fitted_pipeline.stages[-1].model.parameters):
        np.testing.assert_array_equal(a, b)
    assert codes_by_id(loaded.transform(df)) == codes_by_id(fitted_pipeline.transform(df))


def test_vector_column_gives_the_same_model_as_the_array_column(spark, oxford_frame,
                                                                fitted_pipeline):
    from lopq.spark.ml import LOPQ
    _, train = oxford_frame
    vectors = frame(spark, train, vector_type="vector")
    fitted = LOPQ(V=16, M=8, seed=3).fit(vectors)
    for a, b in zip(fitted.model.parameters, fitted_pipeline.stages[-1].model.parameters):
        np.testing.assert_array_equal(a, b)
    out = fitted.transform(vectors)
    assert out.schema["features"].dataType.typeName() == "vectorudt"  # kept as it was


def test_estimator_params_follow_pyspark_ml_conventions(tmp_path):
    from lopq.spark.ml import LOPQ, LOPQSparkModel
    est = LOPQ(V=4, M=2)
    assert est.getSubquantizerClusters() == 256 and est.getCoarseIters() == 10
    assert est.setLocalIters(5).getLocalIters() == 5
    assert "subquantizerClusters" in est.explainParams()
    copied = est.copy({est.V: 9})
    assert copied.getV() == 9 and est.getV() == 4
    est.save(str(tmp_path / "est"))
    again = LOPQ.load(str(tmp_path / "est"))
    assert (again.getV(), again.getM(), again.getLocalIters()) == (4, 2, 5)
    model = LOPQSparkModel(None).setCoarseCol("c").setFineCol("f")
    assert (model.getCoarseCol(), model.getFineCol()) == ("c", "f")


def test_transform_names_the_column_of_a_bad_row(spark, fitted_pipeline):
    bad = frame(spark, np.ones((3, 128), dtype=np.float32))
    bad = bad.union(spark.createDataFrame([("broken", [1.0, 2.0])], bad.schema))
    with pytest.raises(Exception, match="column 'features', .*length 2"):
        fitted_pipeline.transform(bad).collect()


def test_fit_errors_name_the_column(spark):
    from lopq.spark.ml import LOPQ
    df = spark.createDataFrame([("a", "not a vector")], "id string, features string")
    with pytest.raises(ValueError, match="'features' is string"):
        LOPQ(V=2, M=2).fit(df)
    with pytest.raises(ValueError, match="no such column"):
        LOPQ(V=2, M=2, featuresCol="embedding").fit(df)
    empty = spark.createDataFrame([], "id string, features array<float>")
    with pytest.raises(ValueError, match="no vectors"):
        LOPQ(V=2, M=2).fit(empty)


def test_compute_codes_parquet_in_parquet_out(spark, fitted_pipeline, oxford_frame, tmp_path,
                                              capsys):
    import pyarrow.parquet as pq
    df, train = oxford_frame
    data = tmp_path / "data.parquet"
    df.withColumnRenamed("id", "key").withColumnRenamed("features", "emb").write.parquet(
        str(data))
    model = fitted_pipeline.stages[-1].model
    model.export_proto(str(tmp_path / "m.lopq"))
    out = tmp_path / "codes"
    code, streams = run_driver("compute_codes", [
        "--data", str(data), "--vector_col", "emb", "--id_col", "key", "--output", str(out),
        "--model_proto", str(tmp_path / "m.lopq"), "--output_format", "parquet",
        "--partition_by_cell"], capsys)
    assert code == 0, streams.err
    table = pq.read_table(str(out)).to_pydict()
    assert set(table) >= {"id", "coarse", "fine", "cell"}
    coarse, fine = model.encode(train)
    assert sorted(table["id"]) == sorted(f"r{i}" for i in range(len(train)))
    for key, c, f, cell in zip(table["id"], table["coarse"], table["fine"], table["cell"]):
        i = int(key[1:])
        assert (c, f) == (coarse[i].tolist(), fine[i].tolist())
        assert int(cell) == c[0] * model.V + c[1]


def test_compute_codes_parquet_errors_leave_no_output(spark, fitted_pipeline, tmp_path,
                                                      capsys):
    X = np.ones((4, 128), dtype=np.float32)
    X[2, 5] = np.nan
    data = tmp_path / "data.parquet"
    frame(spark, X).write.parquet(str(data))
    fitted_pipeline.stages[-1].model.export_proto(str(tmp_path / "m.lopq"))
    out = tmp_path / "codes"
    args = ["--data", str(data), "--output", str(out), "--model_proto",
            str(tmp_path / "m.lopq"), "--output_format", "parquet"]
    code, streams = run_driver("compute_codes", args, capsys)
    assert code != 0 and "row with id r2" in streams.err and "NaN" in streams.err
    assert not out.exists()
    code, streams = run_driver("compute_codes", args + ["--vector_col", "nope"], capsys)
    assert code != 0 and "'nope': no such column" in streams.err
    code, streams = run_driver("compute_codes", args + ["--skip_bad_records"], capsys)
    assert code == 0 and "skipped 1 malformed" in streams.out
    import pyarrow.parquet as pq
    assert sorted(pq.read_table(str(out)).to_pydict()["id"]) == ["r0", "r1", "r3"]


def test_train_model_reads_parquet_and_equals_the_estimator(spark, oxford_frame, tmp_path,
                                                            capsys, fitted_pipeline):
    df, _ = oxford_frame
    data = tmp_path / "train.parquet"
    df.write.parquet(str(data))
    out = tmp_path / "m.lopq"
    code, streams = run_driver("train_model", ["--data", str(data), "--V", "16", "--M", "8",
                                        "--seed", "3", "--model_proto", str(out)], capsys)
    assert code == 0, streams.err
    from lopq.spark.ml import LOPQ
    from_file = LOPQ(V=16, M=8, seed=3).fit(spark.read.parquet(str(data)))
    for a, b in zip(LOPQModel.load_proto(str(out)).parameters, from_file.model.parameters):
        np.testing.assert_array_equal(a, b)


def test_transform_joins_small_arrow_batches_in_row_order(spark):
    """Arrow batches far smaller than an encoding block are joined before encoding
    (lopq.spark.codes.regrouped): every row keeps its id, its place and its codes."""
    from lopq.spark.ml import LOPQSparkModel
    rng = np.random.default_rng(5)
    X = rng.normal(size=(1500, 8)).astype(np.float32)
    model = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X, n_init=1, random_state=0)
    ids = [f"v{i}" for i in range(len(X))]
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "37")
    try:
        rows = LOPQSparkModel(model).transform(frame(spark, X, ids)).collect()
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    assert [r["id"] for r in rows] == ids
    coarse, fine = model.encode(X)
    assert [list(r["coarse"]) for r in rows] == coarse.tolist()
    assert [list(r["fine"]) for r in rows] == fine.tolist()


def test_regrouped_joins_batches_in_order_up_to_the_block_size():
    import pyarrow as pa

    from lopq.spark.codes import regrouped
    sizes, start, batches = [3, 4, 0, 5, 1, 9], 0, []
    for size in sizes:
        column = pa.array(range(start, start + size), pa.int64())
        batches.append(pa.RecordBatch.from_arrays([column], ["i"]))
        start += size
    joined = list(regrouped(iter(batches), 6))
    assert [b.num_rows for b in joined] == [7, 6, 9]  # 3+4, 0+5+1, then 9 alone
    assert [v for b in joined for v in b.column(0).to_pylist()] == list(range(start))
    assert list(regrouped(iter(batches[:1]), 6))[0] is batches[0]  # nothing to join
    assert list(regrouped(iter([]), 6)) == []
