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
