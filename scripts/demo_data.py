"""Demo helpers: `make` writes a synthetic data set in the default Spark format,
`report` reads compute_codes output and prints recall against exact neighbours."""

import argparse
import time
from pathlib import Path

import numpy as np

from lopq import LOPQModel, LOPQSearcher
from lopq.datasets import make_clustered
from lopq.eval import exact_neighbors, recall_at
from lopq.formats import parse_code_line, write_vector_file


def make(args):
    X = make_clustered(args.n + args.queries, args.dim, n_clusters=64, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_vector_file(out / "data.txt", X[:args.n], ids=[f"v{i}" for i in range(args.n)])
    np.save(out / "queries.npy", X[args.n:])
    np.save(out / "base.npy", X[:args.n])
    print(f"wrote {args.n} vectors of dimension {args.dim} to {out / 'data.txt'} "
          f"and {args.queries} queries")


def report(args):
    out = Path(args.out)
    model = LOPQModel.load_proto(out / "model.lopq")
    base, queries = np.load(out / "base.npy"), np.load(out / "queries.npy")
    ids, coarse, fine = [], [], []
    for part in sorted((out / "codes").glob("part-*")):
        for line in part.read_text().splitlines():
            key, c, f = parse_code_line(line)
            ids.append(int(key[1:]))
            coarse.append(c)
            fine.append(f)
    searcher = LOPQSearcher(model)
    searcher.add_codes((np.asarray(coarse), np.asarray(fine)), ids)
    nns = exact_neighbors(queries, base)[:, 0]
    thresholds = (1, 10, 100)
    start = time.perf_counter()
    results = searcher.search_batch(queries, quota=args.quota, limit=max(thresholds))
    elapsed = time.perf_counter() - start
    recall = recall_at([ids for ids, _ in results], nns, thresholds)
    print(f"{len(ids)} codes from compute_codes, {len(queries)} queries, quota {args.quota}: "
          + ", ".join(f"recall@{t} {r:.3f}" for t, r in zip(thresholds, recall))
          + f" ({len(queries) / elapsed:.0f} queries/s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", default="demo-out")
    m.add_argument("--n", type=int, default=50000)
    m.add_argument("--queries", type=int, default=500)
    m.add_argument("--dim", type=int, default=64)
    m.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report")
    r.add_argument("--out", default="demo-out")
    r.add_argument("--quota", type=int, default=2000)
    args = parser.parse_args()
    make(args) if args.command == "make" else report(args)


if __name__ == "__main__":
    main()
