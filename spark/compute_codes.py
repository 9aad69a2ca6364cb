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
from lopq.spark.codes import code_lines, code_rows_frame
from lopq.spark.data import load_blocks

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
        options = cli.data_options(args, with_ids=True)
        if args.output_format == "parquet" and options["data_format"] != "text" \
                and not args.data_udf:
            n, skipped = table_to_table(sc, args, options, model)
            if skipped:
                print(f"skipped {skipped} malformed record(s) in --data {args.data}")
        else:
            blocks, n, D = load_blocks(sc, args.data, **options)
            if D != model.D:
                raise cli.UsageError(f"the model is for D={model.D} but --data has vectors "
                                     f"of dimension {D}")
            sc.setJobDescription("lopq compute_codes: encode and write")
            if args.output_format == "text":
                fs.save_text_atomically(sc, code_lines(sc, blocks, model), args.output,
                                        args.overwrite)
            else:
                fs.save_frame_atomically(sc, code_rows_frame(sc, blocks, model,
                                                             args.partition_by_cell),
                                         args.output, args.overwrite,
                                         "cell" if args.partition_by_cell else None)
        print(f"wrote codes of {n} vectors to {args.output} in {time.time() - started:.1f} s")


def table_to_table(sc, args, options, model):
    """Parquet (or any table) in, Parquet out: codes on Arrow batches, no Python row
    objects; local Parquet files are read by the executors directly (lopq.spark.parquet).
    Returns (rows written, malformed rows skipped)."""
    from pyspark.sql import SparkSession

    from lopq.spark.codes import encode_frame
    from lopq.spark.data import DataError, read_table
    from lopq.spark.parquet import encode_parquet_files, row_groups
    if options["data_format"] == "parquet" and args.sampling_ratio == 1.0 \
            and not args.partition_by_cell and fs.local_path(sc, args.output):
        units = row_groups(sc, args.data, args.vector_col, args.id_col)
        if units is not None:
            sc.setJobDescription("lopq compute_codes: encode Parquet row groups")
            return encode_parquet_files(
                sc, units, model, args.output, args.overwrite, args.vector_col,
                args.id_col, args.skip_bad_records, f"--data {args.data}")
    spark = SparkSession.builder.getOrCreate()
    df = read_table(spark, sc, args.data, options["data_format"])
    from lopq.spark.frames import vector_column
    vector_column(df, args.vector_col)  # a missing or non-vector column, said in one line
    if args.id_col not in df.columns:
        raise DataError(f"--id_col {args.id_col!r}: no such column in --data {args.data} "
                        f"(columns: {', '.join(df.columns)})")
    if args.sampling_ratio < 1.0:
        df = df.sample(False, args.sampling_ratio, args.seed)
    encoded, (skipped, written) = encode_frame(
        df.select(args.id_col, args.vector_col), model, args.vector_col,
        keep=[args.id_col], id_col=args.id_col,
        cell_col="cell" if args.partition_by_cell else None,
        skip_bad_records=args.skip_bad_records)
    if args.id_col != "id":
        encoded = encoded.withColumnRenamed(args.id_col, "id")

    def refuse_empty(tmp):
        if not written.value:
            raise DataError(f"no vectors in --data {args.data}"
                            + (" after sampling" if args.sampling_ratio < 1 else ""))

    sc.setJobDescription("lopq compute_codes: encode Arrow batches and write Parquet")
    fs.save_frame_atomically(sc, encoded, args.output, args.overwrite,
                             "cell" if args.partition_by_cell else None, refuse_empty)
    return written.value, skipped.value


if __name__ == "__main__":
    cli.run(main)
