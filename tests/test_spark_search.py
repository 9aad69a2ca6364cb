"""Search on Spark (spark/search.py, lopq.spark.search, the ml LSH interface): the same
results as LOPQSearcher on the same codes, planted duplicates found by the self join,
bad input refused in one line, and scoring that runs as tasks, not on the driver."""

import json

import numpy as np
import pytest
from spark_helpers import run_driver, tasks_since

from lopq import LOPQModel, LOPQSearcher
from lopq.datasets import make_clustered
from lopq.formats import write_vector_file

pytestmark = pytest.mark.spark
pyspark = pytest.importorskip("pyspark")


def _codes(sc, tmp_path, model, X, ids, capsys, name="codes"):
    data = tmp_path / f"{name}.txt"
    write_vector_file(data, X, ids=ids)
    proto = tmp_path / f"{name}.lopq"
    model.export_proto(str(proto))
    out = tmp_path / name
    code, (_, err) = run_driver("compute_codes", ["--data", str(data), "--model_proto",
                                                  str(proto), "--output", str(out)], capsys)
    assert code == 0, err
    return proto, out


def _read_neighbours(folder):
    out = {}
    for part in sorted(folder.glob("part-*")):
        for line in part.read_text().splitlines():
            key, payload = line.split("\t")
            assert key not in out
            out[key] = json.loads(payload)
    return out


def test_spark_search_returns_what_the_searcher_returns_on_oxford(sc, oxford, tmp_path,
                                                                  capsys):
    """The reference protocol's queries on compute_codes output: every query gets the
    searcher's ids in the searcher's order (quota 1000, limit 100), distances within float
    tolerance (exact ties may swap); small shards split the big cells over tasks."""
    train, test, _ = oxford
    model = LOPQModel(V=16, M=8).fit(train, n_init=1, random_state=0)
    proto, codes = _codes(sc, tmp_path, model, train, [str(i) for i in range(len(train))],
                          capsys)
    queries = tmp_path / "queries.txt"
    write_vector_file(queries, test, ids=[f"q{i}" for i in range(len(test))])
    out = tmp_path / "neighbours"
    jobs_before = set(sc.statusTracker().getJobIdsForGroup())
    code, (stdout, err) = run_driver("search", [
        "--model_proto", str(proto), "--codes", str(codes), "--data", str(queries),
        "--k", "100", "--quota", "1000", "--rows_per_shard", "300", "--output", str(out)],
        capsys)
    assert code == 0, err
    assert f"wrote neighbours of {len(test)} queries" in stdout
    assert max(tasks_since(sc, jobs_before)) >= 4000 // 300  # one task per shard
    got = _read_neighbours(out)
    searcher = LOPQSearcher.from_codes(model, str(codes))
    assert len(got) == len(test)
    for i, x in enumerate(test):
        want, _ = searcher.search(x, quota=1000, limit=100, with_dists=True)
        ids, dists = got[f"q{i}"]
        want_d = np.array([r.dist for r in want])
        np.testing.assert_allclose(dists, want_d, rtol=1e-4, atol=1e-4)
        order_ok = [a == r.id for a, r in zip(ids, want)]
        if not all(order_ok):  # only where the distances tie within float rounding
            # (at rank 100 the tie may be with an item ranked 101st by the searcher)
            retrieved = searcher.search(x, quota=1000, with_dists=True)[0]
            own = {r.id: r.dist for r in retrieved}
            for k in np.flatnonzero(~np.array(order_ok)):
                assert abs(dists[k] - want_d[k]) <= 1e-4 * max(1.0, want_d[k])
                assert abs(own[ids[k]] - dists[k]) <= 1e-4 * max(1.0, dists[k])


def test_parquet_codes_and_output_give_the_same_neighbours(sc, tmp_path, capsys):
    import pyarrow.parquet as pq
    X = make_clustered(1500, 16, n_clusters=10, seed=1)
    model = LOPQModel(V=6, M=4, subquantizer_clusters=16).fit(X, n_init=1, random_state=0)
    proto, _ = _codes(sc, tmp_path, model, X, [str(i) for i in range(len(X))], capsys)
    data = tmp_path / "codes.txt"
    out_codes = tmp_path / "codes.parquet"
    code, (_, err) = run_driver("compute_codes", ["--data", str(data), "--model_proto",
                                                  str(proto), "--output", str(out_codes),
                                                  "--output_format", "parquet"], capsys)
    assert code == 0, err
    queries = tmp_path / "q.txt"
    write_vector_file(queries, X[:40] + 0.01, ids=[f"q{i}" for i in range(40)])
    out = tmp_path / "nn.parquet"
    code, (_, err) = run_driver("search", [
        "--model_proto", str(proto), "--codes", str(out_codes), "--data", str(queries),
        "--k", "5", "--quota", "100", "--output", str(out), "--output_format", "parquet"],
        capsys)
    assert code == 0, err
    table = pq.read_table(out).to_pydict()
    searcher = LOPQSearcher(model)
    searcher.add_data(X, ids=[str(i) for i in range(len(X))])
    for key, ids, dists in zip(table["query_id"], table["ids"], table["distances"]):
        retrieved, _ = searcher.search(X[int(key[1:])] + 0.01, quota=100, with_dists=True)
        np.testing.assert_allclose(dists, [r.dist for r in retrieved[:5]], rtol=1e-4,
                                   atol=1e-4)
        own = {r.id: r.dist for r in retrieved}  # 16-centroid codes tie often: any of
        np.testing.assert_allclose([own[i] for i in ids], dists, rtol=1e-4, atol=1e-4)


def test_self_join_with_rerank_finds_planted_duplicates(sc, tmp_path, capsys):
    rng = np.random.RandomState(3)
    base = make_clustered(3000, 32, n_clusters=20, seed=7)
    originals = rng.choice(len(base), 150, replace=False)
    copies = base[originals] + 0.01 * rng.randn(150, 32).astype(np.float32)
    X = np.concatenate([base, copies])
    ids = [f"b{i}" for i in range(len(base))] + [f"d{i}" for i in range(150)]
    model = LOPQModel(V=8, M=8, subquantizer_clusters=32).fit(X, n_init=1, random_state=0)
    proto, codes = _codes(sc, tmp_path, model, X, ids, capsys)
    out = tmp_path / "pairs"
    code, (_, err) = run_driver("search", [
        "--model_proto", str(proto), "--codes", str(codes), "--self_join", "--k", "1",
        "--quota", "200", "--rerank_data", str(tmp_path / "codes.txt"),
        "--output", str(out)], capsys)
    assert code == 0, err
    pairs = {}
    for part in out.glob("part-*"):
        for line in part.read_text().splitlines():
            a, b, d = line.split("\t")
            assert a != b and float(d) >= 0
            pairs[a] = (b, float(d))
    found = sum(pairs.get(f"d{i}", (None,))[0] == f"b{o}" for i, o in enumerate(originals))
    assert found >= 0.99 * len(originals), found
    # exact re-ranked distances: the planted pairs' true squared distances
    i = 0
    np.testing.assert_allclose(pairs["d0"][1], ((copies[i] - base[originals[i]]) ** 2).sum(),
                               rtol=1e-4)


@pytest.mark.parametrize("case,match", [
    ("dimension", "the model is for vectors of dimension 16 but --data"),
    ("model", "come from another model"),
    ("k", "--k must be a positive number"),
    ("empty", "--data"),
    ("candidates", "--rerank_candidates must be at least --k (3)"),
])
def test_bad_search_input_is_one_line_without_output(sc, tmp_path, capsys, case, match):
    X = make_clustered(600, 16, n_clusters=6, seed=2)
    model = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X, n_init=1, random_state=0)
    proto, codes = _codes(sc, tmp_path, model, X, [str(i) for i in range(len(X))], capsys)
    queries = tmp_path / "q.txt"
    write_vector_file(queries, X[:5], ids=["a", "b", "c", "d", "e"])
    args = ["--model_proto", str(proto), "--codes", str(codes), "--data", str(queries),
            "--k", "3", "--output", str(tmp_path / "out")]
    if case == "dimension":
        write_vector_file(queries, X[:5, :8], ids=["a", "b", "c", "d", "e"])
    elif case == "model":
        other = LOPQModel(V=4, M=2, subquantizer_clusters=16).fit(X, n_init=1,
                                                                  random_state=0)
        other.export_proto(str(tmp_path / "other.lopq"))
        args[1] = str(tmp_path / "other.lopq")
    elif case == "k":
        args[args.index("--k") + 1] = "0"
    elif case == "empty":
        queries.write_text("")
    elif case == "candidates":
        args += ["--rerank_data", str(tmp_path / "codes.txt"), "--rerank_candidates", "2"]
    code, (_, err) = run_driver("search", args, capsys)
    assert code != 0
    assert match in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_ml_lsh_interface_matches_the_searcher(sc, tmp_path):
    from pyspark.ml.linalg import Vectors
    from pyspark.sql import SparkSession

    from lopq.spark.ml import LOPQSparkModel
    spark = SparkSession.builder.getOrCreate()
    X = make_clustered(800, 16, n_clusters=8, seed=9)
    model = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X, n_init=1, random_state=0)
    df = spark.createDataFrame([(i, Vectors.dense(x.tolist())) for i, x in enumerate(X)],
                               ["id", "features"])
    fitted = LOPQSparkModel(model).setQuota(200)
    searcher = LOPQSearcher(model)
    searcher.add_data(X)
    key = X[3] + 0.05
    near = fitted.approxNearestNeighbors(df, Vectors.dense(key.tolist()), 7).collect()
    want, _ = searcher.search(key, quota=200, limit=7, with_dists=True)
    assert {r.id for r in near} == {r.id for r in want}
    np.testing.assert_allclose([r.distCol for r in near], np.sqrt([w.dist for w in want]),
                               rtol=1e-4)
    assert near[0].features is not None  # every input column kept
    threshold = 1.0
    a = df.filter("id < 30")
    pairs = fitted.approxSimilarityJoin(a, df, threshold).collect()
    got = {(p.datasetA.id, p.datasetB.id) for p in pairs}
    assert all(p.distCol < threshold for p in pairs)
    expected = set()
    for i in range(30):
        results, _ = searcher.search(X[i], quota=200, limit=200, with_dists=True)
        expected |= {(i, r.id) for r in results if np.sqrt(r.dist) < threshold}
    assert got == expected


def test_routing_sends_each_visited_cell_to_each_of_its_shards_in_order():
    """route_block against a plain loop: a query reaches exactly the shards holding the
    cells it visits (all shards of a split cell), with those cells in visiting order."""
    from lopq.spark.search import plan_shards, route_block
    rng = np.random.RandomState(0)
    V = 5
    sizes = rng.randint(0, 40, size=V * V)
    sizes[7] = 200  # a skewed cell: split over shards
    first, count, n_shards = plan_shards(sizes, rows_per_shard=60)
    assert count[7] == 4 and n_shards > 4
    nonempty = np.flatnonzero(sizes)
    ptr, cells = [0], []
    for _ in range(6):
        visit = rng.choice(nonempty, size=rng.randint(1, 8), replace=False)
        cells += [(c // V, c % V) for c in visit]
        ptr.append(len(cells))
    ptr, cells = np.array(ptr), np.array(cells, dtype=np.int32)
    want = {}
    for q in range(len(ptr) - 1):
        for c0, c1 in cells[ptr[q]:ptr[q + 1]]:
            cell = c0 * V + c1
            for shard in range(first[cell], first[cell] + count[cell]):
                want.setdefault((shard, q), []).append(cell)
    got = {}
    for shard, rows, cell_ptr, cell_ids in route_block(ptr, cells, V, first, count):
        for i, q in enumerate(rows):
            got[(shard, int(q))] = cell_ids[cell_ptr[i]:cell_ptr[i + 1]].tolist()
    assert got == want


@pytest.mark.parametrize("k", [1, 4])
def test_block_merge_keeps_each_querys_k_nearest_over_all_shards(k):
    """_merge_blocks (shards' per-block arrays, merged in any order) against a plain
    per-query sort of every shard's candidates; two queries share an id, rows differ."""
    from functools import reduce

    from lopq.spark.search import _block_columns, _merge_blocks, query_records
    rng = np.random.RandomState(k)
    keys_of_rows = np.array(["a", "b", "a", "c", "d"], dtype=object)  # "a" twice
    parts, candidates = [], {}
    for shard in range(4):
        rows = np.sort(rng.choice(5, size=rng.randint(1, 5), replace=False))
        dists = rng.rand(len(rows), k).astype(np.float32)
        dists[rng.rand(*dists.shape) < 0.3] = np.inf  # fewer than k found
        dists.sort(axis=1)
        ids = np.array([[f"s{shard}r{r}c{c}" for c in range(k)] for r in rows], dtype=object)
        parts.append((rows, keys_of_rows[rows], dists, ids))
        for r, d, i in zip(rows, dists, ids):
            candidates.setdefault(int(r), []).extend(
                (float(a), b) for a, b in zip(d, i) if np.isfinite(a))
    merge = _merge_blocks(k)
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        merged = reduce(merge, [parts[i] for i in order])
        got = {}
        assert len(list(query_records(_block_columns((None, merged))))) == sum(
            np.isfinite(merged[2]).any(axis=1))  # queries with no neighbour are absent
        for i, row in enumerate(merged[0]):
            one = tuple(a[i:i + 1] for a in merged)
            for key, (dists, ids) in query_records(_block_columns((None, one))):
                got[int(row)] = (key, dists.tolist(), ids)
        want = {r: sorted(c)[:k] for r, c in candidates.items() if c}
        assert sorted(got) == sorted(want)
        for r, best in want.items():
            key, dists, ids = got[r]
            assert key == keys_of_rows[r]
            np.testing.assert_allclose(dists, [d for d, _ in best], rtol=1e-6)
            assert ids == [i for _, i in best]


def test_rerank_candidates_rank_every_retrieved_item_exactly(sc):
    """With candidates covering the quota, re-ranking returns the exact k nearest of the
    items the searcher retrieves (brute force over its cells); with the default (4k per
    shard) the result's distances are exact ones of retrieved items."""
    from lopq.spark.search import ShardedIndex
    X = make_clustered(2000, 16, n_clusters=8, seed=5)
    queries = make_clustered(40, 16, n_clusters=8, seed=6)
    model = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X, n_init=1, random_state=0)
    coarse, fine = model.encode(X)
    ids = list(range(len(X)))
    codes = sc.parallelize([(ids[:1000], coarse[:1000], fine[:1000]),
                            (ids[1000:], coarse[1000:], fine[1000:])], 2)
    vectors = sc.parallelize([(ids[:1000], X[:1000]), (ids[1000:], X[1000:])], 2)
    query_rdd = sc.parallelize([([f"q{i}" for i in range(40)], queries)], 1)
    index = ShardedIndex(sc, model, codes, rows_per_shard=300, rerank_vectors=vectors)
    try:
        everything = dict(index.search(query_rdd, 5, 300, rerank_candidates=2000).collect())
        default = dict(index.search(query_rdd, 5, 300).collect())
    finally:
        index.unpersist()
    searcher = LOPQSearcher(model)
    searcher.add_codes((coarse, fine), ids)
    for i, x in enumerate(queries):
        retrieved = [item_id for item_id, _ in searcher.get_result_quota(x, quota=300)[0]]
        exact = ((X[retrieved] - x) ** 2).sum(axis=1)
        best = np.argsort(exact, kind="stable")[:5]
        dists, found = everything[f"q{i}"]
        np.testing.assert_allclose(dists, exact[best], rtol=1e-4, atol=1e-5)
        assert set(found) <= set(retrieved)
        d_default, f_default = default[f"q{i}"]
        np.testing.assert_allclose(d_default, ((X[f_default] - x) ** 2).sum(axis=1),
                                   rtol=1e-4, atol=1e-5)
        assert np.all(d_default >= dists[:len(d_default)] - 1e-5)


@pytest.mark.parametrize("map_join", [True, False], ids=["map", "buckets"])
def test_vectors_join_matches_a_join_by_dictionary(sc, monkeypatch, map_join):
    """The columnar join of codes with their vectors against a plain join by id: numeric
    text ids meet their ints, an id repeated in the vectors takes its first vector in
    the vectors' order (across partitions too), a code without a vector is left out, a
    repeated code keeps every copy, empty partitions and blocks change nothing."""
    from lopq.spark import search
    monkeypatch.setattr(search, "MAP_JOIN_MAX_CODES", 10 ** 9 if map_join else 0)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((60, 4)).astype(np.float32)
    vector_ids = [*range(20), *(str(i) for i in range(20, 40)), 5, "7", 41, "x", "y", "x"]
    vectors = sc.parallelize([
        (vector_ids[:25], X[:25]), ([], X[:0]),
        (vector_ids[25:40], X[25:40]), (vector_ids[40:], X[40:len(vector_ids)])], 3)
    code_ids = ["5", 7, "x", "y", 12, 12, "missing", 39, "039", 41, "41"]
    coarse = np.arange(2 * len(code_ids), dtype=np.int32).reshape(-1, 2)
    fine = np.arange(3 * len(code_ids), dtype=np.uint8).reshape(-1, 3)
    codes = sc.parallelize([(code_ids[:6], coarse[:6], fine[:6]), ([], coarse[:0], fine[:0]),
                            (code_ids[6:], coarse[6:], fine[6:])], 4)
    first = {}
    for row, key in enumerate(vector_ids):  # the vectors' order is the list's order
        first.setdefault(str(int(key)) if str(key).isdigit() else key, row)
    expected = sorted(
        (str(key), tuple(coarse[i]), tuple(fine[i]), tuple(X[first[k]]))
        for i, key in enumerate(code_ids)
        for k in [str(int(key)) if str(key).isdigit() else key] if k in first)
    model = LOPQModel(V=2, M=2, subquantizer_clusters=4).fit(X, n_init=1, random_state=0)
    jobs_before = set(sc.statusTracker().getJobIdsForGroup())
    index = search.ShardedIndex(sc, model, codes.map(lambda b: (b[0], b[1] % 2, b[2] % 4)),
                                rows_per_shard=2, rerank_vectors=vectors)
    # the join ran as tasks: a stage per side (3 and 4 partitions), one over the shards
    assert {3, 4, index.n_shards} <= set(tasks_since(sc, jobs_before))
    try:
        got = sorted(
            (str(key), tuple(c), tuple(f), tuple(x))
            for _, (_, ids, cs, fs, xs) in index.index.collect()
            for key, c, f, x in zip(ids, cs, fs, xs))
    finally:
        index.unpersist()
    assert (index.map_bc is not None) == map_join
    expected = sorted((key, tuple(np.asarray(c) % 2), tuple(np.asarray(f) % 4), x)
                      for key, c, f, x in expected)
    assert got == expected
    assert len(got) == len(code_ids) - 1  # only "missing" has no vector


def test_join_keys_and_hashes_hold_for_any_ids():
    """`_id_keys` equals `id_value` made text, id by id, on ids that need it (leading
    zeros and signs, non-ASCII digits, texts int() cannot read, ints, mixtures); a key
    hashes the same in arrays of any width; `_first_vectors` finds the first vector of
    each id even when every hash collides."""
    from lopq.spark.search import _first_vectors, _id_keys, _key_hashes, id_value
    rng = np.random.default_rng(0)
    pool = ["0", "00", "007", "-5", "-0", "--5", "²", "-²", "7", "x", "٣", "-٣", "é", "",
            "-", " 5", "x\u00a0", "12"]
    for _ in range(500):
        ids = [str(i) for i in rng.choice(pool, size=rng.integers(1, 8))]
        ids += [int(i) for i in rng.integers(-20, 20, size=rng.integers(0, 3))]
        assert _id_keys(ids).tolist() == [str(id_value(key)) for key in ids]
    assert id_value("--5") == "--5" and id_value("²") == "²" and id_value("-007") == -7
    assert _id_keys([True, 1]).tolist() == ["True", "1"]
    narrow, wide = np.array(["ab", "7"]), np.array(["ab", "7", "a much longer key"])
    np.testing.assert_array_equal(_key_hashes(narrow), _key_hashes(wide)[:2])
    keys = np.array(["b", "a", "b", "c", "a"])
    homes, rows = np.array([1, 1, 0, 0, 2]), np.array([0, 1, 5, 4, 0])
    code_keys = np.array(["a", "b", "c", "d"])
    expected = [1, 2, 3, -1]  # "b": partition 0 row 5 comes before partition 1 row 0
    for hashes, code_hashes in ((_key_hashes(keys), _key_hashes(code_keys)),
                                (np.zeros(5, np.uint64), np.zeros(4, np.uint64))):
        assert _first_vectors(keys, hashes, homes, rows, code_keys,
                              code_hashes).tolist() == expected
