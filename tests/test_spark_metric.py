"""Cosine and inner product through the Spark drivers and the pyspark.ml Estimator: the
metric chosen at training travels in the model, codes equal `LOPQModel.encode`'s, search
returns what `LOPQSearcher.search_batch` returns with distances in the metric, re-ranked
distances equal brute force, and zero vectors are refused by name under cosine."""

import json

import numpy as np
import pytest
from spark_helpers import assert_codes_equal_encode, read_codes, run_driver

from lopq import LOPQModel, LOPQSearcher
from lopq.datasets import make_clustered
from lopq.formats import write_vector_file

pytestmark = pytest.mark.spark
pyspark = pytest.importorskip("pyspark")

N, Q, DIM = 1500, 40, 16


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    """Clustered rows with norms spread over 0.3..3 (so the three metrics rank
    differently): (data file, ids, X (1500, 16), queries file, query ids, queries)."""
    rng = np.random.default_rng(5)
    everything = make_clustered(N + Q, DIM, n_clusters=10, seed=5)
    everything = (everything * rng.uniform(0.3, 3.0, (N + Q, 1))).astype(np.float32)
    X, queries = everything[:N], everything[N:]
    folder = tmp_path_factory.mktemp("metric_data")
    ids = [f"item{i}" for i in range(N)]
    qids = [f"q{i}" for i in range(Q)]
    write_vector_file(folder / "data.txt", X, ids=ids)
    write_vector_file(folder / "queries.txt", queries, ids=qids)
    return folder / "data.txt", ids, X, folder / "queries.txt", qids, queries


def brute_force(metric, Q, X):
    Q, X = Q.astype(np.float64), X.astype(np.float64)
    if metric == "cosine":
        return 1 - (Q / np.linalg.norm(Q, axis=1)[:, None]) @ (
            X / np.linalg.norm(X, axis=1)[:, None]).T
    return -(Q @ X.T)


def read_neighbours(folder):
    out = {}
    for part in sorted(folder.glob("part-*")):
        for line in part.read_text().splitlines():
            key, payload = line.split("\t")
            out[key] = json.loads(payload)
    return out


@pytest.mark.parametrize("metric", ["cosine", "inner_product"])
def test_train_codes_and_search_in_the_metric(sc, vectors, metric, tmp_path, capsys):
    data, ids, X, queries_path, qids, queries = vectors
    proto = tmp_path / "model.lopq"
    code, (_, err) = run_driver("train_model", [
        "--data", str(data), "--V", "4", "--M", "4", "--subquantizer_clusters", "32",
        "--seed", "3", "--metric", metric, "--model_proto", str(proto)], capsys)
    assert code == 0, err
    model = LOPQModel.load_proto(proto)
    assert (model.metric, model.dim) == (metric, DIM)
    if metric == "inner_product":
        assert model.D == 20  # 16 + the norm coordinate, padded to a multiple of M=4
        assert model.max_norm == pytest.approx(np.linalg.norm(X, axis=1).max(), rel=1e-5)

    codes = tmp_path / "codes"
    code, (_, err) = run_driver("compute_codes", [
        "--data", str(data), "--model_proto", str(proto), "--output", str(codes),
        "--metric", metric], capsys)
    assert code == 0, err
    assert_codes_equal_encode(model, X, ids, read_codes(codes))

    out, reranked = tmp_path / "neighbours", tmp_path / "reranked"
    for folder, extra in ((out, []), (reranked, ["--rerank_data", str(data)])):
        code, (_, err) = run_driver("search", [
            "--model_proto", str(proto), "--codes", str(codes), "--data", str(queries_path),
            "--k", "10", "--quota", "750", "--output", str(folder), *extra], capsys)
        assert code == 0, err

    searcher = LOPQSearcher(model)
    searcher.add_data(X, ids=ids)
    expected = searcher.search_batch(queries, quota=750, limit=10)
    truth = brute_force(metric, queries, X)
    found, exact = read_neighbours(out), read_neighbours(reranked)
    position = {key: i for i, key in enumerate(ids)}
    hits = 0
    for qi, key in enumerate(qids):
        got_ids, got_dists = found[key]
        want_ids, want_dists = expected[qi]
        np.testing.assert_allclose(got_dists, want_dists, rtol=1e-4, atol=1e-4)
        assert got_ids[:3] == list(want_ids[:3]) or np.allclose(got_dists[:3],
                                                                 want_dists[:3])
        # Re-ranked distances are the metric's exact ones, ascending.
        r_ids, r_dists = exact[key]
        rows = [position[i] for i in r_ids]
        np.testing.assert_allclose(r_dists, truth[qi, rows], rtol=1e-4, atol=1e-4)
        assert r_dists == sorted(r_dists)
        hits += int(np.argmin(truth[qi])) in rows
    # The true nearest in the metric is among the re-ranked ten for most queries (32
    # centroids per 4-d subvector cap it: exhaustive search finds 0.82-0.92 here).
    assert hits >= 0.7 * len(qids), hits


def test_cosine_refuses_zero_vectors_by_id_unless_skipped(sc, tmp_path, capsys):
    X = make_clustered(300, 8, seed=2)
    X[17] = 0
    data = tmp_path / "zeros.txt"
    write_vector_file(data, X, ids=[f"v{i}" for i in range(300)])
    proto = tmp_path / "m.lopq"
    args = ["--data", str(data), "--V", "2", "--M", "2", "--subquantizer_clusters", "8",
            "--metric", "cosine", "--model_proto", str(proto)]
    code, (_, err) = run_driver("train_model", args, capsys)
    assert code == 2 and "1 vector(s) of norm 0 in --data" in err and "--skip_bad_records" \
        in err, err
    assert not proto.exists()
    code, (_, err) = run_driver("train_model", args + ["--skip_bad_records"], capsys)
    assert code == 0, err
    model = LOPQModel.load_proto(proto)
    codes = tmp_path / "codes"
    code, (_, err) = run_driver("compute_codes", ["--data", str(data), "--model_proto",
                                                  str(proto), "--output", str(codes)], capsys)
    assert code == 2 and "(the first: id 'v17')" in err, err
    assert not codes.exists()
    code, (out, err) = run_driver("compute_codes", [
        "--data", str(data), "--model_proto", str(proto), "--output", str(codes),
        "--skip_bad_records"], capsys)
    assert code == 0, err
    written = read_codes(codes)
    assert len(written) == 299 and "v17" not in written
    # The metric is the model's: another one is refused, naming both.
    code, (_, err) = run_driver("compute_codes", [
        "--data", str(data), "--model_proto", str(proto), "--output", str(tmp_path / "x"),
        "--metric", "inner_product"], capsys)
    assert code == 2 and "--metric inner_product, but" in err and "metric cosine" in err
    assert model.metric == "cosine"


def test_estimator_metric_param_is_trained_persisted_and_searched(sc, tmp_path):
    from pyspark.ml.linalg import Vectors
    from pyspark.sql import SparkSession

    from lopq.spark.ml import LOPQ, LOPQSparkModel
    spark = SparkSession.builder.getOrCreate()
    rng = np.random.default_rng(9)
    X = (make_clustered(600, 8, seed=9) * rng.uniform(0.5, 2, (600, 1))).astype(np.float32)
    df = spark.createDataFrame([(i, Vectors.dense(x.tolist())) for i, x in enumerate(X)],
                               ["id", "features"])
    estimator = LOPQ(V=2, M=2, subquantizerClusters=16, seed=1, metric="inner_product")
    fitted = estimator.fit(df)
    assert fitted.model.metric == "inner_product" and fitted.model.dim == 8
    estimator.save(str(tmp_path / "estimator"))
    assert LOPQ.load(str(tmp_path / "estimator")).getMetric() == "inner_product"
    fitted.save(str(tmp_path / "fitted"))
    again = LOPQSparkModel.load(str(tmp_path / "fitted"))
    assert again.model.metric == "inner_product"
    key = X[0]
    near = again.setQuota(600).approxNearestNeighbors(df, Vectors.dense(key.tolist()), 5)
    rows = near.collect()
    # distCol is minus the (estimated) dot product, ascending; the ids are the
    # searcher's on the same codes.
    searcher = LOPQSearcher(fitted.model)
    searcher.add_data(X)
    (want_ids, want_dists), = searcher.search_batch(key[None, :], quota=600, limit=5)
    np.testing.assert_allclose([r.distCol for r in rows], want_dists, rtol=1e-4, atol=1e-4)
    assert [r.distCol for r in rows] == sorted(r.distCol for r in rows)
    with pytest.raises(ValueError, match="unknown metric 'dot'"):
        LOPQ(V=2, M=2).setMetric("dot")
