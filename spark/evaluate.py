"""Measure the recall of an LOPQ index on Spark: exact neighbours of sampled queries on
the executors against the LOPQ search of the same queries at several quotas.

    spark-submit spark/evaluate.py --model_proto model.lopq --codes codes/ \
        --data vectors/ --sample 1000 --quotas 100,1000,10000 --output recall.json

--data holds the indexed items' original vectors (the same ids as the codes; same
flags as the other drivers). N of them are sampled as queries (--sample, --seed); each
query's exact nearest neighbours among all vectors (itself excluded) are computed in
blocks on the executors, in the model's metric. Recall@R is the fraction of queries
whose exact nearest neighbour is among the first R results of the search (itself
excluded), printed with a 95% Wilson interval and written as JSON with --output.
"""

import json
import time

from lopq._help import help_texts
from lopq.spark import cli, fs
from lopq.spark.data import load_blocks
from lopq.spark.evaluate import evaluate
from lopq.spark.search import check_model_for_search, load_codes

#: The --help epilog's example, runnable as written after `make demo`.
EXAMPLE = ('.venv/bin/spark-submit spark/evaluate.py --model_proto demo-out/model.lopq '
           '--codes demo-out/codes --data demo-out/data.txt --sample 200 --quotas 100,1000')


def quota_list(text):
    try:
        quotas = [int(q) for q in text.split(",") if q.strip()]
    except ValueError:
        raise ValueError(f"--quotas {text!r}: expected comma-separated integers") from None
    if not quotas or min(quotas) <= 0:
        raise ValueError(f"--quotas {text!r}: expected positive integers")
    return quotas


def parse_args(argv=None):
    parser = cli.Parser(**help_texts(__doc__, EXAMPLE))
    parser.add_argument("--model_pkl", default=None, help="file name of the model pickle")
    parser.add_argument("--model_proto", default=None,
                        help="file name of the model protobuf file")
    parser.add_argument("--codes", default=None,
                        help="compute_codes output of --data (folders, commas, globs, as "
                             "search.py)")
    parser.add_argument("--codes_format", default=None,
                        help="text or parquet; default: parquet when --codes ends with "
                             ".parquet, else text")
    cli.add_data_arguments(parser, "proportion of the vectors to read (all by default: "
                                   "the exact neighbours are searched among them)")
    parser.add_argument("--sample", type=int, default=1000,
                        help="queries sampled from --data (default 1000)")
    parser.add_argument("--quotas", default="100,1000,10000",
                        help="comma-separated search quotas to measure (default "
                             "100,1000,10000)")
    parser.add_argument("--output", default=None,
                        help="write the results as JSON to this path (local or Hadoop)")
    cli.add_metric_argument(parser)
    cli.add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    if args.model_pkl is None and args.model_proto is None:
        parser.error("one of --model_pkl and --model_proto is required")
    if args.codes is None or args.data is None:
        parser.error("--codes and --data (the original vectors) are required")
    if args.sample <= 0:
        parser.error(f"--sample must be positive, got {args.sample}")
    try:
        args.quotas = quota_list(args.quotas)
    except ValueError as err:
        parser.error(str(err))
    if args.codes_format is None:
        args.codes_format = "parquet" if args.codes.rstrip("/").endswith(".parquet") \
            else "text"
    return args


def format_table(report):
    ranks = report["ranks"]
    lines = [f"recall of {report['sample']} sampled queries over {report['rows']} vectors "
             f"(metric {report['metric']}; 95% Wilson intervals)",
             "quota    " + "  ".join(f"{'recall@' + str(R):>22}" for R in ranks)]
    for row in report["results"]:
        cells = []
        for R in ranks:
            low, high = row[f"recall@{R}_interval"]
            cells.append(f"{row[f'recall@{R}']:.3f} [{low:.3f}, {high:.3f}]".rjust(22))
        lines.append(f"{row['quota']:<8} " + "  ".join(cells))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    cli.configure_logging()
    with cli.spark_context("lopq evaluate") as sc:
        started = time.time()
        if args.output:
            fs.check_output_path(sc, args.output, args.overwrite, "--output")
        model = cli.load_model(sc, args.model_pkl, args.model_proto, "--model_pkl",
                               "--model_proto")
        check_model_for_search(model)
        cli.check_metric(args.metric, model, args.model_pkl or args.model_proto)
        codes = load_codes(sc, args.codes, model, args.codes_format).cache()
        blocks, n, D = load_blocks(sc, args.data, **cli.data_options(args, with_ids=True))
        if D != model.dim:
            raise cli.UsageError(f"the model is for vectors of dimension {model.dim} but "
                                 f"--data {args.data} has vectors of dimension {D}")
        report = evaluate(sc, model, codes, blocks, n, args.sample, args.quotas,
                          seed=args.seed)
        print(format_table(report))
        if args.output:
            fs.write_bytes(sc, args.output, json.dumps(report).encode("utf-8"),
                           args.overwrite)
        codes.unpersist()
        blocks.unpersist()
        print(f"evaluated in {time.time() - started:.1f} s"
              + (f"; wrote {args.output}" if args.output else ""))


if __name__ == "__main__":
    cli.run(main)
