"""Multi-index search: traversal order, equality with a plain numpy definition, the
compiled path, persistence, and recall on Oxford5k."""

import numpy as np
import pytest

import lopq.search as search_module
from lopq import LOPQModel, LOPQSearcher
from lopq.datasets import make_clustered
from lopq.eval import get_recall, get_recall_batch
from lopq.search import multisequence


@pytest.mark.parametrize("V,seed", [(1, 0), (3, 1), (8, 2), (17, 3)])
def test_multisequence_yields_every_cell_once_in_distance_order(V, seed):
    rng = np.random.RandomState(seed)
    Cs = rng.randn(2, V, 4)
    Cs[1, :2] = Cs[1, 0]  # duplicated centroids: exact ties
    x = rng.randn(8)
    got = list(multisequence(x, Cs))
    cells = [cell for _, cell in got]
    assert len(cells) == V * V and len(set(cells)) == V * V
    dists = np.array([d for d, _ in got])
    assert np.all(np.diff(dists) >= -1e-12)
    d0 = ((x[:4] - Cs[0]) ** 2).sum(1)
    d1 = ((x[4:] - Cs[1]) ** 2).sum(1)
    np.testing.assert_allclose(dists, np.sort((d0[:, None] + d1[None, :]).ravel()))


@pytest.fixture(scope="module")
def model_and_data():
    X = make_clustered(6000, 16, n_clusters=20, seed=4)
    model = LOPQModel(V=6, M=4, subquantizer_clusters=32).fit(X, n_init=1, random_state=2)
    return model, X


def numpy_search(model, coarse, fine, x, quota):
    """The searcher's definition, plainly: cells by coarse distance until the quota,
    then every retrieved item ranked by |x - reconstruction|^2."""
    h = model.D // 2
    d0 = ((x[:h] - model.Cs[0]) ** 2).sum(1)
    d1 = ((x[h:] - model.Cs[1]) ** 2).sum(1)
    cell_dist = d0[coarse[:, 0]] + d1[coarse[:, 1]]
    order = np.sort(np.unique(cell_dist))
    retrieved = np.zeros(len(coarse), bool)
    for d in order:
        retrieved |= cell_dist == d
        if retrieved.sum() >= quota:
            break
    rows = np.flatnonzero(retrieved)
    rec = model.decode((coarse[rows], fine[rows]))
    dists = ((x - rec) ** 2).sum(1)
    return rows, dists


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("quota", [1, 50, 700, 10 ** 6])
def test_searcher_equals_plain_numpy_definition(model_and_data, compiled, quota,
                                                monkeypatch):
    model, X = model_and_data
    if not compiled:
        monkeypatch.setattr(search_module.kernels, "compiled_search", lambda: None)
    elif search_module.kernels.compiled_search() is None:
        pytest.skip("compiled search extension not built")
    coarse, fine = model.encode(X)
    searcher = LOPQSearcher(model)
    searcher.add_codes((coarse, fine))
    for x in X[::500]:
        results, visited = searcher.search(x, quota=quota, limit=len(X), with_dists=True)
        rows, dists = numpy_search(model, coarse, fine, x, quota)
        assert sorted(r.id for r in results) == sorted(rows.tolist())
        want = dict(zip(rows.tolist(), dists))
        for r in results:
            assert r.dist == pytest.approx(want[r.id], rel=1e-3, abs=1e-3)
        assert [r.dist for r in results] == sorted(r.dist for r in results)
        assert 1 <= visited <= model.V ** 2


def test_compiled_and_python_paths_visit_the_same_cells(model_and_data, monkeypatch):
    if search_module.kernels.compiled_search() is None:
        pytest.skip("compiled search extension not built")
    model, X = model_and_data
    searcher = LOPQSearcher(model)
    searcher.add_data(X)
    fast = [searcher.search(x, quota=300, with_dists=True) for x in X[:20]]
    monkeypatch.setattr(search_module.kernels, "compiled_search", lambda: None)
    slow = [searcher.search(x, quota=300, with_dists=True) for x in X[:20]]
    for (a, va), (b, vb) in zip(fast, slow):
        # the kernel sums in another order: float32 near-ties may swap (query 1 here)
        assert va == vb
        _assert_same_ranking(a, b)


@pytest.mark.parametrize("V", [5, 33, 300])
def test_compiled_traversal_order_equals_python_with_exact_ties(V, monkeypatch):
    """Retrieval order (not only the ranked results) of the compiled path equals the
    Python multi-sequence, across its short (insertion) and long (radix) coarse sorts, with
    duplicated centroids giving exactly tied coarse distances."""
    if search_module.kernels.compiled_search() is None:
        pytest.skip("compiled search extension not built")
    rng = np.random.RandomState(V)
    D, M, S = 8, 2, 16
    # Small integer coordinates: every coarse distance and sum is exact in float32 and
    # float64 alike, so both paths see the same (many) ties and no rounding near-ties.
    Cs = rng.randint(-3, 4, size=(2, V, D // 2)).astype(np.float32)
    Cs[0, 1::3] = Cs[0, 0]  # duplicated centroids on top
    Cs[1, 2::3] = Cs[1, V // 2]
    Rs = np.tile(np.eye(D // 2, dtype=np.float32), (2, V, 1, 1))
    mus = np.zeros((2, V, D // 2), dtype=np.float32)
    subs = rng.randn(M, S, D // M).astype(np.float32)
    model = LOPQModel(V=V, M=M, subquantizer_clusters=S, parameters=(Cs, Rs, mus, subs))
    n = 4000
    coarse = rng.randint(0, V, size=(n, 2)).astype(np.int32)
    fine = rng.randint(0, S, size=(n, M)).astype(np.uint8)
    searcher = LOPQSearcher(model)
    searcher.add_codes((coarse, fine))
    queries = np.vstack([rng.randint(-3, 4, size=(3, D)),
                         np.concatenate([Cs[0, 0], Cs[1, V // 2]])[None]])
    for quota in (1, 37, 900, n):
        for x in queries.astype(np.float32):
            rows_c, dists_c, visited_c = searcher._retrieve_scored(x, quota)
            with monkeypatch.context() as patch:
                patch.setattr(search_module.kernels, "compiled_search", lambda: None)
                rows_p, dists_p, visited_p = searcher._retrieve_scored(x, quota)
            assert visited_c == visited_p
            np.testing.assert_array_equal(rows_c, rows_p)
            np.testing.assert_allclose(dists_c, dists_p, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("D,M,S", [(8, 2, 16), (24, 4, 20), (128, 16, 256), (36, 6, 9),
                                   (16, 4, 300)])
def test_compiled_distance_tables_on_every_block_shape(D, M, S, monkeypatch):
    """Search distances equal |x - reconstruction|^2 when the rotations are orthogonal,
    for half dimensions and codebook sizes that hit the full register blocks, single
    blocks and scalar remainders of the compiled table kernel, and uint16 codes."""
    if search_module.kernels.compiled_search() is None:
        pytest.skip("compiled search extension not built")
    rng = np.random.RandomState(D + M + S)
    V, h = 3, D // 2
    Cs = rng.randn(2, V, h).astype(np.float32)
    Rs = np.linalg.qr(rng.randn(2, V, h, h))[0].astype(np.float32)
    mus = (0.1 * rng.randn(2, V, h)).astype(np.float32)
    subs = rng.randn(M, S, D // M).astype(np.float32)
    model = LOPQModel(V=V, M=M, subquantizer_clusters=S, parameters=(Cs, Rs, mus, subs))
    n = 500
    coarse = rng.randint(0, V, size=(n, 2)).astype(np.int32)
    fine = rng.randint(0, S, size=(n, M))
    searcher = LOPQSearcher(model)
    searcher.add_codes((coarse, fine))
    assert searcher.fine.dtype == (np.uint16 if S > 256 else np.uint8)
    for x in rng.randn(4, D).astype(np.float32):
        results, _ = searcher.search(x, quota=n, with_dists=True)
        rows, dists = numpy_search(model, coarse, fine, x, n)
        want = dict(zip(rows.tolist(), dists))
        assert len(results) == n
        for r in results:
            assert r.dist == pytest.approx(want[r.id], rel=1e-4, abs=1e-3)


def test_reference_api(model_and_data):
    model, X = model_and_data
    searcher = LOPQSearcher(model)
    ids = [f"doc{i}" for i in range(len(X))]
    searcher.add_data(X, ids=ids)
    items, visited = searcher.get_result_quota(X[0], quota=20)
    assert len(items) >= 20 and visited >= 1
    assert all(isinstance(i[0], str) for i in items)
    code = model.predict(X[0])
    assert ("doc0", code) in searcher.get_cell(code.coarse)
    dists = searcher.compute_distances(X[0], items)
    assert len(dists) == len(items) and dists[0][1] == items[0]
    results, _ = searcher.search(X[0], quota=20, limit=5)
    assert len(results) == 5 and results[0].id == "doc0"
    assert results[0].code == code


def test_get_recall_and_batched_version_agree(model_and_data):
    model, X = model_and_data
    base, queries = X[:5000], X[5000:5100]
    from lopq.eval import exact_neighbors
    nns = exact_neighbors(queries, base)[:, 0]
    searcher = LOPQSearcher(model)
    searcher.add_data(base)
    recall, _ = get_recall(searcher, queries, nns, thresholds=[1, 10, 100])
    batched, _ = get_recall_batch(searcher, queries, nns, thresholds=[1, 10, 100], threads=2)
    np.testing.assert_allclose(recall, batched)
    assert recall[2] > 0.6  # measured 0.77 with 32 subquantizer clusters


def test_save_and_mmap_load_round_trip(model_and_data, tmp_path):
    model, X = model_and_data
    searcher = LOPQSearcher(model)
    searcher.add_data(X)
    searcher.save(tmp_path / "index")
    loaded = LOPQSearcher.load(tmp_path / "index", mmap=True)
    assert isinstance(loaded.fine, np.memmap)
    for x in X[:10]:
        a, _ = searcher.search(x, quota=200, limit=10, with_dists=True)
        b, _ = loaded.search(x, quota=200, limit=10, with_dists=True)
        assert [r.id for r in a] == [r.id for r in b]
        # ids come back as Python ints from a memory-mapped index too (json-serialisable)
        assert all(type(r.id) is int for r in b)
        assert all(type(item[0]) is int for item in loaded.get_result_quota(x, quota=5)[0])
    with pytest.raises(ValueError, match="already holds an index"):
        searcher.save(tmp_path / "index")


def test_string_ids_survive_save_and_load(model_and_data, tmp_path):
    model, X = model_and_data
    searcher = LOPQSearcher(model)
    searcher.add_data(X[:100], ids=[f"k{i}" for i in range(100)])
    searcher.save(tmp_path / "index")
    assert LOPQSearcher.load(tmp_path / "index").search(X[3], quota=5)[0][0].id == "k3"


def test_truncated_or_foreign_index_is_a_clear_error(model_and_data, tmp_path):
    model, X = model_and_data
    with pytest.raises(ValueError, match="not an lopq index"):
        LOPQSearcher.load(tmp_path)
    searcher = LOPQSearcher(model)
    searcher.add_data(X)
    searcher.save(tmp_path / "index")
    fine = tmp_path / "index" / "fine.npy"
    fine.write_bytes(fine.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or damaged"):
        LOPQSearcher.load(tmp_path / "index")


def test_index_from_compute_codes_output(model_and_data, tmp_path):
    from lopq.formats import format_code_line
    model, X = model_and_data
    coarse, fine = model.encode(X[:300])
    folder = tmp_path / "codes"
    folder.mkdir()
    (folder / "part-00000").write_text("\n".join(
        format_code_line(i, c, f) for i, (c, f) in enumerate(zip(coarse, fine))) + "\n")
    searcher = LOPQSearcher.from_codes(model, folder)
    results, _ = searcher.search(X[7], quota=10)
    assert results[0].id == 7
    (folder / "part-00001").write_text("9\t[[0, 1], [2, 3]]\n")  # a model with M=2
    with pytest.raises(ValueError, match="different models"):
        LOPQSearcher.from_codes(model, folder)
    (folder / "part-00001").write_text("9\t[[0, 1], [2, 3, x, 4]]\n")
    with pytest.raises(ValueError, match="part-00001: code line 1 is not"):
        LOPQSearcher.from_codes(model, folder)


def test_code_lines_parse_in_bulk_as_line_by_line():
    from lopq.formats import format_code_line, parse_code_line, parse_code_lines
    rng = np.random.RandomState(0)
    coarse = rng.randint(0, 1024, size=(200, 2))
    fine = rng.randint(0, 65536, size=(200, 16))
    lines = [format_code_line(f"id{i}" if i % 3 else i, c, f)
             for i, (c, f) in enumerate(zip(coarse, fine))]
    lines[5] += "  \r\n"  # trailing blanks and a Windows line end
    lines.insert(7, "")
    keys, got_coarse, got_fine = parse_code_lines(lines)
    one_by_one = [parse_code_line(line) for line in lines if line]
    assert keys == [k for k, _, _ in one_by_one]
    np.testing.assert_array_equal(got_coarse, coarse)
    np.testing.assert_array_equal(got_fine, fine)


@pytest.mark.parametrize("bad,match", [
    ("8\t[[1, 2], [3, 4]]", "line 2 has 2 fine codes, the first line 3"),
    ("8 [[1, 2], [3, 4, 5]]", "line 2 is not id<TAB>.*no TAB"),
    ("8\t[[1, 2], [3, 4.5, 5]]", "line 2 holds a code that is not an integer"),
    ("8\t[[1, 2, 3], [4, 5]]", "line 2 has 3 coarse codes, not 2"),
    ("8\t[[1, 2], [3, x, 5]]", "line 2 is not id<TAB>"),
])
def test_bad_code_lines_are_named(bad, match):
    from lopq.formats import parse_code_lines
    with pytest.raises(ValueError, match=match):
        parse_code_lines(["7\t[[1, 2], [3, 4, 5]]", bad], source="codes/")


@pytest.mark.parametrize("call,match", [
    (lambda s, X: s.search(X[0, :5]), "D=16"),
    (lambda s, X: s.search(X[0], quota=0), "quota"),
    (lambda s, X: s.add_data(X[:10], ids=[1, 2]), "2 ids for 10"),
    (lambda s, X: s.search_batch(X[:3, :4]), "D=16"),
])
def test_bad_search_input_is_a_clear_error(model_and_data, call, match):
    model, X = model_and_data
    searcher = LOPQSearcher(model)
    searcher.add_data(X[:100])
    with pytest.raises(ValueError, match=match):
        call(searcher, X)


def test_oxford5k_recall_with_the_searcher(oxford):
    train, test, nns = oxford
    searched = []
    for seed in range(40, 48):  # one seed varies recall@10 by +-0.01: eight are averaged
        model = LOPQModel(V=16, M=8).fit(train, n_init=1, random_state=seed)
        searcher = LOPQSearcher(model)
        searcher.add_data(train)
        recall, _ = get_recall_batch(searcher, test, nns, thresholds=[1, 10, 100, 1000])
        searched.append(recall)
    searched = np.mean(searched, 0)
    # Measured here over seeds 40-47: [0.511, 0.935] at recall@1 and @10 (2026-12-07,
    # the held-out selection; 0.927-0.932 at recall@10 with earlier selections). The
    # reference (Python 3 port, same protocol) measured [0.499, 0.925, 0.978]: the bar
    # is the reference's recall. Recall@100 is capped by the cells that quota=1000
    # reaches (recall@1000), which only the coarse quantizers decide.
    assert searched[0] >= 0.505 and searched[1] >= 0.925 and searched[2] >= 0.97, searched


def test_empty_and_single_item_searchers(model_and_data):
    model, X = model_and_data
    searcher = LOPQSearcher(model)
    assert searcher.search(X[0], quota=5) == ([], model.V ** 2)
    assert all(len(ids) == 0 for ids, _ in searcher.search_batch(X[:3], quota=5, limit=3))
    searcher.add_data(X[:1], ids=["only"])
    results, _ = searcher.search(X[1], quota=5)
    assert [r.id for r in results] == ["only"]
    ids, dists = searcher.search_batch(X[1:2], quota=5, limit=3)[0]
    assert list(ids) == ["only"] and dists.shape == (1,)


def test_index_folder_with_a_pickle_that_runs_code_is_refused(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    X = make_clustered(300, 8, seed=4)
    model = LOPQModel(V=2, M=2, subquantizer_clusters=8).fit(X, n_init=1, random_state=0)
    searcher = LOPQSearcher(model)
    searcher.add_data(X, ids=[f"k{i}" for i in range(len(X))])
    searcher.save(tmp_path / "index")
    assert LOPQSearcher.load(tmp_path / "index").size == len(X)  # string ids load
    (tmp_path / "index" / "ids.pkl").write_bytes(pickle.dumps([Evil()] * len(X)))
    with pytest.raises(ValueError, match="posix.system.*not allowed"):
        LOPQSearcher.load(tmp_path / "index")
    assert not (tmp_path / "pwned").exists()


def test_numpy_backend_switch_covers_the_compiled_query_path(monkeypatch, rng):
    """LOPQ_KERNELS=numpy runs search without compiled code, with the same results."""
    from lopq import _kernels
    X = rng.randn(2000, 16).astype(np.float32)
    model = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X, n_init=1, random_state=0)
    searcher = LOPQSearcher(model)
    searcher.add_data(X)
    want = [searcher.search(q, quota=100, limit=10, with_dists=True)[0] for q in X[:20]]
    monkeypatch.setenv("LOPQ_KERNELS", "numpy")
    assert _kernels.compiled_search() is None
    got = [searcher.search(q, quota=100, limit=10, with_dists=True)[0] for q in X[:20]]
    for a, b in zip(got, want):
        assert [r.id for r in a] == [r.id for r in b]
        np.testing.assert_allclose([r.dist for r in a], [r.dist for r in b], rtol=1e-4,
                                   atol=1e-5)


def test_search_batch_equals_search_on_many_queries(model_and_data):
    """The batched, threaded query path ranks exactly as one query at a time."""
    model, X = model_and_data[:2]
    searcher = LOPQSearcher(model)
    searcher.add_data(X, ids=[f"x{i}" for i in range(len(X))])
    queries = X[:200] + 0.05 * np.random.RandomState(4).randn(200, X.shape[1]).astype(
        np.float32)
    batch = searcher.search_batch(queries, quota=60, limit=7, threads=2)
    assert len(batch) == len(queries)
    for q, (ids, dists) in zip(queries, batch):
        one = searcher.search(q, quota=60, limit=7, with_dists=True)[0]
        assert list(ids) == [r.id for r in one]
        np.testing.assert_allclose(dists, [r.dist for r in one], rtol=1e-5, atol=1e-6)


def _grouped_case(D, M, S, V, n, seed):
    """A model with random orthogonal rotations (no training) and random codes: sizes the
    compiled loops must handle at their edges (h and S not multiples of the vector width,
    empty cells, one row)."""
    rng = np.random.RandomState(seed)
    h = D // 2
    Cs = rng.randn(2, V, h).astype(np.float32)
    Rs = np.linalg.qr(rng.randn(2, V, h, h))[0].astype(np.float32)
    mus = (0.1 * rng.randn(2, V, h)).astype(np.float32)
    subs = rng.randn(M, S, D // M).astype(np.float32)
    model = LOPQModel(V=V, M=M, subquantizer_clusters=S, parameters=(Cs, Rs, mus, subs))
    coarse = rng.randint(0, max(1, V // 2), size=(n, 2))  # half the clusters stay empty
    fine = rng.randint(0, S, size=(n, M))
    return model, coarse, fine, rng


@pytest.mark.parametrize("direct", [0, 1.0, 1e9])
@pytest.mark.parametrize("D,M,S,V,n", [(16, 4, 32, 6, 500), (12, 2, 12, 5, 300),
                                       (24, 6, 20, 40, 2000), (16, 4, 32, 3, 1),
                                       (40, 4, 9, 30, 1500)])
def test_grouped_batch_tables_equal_plain_numpy_distances(D, M, S, V, n, direct,
                                                          monkeypatch):
    """search_batch (tables of a block of queries built per cluster, expanded square)
    retrieves what the plain definition retrieves and ranks by its distances, within
    float tolerance; blocks of 3 queries make the block boundaries part of the test.
    ``direct``: pairs with fewer rows than that many per centroid are scored without
    tables (0: none; 1: a mix, pair by pair; 1e9: every one; ds = 10 in the last case
    leaves a tail past the vector width)."""
    if search_module.kernels.compiled_search() is None:
        pytest.skip("compiled search extension not built")
    model, coarse, fine, rng = _grouped_case(D, M, S, V, n, seed=D + V)
    searcher = LOPQSearcher(model)
    searcher.add_codes((coarse, fine))
    monkeypatch.setattr(LOPQSearcher, "BATCH_BLOCK", 3)
    monkeypatch.setattr(LOPQSearcher, "GROUPED_MIN_ROTATION_BYTES", 0)
    monkeypatch.setattr(LOPQSearcher, "DIRECT_ROWS_PER_CENTROID", direct)
    assert searcher.uses_grouped_tables()
    queries = rng.randn(11, D).astype(np.float32)
    queries[5] = queries[4]  # a repeated query: identical results
    quota, limit = max(1, n // 7), 9
    batch = searcher.search_batch(queries, quota=quota, limit=limit, threads=1)
    for x, (ids, dists) in zip(queries, batch):
        rows, want = numpy_search(model, coarse, fine, x, quota)
        k = min(limit, len(rows))
        assert len(ids) == k
        np.testing.assert_allclose(dists, np.sort(want)[:k], rtol=1e-4, atol=1e-4)
        lookup = dict(zip(rows.tolist(), want))
        # every returned id was retrieved, at its own distance (near-ties may swap ids)
        np.testing.assert_allclose([lookup[i] for i in ids], dists, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(batch[4][0], batch[5][0])
    profile = searcher.last_batch_profile
    assert set(profile) == {"traversal", "tables", "scan"}
    assert all(v >= 0 for v in profile.values())


@pytest.mark.parametrize("grouped", [True, False])
def test_batch_with_threads_and_a_huge_quota_equals_one_query_at_a_time(
        model_and_data, grouped, monkeypatch):
    model, X = model_and_data
    if search_module.kernels.compiled_search() is None:
        pytest.skip("compiled search extension not built")
    monkeypatch.setattr(LOPQSearcher, "GROUPED_MIN_ROTATION_BYTES", 0 if grouped else 2 ** 62)
    searcher = LOPQSearcher(model)
    assert searcher.uses_grouped_tables() == grouped
    searcher.add_data(X)
    batch = searcher.search_batch(X[:30], quota=10 ** 9, limit=5, threads=2)
    for x, (_, dists) in zip(X[:30], batch):
        one = searcher.search(x, quota=10 ** 9, limit=5, with_dists=True)[0]
        np.testing.assert_allclose(dists, [r.dist for r in one], rtol=1e-4, atol=1e-4)
    profile = searcher.last_batch_profile
    assert set(profile) == {"traversal", "tables", "scan"} and profile["scan"] > 0


def _assert_same_ranking(got, want, tol=1e-4):
    """``(id, code, dist)`` rankings agree: the same distances in order (to float
    rounding), each id with the same code, and the same items wherever the distances
    are not near-ties (two paths may order float32 near-ties differently)."""
    assert len(got) == len(want)
    np.testing.assert_allclose([d for *_, d in got], [d for *_, d in want], rtol=tol,
                               atol=tol)
    codes = {i: c for i, c, _ in want}
    assert all(codes.get(i, c) == c for i, c, _ in got)
    assert len({i for i, _, _ in got}) == len(got)
    last = want[-1][2] if want else 0
    sure = {i for i, _, d in want if d < last - tol * max(1, abs(last))}
    assert sure <= {i for i, _, _ in got}


def _searchers_under_test(model_and_data):
    """The fixture's index (uint8 codes, string ids) and one of random parameters with
    S=300 (uint16 codes) and empty cells."""
    from lopq.search import LOPQSearcherBase
    model, X = model_and_data
    small = LOPQSearcher(model)
    small.add_data(X[:3000], ids=[f"x{i}" for i in range(3000)])
    wide, coarse, fine, rng = _grouped_case(16, 4, 300, 5, 800, 9)
    big = LOPQSearcher(wide)
    big.add_codes((coarse, fine))
    queries = [(small, X[3000:3060]), (big, rng.randn(40, 16).astype(np.float32))]
    return LOPQSearcherBase, queries


@pytest.mark.parametrize("quota,limit", [(1, None), (60, 7), (500, 100), (10 ** 6, 5000),
                                         (40, 0)])
def test_search_equals_the_per_item_reference_path(model_and_data, quota, limit):
    """`LOPQSearcher.search` (top rows picked in the kernel, results built by C-level
    maps) returns what the reference-style path of `LOPQSearcherBase` returns: the same
    ids, codes, order and visited cells, distances to float rounding."""
    base, cases = _searchers_under_test(model_and_data)
    for searcher, queries in cases:
        for q in queries:
            got, visited = searcher.search(q, quota=quota, limit=limit, with_dists=True)
            want, want_visited = base.search(searcher, q, quota=quota, limit=limit,
                                             with_dists=True)
            assert visited == want_visited
            _assert_same_ranking([(r.id, r.code, r.dist) for r in got],
                                 [(r.id, r.code, r.dist) for r in want])
            assert all(type(r.code.coarse) is tuple and type(r.code.fine[0]) is int
                       for r in got)
            plain, _ = searcher.search(q, quota=quota, limit=limit)
            assert plain == [(r.id, r.code) for r in got]
            assert type(plain[0]).__name__ == "Result" if plain else True


@pytest.mark.parametrize("quota,limit", [(1, None), (60, 7), (500, None), (10 ** 6, 5000),
                                         (40, 0)])
def test_search_arrays_is_search_batch_of_one_query(model_and_data, quota, limit):
    base, cases = _searchers_under_test(model_and_data)
    for searcher, queries in cases:
        for q in queries:
            ids, dists = searcher.search_arrays(q, quota=quota, limit=limit)
            (want_ids, want_dists), = searcher.search_batch(q[None], quota=quota,
                                                           limit=limit, threads=1)
            assert list(ids) == list(want_ids)
            np.testing.assert_allclose(dists, want_dists, rtol=1e-5, atol=1e-5)
            assert dists.dtype == np.float32


def test_search_arrays_checks_its_arguments(model_and_data):
    model, X = model_and_data
    searcher = LOPQSearcher(model)
    searcher.add_data(X[:100])
    with pytest.raises(ValueError, match="quota must be a positive"):
        searcher.search_arrays(X[0], quota=0)
    with pytest.raises(ValueError, match="limit must be None or at least 0"):
        searcher.search_arrays(X[0], quota=5, limit=-1)
    with pytest.raises(ValueError, match="one vector of shape"):
        searcher.search_arrays(X[:2], quota=5)


def test_one_query_contexts_follow_the_index_and_the_threads(model_and_data):
    """`search` keeps a compiled context per thread: searches from many threads at once
    give the sequential results, and items added or removed after a search are seen."""
    from concurrent.futures import ThreadPoolExecutor
    model, X = model_and_data
    searcher = LOPQSearcher(model)
    searcher.add_data(X[:2000])
    queries = X[2000:2200]
    expected = [searcher.search_arrays(q, quota=80, limit=10) for q in queries]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: searcher.search_arrays(q, quota=80, limit=10),
                            queries))
    for (ids, dists), (want_ids, want_dists) in zip(got, expected):
        assert list(ids) == list(want_ids)
        np.testing.assert_array_equal(dists, want_dists)
    searcher.add_data(queries[:1], ids=["new"])
    assert searcher.search_arrays(queries[0], quota=80, limit=1)[0][0] == "new"
    assert searcher.search(queries[0], quota=80, limit=1)[0][0].id == "new"
    searcher.remove_ids(["new"])
    assert "new" not in list(searcher.search_arrays(queries[0], quota=80, limit=10)[0])
