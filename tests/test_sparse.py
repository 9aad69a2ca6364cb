"""Sparse vectors wherever dense ones go: scipy sparse rows and pyspark ML SparseVectors
give the codes and models of the same vectors dense; bad sparse rows get the errors of
bad dense rows."""

import numpy as np
import pytest
from spark_helpers import read_codes, run_driver

from lopq import LOPQModel, LOPQSearcher


def sparse_rows(n, d, seed):
    """(n, d) float32 with about 80% zeros (bag-of-words-like), as VectorAssembler and
    HashingTF emit them."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[rng.random((n, d)) < 0.8] = 0
    X[:, 0] += 1  # no all-zero row
    return X


def test_scipy_sparse_rows_encode_and_search_as_their_dense_rows():
    sp = pytest.importorskip("scipy.sparse")
    X = sparse_rows(600, 16, 1)
    model = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X, n_init=1, random_state=0)
    csr = sp.csr_matrix(X)
    for a, b in zip(model.encode(csr), model.encode(X)):
        np.testing.assert_array_equal(a, b)
    searcher = LOPQSearcher(model)
    searcher.add_data(csr)
    dense = searcher.search_batch(X[:5], quota=100, limit=5)
    for (ids, d), (ids2, d2) in zip(searcher.search_batch(sp.csr_matrix(X[:5]), quota=100,
                                                          limit=5), dense):
        assert list(ids) == list(ids2)
        np.testing.assert_array_equal(d, d2)
    with pytest.raises(ValueError, match="dimension 15 but the model expects D=16"):
        model.encode(sp.csr_matrix(X[:, :15]))


@pytest.mark.spark
def test_ml_sparse_vectors_train_encode_and_search_as_dense(sc, tmp_path, capsys):
    from pyspark.ml.linalg import SparseVector, Vectors, VectorUDT
    from pyspark.sql import SparkSession
    from pyspark.sql.types import StringType, StructField, StructType

    from lopq.spark.ml import LOPQ
    spark = SparkSession.builder.getOrCreate()
    X = sparse_rows(800, 16, 2)
    schema = StructType([StructField("id", StringType()), StructField("features", VectorUDT())])

    def as_sparse(x):
        nz = np.flatnonzero(x)
        return SparseVector(len(x), nz.tolist(), x[nz].astype(float).tolist())

    sparse = spark.createDataFrame([(f"r{i}", as_sparse(x)) for i, x in enumerate(X)], schema)
    dense = spark.createDataFrame([(f"r{i}", Vectors.dense(x.astype(float)))
                                   for i, x in enumerate(X)], schema)
    fitted = LOPQ(V=4, M=4, subquantizerClusters=16, seed=5).fit(sparse)
    reference = LOPQ(V=4, M=4, subquantizerClusters=16, seed=5).fit(dense)
    for a, b in zip(fitted.model.parameters, reference.model.parameters):
        np.testing.assert_array_equal(a, b)
    coarse, fine = fitted.model.encode(X)
    got = {r["id"]: (tuple(r["coarse"]), tuple(r["fine"])) for r in
           fitted.transform(sparse).collect()}
    assert got == {f"r{i}": (tuple(c), tuple(f)) for i, (c, f) in
                   enumerate(zip(coarse.tolist(), fine.tolist()))}
    near = fitted.setQuota(800).approxNearestNeighbors(sparse, as_sparse(X[3]), 3).collect()
    assert near[0]["id"] == "r3"

    # compute_codes from a Parquet table of sparse vectors.
    data = tmp_path / "sparse.parquet"
    sparse.write.parquet(str(data))
    proto = tmp_path / "m.lopq"
    fitted.model.export_proto(str(proto))
    out = tmp_path / "codes"
    code, (_, err) = run_driver("compute_codes", ["--data", str(data), "--model_proto",
                                                  str(proto), "--output", str(out)], capsys)
    assert code == 0, err
    codes = read_codes(out)
    assert {k: (tuple(c), tuple(f)) for k, (c, f) in codes.items()} == got

    # A sparse vector of another size is refused as a dense one of that length is.
    bad = sparse.union(spark.createDataFrame([("short", SparseVector(5, [0], [1.0]))],
                                             schema))
    with pytest.raises(Exception, match="column 'features', .*length 5"):
        fitted.transform(bad).collect()


@pytest.mark.spark
def test_a_data_udf_may_return_sparse_vectors(sc, tmp_path, capsys, monkeypatch):
    X = sparse_rows(400, 8, 3)
    module = tmp_path / "sparse_udf.py"
    np.save(tmp_path / "x.npy", X)
    module.write_text(
        "import numpy as np\n"
        "from pyspark.ml.linalg import SparseVector\n"
        "def udf(sc, path, ratio, seed):\n"
        "    X = np.load(path)\n"
        "    rows = [SparseVector(len(x), np.flatnonzero(x).tolist(),\n"
        "                         x[np.flatnonzero(x)].astype(float).tolist()) for x in X]\n"
        "    return sc.parallelize(rows, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sc.addPyFile(str(module))
    proto = tmp_path / "m.lopq"
    code, (_, err) = run_driver("train_model", [
        "--data", str(tmp_path / "x.npy"), "--data_udf", "sparse_udf", "--V", "2", "--M", "2",
        "--subquantizer_clusters", "8", "--seed", "1", "--model_proto", str(proto)], capsys)
    assert code == 0, err
    assert LOPQModel.load_proto(proto).D == 8
