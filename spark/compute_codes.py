"""Compute LOPQ codes of (id, vector) data on Spark.

    spark-submit --files model.lopq spark/compute_codes.py --data DATA --output OUT \
        --model_proto model.lopq

Writes text part files of ``id<TAB>[[c0, c1], [f0, ..., fM-1]]``.
"""

import time

from lopq.spark import cli, fs
from lopq.spark.codes import code_lines
from lopq.spark.data import load_blocks


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.split("\n")[0])
    cli.add_data_arguments(parser, "proportion of data to sample")
    parser.add_argument("--output", default=None, help="hdfs output path")
    parser.add_argument("--model_pkl", default=None, help="file name of the model pickle")
    parser.add_argument("--model_proto", default=None,
                        help="file name of the model protobuf file")
    cli.add_overwrite_argument(parser)
    args = parser.parse_args(argv)
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
        blocks, n, D = load_blocks(sc, args.data, args.sampling_ratio, args.seed,
                                   args.data_udf, with_ids=True,
                                   skip_bad_records=args.skip_bad_records)
        if D != model.D:
            raise cli.UsageError(f"the model is for D={model.D} but --data has vectors of "
                                 f"dimension {D}")
        sc.setJobDescription("lopq compute_codes: encode and write")
        fs.save_text_atomically(sc, code_lines(sc, blocks, model), args.output,
                                args.overwrite)
        print(f"wrote codes of {n} vectors to {args.output} in {time.time() - started:.1f} s")


if __name__ == "__main__":
    cli.run(main)
