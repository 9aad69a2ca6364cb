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
import time

from lopq import LOPQModel
from lopq.spark import cli
from lopq.spark.codes import compute_codes as encode_and_write
from lopq.spark.ml import LOPQSparkModel
from lopq.spark.session import get_session


def compute_codes(spark, argv, output):
    """What `spark/compute_codes.py` runs (`lopq.spark.codes.compute_codes`, the same
    route choice), for its data flags, ``--model_proto`` and ``--output_format``: the
    rows written."""
    parser = argparse.ArgumentParser()
    cli.add_data_arguments(parser)
    parser.add_argument("--model_proto", required=True)
    parser.add_argument("--output_format", choices=("text", "parquet"), default="text")
    args = parser.parse_args(argv)
    model = LOPQModel.load_proto(args.model_proto)
    rows, _ = encode_and_write(spark.sparkContext, args.data, model, output,
                               cli.data_options(args, with_ids=True), args.output_format)
    return rows


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
