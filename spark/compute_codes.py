"""Compute LOPQ codes of (id, vector) data on Spark.

    spark-submit --files model.lopq spark/compute_codes.py --data DATA --output OUT \
        --model_proto model.lopq

Writes text part files of ``id<TAB>[[c0, c1], [f0, ..., fM-1]]`` (the reference's
format), or with ``--output_format parquet`` a table of ``id``, ``coarse`` (2 ints) and
``fine`` (M ints), optionally partitioned by cell (``--partition_by_cell``). From a table
(``--data x.parquet`` or ``--data_format``), codes are computed on Arrow batches.
"""

import time

from lopq._help import help_texts
from lopq.spark import cli, fs
from lopq.spark.codes import compute_codes

#: The --help epilog's example, runnable as written after `make demo`.
EXAMPLE = ('.venv/bin/spark-submit spark/compute_codes.py --data demo-out/data.txt '
           '--model_proto demo-out/model.lopq --output codes')


def parse_args(argv=None):
    parser = cli.Parser(**help_texts(__doc__, EXAMPLE))
    cli.add_data_arguments(parser, "proportion of data to sample")
    parser.add_argument("--output", default=None, help="hdfs output path")
    parser.add_argument("--model_pkl", default=None, help="file name of the model pickle")
    parser.add_argument("--model_proto", default=None,
                        help="file name of the model protobuf file")
    parser.add_argument("--output_format", choices=("text", "parquet"), default="text",
                        help="text part files (the reference's format) or a Parquet table "
                             "of id, coarse, fine")
    parser.add_argument("--partition_by_cell", action="store_true",
                        help="with --output_format parquet: add a `cell` column "
                             "(c0 * V + c1) and partition the table by it")
    cli.add_metric_argument(parser)
    cli.add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    if args.partition_by_cell and args.output_format != "parquet":
        parser.error("--partition_by_cell needs --output_format parquet")
    if args.data is None or args.output is None:
        parser.error("--data and --output are required")
    if args.model_pkl is None and args.model_proto is None:
        parser.error("one of --model_pkl and --model_proto is required")
    return args


def main(argv=None):
    args = parse_args(argv)
    cli.configure_logging()
    with cli.spark_context("lopq compute_codes") as sc:
        started = time.time()
        fs.check_output_path(sc, args.output, args.overwrite, "--output")
        model = cli.load_model(sc, args.model_pkl, args.model_proto, "--model_pkl",
                               "--model_proto")
        if model.codebooks is None or model.Rs is None or model.Cs is None:
            raise cli.UsageError("the model is not fully trained (it lacks coarse "
                                 "quantizers, rotations or subquantizers)")
        cli.check_metric(args.metric, model, args.model_pkl or args.model_proto)
        n, skipped = compute_codes(
            sc, args.data, model, args.output, cli.data_options(args, with_ids=True),
            output_format=args.output_format, overwrite=args.overwrite,
            partition_by_cell=args.partition_by_cell)
        if skipped:
            print(f"skipped {skipped} malformed record(s) in --data {args.data}")
        print(f"wrote codes of {n} vectors to {args.output} in {time.time() - started:.1f} s")


if __name__ == "__main__":
    cli.run(main)
