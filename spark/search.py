"""Batch LOPQ search on Spark: the k nearest indexed items of every query, or every
item's near duplicates (--self_join), routed by coarse cells.

    spark-submit spark/search.py --model_proto model.lopq --codes codes/ \
        --data queries/ --k 100 --quota 1000 --output neighbours/

Each query gets exactly what `LOPQSearcher.search(q, quota, limit=k)` on the same codes
gives (whole cells in multi-sequence order until the quota, ranked by LOPQ distance),
without any task holding all codes: codes are grouped by cell into shards, and each query
goes only to the shards holding the cells it visits (see lopq/spark/search.py).

Distances are those of the model's metric (`train_model.py --metric`): squared L2,
1 - cosine, or minus the inner product; ascending in every metric.

Output, one record per query: text lines ``query_id<TAB>[[id, ...], [distance, ...]]``
(JSON; ids as in the codes, integers where they are), or with --output_format parquet a
table of ``query_id``, ``ids``, ``distances``. With --self_join: ``id<TAB>neighbour_id
<TAB>distance`` lines (Parquet: ``id``, ``neighbour_id``, ``distance``), the item itself
excluded.
"""

import time

from lopq._help import help_texts
from lopq.formats import format_neighbour_lines, format_pair_lines
from lopq.spark import cli, fs
from lopq.spark.data import load_blocks
from lopq.spark.search import (
    ROWS_PER_SHARD,
    ShardedIndex,
    check_model_for_search,
    decoded_queries,
    load_codes,
    query_records,
)

#: The --help epilog's example, runnable as written after `make demo`.
EXAMPLE = ('.venv/bin/spark-submit spark/search.py --model_proto demo-out/model.lopq --codes '
           'demo-out/codes --data demo-out/data.txt --k 10 --output neighbours')


def parse_args(argv=None):
    parser = cli.Parser(**help_texts(__doc__, EXAMPLE))
    parser.add_argument("--model_pkl", default=None, help="file name of the model pickle")
    parser.add_argument("--model_proto", default=None,
                        help="file name of the model protobuf file")
    parser.add_argument("--codes", default=None,
                        help="compute_codes output to search: a folder of text part files "
                             "or a Parquet table (id, coarse, fine); several, separated by "
                             "commas, and globs (codes/day-*) search them as one index")
    parser.add_argument("--codes_format", default=None,
                        help="text (compute_codes' default) or parquet; default: parquet "
                             "when --codes ends with .parquet, else text")
    cli.add_data_arguments(parser, "proportion of the queries to search")
    parser.add_argument("--k", type=int, default=None,
                        help="neighbours per query (default 10; with --self_join and "
                             "--max_distance alone: all retrieved within the distance)")
    parser.add_argument("--quota", type=int, default=1000,
                        help="codes retrieved per query, whole cells in multi-sequence "
                             "order, as LOPQSearcher.search's quota")
    parser.add_argument("--self_join", action="store_true",
                        help="neighbours of every indexed item among the indexed items "
                             "(itself excluded); --data is then not used")
    parser.add_argument("--max_distance", type=float, default=None,
                        help="keep neighbours at most this distance away, in the model's "
                             "metric (l2: squared distance; cosine: 1 - cosine; "
                             "inner_product: minus the dot product)")
    parser.add_argument("--rerank_data", default=None,
                        help="the indexed items' original vectors (same flags as --data): "
                             "candidates are re-ranked by their exact distance")
    parser.add_argument("--rerank_candidates", type=int, default=None,
                        help="with --rerank_data: LOPQ-nearest candidates per query and "
                             "shard re-ranked exactly (default 4 x --k); more finds more "
                             "true neighbours at some speed")
    parser.add_argument("--rows_per_shard", type=int, default=ROWS_PER_SHARD,
                        help="codes per scoring task; larger cells are split over tasks")
    parser.add_argument("--output", default=None, help="hdfs output path")
    parser.add_argument("--output_format", choices=("text", "parquet"), default="text",
                        help="text lines (JSON lists) or a Parquet table")
    cli.add_metric_argument(parser)
    cli.add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    if args.model_pkl is None and args.model_proto is None:
        parser.error("one of --model_pkl and --model_proto is required")
    if args.codes is None or args.output is None:
        parser.error("--codes and --output are required")
    if not args.self_join and args.data is None:
        parser.error("--data (the queries) is required, unless --self_join")
    if args.self_join and args.k is None and args.max_distance is None:
        parser.error("--self_join needs --k or --max_distance")
    if args.k is None:
        args.k = args.quota if args.self_join else 10
    if args.rerank_candidates is not None and args.rerank_candidates < args.k:
        parser.error(f"--rerank_candidates must be at least --k ({args.k}), got "
                     f"{args.rerank_candidates}")
    if args.k <= 0:
        parser.error(f"--k must be a positive number of neighbours, got {args.k}")
    if args.quota <= 0:
        parser.error(f"--quota must be a positive number of codes, got {args.quota}")
    if args.max_distance is not None and args.max_distance != args.max_distance:
        parser.error("--max_distance must be a number, got nan")
    if args.rows_per_shard <= 0:
        parser.error(f"--rows_per_shard must be positive, got {args.rows_per_shard}")
    if args.codes_format is None:
        args.codes_format = "parquet" if args.codes.rstrip("/").endswith(".parquet") \
            else "text"
    return args


def _load_vectors(sc, args, path, model, flag):
    blocks, n, D = load_blocks(sc, path, flag=flag, **cli.data_options(args, with_ids=True))
    if D != model.dim:
        raise cli.UsageError(f"the model is for vectors of dimension {model.dim} but "
                             f"{flag} {path} has vectors of dimension {D}")
    return blocks, n


def main(argv=None):
    args = parse_args(argv)
    cli.configure_logging()
    with cli.spark_context("lopq search") as sc:
        started = time.time()
        fs.check_output_path(sc, args.output, args.overwrite, "--output")
        model = cli.load_model(sc, args.model_pkl, args.model_proto, "--model_pkl",
                               "--model_proto")
        check_model_for_search(model)
        cli.check_metric(args.metric, model, args.model_pkl or args.model_proto)
        if args.max_distance is not None and args.max_distance < 0 \
                and model.metric != "inner_product":
            raise cli.UsageError(f"--max_distance {args.max_distance}: {model.metric} "
                                 "distances are never negative")
        codes = load_codes(sc, args.codes, model, args.codes_format).cache()
        rerank = None
        if args.rerank_data:
            rerank, _ = _load_vectors(sc, args, args.rerank_data, model, "--rerank_data")
        if args.self_join:
            queries = rerank if rerank is not None else decoded_queries(codes, model)
            n = None
        else:
            queries, n = _load_vectors(sc, args, args.data, model, "--data")
        index = ShardedIndex(sc, model, codes, args.rows_per_shard, rerank)
        results = index.search_blocks(queries, args.k, args.quota,
                                      exclude_self=args.self_join,
                                      max_distance=args.max_distance,
                                      rerank_candidates=args.rerank_candidates)
        sc.setJobDescription("lopq search: route, score and write")
        if args.self_join:
            written = _write_pairs(sc, results, args)
        else:
            written = _write_neighbours(sc, results, args)
        index.unpersist()
        codes.unpersist()
        what = "items" if args.self_join else "queries"
        print(f"wrote neighbours of {written if n is None else n} {what} to {args.output} "
              f"in {time.time() - started:.1f} s")


def _write_text(sc, results, args, format_lines):
    """One newline-joined string per block of queries (saveAsTextFile adds the last
    newline), formatted by columns rather than a Python record per row."""
    text = results.map(lambda block: format_lines(*block)).filter(bool)
    fs.save_text_atomically(sc, text, args.output, args.overwrite)


def _write_neighbours(sc, results, args):
    if args.output_format == "text":
        _write_text(sc, results, args, format_neighbour_lines)
        return None
    from pyspark.sql import SparkSession
    from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType
    spark = SparkSession.builder.getOrCreate()
    schema = StructType([StructField("query_id", StringType(), False),
                         StructField("ids", ArrayType(StringType(), False), False),
                         StructField("distances", ArrayType(FloatType(), False), False)])
    rows = results.flatMap(query_records).map(
        lambda kv: (str(kv[0]), [str(i) for i in kv[1][1]], kv[1][0].tolist()))
    fs.save_frame_atomically(sc, spark.createDataFrame(rows, schema), args.output,
                             args.overwrite)
    return None


def _pairs(kv):
    key, (dists, ids) = kv
    return [(key, other, float(d)) for other, d in zip(ids, dists)]


def _write_pairs(sc, results, args):
    if args.output_format == "text":
        _write_text(sc, results, args, format_pair_lines)
        return None
    from pyspark.sql import SparkSession
    from pyspark.sql.types import FloatType, StringType, StructField, StructType
    spark = SparkSession.builder.getOrCreate()
    schema = StructType([StructField("id", StringType(), False),
                         StructField("neighbour_id", StringType(), False),
                         StructField("distance", FloatType(), False)])
    # Spark's Python-to-row conversion is per row whatever we do (createDataFrame)
    pairs = results.flatMap(query_records).flatMap(_pairs)
    fs.save_frame_atomically(sc, spark.createDataFrame(
        pairs.map(lambda p: (str(p[0]), str(p[1]), p[2])), schema), args.output,
        args.overwrite)
    return None


if __name__ == "__main__":
    cli.run(main)
