"""Drop-in compatibility with the reference `lopq` package, checked against its documented
API and its fixtures in ../shared/data/compat."""

import itertools
import pickle

import numpy as np
import pytest
from conftest import shared_file

from lopq import LOPQModel, LOPQSearcher


def load_pickle(name):
    with open(shared_file("compat", name), "rb") as f:
        return pickle.load(f, encoding="latin1")


@pytest.fixture(scope="module")
def compat_searcher_inputs():
    model = LOPQModel.load_proto(str(shared_file("compat", "random_test_model.lopq")))
    return model, load_pickle("test_searcher_data.pkl")


def counts(result):
    items, visited = result
    return len(items), visited


def searcher_battery(searcher, q):
    """The reference's counts on its searcher fixture: whole cells until the quota, and
    at most ``quota`` results from ``search`` unless ``limit`` says otherwise."""
    assert counts(searcher.get_result_quota(q)) == (12, 3)
    assert counts(searcher.search(q)) == (10, 3)
    assert counts(searcher.get_result_quota(q, 20)) == (28, 5)
    assert counts(searcher.search(q, 20)) == (20, 5)
    assert counts(searcher.search(q, 20, limit=10)) == (10, 5)


def test_searcher_counts_from_add_data(compat_searcher_inputs):
    model, data = compat_searcher_inputs
    searcher = LOPQSearcher(model)
    searcher.add_data(data)
    searcher_battery(searcher, np.ones(8))


def test_searcher_counts_from_add_codes_with_an_unbounded_id_iterator(compat_searcher_inputs):
    model, data = compat_searcher_inputs
    codes = [model.predict(x) for x in data]
    searcher = LOPQSearcher(model)
    searcher.add_codes(codes, ids=itertools.count())  # the reference's default pattern
    assert searcher.size == len(data)
    searcher_battery(searcher, np.ones(8))
    ids = itertools.count(1000)
    searcher.add_codes(codes[:3], ids=ids)
    assert next(ids) == 1003  # took exactly one id per code


def test_accumulate_covariance_estimators_keeps_float64_to_the_fixtures_tolerance():
    from lopq.model import accumulate_covariance_estimators
    data, C = load_pickle("test_accumulate_covariance_estimators_input.pkl")
    want = load_pickle("test_accumulate_covariance_estimators_output.pkl")
    got = accumulate_covariance_estimators(data, C)
    assert got[4].dtype == np.float64 and got[0].dtype == np.float64
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-8)
    # float32 callers keep the compiled float32 path.
    got32 = accumulate_covariance_estimators(data.astype(np.float32), C.astype(np.float32))
    assert got32[4].dtype == np.float32


def test_model_infers_V_M_and_S_from_its_parameters():
    model = LOPQModel.load_proto(str(shared_file("compat", "random_test_model.lopq")))
    Cs, Rs, mus, subs = model.parameters
    reference_layout = ([c for c in Cs], [list(r) for r in Rs], [list(m) for m in mus],
                        [list(s) for s in subs])  # tuples of per-cluster arrays per split
    for params in (model.parameters, reference_layout):
        again = LOPQModel(parameters=params)  # defaults V=8, M=4 must not win
        assert (again.V, again.M, again.subquantizer_clusters, again.D) == \
            (model.V, model.M, model.subquantizer_clusters, model.D)
    partial = LOPQModel(parameters=(Cs, None, None, None))
    assert (partial.V, partial.M) == (model.V, 4)
    refit_data = np.random.RandomState(0).standard_normal((300, 8))
    refit = LOPQModel(V=3, M=2, subquantizer_clusters=16,
                      parameters=(Cs, Rs, mus, None)).fit(refit_data, n_init=1)
    assert (refit.V, refit.M, refit.subquantizer_clusters) == (5, 2, 16)
    np.testing.assert_array_equal(refit.Cs, Cs)


def test_lmdb_searcher_counts_from_add_data_and_add_codes(compat_searcher_inputs, tmp_path):
    pytest.importorskip("lmdb")
    from lopq.search import LOPQSearcherLMDB
    model, data = compat_searcher_inputs
    searcher = LOPQSearcherLMDB(model, str(tmp_path / "by_data"))
    searcher.add_data(data)
    searcher_battery(searcher, np.ones(8))
    searcher = LOPQSearcherLMDB(model, str(tmp_path / "by_codes"))
    searcher.add_codes([model.predict(x) for x in data])
    searcher_battery(searcher, np.ones(8))


def test_lmdb_searcher_persists_and_ranks_as_the_in_memory_searcher(tmp_path):
    pytest.importorskip("lmdb")
    from lopq.search import LOPQSearcherLMDB
    rng = np.random.RandomState(3)
    X = rng.standard_normal((600, 8)).astype(np.float32)
    model = LOPQModel(V=4, M=2, subquantizer_clusters=16).fit(X, n_init=1, random_state=0)
    ids = [f"doc-{i}" for i in range(len(X))]
    path = str(tmp_path / "index")
    writer = LOPQSearcherLMDB(model, path, id_lambda=lambda b: b.decode())
    writer.add_data(X, ids=ids)
    writer.close()
    reader = LOPQSearcherLMDB(model, path, id_lambda=lambda b: b.decode())
    assert reader.size == len(X)
    memory = LOPQSearcher(model)
    memory.add_data(X, ids=ids)
    for q in rng.standard_normal((5, 8)):
        got, visited = reader.search(q, quota=50, limit=20, with_dists=True)
        want, want_visited = memory.search(q, quota=50, limit=20, with_dists=True)
        assert visited == want_visited
        np.testing.assert_allclose([r.dist for r in got], [r.dist for r in want], rtol=1e-5)
        # Equal distances may come in another order: compare ids up to ties.
        assert {r.id for r in got if r.dist < got[-1].dist} <= {r.id for r in want}
        assert all(isinstance(r.id, str) and r.id.startswith("doc-") for r in got)


def test_searcher_base_is_the_reference_interface():
    from lopq.search import LOPQSearcherBase
    assert issubclass(LOPQSearcher, LOPQSearcherBase)
    with pytest.raises(NotImplementedError):
        LOPQSearcherBase().get_cell((0, 0))
