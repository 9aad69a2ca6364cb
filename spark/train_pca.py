"""Compute PCA parameters on Spark: a pickled dict {mu, P, E, A, c}.

    spark-submit spark/train_pca.py --data DATA --output pca.pkl

``P`` holds eigenvectors as columns with eigenvalues ``E`` in ascending order, ``A`` is
the covariance, ``mu`` the mean and ``c`` the count. Then run pca_preparation.py.
"""

import pickle

from lopq._help import help_texts
from lopq.spark import cli, fs
from lopq.spark.data import load_blocks
from lopq.spark.training import pca_statistics

#: The --help epilog's example, runnable as written after `make demo`.
EXAMPLE = ('.venv/bin/spark-submit spark/train_pca.py --data demo-out/data.txt --output '
           'pca.pkl')


def parse_args(argv=None):
    parser = cli.Parser(**help_texts(__doc__, EXAMPLE))
    cli.add_data_arguments(parser)
    parser.add_argument("--agg_depth", type=int, default=4,
                        help="depth of tree aggregation for computing covariance - increase "
                             "if you have driver memory issues")
    parser.add_argument("--output", default=None, help="hdfs output path")
    cli.add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    if args.data is None or args.output is None:
        parser.error("--data and --output are required")
    if args.agg_depth < 1:
        parser.error("--agg_depth must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    cli.configure_logging()
    with cli.spark_context("lopq train_pca") as sc:
        fs.check_output_path(sc, args.output, args.overwrite, "--output")
        blocks, n, D = load_blocks(sc, args.data, **cli.data_options(args))
        params = pca_statistics(sc, blocks, args.agg_depth)
        fs.write_bytes(sc, args.output, pickle.dumps(params, protocol=4), args.overwrite)
        print(f"PCA of {n} vectors of dimension {D} written to {args.output}")


if __name__ == "__main__":
    cli.run(main)
