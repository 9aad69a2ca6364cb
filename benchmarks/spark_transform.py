"""LOPQSparkModel.transform of a Parquet table, written back as Parquet, for the
benchmarks. Prints ``TRANSFORM_SECONDS <s> <rows>`` (after the session is up).

    spark-submit benchmarks/spark_transform.py --data X.parquet --model model.lopq --output OUT
"""

import argparse
import time

from lopq import LOPQModel
from lopq.spark.ml import LOPQSparkModel
from lopq.spark.session import get_session


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    spark, _ = get_session("lopq benchmark: transform")
    stage = LOPQSparkModel(LOPQModel.load_proto(args.model))
    start = time.time()
    df = spark.read.parquet(args.data)
    stage.transform(df).select("id", "coarse", "fine").write.parquet(args.output)
    rows = spark.read.parquet(args.output).count()
    print(f"TRANSFORM_SECONDS {time.time() - start:.3f} {rows}")
    spark.stop()


if __name__ == "__main__":
    main()
