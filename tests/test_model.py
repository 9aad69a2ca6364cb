"""LOPQModel: reference fixtures, the reference API, batched coding, formats, bad input."""

import io
import json
import pickle

import numpy as np
import pytest
from conftest import shared_file

from lopq import LOPQCode, LOPQModel
from lopq.datasets import make_clustered
from lopq.formats import load_xvecs, save_xvecs
from lopq.model import (
    accumulate_covariance_estimators,
    compute_rotations_from_accumulators,
    eigenvalue_allocation,
)

EXPECTED_ALLOCATION = np.array([
    [63, 56, 52, 48, 44, 40, 36, 30, 26, 22, 18, 14, 10, 6, 3, 0],
    [62, 57, 53, 51, 45, 41, 39, 33, 32, 31, 29, 25, 21, 17, 13, 9],
    [61, 58, 54, 49, 47, 42, 38, 34, 28, 24, 20, 16, 12, 8, 5, 2],
    [60, 59, 55, 50, 46, 43, 37, 35, 27, 23, 19, 15, 11, 7, 4, 1]])
EXPECTED_RECONSTRUCTION = [-2.27444688, 6.47126941, 4.5042611, 4.76683476, 0.83671082,
                           9.36027283, 8.11780532, 6.34846377]


def load_pickle(name):
    with open(shared_file("compat", name), "rb") as f:
        return pickle.load(f, encoding="latin1")


def test_eigenvalue_allocation_matches_fixture():
    matrix = load_pickle("test_eigenvalue_allocation_input.pkl")
    vals = np.linalg.eigh(matrix)[0]
    np.testing.assert_array_equal(eigenvalue_allocation(4, vals), EXPECTED_ALLOCATION.ravel())


def test_accumulate_covariance_estimators_matches_fixture():
    data, C = load_pickle("test_accumulate_covariance_estimators_input.pkl")
    want = load_pickle("test_accumulate_covariance_estimators_output.pkl")
    got = accumulate_covariance_estimators(data, C)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_compute_rotations_from_accumulators_matches_fixture_up_to_row_sign():
    A, mu, count, num_buckets = load_pickle("test_compute_rotations_from_accumulators_input.pkl")
    R_want, mu_want = load_pickle("test_compute_rotations_from_accumulators_output.pkl")
    R, mu_got = compute_rotations_from_accumulators(A, mu.copy(), count, num_buckets)
    signs = np.sign((R * R_want).sum(axis=2, keepdims=True))
    np.testing.assert_allclose(R * signs, R_want, atol=1e-8)
    np.testing.assert_allclose(mu_got, mu_want, atol=1e-12)


@pytest.fixture(scope="module")
def compat_model():
    return LOPQModel.load_proto(str(shared_file("compat", "random_test_model.lopq")))


def test_load_proto_reproduces_documented_reconstruction(compat_model):
    assert (compat_model.V, compat_model.M, compat_model.D) == (5, 4, 8)
    np.testing.assert_allclose(compat_model.reconstruct(((0, 1), (0, 1, 2, 3))),
                               EXPECTED_RECONSTRUCTION, rtol=1e-5)


def test_proto_round_trip_is_bit_exact(compat_model, tmp_path):
    raw = shared_file("compat", "random_test_model.lopq").read_bytes()
    buf = io.BytesIO()
    compat_model.export_proto(buf)
    again = LOPQModel.from_proto_bytes(buf.getvalue())
    for a, b in zip(compat_model.parameters, again.parameters):
        np.testing.assert_array_equal(a, b)
    # Byte for byte what the reference wrote, after the header: the fixture declares
    # num_subquantizers=256 for codebooks of 10 clusters, and we write the real size.
    ours = buf.getvalue()
    assert ours[:8] == b"\x08\x08\x10\x05\x18\x04\x20\x0a"
    assert raw[9:] == ours[8:]
    buf2 = io.BytesIO()
    again.export_proto(buf2)
    assert buf2.getvalue() == ours


def test_searcher_fixture_encodes_and_decodes(compat_model):
    data = load_pickle("test_searcher_data.pkl")
    coarse, fine = compat_model.encode(data)
    rec = compat_model.decode((coarse, fine))
    assert rec.shape == data.shape
    assert ((data - rec) ** 2).sum() < ((data - data.mean(0)) ** 2).sum()


@pytest.fixture(scope="module")
def small_model():
    rng = np.random.RandomState(0)
    X = (rng.randn(3000, 16) * np.linspace(3, 0.5, 16)).astype(np.float32)
    return LOPQModel(V=6, M=4, subquantizer_clusters=32).fit(X, n_init=1, random_state=1), X


def test_batched_encode_equals_per_vector_predict(small_model):
    model, X = small_model
    coarse, fine = model.encode(X)
    for i in range(0, len(X), 7):
        code = model.predict(X[i])
        assert code == LOPQCode(tuple(coarse[i]), tuple(fine[i]))
        assert model.predict_coarse(X[i]) == code.coarse
        assert model.predict_fine(X[i]) == code.fine


def test_numba_encode_equals_numpy_reference_by_distance(small_model):
    model, X = small_model
    c_numba, f_numba = model.encode(X, backend="numba")
    c_ref, f_ref = model.encode(X, backend="numpy")
    np.testing.assert_array_equal(c_numba, c_ref)
    err_numba = ((X - model.decode((c_numba, f_numba))) ** 2).sum(1)
    err_ref = ((X - model.decode((c_ref, f_ref))) ** 2).sum(1)
    np.testing.assert_allclose(err_numba, err_ref, rtol=1e-4, atol=1e-5)


def test_predict_returns_plain_ints_that_serialise_to_json(small_model):
    model, X = small_model
    code = model.predict(X[0])
    decoded = json.loads(json.dumps(model.predict(X[0])))
    assert decoded == [list(code.coarse), list(code.fine)]
    assert all(type(v) is int for v in code.coarse + code.fine)


def test_reference_api_round_trips(small_model):
    model, X = small_model
    code = model.predict(X[5])
    # x = C[c] + mu[c] + R[c]^T (subquantizer centroids), per split, from the parameters.
    half_m = model.M // 2
    by_hand = []
    for split in range(2):
        C, R, mu, subs = model.get_split_parameters(split)
        c = code.coarse[split]
        fine = code.fine[split * half_m:(split + 1) * half_m]
        projected = np.concatenate([subs[j][f] for j, f in enumerate(fine)])
        by_hand.append(C[c] + mu[c] + R[c].T @ projected)
    np.testing.assert_allclose(model.reconstruct(code), np.concatenate(by_hand), rtol=1e-5,
                               atol=1e-5)
    dists = model.get_subquantizer_distances(X[5], code.coarse)
    assert len(dists) == model.M and dists[0].shape == (32,)
    assert [int(np.argmin(d)) for d in dists] == list(code.fine)
    assert len(model.get_subquantizer_distances(X[5], code.coarse, coarse_split=1)) == 2
    cell = model.get_cell_id_for_coarse_codes(code.coarse)
    assert cell == code.coarse[0] * model.V + code.coarse[1]
    assert model.get_coarse_codes_for_cell_id(cell) == code.coarse
    assert model.project(X[5], code.coarse).shape == (16,)


def test_pickle_round_trip(small_model):
    model, X = small_model
    again = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(again.encode(X[:50])[1], model.encode(X[:50])[1])


def test_reads_pickles_in_the_reference_layout(small_model):
    model, X = small_model
    ref = LOPQModel.__new__(LOPQModel)
    ref.__setstate__({"V": model.V, "M": model.M, "subquantizer_clusters": 32,
                      "Cs": (model.Cs[0].astype(float), model.Cs[1].astype(float)),
                      "Rs": (model.Rs[0], model.Rs[1]), "mus": (model.mus[0], model.mus[1]),
                      "subquantizers": ([s for s in model.subquantizers[0]],
                                        [s for s in model.subquantizers[1]])})
    np.testing.assert_array_equal(ref.encode(X[:50])[1], model.encode(X[:50])[1])


def test_mat_round_trip(small_model, tmp_path):
    pytest.importorskip("scipy")
    model, X = small_model
    model.export_mat(tmp_path / "m.mat")
    again = LOPQModel.load_mat(tmp_path / "m.mat")
    np.testing.assert_array_equal(again.encode(X[:50])[1], model.encode(X[:50])[1])


def test_fit_reuses_existing_parameters(small_model):
    model, X = small_model
    partial = LOPQModel(V=6, M=4, subquantizer_clusters=32,
                        parameters=(model.Cs, model.Rs, model.mus, None))
    partial.fit(X, n_init=1, random_state=3)
    np.testing.assert_array_equal(partial.Cs, model.Cs)
    np.testing.assert_array_equal(partial.Rs, model.Rs)
    assert partial.codebooks.shape == model.codebooks.shape


def test_fit_is_reproducible_with_a_seed():
    rng = np.random.RandomState(5)
    X = rng.randn(1500, 8).astype(np.float32)
    a = LOPQModel(V=4, M=2, subquantizer_clusters=16).fit(X, n_init=2, random_state=9)
    b = LOPQModel(V=4, M=2, subquantizer_clusters=16).fit(X, n_init=2, random_state=9)
    for p, q in zip(a.parameters, b.parameters):
        np.testing.assert_array_equal(p, q)


def test_subquantizer_sample_ratio_is_applied():
    rng = np.random.RandomState(5)
    X = rng.randn(2000, 8).astype(np.float32)
    model = LOPQModel(V=4, M=2, subquantizer_clusters=16)
    model.fit(X, n_init=1, random_state=1, subquantizer_sample_ratio=0.25)
    assert model.codebooks.shape == (2, 16, 4)
    with pytest.raises(ValueError, match="subquantizer"):
        LOPQModel(V=4, M=2, subquantizer_clusters=16).fit(
            X[:100], subquantizer_sample_ratio=0.1)


@pytest.mark.parametrize("kind", ["fvecs", "ivecs", "bvecs"])
def test_xvecs_round_trip(kind, tmp_path, rng):
    X = (rng.rand(37, 5) * 200).astype({"fvecs": np.float32, "ivecs": np.int32,
                                        "bvecs": np.uint8}[kind])
    path = tmp_path / f"x.{kind}"
    save_xvecs(path, X)
    np.testing.assert_array_equal(load_xvecs(path), X)


def test_load_xvecs_reads_oxford5k():
    X = load_xvecs(shared_file("oxford5k", "oxford_features.fvecs"))
    assert X.shape == (5063, 128) and X.dtype == np.float32


def test_truncated_xvecs_is_a_clear_error(tmp_path, rng):
    path = tmp_path / "x.fvecs"
    save_xvecs(path, rng.rand(4, 3).astype(np.float32))
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        load_xvecs(path)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("data,V,M,match", [
    (np.zeros((100, 7)), 4, 2, "even"),
    (np.zeros((100, 12)), 4, 8, "divide"),
    (np.zeros((0, 8)), 4, 2, "rows"),
    (np.zeros((3, 8)), 4, 2, "at least 4"),
    (np.array([[1.0, np.nan, 0, 0]] * 50), 2, 2, "NaN"),
    (np.array([[1.0, np.inf, 0, 0]] * 50), 2, 2, "NaN or infinite"),
    (np.array([["a", "b"]]), 2, 2, "numeric"),
])
def test_bad_training_data_is_a_clear_error(data, V, M, match):
    with pytest.raises(ValueError, match=match):
        LOPQModel(V=V, M=M, subquantizer_clusters=4).fit(data)


def test_wrong_dimension_is_a_clear_error(small_model):
    model, X = small_model
    with pytest.raises(ValueError, match="D=16"):
        model.predict(X[0, :10])
    with pytest.raises(ValueError, match="D=16"):
        model.encode(X[:, :10])


def test_odd_M_is_a_clear_error():
    with pytest.raises(ValueError, match="M even"):
        LOPQModel(V=4, M=3)


@pytest.mark.parametrize("payload,match", [
    (b"\x00\x01garbage\xff\xff", "not a .lopq model"),
    (b"", "not a valid .lopq"),
    (b"\x08\x08\x10\x05\x18\x04*\x04\x0a\x02\x00\x00", "corrupt|not a"),
])
def test_corrupt_proto_is_a_clear_error(payload, match):
    with pytest.raises(ValueError, match=match):
        LOPQModel.from_proto_bytes(payload)


def test_incomplete_model_cannot_encode():
    with pytest.raises(ValueError, match="no Cs"):
        LOPQModel(V=4, M=2).encode(np.zeros((2, 8)))


def test_oxford5k_recall_beats_the_reference_also_when_refitting(oxford):
    """The reference protocol: V=16, M=8, one k-means init, seeds 40-42, items ranked by
    LOPQ distance. The reference (Python 3 port) measured [0.499, 0.925, 0.978]."""
    from lopq.eval import rank_by_lopq_distance, recall_at
    train, test, nns = oxford
    recalls = {"full": [], "from coarse": [], "from coarse and rotations": []}
    for seed in (40, 41, 42):
        full = LOPQModel(V=16, M=8).fit(train, n_init=1, random_state=seed)
        models = {
            "full": full,
            "from coarse": LOPQModel(V=16, M=8, parameters=(full.Cs, None, None, None)).fit(
                train, n_init=1, random_state=seed),
            "from coarse and rotations": LOPQModel(
                V=16, M=8, parameters=(full.Cs, full.Rs, full.mus, None)).fit(
                train, n_init=1, random_state=seed)}
        for name, model in models.items():
            coarse, fine = model.encode(train)
            ranked = rank_by_lopq_distance(model, test, coarse, fine, limit=100)
            recalls[name].append(recall_at(ranked, nns, (1, 10, 100)))
    for name, values in recalls.items():
        mean = np.mean(values, axis=0)
        assert np.all(mean >= [0.51, 0.93, 0.98]), (name, mean)


def test_reference_evaluation_helpers(small_model):
    from lopq.eval import (
        compute_all_neighbors,
        exact_neighbors,
        get_cell_histogram,
        get_proportion_nns_with_same_coarse_codes,
        get_subquantizer_distortion,
    )
    from lopq.utils import compute_codes_parallel, iterate_splits
    model, X = small_model
    data = X[:400]
    brute = ((data[:, None, :] - data[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(brute, np.inf)
    nns = compute_all_neighbors(data, exclude_self=True)
    np.testing.assert_array_equal(nns, brute.argmin(1))
    np.testing.assert_array_equal(compute_all_neighbors(data[:5], data),
                                  exact_neighbors(data[:5], data)[:, 0])
    histogram = get_cell_histogram(data, model)
    assert histogram.shape == (model.V ** 2 - 1,) and histogram.sum() == len(data)
    # Counted one vector at a time with the reference's own per-vector call.
    same = np.mean([model.predict_coarse(data[i]) == model.predict_coarse(data[j])
                    for i, j in enumerate(nns)])
    assert get_proportion_nns_with_same_coarse_codes(data, model, nns) == pytest.approx(same)
    distortion = get_subquantizer_distortion(data, model)
    assert distortion.shape == (model.M,) and np.all(distortion > 0)
    codes = compute_codes_parallel(data[:20], model)
    assert codes == [model.predict(x) for x in data[:20]]
    assert [i for _, i in iterate_splits(np.arange(8), 4)] == [0, 1, 2, 3]
    C, R, mu, subs = model.get_split_parameters(1)
    np.testing.assert_array_equal(C, model.Cs[1])
    assert subs.shape == (model.M // 2, 32, model.D // model.M)


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_fit_on_each_backend_quantizes_as_well(how, monkeypatch):
    """fit(backend="numba") and LOPQ_KERNELS=numba train through the numba kernels (their
    calls are counted) and quantize as well as the default build."""
    from lopq._kernels import numba_kernels
    X = make_clustered(4000, 16, n_clusters=10, seed=8)
    calls = []
    real_assign = numba_kernels.assign
    monkeypatch.setattr(numba_kernels, "assign",
                        lambda *a: calls.append(1) or real_assign(*a))
    default = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X, n_init=1, random_state=1)
    assert not calls
    kwargs = {}
    if how == "argument":
        kwargs["backend"] = "numba"
    else:
        monkeypatch.setenv("LOPQ_KERNELS", "numba")
    other = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X, n_init=1, random_state=1,
                                                              **kwargs)
    assert calls, "the numba kernels were not used"

    def error(model):
        return float(((X - model.decode(model.encode(X, backend="numpy"))) ** 2).sum())
    assert error(other) <= 1.05 * error(default)


# ------------------------------------------------------------ rotations of small clusters
def _accumulators(groups):
    """(A, summed residuals, counts) of residual rows grouped by cluster, plainly."""
    d = groups[0].shape[1] if len(groups[0]) else groups[-1].shape[1]
    A = np.stack([g.T @ g if len(g) else np.zeros((d, d)) for g in groups])
    sums = np.stack([g.sum(axis=0) for g in groups])
    return A, sums, np.array([len(g) for g in groups])


def _off_diagonal(R, cov):
    """Relative off-diagonal mass of R cov R^T: 0 when R's rows are cov's eigenvectors."""
    rotated = R @ cov @ R.T
    return np.abs(rotated - np.diag(np.diag(rotated))).sum() / np.abs(rotated).sum()


def test_shrinkage_gives_small_and_empty_clusters_the_pooled_rotation():
    rng = np.random.RandomState(0)
    d = 8
    basis = np.linalg.qr(rng.randn(d, d))[0]
    scales = np.linspace(3.0, 0.3, d)
    big = (rng.randn(20000, d) * scales) @ basis.T        # well estimated
    small = (rng.randn(3, d) * scales) @ basis.T + 5.0    # 3 rows < d, offset mean
    A, sums, counts = _accumulators([big, small, np.zeros((0, d))])
    truth = basis @ np.diag(scales ** 2) @ basis.T        # every cluster's true covariance
    R_ref, _ = compute_rotations_from_accumulators(A, sums, counts, 2)  # the reference
    np.testing.assert_array_equal(R_ref[1], np.eye(d))
    np.testing.assert_array_equal(R_ref[2], np.eye(d))
    R, means = compute_rotations_from_accumulators(A, sums, counts, 2, shrinkage=1.0)
    for i in range(3):
        np.testing.assert_allclose(R[i] @ R[i].T, np.eye(d), atol=1e-10)
    unrotated = _off_diagonal(np.eye(d), truth)
    assert _off_diagonal(R[0], truth) < 0.1 * unrotated  # a big cluster keeps its own
    assert _off_diagonal(R[2], truth) < 0.1 * unrotated  # empty: the pooled estimate
    assert _off_diagonal(R[1], truth) < 0.5 * unrotated  # 3 rows: close to it
    np.testing.assert_allclose(means[1], small.mean(axis=0))
    np.testing.assert_array_equal(means[2], 0)


def test_shrinkage_rejects_negative_strength():
    A, sums, counts = _accumulators([np.ones((3, 4))])
    with pytest.raises(ValueError, match="shrinkage"):
        compute_rotations_from_accumulators(A, sums, counts, 2, shrinkage=-1)


def _intensity_by_brute_force(rows, target):
    """The formula of `shrinkage_intensities` from a cluster's raw rows: np.cov, then
    the unbiased Gaussian estimates of tr(Sigma^2) and (tr Sigma)^2."""
    n = len(rows)
    if n < 3:
        return 1.0
    S = np.cov(rows, rowvar=False)
    nu = n - 1
    a, b = np.trace(S @ S), np.trace(S) ** 2
    tr_sq = max(nu * (nu * a - b) / ((nu + 2) * (nu - 1)), 0.0)
    sq_tr = max(b - 2 * tr_sq / nu, 0.0)
    gap = np.sum((S - target) ** 2)
    return 1.0 if gap == 0 else min(1.0, (tr_sq + sq_tr) / nu / gap)


def test_shrinkage_intensity_matches_the_formula_on_raw_rows():
    """Auto shrinkage from accumulators equals the formula computed from the rows
    themselves, for a big cluster, D/2 rows exactly, small ones, one row and none."""
    from lopq.training import shrunk_covariances
    rng = np.random.RandomState(3)
    d = 6
    clusters = [rng.normal(size=(200, d)) * np.arange(1, d + 1), rng.normal(size=(d, d)),
                rng.normal(size=(3, d)), rng.normal(size=(1, d)), np.empty((0, d)),
                rng.normal(size=(40, d)) + 5]
    A, sums, counts = _accumulators(clusters)
    cov, pooled, means, rho = shrunk_covariances(A, sums, counts, "auto")
    scatter = sum((len(c) - 1) * np.cov(c, rowvar=False) for c in clusters if len(c) > 1)
    np.testing.assert_allclose(pooled, scatter / sum(max(len(c) - 1, 0) for c in clusters))
    for i, rows in enumerate(clusters):
        want = _intensity_by_brute_force(rows, pooled)
        assert rho[i] == pytest.approx(want, rel=1e-9, abs=1e-12), i
        own = np.cov(rows, rowvar=False) if len(rows) > 1 else np.zeros((d, d))
        np.testing.assert_allclose(cov[i], (1 - want) * own + want * pooled, atol=1e-9)
    assert rho[3] == rho[4] == 1.0 and np.all((rho >= 0) & (rho <= 1))


def test_shrinkage_intensity_is_near_the_oracle_on_gaussian_samples():
    """On Gaussian clusters, the estimated intensity is close to the oracle one,
    E|S - Sigma|^2 / E|S - T|^2, measured by simulation with the true Sigma."""
    from lopq.training import shrinkage_intensities
    rng = np.random.RandomState(0)
    d = 8
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    sigma = Q @ np.diag(np.linspace(0.5, 3.0, d)) @ Q.T
    target = np.diag(np.linspace(1.0, 2.0, d))
    for n in (6, 20, 100):
        samples = rng.multivariate_normal(np.zeros(d), sigma, size=(4000, n))
        centred = samples - samples.mean(axis=1, keepdims=True)
        S = np.einsum("tni,tnj->tij", centred, centred) / (n - 1)
        oracle = (np.mean(np.sum((S - sigma) ** 2, axis=(1, 2)))
                  / np.mean(np.sum((S - target) ** 2, axis=(1, 2))))
        estimated = shrinkage_intensities(S, np.full(len(S), n - 1), target)
        assert np.mean(estimated) == pytest.approx(oracle, rel=0.15), n


def test_shrinkage_setting_is_checked():
    from lopq.training import check_shrinkage
    assert [check_shrinkage(s) for s in ("auto", "lw", "0.5", 2)] == ["auto", "lw", 0.5, 2.0]
    for bad in ("often", -1, float("nan")):
        with pytest.raises(ValueError, match="'auto', 'lw' or a number >= 0"):
            check_shrinkage(bad)


def test_shrinkage_and_refinement_zero_train_as_the_reference_and_the_default_no_worse():
    """With most clusters below D/2 rows, shrunk rotations quantize better than the
    reference's identity fallback (relative reconstruction error, independent data)."""
    from lopq.eval import relative_reconstruction_error
    X = make_clustered(6000, 64, n_clusters=16, seed=5)
    train, test = X[:5000], X[5000:]
    errors = {}
    for shrinkage in (0.0, 1.0, "lw"):
        model = LOPQModel(V=48, M=8, subquantizer_clusters=32).fit(
            train, n_init=1, random_state=1, rotation_refinement_iters=0,
            rotation_shrinkage=shrinkage)
        errors[shrinkage] = relative_reconstruction_error(test, model)
    assert errors[1.0] < errors[0.0] and errors["lw"] < errors[0.0], errors


def test_verbose_fit_shows_steps_and_iterations_on_stderr_in_a_plain_script():
    """A script with no logging set up sees each step and k-means iteration, as the
    reference printed them; the lopq logger is left as it was."""
    import subprocess
    import sys
    script = (
        "import logging, numpy as np\n"
        "from lopq import LOPQModel\n"
        "X = np.random.RandomState(0).rand(3000, 16).astype(np.float32)\n"
        "LOPQModel(V=4, M=4, subquantizer_clusters=8).fit(X, n_init=1, verbose=True)\n"
        "log = logging.getLogger('lopq')\n"
        "print(log.level, len(log.handlers))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, check=True)
    for line in ("step 0: coarse quantizers", "step 1: local rotations",
                 "step 2: 4 subquantizers", "Lloyd iteration 1/"):
        assert line in out.stderr, out.stderr
    assert out.stdout.split() == ["0", "0"]
    quiet = subprocess.run([sys.executable, "-c", script.replace("verbose=True", "")],
                           capture_output=True, text=True, timeout=300, check=True)
    assert "Lloyd iteration" not in quiet.stderr


def _greedy_allocation_one_at_a_time(num_buckets, eigenvalues):
    """The allocation rule written plainly, one eigenvalue at a time (the reference's
    loop): scaled by the smallest non-zero |eigenvalue|, descending, each into the
    non-full bucket of smallest log2 sum (the first one on a tie)."""
    D = len(eigenvalues)
    per = D // num_buckets
    nonzero = np.abs(eigenvalues[eigenvalues != 0])
    scaled = eigenvalues / nonzero.min() if nonzero.size else eigenvalues
    buckets = [[] for _ in range(num_buckets)]
    sums = [0.0] * num_buckets
    with np.errstate(divide="ignore"):
        for ind in np.argsort(scaled)[::-1]:
            best = None
            for b in range(num_buckets):
                if len(buckets[b]) < per and (best is None or sums[b] < sums[best]):
                    best = b
            sums[best] += np.log2(np.abs(scaled[ind]))
            buckets[best].append(ind)
    return np.concatenate(buckets)


def test_batched_eigenvalue_allocation_equals_the_plain_greedy_rule():
    """Random spectra, ties, zeros, negative values and an all-zero set."""
    from lopq.training import eigenvalue_allocations
    rng = np.random.RandomState(2)
    sets = [np.sort(rng.gamma(0.5, size=32)), rng.normal(size=32),
            np.repeat([3.0, 1.0, 0.5, 0.0], 8), np.zeros(32),
            np.concatenate([np.full(16, 2.0), rng.rand(16)])]
    E = np.stack(sets)
    for buckets in (1, 2, 4, 8):
        got = eigenvalue_allocations(buckets, E)
        for row, values in enumerate(sets):
            np.testing.assert_array_equal(got[row],
                                          _greedy_allocation_one_at_a_time(buckets, values))


def test_auto_shrinkage_threads_do_not_change_the_model():
    """`fit(n_jobs=...)` only sets how many threads compare the "auto" candidates and
    run the k-means column groups: one thread and three train the very same model (each
    candidate has its own seed; the warm start runs at these sizes)."""
    X = make_clustered(9000, 32, n_clusters=20, seed=8)
    models = [LOPQModel(V=8, M=4, subquantizer_clusters=16).fit(
        X, random_state=3, n_init=1, n_jobs=jobs) for jobs in (1, 3)]
    for a, b in zip(models[0].parameters, models[1].parameters):
        np.testing.assert_array_equal(a, b)


def record_shrinkage_choices(monkeypatch):
    """Wrap `choose_shrinkage`: a list that gets (refinement_iters, choice) per call."""
    import lopq.training as training
    calls = []
    choose = training.choose_shrinkage

    def recorded(*args, **kwargs):
        calls.append((args[6], choose(*args, **kwargs)))
        return calls[-1][1]
    monkeypatch.setattr(training, "choose_shrinkage", recorded)
    return calls


def test_auto_shrinkage_trains_the_model_of_its_choice(monkeypatch):
    """"auto" draws its comparison from a stream of its own: the model it trains is the
    very model that its chosen shrinkage, given as a constant, trains with the same seed
    (so a user can reproduce it, and the choice costs no accuracy to a reseeding)."""
    calls = record_shrinkage_choices(monkeypatch)
    X = make_clustered(9000, 32, n_clusters=20, seed=8)
    auto = LOPQModel(V=8, M=4, subquantizer_clusters=16).fit(X, random_state=3, n_init=1)
    assert len(calls) == 1
    constant = LOPQModel(V=8, M=4, subquantizer_clusters=16).fit(
        X, random_state=3, n_init=1, rotation_shrinkage=calls[0][1])
    for a, b in zip(auto.parameters, constant.parameters):
        np.testing.assert_array_equal(a, b)


def test_auto_shrinkage_compares_candidates_for_step_1_alone(monkeypatch):
    """Steps 0 and 1 without step 2 (``--steps 0,1``) still choose the shrinkage, with
    unrefined candidates (a later step 2 alone does not refine), and give the rotations
    of that choice."""
    import lopq.training as training
    from lopq.rows import ArrayRows
    calls = record_shrinkage_choices(monkeypatch)
    X = make_clustered(9000, 32, n_clusters=20, seed=8)
    (Cs, Rs, mus, subs), _ = training.train_sequence(
        ArrayRows(X), 8, 4, subquantizer_clusters=16, n_init=1, random_state=3, steps=(0, 1))
    assert subs is None and len(calls) == 1
    refinement_iters, chosen = calls[0]
    assert refinement_iters == 0
    (Cs2, Rs2, mus2, _), _ = training.train_sequence(
        ArrayRows(X), 8, 4, subquantizer_clusters=16, n_init=1, random_state=3, steps=(0, 1),
        rotation_shrinkage=chosen)
    np.testing.assert_array_equal(Rs, Rs2)
    np.testing.assert_array_equal(mus, mus2)


def _rows_of(A):
    return {row.tobytes() for row in np.ascontiguousarray(A)}


@pytest.mark.parametrize("n, folds", [(5000, 2), (9000, 1)])
def test_auto_shrinkage_holds_back_queries_it_never_fits(monkeypatch, n, folds):
    """Every candidate is ranked on held-back queries that are neither fitted nor in the
    base it searches; two folds where the rows are scarce, one holding back as many
    queries as both where the rows would fill two disjoint folds (S=16: a 1,024-row fit
    and base share, so 5,000 rows give two folds of 500 queries, 9,000 rows one of 1,800)."""
    import lopq.training as training
    from lopq.rows import ArrayRows
    seen = []
    evaluate = training._evaluate_candidate

    def recorded(shrinkage, seed, fit, queries, base, *args, **kwargs):
        seen.append((shrinkage, fit, queries, base))
        return evaluate(shrinkage, seed, fit, queries, base, *args, **kwargs)
    monkeypatch.setattr(training, "_evaluate_candidate", recorded)
    X = make_clustered(n, 32, n_clusters=20, seed=8)
    source = ArrayRows(X)
    Cs = training.kmeans_rows(source, 2, 8, 5, 1, random_state=0).astype(np.float32)
    training.choose_shrinkage(source, source.covariance_pass(Cs), Cs, 4, 16, 5, 1,
                              random_state=1, n_jobs=1)
    candidates = training.SHRINKAGE_CANDIDATES
    assert len(seen) == folds * len(candidates)
    held = [_rows_of(q) for _, _, q, _ in seen[::len(candidates)]]
    assert sum(len(h) for h in held) == 2 * (n // 10)  # as many queries either way
    for _, fit, queries, base in seen:
        assert len(fit) == 1024
        queries = _rows_of(queries)
        assert not queries & _rows_of(fit) and not queries & _rows_of(base)
        assert _rows_of(fit) <= _rows_of(base)
    if folds == 2:
        assert not held[0] & held[1]


def test_in_memory_projection_reuses_the_covariance_pass_labels_only_for_its_centroids():
    """`ArrayRows` keeps the coarse labels of its covariance pass: a projection over the
    same centroids reads them (poisoned labels show it), one over other centroids
    assigns again; both equal the projection that assigns every row itself."""
    from lopq.rows import ArrayRows, project_rows
    rng = np.random.RandomState(2)
    X = rng.randn(500, 8).astype(np.float32)
    Cs = rng.randn(2, 5, 4).astype(np.float32)
    Rs = np.stack([np.stack([np.linalg.qr(rng.randn(4, 4))[0] for _ in range(5)])
                   for _ in range(2)]).astype(np.float32)
    mus = (0.1 * rng.randn(2, 5, 4)).astype(np.float32)
    rows = ArrayRows(X)
    rows.covariance_pass(Cs)
    np.testing.assert_array_equal(rows.projected(Cs, Rs, mus).X, project_rows(X, Cs, Rs, mus))
    rows._labels[1][:] = (rows._labels[1] + 1) % 5
    assert not np.allclose(rows.projected(Cs, Rs, mus).X, project_rows(X, Cs, Rs, mus))
    other = Cs + np.float32(0.25)
    np.testing.assert_array_equal(rows.projected(other, Rs, mus).X,
                                  project_rows(X, other, Rs, mus))
