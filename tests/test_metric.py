"""Cosine and inner-product models: the transforms against brute force, search ranking
in each metric against exhaustive ranking, and the metric travelling with the model."""

import pickle

import numpy as np
import pytest
from conftest import shared_file
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from lopq import LOPQModel
from lopq.metric import augmented_rows, model_dimension, padded_queries, unit_rows
from lopq.search import LOPQSearcher, LOPQSearcherBase


def brute_force(metric, Q, X):
    """(q, n) distances of the metric, computed directly in float64."""
    Q, X = Q.astype(np.float64), X.astype(np.float64)
    if metric == "l2":
        return ((Q[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    if metric == "cosine":
        Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        return 1.0 - Qn @ Xn.T
    return -(Q @ X.T)


# ------------------------------------------------------------------ the transforms
def test_inner_product_transform_turns_dot_products_into_squared_distances():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 7)).astype(np.float32) * rng.uniform(0.1, 3, (50, 1))
    Q = rng.standard_normal((5, 7)).astype(np.float32)
    phi = np.linalg.norm(X, axis=1).max()
    D = model_dimension("inner_product", 7, 4)
    assert D == 8  # 7 + the norm coordinate, a multiple of M
    Xm, Qm = augmented_rows(X, phi, D), padded_queries(Q, D)
    assert Xm.shape == (50, 8) and Qm.shape == (5, 8)
    np.testing.assert_allclose(np.linalg.norm(Xm, axis=1), phi, rtol=1e-5)
    sq = ((Qm[:, None, :].astype(np.float64) - Xm[None]) ** 2).sum(-1)
    expected = (Q.astype(np.float64) ** 2).sum(1)[:, None] + phi ** 2 - 2 * Q @ X.T
    np.testing.assert_allclose(sq, expected, rtol=1e-4, atol=1e-4)
    # Every input coordinate appears once; the rest of a query is zero.
    assert np.count_nonzero(Qm, axis=1).max() <= 7
    np.testing.assert_allclose(np.sort(np.abs(Qm), axis=1)[:, 1:],
                               np.sort(np.abs(Q), axis=1), rtol=0)


def test_model_dimension_keeps_two_equal_halves_and_equal_subvectors():
    for d in (1, 2, 7, 8, 127, 128, 384):
        for M in (2, 4, 8, 16):
            D = model_dimension("inner_product", d, M)
            assert D > d and D % M == 0 and D % 2 == 0 and D - (d + 1) < M
            assert model_dimension("cosine", d, M) == d == model_dimension("l2", d, M)


def test_cosine_rows_are_unit_and_zero_rows_are_refused_by_name():
    X = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(unit_rows(X), [[0.6, 0.8], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"norm 0 \(first: row 1\).*metric='l2'"):
        unit_rows(np.array([[1.0, 0.0], [0.0, 0.0]]), "vectors")


# ------------------------------------------------------------------ search vs brute force
def exact_model(metric, X):
    """A model whose codes reconstruct every training row (S >= n per subquantizer, no
    shrinkage): LOPQ distances then equal the true ones, so rankings must match."""
    return LOPQModel(V=2, M=2, subquantizer_clusters=len(X), metric=metric).fit(
        X, n_init=1, random_state=0, rotation_refinement_iters=0, rotation_shrinkage=0)


@pytest.fixture(scope="module")
def spread_data():
    rng = np.random.default_rng(1)
    # Norms spread over 0.2..5 so inner product, cosine and L2 rank differently.
    X = rng.standard_normal((64, 10)) * rng.uniform(0.2, 5, (64, 1))
    Q = rng.standard_normal((6, 10)) * rng.uniform(0.5, 2, (6, 1))
    return X.astype(np.float32), Q.astype(np.float32)


def assert_same_ranking_up_to_ties(ids, dists, truth_row, atol):
    """The returned distances are the true ones of the returned ids, and the k-th
    returned distance is the k-th smallest true one (so ids agree up to ties)."""
    ids = np.asarray(ids).astype(np.int64)
    np.testing.assert_allclose(dists, truth_row[ids], atol=atol, rtol=1e-4)
    np.testing.assert_allclose(dists, np.sort(truth_row)[:len(ids)], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("metric", ["l2", "cosine", "inner_product"])
def test_search_ranks_as_exhaustive_search_in_each_metric(metric, spread_data):
    X, Q = spread_data
    model = exact_model(metric, X)
    assert model.dim == 10 and model.D == (12 if metric == "inner_product" else 10)
    truth = brute_force(metric, Q, X)
    # The rankings differ between metrics on this data, so each test is specific.
    assert len({tuple(np.argsort(brute_force(m, Q, X)[0])[:5])
                for m in ("l2", "cosine", "inner_product")}) == 3
    searcher = LOPQSearcher(model)
    searcher.add_data(X)
    batch = searcher.search_batch(Q, quota=len(X), limit=10)
    for qi, q in enumerate(Q):
        results, _ = searcher.search(q, quota=len(X), limit=10, with_dists=True)
        ids = [r.id for r in results]
        dists = [r.dist for r in results]
        atol = 1e-3 * max(1.0, np.abs(truth[qi]).max())
        assert_same_ranking_up_to_ties(ids, dists, truth[qi], atol)
        assert_same_ranking_up_to_ties(batch[qi][0], batch[qi][1], truth[qi], atol)
        # The reference's plain-Python path computes the same distances.
        items = [(r.id, r.code) for r in results]
        plain = LOPQSearcherBase.compute_distances(searcher, q, items)
        np.testing.assert_allclose([d for d, _ in plain], dists, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("metric", ["cosine", "inner_product"])
def test_encode_decode_and_the_single_vector_api_work_in_the_input_space(metric, spread_data):
    X, _ = spread_data
    model = exact_model(metric, X)
    coarse, fine = model.encode(X)
    back = model.decode((coarse, fine))
    assert back.shape == X.shape
    expected = unit_rows(X) if metric == "cosine" else X
    np.testing.assert_allclose(back, expected, atol=1e-3 * np.abs(X).max())
    code = model.predict(X[3])
    assert code.coarse == tuple(coarse[3]) and code.fine == tuple(fine[3])
    np.testing.assert_allclose(model.reconstruct(code), expected[3], atol=1e-2)
    tables = model.get_subquantizer_distances(X[0], code.coarse)
    assert len(tables) == model.M and tables[0].shape == (len(X),)
    with pytest.raises(ValueError, match="dimension 12 but the model expects D=10"):
        model.encode(np.ones((2, 12), dtype=np.float32))


def test_cosine_model_refuses_zero_rows_and_queries_with_a_clear_error(spread_data):
    X, Q = spread_data
    model = exact_model("cosine", X)
    bad = X[:3].copy()
    bad[2] = 0
    with pytest.raises(ValueError, match=r"vectors: 1 rows have norm 0 \(first: row 2\)"):
        model.encode(bad)
    searcher = LOPQSearcher(model)
    searcher.add_data(X)
    with pytest.raises(ValueError, match="queries: 1 rows have norm 0"):
        searcher.search_batch(np.zeros((1, 10), dtype=np.float32), quota=5)


def test_inner_product_rows_longer_than_the_training_norm_still_encode(spread_data):
    X, Q = spread_data
    model = exact_model("inner_product", X)
    assert model.max_norm == pytest.approx(np.linalg.norm(X, axis=1).max(), rel=1e-5)
    coarse, fine = model.encode(3 * X[:4])
    assert coarse.shape == (4, 2) and fine.shape == (4, 2)


# ------------------------------------------------------------------ persistence
def reference_schema_message():
    """LOPQModelParams exactly as the reference's lopq_model.proto declares it (fields
    1-8), built here independently of lopq.formats."""
    fdp = descriptor_pb2.FileDescriptorProto(name="reference_lopq_model.proto",
                                             package="reference.lopq", syntax="proto2")
    F = descriptor_pb2.FieldDescriptorProto
    vector = fdp.message_type.add(name="Vector")
    vector.field.add(name="values", number=1, label=F.LABEL_REPEATED, type=F.TYPE_FLOAT,
                     options=descriptor_pb2.FieldOptions(packed=True))
    matrix = fdp.message_type.add(name="Matrix")
    matrix.field.add(name="values", number=1, label=F.LABEL_REPEATED, type=F.TYPE_FLOAT,
                     options=descriptor_pb2.FieldOptions(packed=True))
    matrix.field.add(name="shape", number=2, label=F.LABEL_REPEATED, type=F.TYPE_UINT32)
    params = fdp.message_type.add(name="LOPQModelParams")
    for number, name in enumerate(["D", "V", "M", "num_subquantizers"], start=1):
        params.field.add(name=name, number=number, label=F.LABEL_OPTIONAL,
                         type=F.TYPE_UINT32)
    for number, (name, kind) in enumerate([("Cs", "Matrix"), ("Rs", "Matrix"),
                                           ("mus", "Vector"), ("subs", "Matrix")], start=5):
        params.field.add(name=name, number=number, label=F.LABEL_REPEATED,
                         type=F.TYPE_MESSAGE, type_name=f".reference.lopq.{kind}")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("reference.lopq.LOPQModelParams"))


@pytest.mark.parametrize("metric", ["cosine", "inner_product"])
def test_metric_travels_in_the_lopq_file_and_the_reference_schema_reads_it_as_l2(
        metric, spread_data, tmp_path):
    X, Q = spread_data
    model = exact_model(metric, X)
    path = tmp_path / "m.lopq"
    model.export_proto(str(path))
    again = LOPQModel.load_proto(str(path))
    assert (again.metric, again.dim, again.D) == (metric, model.dim, model.D)
    assert again.max_norm == model.max_norm
    for a, b in zip(again.parameters, model.parameters):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again.encode(X)[1], model.encode(X)[1])

    old = reference_schema_message()()
    old.ParseFromString(path.read_bytes())  # unknown fields 9-11 are skipped
    assert (old.D, old.V, old.M, old.num_subquantizers) == (model.D, 2, 2, len(X))
    assert len(old.Cs) == 2 and list(old.Cs[0].shape) == [2, model.D // 2]
    np.testing.assert_array_equal(np.asarray(old.Cs[1].values, np.float32),
                                  model.Cs[1].ravel())
    # An old reader sees an L2 model over the transformed vectors.
    old.DiscardUnknownFields()
    legacy = LOPQModel.from_proto_bytes(old.SerializeToString())
    assert legacy.metric == "l2" and legacy.D == model.D

    unpickled = pickle.loads(pickle.dumps(model))
    assert (unpickled.metric, unpickled.dim, unpickled.max_norm) == \
        (metric, model.dim, model.max_norm)
    assert metric in repr(model)


def test_l2_files_and_pickles_are_the_references_bytes_and_keys():
    fixture = shared_file("compat", "random_test_model.lopq").read_bytes()
    model = LOPQModel.from_proto_bytes(fixture, "random_test_model.lopq")
    assert model.metric == "l2" and model.dim == model.D == 8 and model.max_norm is None
    old = reference_schema_message()()
    old.ParseFromString(model.to_proto_bytes())
    assert old.SerializeToString() == model.to_proto_bytes()  # no unknown fields
    state = model.__getstate__()
    assert set(state) == {"V", "M", "subquantizer_clusters", "Cs", "Rs", "mus", "codebooks"}
    restored = LOPQModel.__new__(LOPQModel)
    restored.__setstate__(state)
    assert restored.metric == "l2" and restored.dim == 8


def test_unknown_metric_and_mismatched_dimension_are_refused():
    with pytest.raises(ValueError, match="unknown metric 'dot': choose one of l2, cosine"):
        LOPQModel(V=2, M=2, metric="dot")
    model = LOPQModel.from_proto_bytes(
        shared_file("compat", "random_test_model.lopq").read_bytes())
    with pytest.raises(ValueError, match="dimension 8 has D=12, but its parameters are for D=8"):
        LOPQModel(parameters=model.parameters, metric="inner_product", dim=8)


def test_inner_product_distances_are_dot_products_with_the_reconstructions(spread_data,
                                                                           monkeypatch):
    """With lossy codes, every search path reports -q.x_hat, x_hat the decoded row (not
    the model-space squared distance, which would add each reconstruction's norm error)."""
    from lopq.eval import rank_by_lopq_distance
    X, Q = spread_data
    model = LOPQModel(V=2, M=4, subquantizer_clusters=8, metric="inner_product").fit(
        X, n_init=1, random_state=0)
    coarse, fine = model.encode(X)
    truth = -(Q.astype(np.float64) @ model.decode((coarse, fine)).T)
    searcher = LOPQSearcher(model)
    searcher.add_codes((coarse, fine))
    # the one-query tables, the grouped GEMM tables, and grouped pairs scored directly
    for grouped, direct in ((False, 0), (True, 0), (True, 1e9)):
        monkeypatch.setattr(LOPQSearcher, "GROUPED_MIN_ROTATION_BYTES", 0 if grouped else 1e18)
        monkeypatch.setattr(LOPQSearcher, "DIRECT_ROWS_PER_CENTROID", direct)
        assert searcher.uses_grouped_tables() == grouped
        for qi, (ids, dists) in enumerate(searcher.search_batch(Q, quota=len(X), limit=8)):
            assert_same_ranking_up_to_ties(ids, dists, truth[qi], 1e-3)
    for qi, q in enumerate(Q):
        results, _ = searcher.search(q, quota=len(X), limit=8, with_dists=True)
        assert_same_ranking_up_to_ties([r.id for r in results], [r.dist for r in results],
                                       truth[qi], 1e-3)
        plain = LOPQSearcherBase.compute_distances(searcher, q, [(r.id, r.code)
                                                                 for r in results])
        np.testing.assert_allclose([d for d, _ in plain], [r.dist for r in results],
                                   rtol=1e-4, atol=1e-3)
    ranked = rank_by_lopq_distance(model, Q, coarse, fine, 8)
    for qi in range(len(Q)):
        np.testing.assert_allclose(np.sort(truth[qi])[:8], truth[qi, ranked[qi]], atol=1e-3)


def test_inner_product_traversal_visits_cells_by_dot_product():
    """The multi-sequence order of an inner-product model is by q.C (the centroids'
    norms subtracted), in the Python traversal and the compiled one alike."""
    from lopq._kernels import compiled_search
    from lopq.search import multisequence
    rng = np.random.default_rng(3)
    X = (rng.standard_normal((400, 6)) * rng.uniform(0.2, 4, (400, 1))).astype(np.float32)
    model = LOPQModel(V=6, M=2, subquantizer_clusters=16, metric="inner_product").fit(
        X, n_init=1, random_state=0)
    q = model.model_queries(rng.standard_normal((1, 6)).astype(np.float32))[0]
    h = model.D // 2
    score = [q[s * h:(s + 1) * h] @ model.Cs[s].T for s in range(2)]  # (V,) per split
    cells = [cell for _, cell in multisequence(q, model.Cs, model.coarse_adjustment())]
    sums = [score[0][c0] + score[1][c1] for c0, c1 in cells]
    assert len(cells) == 36 and all(a >= b - 1e-4 for a, b in zip(sums, sums[1:]))
    compiled = compiled_search()
    if compiled is not None:
        offsets = np.arange(37, dtype=np.int64)  # one row per cell: every cell non-empty
        CsT = np.ascontiguousarray(model.Cs.transpose(0, 2, 1))
        _, visited = compiled.visited_cells(q[None, :], CsT, offsets, 36,
                                            model.coarse_adjustment())
        got = [score[0][c0] + score[1][c1] for c0, c1 in visited]
        np.testing.assert_allclose(got, sums, atol=1e-4)
