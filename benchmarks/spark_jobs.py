"""Run one encoding job several times in one Spark application, for the benchmarks:
the first run pays the application's cold start (Python workers, imports), the later
ones show the rate a long job settles at. Prints ``RUN_SECONDS <run> <s> <rows>``.

    spark-submit benchmarks/spark_jobs.py --runs 3 --output OUT compute_codes \
        --data X.parquet --model_proto model.lopq --output_format parquet
    spark-submit benchmarks/spark_jobs.py --runs 3 --output OUT transform \
        --data X.parquet --model model.lopq

Run ``i`` writes to ``OUT/run<i>``.
"""

import argparse
import contextlib
import io
import re
import sys
import time
from pathlib import Path

from lopq import LOPQModel
from lopq.spark.ml import LOPQSparkModel
from lopq.spark.session import get_session

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spark"))


def compute_codes(spark, argv, output):
    """`spark/compute_codes.py` with ``argv``: the rows it reports."""
    import compute_codes as driver
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        driver.main([*argv, "--output", output])
    return int(re.search(r"wrote codes of (\d+) vectors", captured.getvalue()).group(1))


def transform(spark, argv, output):
    """LOPQSparkModel.transform of a Parquet table, written as Parquet: the rows."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    stage = LOPQSparkModel(LOPQModel.load_proto(args.model))
    stage.transform(spark.read.parquet(args.data)).select("id", "coarse", "fine") \
        .write.parquet(output)
    return spark.read.parquet(output).count()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--output", required=True, help="folder for the runs' outputs")
    parser.add_argument("job", choices=("compute_codes", "transform"))
    args, job_args = parser.parse_known_args()
    spark, _ = get_session(f"lopq benchmark: {args.job}")
    job = {"compute_codes": compute_codes, "transform": transform}[args.job]
    for run in range(args.runs):
        start = time.perf_counter()
        rows = job(spark, job_args, f"{args.output}/run{run}")
        print(f"RUN_SECONDS {run} {time.perf_counter() - start:.3f} {rows}", flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
