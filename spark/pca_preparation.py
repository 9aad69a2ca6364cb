"""Truncate PCA parameters to D dimensions and balance the variance of the two halves.

    python spark/pca_preparation.py --pca_params pca.pkl --D 64 --output pca_prepared.pkl

Writes a pickled dict {P (D0, D), mu (D0,)}: project vectors with ``(x - mu) @ P``
(`lopq.spark.apply_pca`), for example in a data UDF (see example_udf.py).
"""

import argparse
import os
import pickle
import sys

from lopq._help import help_texts
from lopq.formats import safe_load_pickle
from lopq.spark.training import prepare_pca

#: The --help epilog's example, runnable as written after `make demo`.
EXAMPLE = ('.venv/bin/python spark/pca_preparation.py --pca_params pca.pkl --D 32 --output '
           'pca_prepared.pkl  # after the train_pca.py example')


def main(argv=None):
    parser = argparse.ArgumentParser(**help_texts(__doc__, EXAMPLE))
    parser.add_argument("--pca_params", required=True,
                        help="pickle written by train_pca.py")
    parser.add_argument("--D", type=int, required=True,
                        help="number of dimensions to keep (even)")
    parser.add_argument("--output", required=True, help="output pickle path")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the output if it exists")
    args = parser.parse_args(argv)
    try:
        with open(args.pca_params, "rb") as f:
            params = safe_load_pickle(f.read(), "a PCA parameter pickle")
        if not isinstance(params, dict) or not {"P", "E", "mu"} <= set(params):
            raise ValueError(f"--pca_params {args.pca_params} is not a train_pca.py pickle "
                             "(needs keys P, E, mu)")
        if os.path.exists(args.output) and not args.overwrite:
            raise ValueError(f"--output {args.output} already exists: pass --overwrite")
        prepared = prepare_pca(params, args.D)
        tmp = f"{args.output}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            pickle.dump(prepared, f, protocol=4)
        os.replace(tmp, args.output)
    except (ValueError, OSError, pickle.UnpicklingError) as err:
        print(f"pca_preparation.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"prepared PCA to D={args.D} written to {args.output}")


if __name__ == "__main__":
    main()
