#!/usr/bin/env bash
# Single-machine demo (the Spark demo replaces it): generate data, fit, encode, recall.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" - <<'PYEOF'
import time
from lopq import LOPQModel
from lopq.datasets import make_clustered
from lopq.eval import exact_neighbors, rank_by_lopq_distance, recall_at
X = make_clustered(22000, 64, seed=0)
base, queries = X[:20000], X[20000:]
t = time.time()
model = LOPQModel(V=16, M=8).fit(base, n_init=1, random_state=0, verbose=True)
print(f"fit {time.time() - t:.1f} s")
coarse, fine = model.encode(base)
ranked = rank_by_lopq_distance(model, queries, coarse, fine, limit=100)
print("recall@[1, 10, 100]:", recall_at(ranked, exact_neighbors(queries, base)[:, 0], (1, 10, 100)))
PYEOF
