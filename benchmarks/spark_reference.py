"""The reference implementation's Spark training approach, for the speed comparison:
an RDD of single vectors, MLlib KMeans for the coarse quantizers and for each of the M
subquantizers in turn, MLlib's per-row ``KMeansModel.predict`` and a per-row Python
projection. Run with spark-submit; prints one JSON line of per-step wall times.

    spark-submit benchmarks/spark_reference.py --data DATA --V 16 --M 8
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--V", type=int, required=True)
    parser.add_argument("--M", type=int, required=True)
    parser.add_argument("--S", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--coarse_iters", type=int, default=10)
    parser.add_argument("--local_iters", type=int, default=20)
    args = parser.parse_args()

    from pyspark import SparkContext
    from pyspark.mllib.clustering import KMeans, KMeansModel

    from lopq.training import compute_rotations_from_accumulators
    sc = SparkContext.getOrCreate()
    sc.setLogLevel("WARN")
    times = {}

    def decode(line):  # the safe decoder: a data line never runs code
        from lopq.formats import decode_vector_line
        return decode_vector_line(line)[1]

    start = time.time()
    data = sc.textFile(args.data, minPartitions=sc.defaultParallelism).map(decode).cache()
    n = data.count()
    D = len(data.first())
    h = D // 2
    times["load"] = time.time() - start

    start = time.time()
    Cs = []
    for split in range(2):
        half = data.map(lambda x, s=split: x[s * h:(s + 1) * h]).cache()
        model = KMeans.train(half, args.V, maxIterations=args.coarse_iters,
                             initializationMode="random", seed=args.seed)
        Cs.append(np.vstack(model.clusterCenters))
        half.unpersist()
    times["step 0 (coarse)"] = time.time() - start

    start = time.time()
    Rs, mus = [], []
    for split in range(2):
        km = KMeansModel(Cs[split])

        def stats(x, s=split, km=km, C=Cs[split]):
            v = x[s * h:(s + 1) * h]
            c = km.predict(v)  # MLlib's per-row predict
            r = v - C[c]
            return c, (np.outer(r, r), r, 1)

        acc = data.map(stats).reduceByKey(
            lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2])).collectAsMap()
        A = np.zeros((args.V, h, h))
        mu = np.zeros((args.V, h))
        count = np.zeros(args.V, dtype=int)
        for c, (a, m, k) in acc.items():
            A[c], mu[c], count[c] = a, m, k
        R, mu = compute_rotations_from_accumulators(A, mu, count, args.M // 2)
        Rs.append(R)
        mus.append(mu)
    times["step 1 (rotations)"] = time.time() - start

    start = time.time()

    def project(x):  # the reference's per-row predict_coarse + project
        out = []
        for s in range(2):
            v = x[s * h:(s + 1) * h]
            c = ((v - Cs[s]) ** 2).sum(axis=1).argmin()
            out.append(Rs[s][c] @ (v - Cs[s][c] - mus[s][c]))
        return np.concatenate(out)

    projected = data.map(project).cache()
    ds = D // args.M
    for j in range(args.M):
        sub = projected.map(lambda x, j=j: x[j * ds:(j + 1) * ds]).cache()
        KMeans.train(sub, args.S, maxIterations=args.local_iters, initializationMode="random",
                     seed=args.seed)
        sub.unpersist()
    times["step 2 (subquantizers)"] = time.time() - start
    times["n"] = n
    print("REFERENCE_TIMES " + json.dumps(times))
    sc.stop()


if __name__ == "__main__":
    main()
