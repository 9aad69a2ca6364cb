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
    from spark_helpers import TEST_JVM_OPTS
    os.environ.setdefault("SPARK_SUBMIT_OPTS", TEST_JVM_OPTS)
    from lopq.spark.session import get_session
    session, _ = get_session("lopq tests")
    yield session.sparkContext
    session.stop()


def run_checked(*cmd, **kwargs):
    """Run ``cmd`` (its parts made strings); its stdout, or a failure showing both
    streams' tails."""
    import subprocess
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory):
    """``python -m build`` of this checkout (sdist, then the wheel from the sdist) and a
    fresh venv with that wheel installed, made once per test run even across xdist
    workers (the packaging test and the cluster's packed-environment test share it: a
    build and an install cost a minute on 2 cores). Returns (dist folder, venv folder).
    """
    import fcntl
    import sys
    pytest.importorskip("build")
    # xdist workers' base temps share a parent: build there, one worker at a time
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    folder = shared / "wheel_venv"
    folder.mkdir(exist_ok=True)
    dist, venv = folder / "dist", folder / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOPQ_KERNELS")}

    def run(*cmd):
        run_checked(*cmd, env=env)

    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").exists():
            run(sys.executable, "-m", "build", "--outdir", dist, ROOT)
            run(sys.executable, "-m", "venv", venv)
            run(venv / "bin" / "python", "-m", "pip", "install", "-q",
                *dist.glob("lopq-*.whl"))
            (folder / "done").write_text("built\n")
    return dist, venv
