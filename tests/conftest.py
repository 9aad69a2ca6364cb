"""Shared fixtures: seeded data, the shared data folder, one SparkSession per run."""

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LOPQ_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(*parts):
    """Path of a file in ../shared/data, or skip the test saying it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (shared data is only beside the project checkout; "
                    "set LOPQ_SHARED_DATA to its folder)")
    return path


@pytest.fixture
def rng():
    return np.random.RandomState(1234)


@pytest.fixture(scope="session")
def oxford():
    """Oxford5k features split by the reference protocol: (train, test, true_nn)."""
    from lopq.eval import exact_neighbors, train_test_split
    from lopq.formats import load_xvecs
    X = load_xvecs(shared_file("oxford5k", "oxford_features.fvecs"))
    train, test = train_test_split(X, test_size=0.2, random_state=40)
    return train, test, exact_neighbors(test, train)[:, 0]


@pytest.fixture(scope="session")
def sc():
    """One local SparkContext for every in-process Spark test (local[2], loopback)."""
    pytest.importorskip("pyspark")
    import sys
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ.setdefault("PYSPARK_SUBMIT_ARGS", "--master local[2] pyspark-shell")
    from lopq.spark.session import get_session
    session, _ = get_session("lopq tests")
    yield session.sparkContext
    session.stop()
