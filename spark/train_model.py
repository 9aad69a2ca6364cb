"""Train an LOPQ model on Spark: steps 0 (coarse), 1 (rotations), 2 (subquantizers).

    spark-submit spark/train_model.py --data DATA --V 16 --M 8 --model_proto model.lopq

Resume from an existing model with --existing_model_pkl / --existing_model_proto and
--steps. See the README's Spark section for every flag.
"""

import time

from lopq._help import help_texts
from lopq.metric import model_dimension
from lopq.spark import cli
from lopq.spark.data import load_blocks
from lopq.spark.metric import blocks_for_metric
from lopq.spark.training import reads_row_files_only, train_model
from lopq.training import ROTATION_SHRINKAGE

STEP_COARSE, STEP_ROTATION, STEP_SUBQUANT = 0, 1, 2


#: The --help epilog's example, runnable as written after `make demo`.
EXAMPLE = ('.venv/bin/spark-submit spark/train_model.py --data demo-out/data.txt --V 16 --M '
           '8 --model_proto model.lopq')


def parse_args(argv=None):
    parser = cli.Parser(**help_texts(__doc__, EXAMPLE))
    cli.add_data_arguments(parser)
    parser.add_argument("--subquantizer_sampling_ratio", type=cli.ratio, default=1.0,
                        help="proportion of data to subsample for subquantizer training")
    parser.add_argument("--existing_model_pkl", default=None,
                        help="a pickled LOPQModel from which to extract existing parameters")
    parser.add_argument("--existing_model_proto", default=None,
                        help="a protobuf of existing parameters")
    parser.add_argument("--V", type=int, default=None, help="number of coarse clusters")
    parser.add_argument("--M", type=int, default=None, help="total number of subquantizers")
    parser.add_argument("--subquantizer_clusters", type=int, default=256,
                        help="number of subquantizer clusters")
    parser.add_argument("--steps", default="0,1,2",
                        help="comma-separated list of integers indicating which steps of "
                             "training to perform")
    parser.add_argument("--model_pkl", default=None,
                        help="hdfs path to save pickle file of resulting LOPQModel")
    parser.add_argument("--model_proto", default=None,
                        help="hdfs path to save protobuf file of resulting model parameters")
    parser.add_argument("--coarse_iters", type=int, default=10,
                        help="Lloyd iterations of the coarse k-means (step 0)")
    parser.add_argument("--local_iters", type=int, default=20,
                        help="Lloyd iterations of the subquantizer k-means (step 2)")
    parser.add_argument("--rotation_refinement_iters", type=int, default=3,
                        help="rounds of local rotation refinement after steps 1 and 2 "
                             "(0 with --rotation_shrinkage 0: the reference's training "
                             "exactly)")
    parser.add_argument("--rotation_shrinkage", type=cli.shrinkage, default=ROTATION_SHRINKAGE,
                        help="how far each local covariance leans on the pooled one: "
                             "'auto' (default) tries 'lw', 1.0 and 0 and keeps the one "
                             "that ranks held-out training rows' neighbours best; 'lw' "
                             "estimates it per cluster "
                             "(Ledoit-Wolf); a number gives that many pseudo-rows per "
                             "dimension; 0 is the reference (identity rotation below D/2 "
                             "rows)")
    parser.add_argument("--agg_depth", type=int, default=None,
                        help="depth of tree aggregation of the per-iteration statistics "
                             "(default: the driver sums them when all partitions' "
                             "statistics hold at most 64 MB together, else depth 2)")
    cli.add_metric_argument(parser, training=True)
    cli.add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("--data is required")
    if args.agg_depth is not None and args.agg_depth < 1:
        parser.error("--agg_depth must be at least 1")
    if args.model_pkl is None and args.model_proto is None:
        parser.error("at least one of --model_pkl and --model_proto is required")
    if args.existing_model_pkl and args.existing_model_proto:
        parser.error("give only one of --existing_model_pkl and --existing_model_proto")
    try:
        args.steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--steps {args.steps!r}: expected comma-separated step numbers 0,1,2")
    if not args.steps or not set(args.steps) <= {0, 1, 2}:
        parser.error(f"--steps must name steps among 0, 1, 2, got {args.steps}")
    if args.steps == [STEP_COARSE, STEP_SUBQUANT]:
        parser.error("--steps 0,2 skips step 1: rotations depend on the coarse quantizers, "
                     "so retraining them needs step 1 too (use 0,1,2)")
    return args


def validate_arguments(args, model):
    """Fill V, M (and subquantizer_clusters when step 2 is not run) in ``args`` from
    the existing model, and raise UsageError for inconsistent requests (the reference's
    rules)."""
    steps = set(args.steps)
    if STEP_COARSE not in steps and (model is None or model.Cs is None):
        raise cli.UsageError("steps without 0 need the coarse quantizers of an existing "
                             "model (--existing_model_pkl / --existing_model_proto)")
    if args.V is None:
        if model is None:
            raise cli.UsageError("the coarse step (0) needs --V, or an existing model "
                                 "(--existing_model_pkl / --existing_model_proto)")
        args.V = model.V
        print(f"Parameter V not specified: using V={model.V} from provided model.")
    elif model is not None and model.V != args.V and STEP_COARSE not in steps:
        raise cli.UsageError(f"--V {args.V} differs from the existing model's V={model.V}: "
                             "retrain the coarse quantizers (--steps 0,1,2) or drop --V")
    if args.M is None:
        if model is None:
            raise cli.UsageError("training needs --M (or an existing model to take it from)")
        args.M = model.M
        print(f"Parameter M not specified: using M={model.M} from provided model.")
    elif model is not None and model.M != args.M and STEP_ROTATION not in steps \
            and STEP_SUBQUANT not in steps:
        raise cli.UsageError(f"--M {args.M} differs from the existing model's M={model.M}")
    if args.M < 2 or args.M % 2:
        raise cli.UsageError(f"--M must be even and at least 2, got {args.M}")
    if args.V < 1:
        raise cli.UsageError(f"--V must be positive, got {args.V}")
    if model is not None and model.M != args.M and STEP_ROTATION not in steps:
        raise cli.UsageError(f"--M {args.M} differs from the existing model's M={model.M}: "
                             "the rotations depend on M, so include step 1 (--steps 1,2)")
    if STEP_ROTATION not in steps and STEP_SUBQUANT in steps and (
            model is None or model.Rs is None or model.mus is None):
        raise cli.UsageError("step 2 without step 1 needs the rotations of an existing model")
    if STEP_SUBQUANT not in steps and model is not None and model.codebooks is not None \
            and args.subquantizer_clusters != model.subquantizer_clusters:
        args.subquantizer_clusters = model.subquantizer_clusters


def main(argv=None):
    args = parse_args(argv)
    cli.configure_logging()
    with cli.spark_context("lopq train_model") as sc:
        started = time.time()
        from lopq.spark import fs
        for flag, path in (("--model_pkl", args.model_pkl), ("--model_proto", args.model_proto)):
            fs.check_output_path(sc, path, args.overwrite, flag)
        model = cli.load_model(sc, args.existing_model_pkl, args.existing_model_proto)
        validate_arguments(args, model)
        metric = args.metric or (model.metric if model is not None else "l2")
        if model is not None and metric != model.metric:
            raise cli.UsageError(f"--metric {metric}, but the existing model is of metric "
                                 f"{model.metric}: train a new model for {metric} (no "
                                 "--existing_model_*) or drop --metric")
        load_started = time.time()
        blocks, n, D = load_blocks(sc, args.data, row_files=True,
                                   cache=not reads_row_files_only(metric),
                                   **cli.data_options(args))
        loading = time.time() - load_started
        if model is not None and model.dim is not None and model.dim != D:
            raise cli.UsageError(f"the existing model is for vectors of dimension "
                                 f"{model.dim} but --data has vectors of dimension {D}")
        D_model = model_dimension(metric, D, args.M)
        if D_model % 2 or D_model % args.M:
            raise cli.UsageError(f"the data dimension D={D} must be even and divisible by "
                                 f"--M {args.M}")
        blocks, largest, dropped = blocks_for_metric(sc, blocks, metric, f"--data {args.data}",
                                                     args.skip_bad_records)
        n -= dropped
        max_norm = None
        if metric == "inner_product":
            max_norm = model.max_norm if model is not None and model.max_norm else largest
        if STEP_COARSE in args.steps and args.V > n:
            raise cli.UsageError(f"--V {args.V} is more than the {n} vectors read from "
                                 f"--data {args.data}: lower --V (or give more data)")
        if STEP_SUBQUANT in args.steps and args.subquantizer_clusters > n:
            raise cli.UsageError(f"--subquantizer_clusters {args.subquantizer_clusters} is "
                                 f"more than the {n} vectors read from --data {args.data}")
        trained = train_model(sc, blocks, args.V, args.M, args.subquantizer_clusters,
                              args.steps, model, args.seed,
                              args.subquantizer_sampling_ratio, args.coarse_iters,
                              args.local_iters, args.agg_depth,
                              args.rotation_refinement_iters, n, args.rotation_shrinkage,
                              metric=metric, dim=D, max_norm=max_norm)
        cli.save_model(sc, trained, args.model_pkl, args.model_proto, args.overwrite)
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in
                          {"loading": loading, **trained.timings}.items())
        print(f"trained {trained} on {n} vectors: {steps}; total {time.time() - started:.1f} s")


if __name__ == "__main__":
    cli.run(main)
