"""Shared plumbing of the ``spark/*.py`` drivers: flags, SparkContext, models, errors."""

import argparse
import logging
import os
import pickle
import sys

from ..formats import safe_load_pickle
from ..model import LOPQModel
from . import fs
from .errors import python_cause
from .session import driver_session


class UsageError(ValueError):
    """A problem with the command line or its inputs, reported without a traceback."""


def ratio(text):
    """argparse type of a sampling ratio: a float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") \
            from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def shrinkage(text):
    """argparse type of ``--rotation_shrinkage``: ``auto`` or a number >= 0."""
    from ..training import check_shrinkage
    try:
        return check_shrinkage(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= 0, got {text!r}") \
            from None


def add_data_arguments(parser, sample_help="proportion of data to sample for training"):
    """The contract's data flags, plus ``--skip_bad_records``."""
    parser.add_argument("--data", default=None, help="hdfs path to input data")
    parser.add_argument("--data_udf", default=None,
                        help="optional module name contained a `udf` function to load "
                             "training data")
    parser.add_argument("--seed", type=int, default=None, help="optional random seed")
    parser.add_argument("--sampling_ratio", type=ratio, default=1.0, help=sample_help)
    parser.add_argument("--data_format", default="text",
                        help="text (the default: id<TAB>base64(pickle(ndarray)) lines) or a "
                             "Spark data source: parquet, orc, json, ...")
    parser.add_argument("--vector_col", default="features",
                        help="column of vectors in a table: array<float>, array<double> or "
                             "an ML Vector")
    parser.add_argument("--id_col", default="id", help="column of record ids in a table")
    parser.add_argument("--skip_bad_records", action="store_true",
                        help="drop malformed input records (counted in a warning) "
                             "instead of failing")


def data_options(args, with_ids=False):
    """The `load_blocks` keyword arguments of the data flags."""
    data_format = args.data_format
    if data_format == "text" and str(args.data).rstrip("/").endswith(".parquet"):
        data_format = "parquet"  # a table by its name
    return dict(sampling_ratio=args.sampling_ratio, seed=args.seed, data_udf=args.data_udf,
                with_ids=with_ids, skip_bad_records=args.skip_bad_records,
                data_format=data_format, vector_col=args.vector_col, id_col=args.id_col)


def add_metric_argument(parser, training=False):
    """``--metric``: chosen when training; after that it travels in the model file, and
    the other drivers only check it."""
    from ..metric import METRICS
    if training:
        text = ("what 'nearest' means: l2 (the reference's squared distance), cosine "
                "(rows and queries normalised) or inner_product (largest dot products "
                "first, through an extra coordinate; see the README). Default: the "
                "existing model's, else l2")
    else:
        text = ("the metric the model was trained for (it is stored in the model file, "
                "so this only checks it): l2, cosine or inner_product")
    parser.add_argument("--metric", choices=METRICS, default=None, help=text)


def check_metric(flag_value, model, where):
    """UsageError when ``--metric`` names another metric than the model's."""
    if flag_value is not None and model is not None and flag_value != model.metric:
        raise UsageError(f"--metric {flag_value}, but {where} is a model of metric "
                         f"{model.metric}: the metric is fixed when a model is trained "
                         "(train_model.py --metric); drop --metric or use a model trained "
                         f"for {flag_value}")


def add_overwrite_argument(parser):
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs that already exist (default: refuse)")


def configure_logging():
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root = logging.getLogger("lopq")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def spark_context(app_name):
    """``with spark_context(name) as sc``: the launcher's Spark (see `lopq.spark.session`)."""
    return driver_session(app_name)


def load_model(sc, pkl_path=None, proto_path=None, flag_pkl="--existing_model_pkl",
               flag_proto="--existing_model_proto"):
    """An LOPQModel from a pickle or a `.lopq` file (local, shipped with --files, or a
    Hadoop path); None if neither is given."""
    if pkl_path:
        model = _parse_model(sc, flag_pkl, pkl_path, lambda data: safe_load_pickle(
            data, "a model pickle"), "a pickled LOPQModel")
        if not isinstance(model, LOPQModel):
            raise UsageError(f"{flag_pkl} {pkl_path} holds a {type(model).__name__}, "
                             "not an LOPQModel")
        return model
    if proto_path:
        return _parse_model(sc, flag_proto, proto_path,
                            lambda data: LOPQModel.from_proto_bytes(data, proto_path),
                            "a .lopq model")
    return None


def _parse_model(sc, flag, path, parse, what):
    try:
        data = fs.read_bytes(sc, path)
    except FileNotFoundError as err:
        raise UsageError(f"{flag}: {err}") from None
    try:
        return parse(data)
    except Exception as err:  # noqa: BLE001 - any parse failure is the file's fault
        raise UsageError(f"{flag} {path} is not {what} ({type(err).__name__}: {err})") \
            from None


def save_model(sc, model, pkl_path=None, proto_path=None, overwrite=False):
    """Write the model to the requested outputs, each atomically."""
    if pkl_path:
        fs.write_bytes(sc, pkl_path, pickle.dumps(model, protocol=4), overwrite)
    if proto_path:
        fs.write_bytes(sc, proto_path, model.to_proto_bytes(), overwrite)


def run(main, argv=None):
    """Run ``main(argv)``; report user errors as one line on stderr and exit 2."""
    prog = os.path.basename(sys.argv[0])
    try:
        main(argv)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 - a failed Spark job: show its Python cause
        message = python_cause(err)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(1)


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors name the program and exit 2 (argparse's convention)."""
