"""Every compiled kernel against the numpy reference, on random and adversarial inputs."""

import numpy as np
import pytest

from lopq import _kernels as K
from lopq._kernels import reference

COMPILED = ["numba", "cython"]


def make_inputs(rng, n, d, k, kind):
    X = rng.randn(n, d).astype(np.float32)
    C = rng.randn(k, d).astype(np.float32)
    if kind == "ties":  # duplicated centroids and rows sitting on centroids
        C[k // 2:] = C[:k - k // 2]
        X[: min(n, k)] = C[np.arange(min(n, k)) % k]
    elif kind == "near_ties":  # rows equidistant (up to float32) from two centroids
        X[:] = (C[0] + C[-1]) / 2 + 1e-7 * rng.randn(n, d).astype(np.float32)
    elif kind == "zeros":
        X[:] = 0
    elif kind == "huge":
        X *= 1e4
        C *= 1e4
    return X, C


def assert_same_assignment(X, C, got, want, rtol=1e-4):
    """Labels equal, or the chosen centroid is as close (near-ties pick either)."""
    labels, sqdist = got
    ref_labels, ref_sqdist = want
    exact = ((X.astype(np.float64) - C[labels]) ** 2).sum(axis=1)
    exact_ref = ((X.astype(np.float64) - C[ref_labels]) ** 2).sum(axis=1)
    scale = np.maximum(exact_ref, (X.astype(np.float64) ** 2).sum(axis=1) * 1e-6) + 1e-12
    differ = labels != ref_labels
    assert np.all(np.abs(exact - exact_ref)[differ] <= rtol * scale[differ] + 1e-6)
    np.testing.assert_allclose(sqdist, exact, rtol=1e-3, atol=1e-3 * scale.max() ** 0.5)
    assert labels.dtype == np.int32 and sqdist.dtype == np.float32


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("kind", ["random", "ties", "near_ties", "zeros", "huge"])
@pytest.mark.parametrize("n,d,k", [(1, 8, 256), (3000, 8, 256), (2500, 64, 16),
                                   (7, 64, 300), (5000, 16, 5), (10, 4, 1)])
def test_assign_matches_reference(backend, kind, n, d, k, rng):
    X, C = make_inputs(rng, n, d, k, kind)
    got = K.assign(X, C, backend=backend)
    want = K.assign(X, C, backend="numpy")
    assert_same_assignment(X, C, got, want)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("d,k", [(8, 5), (64, 13), (64, 2000)])  # fused (padded) and sgemm
def test_nan_rows_stay_in_range(backend, d, k, rng):
    """The public API rejects NaN, but a kernel given NaN rows must still answer with a
    real centroid (never a padding column) and leave the other rows right."""
    X = rng.randn(9, d).astype(np.float32)
    X[[0, 4, 8]] = np.nan
    C = rng.randn(k, d).astype(np.float32)
    labels, _ = K.assign(X, C, backend=backend)
    assert np.all((labels >= 0) & (labels < k))
    finite = [1, 2, 3, 5, 6, 7]
    np.testing.assert_array_equal(labels[finite], K.assign(X, C, backend="numpy")[0][finite])
    books = rng.randn(2, k, d // 2).astype(np.float32)
    codes = K.encode_fine(X, books, backend=backend)
    assert np.all(codes.astype(np.int64) < k)


@pytest.mark.parametrize("backend", COMPILED)
def test_assign_accepts_float64_noncontiguous_readonly(backend, rng):
    X = rng.randn(500, 40)[:, ::2]  # float64, non-contiguous
    C = rng.randn(30, 20)
    C.setflags(write=False)
    got = K.assign(X, C, backend=backend)
    want = K.assign(np.ascontiguousarray(X), np.array(C), backend="numpy")
    assert_same_assignment(X.astype(np.float32), C.astype(np.float32), got, want)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("n,V", [(1, 4), (3000, 16), (50, 200)])  # one row, V > n
def test_project_residuals_matches_reference(backend, n, V, rng):
    d = 32
    X = rng.randn(n, d).astype(np.float32)
    C = rng.randn(V, d).astype(np.float32)
    R = np.stack([np.linalg.qr(rng.randn(d, d))[0] for _ in range(V)]).astype(np.float32)
    mu = 0.1 * rng.randn(V, d).astype(np.float32)
    labels = rng.randint(0, V, n).astype(np.int32)
    labels[labels == 1] = 0  # an empty cluster
    R.setflags(write=False)
    got = K.project_residuals(X, labels, C, R, mu, backend=backend)
    want = K.project_residuals(X, labels, C, R, mu, backend="numpy")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def assert_same_fine_codes(P, books, got, want):
    """Codes equal, or equal in distance at near-ties."""
    m, S, ds = books.shape
    assert got.dtype == want.dtype == reference.code_dtype(S)
    for j in range(m):
        sub = P[:, j * ds:(j + 1) * ds].astype(np.float64)
        dg = ((sub - books[j][got[:, j]]) ** 2).sum(axis=1)
        dw = ((sub - books[j][want[:, j]]) ** 2).sum(axis=1)
        np.testing.assert_allclose(dg, dw, rtol=1e-4, atol=1e-5)
    assert (got == want).mean() > 0.99


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("n,m,S,ds", [(1, 8, 256, 16), (4000, 16, 256, 8), (300, 4, 300, 2),
                                      (100, 2, 1, 4)])
def test_encode_fine_matches_reference(backend, n, m, S, ds, rng):
    P = rng.randn(n, m * ds).astype(np.float32)
    books = rng.randn(m, S, ds).astype(np.float32)
    if S > 1:
        books[:, 1] = books[:, 0]  # duplicated centroid: an exact tie
    got = K.encode_fine(P, books, backend=backend)
    want = K.encode_fine(P, books, backend="numpy")
    assert_same_fine_codes(P, books, got, want)


@pytest.mark.parametrize("backend", COMPILED)
def test_encode_fine_near_ties(backend, rng):
    books = rng.randn(4, 256, 8).astype(np.float32)
    P = np.repeat(((books[:, 3] + books[:, 7]) / 2).reshape(1, -1), 50, axis=0)
    P += 1e-7 * rng.randn(*P.shape).astype(np.float32)
    got = K.encode_fine(P, books, backend=backend)
    want = K.encode_fine(P, books, backend="numpy")
    for j in range(4):
        sub = P[:, j * 8:(j + 1) * 8].astype(np.float64)
        dg = ((sub - books[j][got[:, j]]) ** 2).sum(axis=1)
        dw = ((sub - books[j][want[:, j]]) ** 2).sum(axis=1)
        np.testing.assert_allclose(dg, dw, rtol=1e-5)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("n,V,h,m,S", [(1, 4, 64, 8, 256),      # one row
                                       (5, 16, 64, 8, 256),     # a partial row block
                                       (3000, 16, 64, 8, 256),  # the common shape
                                       (40, 60, 12, 4, 300),    # V > n; h, S not multiples of 8
                                       (700, 8, 48, 2, 16),     # ds = 24: the generic loop
                                       (300, 8, 80, 2, 16)])    # ds = 40: composed kernels
def test_encode_split_matches_reference(backend, n, V, h, m, S, rng):
    """The fused per-split encoder (coarse label, residual, rotation, fine codes) against
    the reference composition, reading a strided column slice in place."""
    full = rng.randn(n, 2 * h).astype(np.float32)
    X = full[:, h:]  # rows strided, columns contiguous
    C = rng.randn(V, h).astype(np.float32)
    C[1] = C[0]  # duplicated centroid: cluster 1 stays empty, exact coarse ties
    R = np.stack([np.linalg.qr(rng.randn(h, h))[0] for _ in range(V)]).astype(np.float32)
    mu = 0.1 * rng.randn(V, h).astype(np.float32)
    books = rng.randn(m, S, h // m).astype(np.float32)
    books[:, 1] = books[:, 0]
    labels, codes = K.encode_split(X, C, R, mu, books, backend=backend)
    want_labels, want_codes = reference.encode_split(np.ascontiguousarray(X), C, R, mu, books)
    assert_same_assignment(X, C, (labels, K.assign(X, C, backend="numpy")[1]),
                           K.assign(X, C, backend="numpy"))
    assert np.all(labels != 1)
    # Fine codes against the reference projection of each row's own cluster.
    P = reference.project_residuals(np.ascontiguousarray(X), labels, C, R, mu)
    assert_same_fine_codes(P, books, codes, reference.encode_fine(P, books))
    assert codes.dtype == want_codes.dtype
    assert (labels == want_labels).mean() > 0.99


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("n,V", [(1, 3), (5000, 16), (20, 50)])
def test_accumulate_covariance_matches_reference(backend, n, V, rng):
    r = rng.randn(n, 12).astype(np.float32)
    labels = rng.randint(0, V, n).astype(np.int32)
    got = K.accumulate_covariance(r, labels, V, backend=backend)
    want = K.accumulate_covariance(r, labels, V, backend="numpy")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9)
    assert got[0].dtype == np.float64 and got[2].sum() == n


@pytest.mark.parametrize("backend", COMPILED)
def test_cluster_sums_matches_reference(backend, rng):
    X = rng.randn(1000, 8)
    labels = rng.randint(0, 40, 1000)
    got = K.cluster_sums(X, labels, 45, backend=backend)  # clusters 40..44 empty
    want = K.cluster_sums(X, labels, 45, backend="numpy")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("S,dtype", [(256, np.uint8), (1000, np.uint16)])
def test_adc_tables_and_scan_match_reference(backend, S, dtype, rng):
    books = rng.randn(8, S, 4).astype(np.float32)
    P = rng.randn(3, 32).astype(np.float32)
    tables = K.adc_tables(P, books, backend=backend)
    np.testing.assert_allclose(tables, K.adc_tables(P, books, backend="numpy"), rtol=1e-5)
    codes = rng.randint(0, S, (777, 8)).astype(dtype)
    got = K.adc_scan(tables[0], codes, backend=backend)
    np.testing.assert_allclose(got, K.adc_scan(tables[0], codes, backend="numpy"), rtol=1e-5)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        K.get_backend("fortran")


@pytest.mark.parametrize("d", [1, 3, 12, 16, 17])  # unrolled: chunks of 8 + rest; sgemm
def test_numba_assignment_paths_match_reference(d, rng):
    """Every shape of the numba nearest-centroid loop (a partial tile, strided rows)
    against the reference, by distance."""
    from lopq._kernels import numba_kernels as nk
    n = nk.TILE_ROWS + 3
    wide = rng.randn(n, 2 * d).astype(np.float32)
    X = wide[:, :d]  # rows with a stride: read in place
    C = rng.randn(40, d).astype(np.float32)
    C[7] = C[3]  # an exact tie: the lower index wins
    X[5] = C[3]
    got = nk.assign(X, C)
    want = reference.assign(np.ascontiguousarray(X), C)
    assert_same_assignment(X, C, got, want)
    assert got[0][5] == 3


def _cpu_has_avx2_fma():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return None
    return "avx2" in flags and "fma" in flags


def _isa_in_subprocess(portable):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "LOPQ_PORTABLE"}
    if portable:
        env["LOPQ_PORTABLE"] = "1"
    out = subprocess.run([sys.executable, "-c", "from lopq._kernels import _cython, _search; "
                          "print(_cython.ISA, _search.ISA)"], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out


def test_the_fused_loops_pick_their_copy_at_run_time():
    """One build runs AVX2/FMA where the CPU has both, the portable copy elsewhere or
    when LOPQ_PORTABLE=1 (so one machine tests both)."""
    pytest.importorskip("lopq._kernels._cython")
    has = _cpu_has_avx2_fma()
    if has is None:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    assert _isa_in_subprocess(portable=True) == ["portable", "portable"]
    expected = "avx2" if has else "portable"
    assert _isa_in_subprocess(portable=False) == [expected, expected]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("n,k", [(1, 1), (500, 8), (64, 64)])  # one row; every row a centre
def test_kmeanspp_matches_reference(backend, n, k, rng):
    """Well-separated blobs: every draw is unambiguous, so the seeds agree exactly; and
    the centres are rows of X, one per blob (what k-means++ is for)."""
    blobs = 100.0 * rng.randn(k, 6).astype(np.float32)
    X = (blobs[np.arange(n) % k] + 0.01 * rng.randn(n, 6)).astype(np.float32)
    uniforms = rng.random_sample((k - 1, 2 + int(np.log(k))))
    got = K.kmeanspp(X, 0, uniforms, backend=backend)
    want = K.kmeanspp(X, 0, uniforms, backend="numpy")
    np.testing.assert_array_equal(got, want)
    assert got.shape == (k, 6) and got.dtype == np.float32
    rows = {tuple(r) for r in X}
    assert all(tuple(c) in rows for c in got)
    if n >= k:
        nearest_blob = np.argmin(((got[:, None, :] - blobs[None]) ** 2).sum(-1), axis=1)
        assert sorted(nearest_blob) == list(range(k))


def _rotated_tables_inputs(rng, n, h, half_m, S, kind):
    from lopq._kernels import cython_kernels
    residuals = rng.randn(n, h).astype(np.float32)
    R = np.linalg.qr(rng.randn(h, h))[0].astype(np.float32)
    books = rng.randn(half_m, S, h // half_m).astype(np.float32)
    if kind == "zeros":  # a query on its cell's centre: tables are the codebook norms
        residuals[:] = 0
    elif kind == "on_codewords":  # rotated residuals equal to codewords: zero entries
        P = np.concatenate([books[j, rng.randint(0, S, n)] for j in range(half_m)], axis=1)
        residuals = (P @ R).astype(np.float32)
    elif kind == "huge":
        residuals *= 1e3
        books *= 1e3
    RTp = np.zeros((h, cython_kernels.padded_width(h)), dtype=np.float32)
    RTp[:, :h] = R.T
    CBTm2, sqnorm = cython_kernels.score_columns(books)
    return residuals, R, books, RTp, CBTm2, sqnorm


@pytest.mark.parametrize("kind", ["random", "zeros", "on_codewords", "huge"])
@pytest.mark.parametrize("n,h,half_m,S", [(1, 8, 2, 256),      # one row
                                          (13, 20, 4, 13),     # h, S, n off the block sizes
                                          (300, 192, 4, 256)])  # MiniLM's split
def test_grouped_rotated_tables_match_reference(kind, n, h, half_m, S, rng):
    """The grouped batch path's two kernels (rotation of a cluster's rows, then their
    tables in the expanded form |b|^2 - 2 p.b + |p|^2) against the plain definition."""
    _search = pytest.importorskip("lopq._kernels._search")
    residuals, R, books, RTp, CBTm2, sqnorm = _rotated_tables_inputs(rng, n, h, half_m, S,
                                                                     kind)
    P, tables = _search.rotated_tables(residuals, RTp, CBTm2, sqnorm, S)
    P_ref, tables_ref = reference.rotated_tables(residuals, R, books)
    scale = float(np.abs(residuals).max()) + 1.0
    np.testing.assert_allclose(P, P_ref, rtol=1e-4, atol=1e-5 * scale * h ** 0.5)
    # The expanded square cancels: its error is relative to |p|^2 + |b|^2, not to the result.
    sub_norms = (P_ref.reshape(n, half_m, 1, -1) ** 2).sum(axis=3)
    bound = 1e-5 * (sub_norms + (books ** 2).sum(axis=2).max()) + 1e-6
    assert tables.shape == (n, half_m, S) and tables.dtype == np.float32
    assert np.all(np.abs(tables - tables_ref) <= bound)
    assert tables.min() >= 0.0  # clamped: a tiny negative would break the top-k order
    if kind == "zeros":
        np.testing.assert_allclose(tables[0], (books ** 2).sum(axis=2), rtol=1e-6)


def test_grouped_rotated_tables_reject_mismatched_shapes(rng):
    _search = pytest.importorskip("lopq._kernels._search")
    residuals, R, books, RTp, CBTm2, sqnorm = _rotated_tables_inputs(rng, 4, 16, 2, 8,
                                                                     "random")
    with pytest.raises(ValueError, match="shapes do not match"):
        _search.rotated_tables(np.ascontiguousarray(residuals[:, :8]), RTp, CBTm2, sqnorm, 8)
