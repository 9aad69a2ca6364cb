"""spark/evaluate.py against a brute-force numpy computation: the sampled queries' exact
nearest neighbours, the recall of the searcher on the same codes at each quota, and the
Wilson intervals; the exact pass runs as tasks over the partitions."""

import json

import numpy as np
import pytest
from spark_helpers import run_driver, tasks_since

from lopq import LOPQModel, LOPQSearcher
from lopq.datasets import make_clustered
from lopq.formats import write_vector_file
from lopq.spark.evaluate import exact_distances, wilson_interval

pytestmark = pytest.mark.spark
pyspark = pytest.importorskip("pyspark")


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson_interval(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    low, high = wilson_interval(10, 10)
    assert round(low, 4) == 0.7225 and high == 1.0
    assert wilson_interval(0, 0) == (0.0, 0.0)


@pytest.mark.parametrize("metric", ["l2", "inner_product"])
def test_evaluate_equals_brute_force_and_the_searcher(sc, metric, tmp_path, capsys):
    rng = np.random.default_rng(4)
    X = (make_clustered(1500, 16, n_clusters=10, seed=4)
         * rng.uniform(0.5, 2.0, (1500, 1))).astype(np.float32)
    ids = [f"v{i}" for i in range(len(X))]
    data = tmp_path / "data.txt"
    write_vector_file(data, X, ids=ids)
    model = LOPQModel(V=4, M=4, subquantizer_clusters=32, metric=metric).fit(
        X, n_init=1, random_state=0)
    proto = tmp_path / "model.lopq"
    model.export_proto(str(proto))
    codes = tmp_path / "codes"
    code, (_, err) = run_driver("compute_codes", ["--data", str(data), "--model_proto",
                                                  str(proto), "--output", str(codes)], capsys)
    assert code == 0, err
    out = tmp_path / "recall.json"
    jobs_before = set(sc.statusTracker().getJobIdsForGroup())
    code, (stdout, err) = run_driver("evaluate", [
        "--model_proto", str(proto), "--codes", str(codes), "--data", str(data),
        "--sample", "80", "--quotas", "50,400", "--seed", "3", "--output", str(out)],
        capsys)
    assert code == 0, err
    assert "recall@10" in stdout and "quota" in stdout
    # The work ran as tasks over the partitions, not on the driver.
    assert max(tasks_since(sc, jobs_before)) >= 2
    report = json.loads(out.read_text())
    assert report["sample"] == 80 and report["metric"] == metric
    rows = [int(q[1:]) for q in report["queries"]]
    assert len(set(rows)) == 80

    # Exact nearest neighbours, itself excluded, by brute force in float64.
    Q = X[rows]
    d = exact_distances(metric, Q.astype(np.float64), X.astype(np.float64))
    d[np.arange(80), rows] = np.inf
    for qi, (nearest, dist) in enumerate(report["exact_nearest"]):
        assert d[qi, int(nearest[1:])] == pytest.approx(d[qi].min(), rel=1e-4, abs=1e-4)
        assert dist == pytest.approx(d[qi].min(), rel=1e-4, abs=1e-4)
    truth = [f"v{int(np.argmin(d[qi]))}" for qi in range(80)]

    # The searcher on the same codes, itself excluded, gives the same recall.
    searcher = LOPQSearcher(model)
    searcher.add_data(X, ids=ids)
    for row in report["results"]:
        found = [[i for i in got if i != f"v{r}"][:100] for got, r in zip(
            (list(g) for g, _ in searcher.search_batch(Q, quota=row["quota"], limit=101)),
            rows)]
        for R in (1, 10, 100):
            hits = sum(t in f[:R] for t, f in zip(truth, found))
            assert abs(row[f"recall@{R}"] * 80 - hits) <= 1, (row["quota"], R)
            low, high = row[f"recall@{R}_interval"]
            assert low <= row[f"recall@{R}"] <= high
    assert report["results"][1]["recall@100"] >= report["results"][0]["recall@100"]
