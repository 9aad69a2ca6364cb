"""The Spark drivers on a real standalone cluster (1 master, 2 workers of 1 core, loopback),
submitted with ``spark-submit --master spark://...`` as users do, and the faults a cluster
has: executors killed, a worker lost, the driver killed, cached data larger than memory.

Every test proves the work left the driver: the application is listed by the master and
executors on both workers logged finished tasks. Run only these with
``pytest -m cluster`` (about 6-7 minutes on 2 cores, with the wheel build it shares).
"""

import subprocess
import zipfile

import numpy as np
import pytest
from conftest import ROOT
from spark_helpers import (
    RunningJob,
    application_id,
    assert_codes_equal_encode,
    read_codes,
    run_driver,
    spark_env,
    spark_submit,
    spark_submit_path,
    submit_command,
)

from lopq import LOPQModel
from lopq.datasets import make_clustered
from lopq.formats import write_vector_file

# `make test` runs `-n 2 --dist loadfile`: one xdist worker takes this whole file (one
# cluster), the other the rest of the suite. (xdist_group marks are not honoured with
# pytest 9 and xdist 3.8: both workers started a cluster.)
pytestmark = [pytest.mark.spark, pytest.mark.cluster, pytest.mark.slow]
pyspark = pytest.importorskip("pyspark")

N_ROWS, N_QUERIES, DIM = 6000, 300, 16
TRAIN_ARGS = ["--V", 4, "--M", 4, "--subquantizer_clusters", 16, "--seed", 7]
RECALL_SLACK = 0.005


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from lopq.spark.localcluster import StandaloneCluster
    base = tmp_path_factory.mktemp("standalone")
    env = spark_env(PYTHONPATH="")  # executors import the installed lopq
    cluster = StandaloneCluster(base, workers=2, cores=1, memory="2g", env=env)
    try:
        cluster.start()
    except (RuntimeError, TimeoutError) as err:
        cluster.stop()
        pytest.fail(f"could not start a standalone cluster: {err}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(path, ids, X (6000, 16), queries (300, 16)) from one clustered distribution."""
    folder = tmp_path_factory.mktemp("cluster_data")
    everything = make_clustered(N_ROWS + N_QUERIES, DIM, n_clusters=12, seed=3)
    X, queries = everything[:N_ROWS], everything[N_ROWS:]
    ids = [f"item{i}" for i in range(N_ROWS)]
    path = folder / "data.txt"
    write_vector_file(path, X, ids=ids)
    return path, ids, X, queries


def recall_at_10(model, X, queries):
    from lopq.eval import exact_neighbors, rank_by_lopq_distance, recall_at
    coarse, fine = model.encode(X)
    ranked = rank_by_lopq_distance(model, queries, coarse, fine, 10)
    return recall_at(ranked, exact_neighbors(queries, X)[:, 0], (10,))[0]


def on_cluster(cluster, script, *args, spark_args=()):
    """spark-submit to the cluster; asserts it ran there. Returns the driver's output."""
    proc = spark_submit(script, *args, master=cluster.master_url, spark_args=spark_args)
    output = proc.stdout + proc.stderr
    assert_ran_on_cluster(cluster, application_id(output))
    return output


def assert_ran_on_cluster(cluster, app_id, workers=(1, 2)):
    """The master lists the application and executors on ``workers`` finished tasks."""
    app = cluster.application(app_id)
    assert app is not None, f"{app_id} never registered with {cluster.master_url}"
    assert app["state"] in ("FINISHED", "RUNNING"), app
    ran = cluster.workers_that_ran_tasks(app_id)
    assert set(workers) <= set(ran), f"executors ran tasks on workers {ran} only"


def executor_backends(cluster, app_id):
    """The `lopq executor: kernel backend ...` lines the executors of ``app_id`` logged."""
    return [line for texts in cluster.executor_logs(app_id).values() for text in texts
            for line in text.splitlines() if line.startswith("lopq executor:")]


def assert_as_good_as(model, undisturbed, X, queries):
    """A model trained through a fault ranks held-out queries as well as the undisturbed
    run's (recall@10 within RECALL_SLACK)."""
    got, want = recall_at_10(model, X, queries), recall_at_10(undisturbed, X, queries)
    assert got >= want - RECALL_SLACK, (got, want)


def models_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a.parameters, b.parameters))


# --------------------------------------------------------------------- distribution
@pytest.fixture(scope="module")
def cluster_model(cluster, data, tmp_path_factory):
    """train_model.py (steps 0, 1, 2) on the cluster: (pickle path, model)."""
    path, _, _, _ = data
    folder = tmp_path_factory.mktemp("cluster_model")
    pkl, proto = folder / "model.pkl", folder / "model.lopq"
    on_cluster(cluster, "train_model.py", "--data", path, *TRAIN_ARGS,
               "--model_pkl", pkl, "--model_proto", proto)
    return pkl, LOPQModel.load_proto(proto)


def in_local_mode(sc, capsys, script, *args):
    """The driver run in this process on the shared local[2] context (the local
    comparisons: a local spark-submit costs a JVM start each)."""
    code, (_, err) = run_driver(script, [str(a) for a in args], capsys)
    assert code == 0, err[-5000:]


def test_train_model_runs_on_the_cluster_and_equals_local(sc, capsys, cluster_model, data,
                                                          tmp_path):
    _, model = cluster_model
    path, _, X, queries = data
    local = tmp_path / "local.lopq"
    in_local_mode(sc, capsys, "train_model", "--data", path, *TRAIN_ARGS,
                  "--model_proto", local)
    local_model = LOPQModel.load_proto(local)
    # Same partitions, same per-partition seeds, partition results merged in order.
    assert models_equal(model, local_model)
    # And it quantizes as well as single-machine training does.
    single = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X, n_init=1, random_state=7)
    assert recall_at_10(model, X, queries) >= 0.9 * recall_at_10(single, X, queries)


def test_train_model_resumes_step_2_on_the_cluster(sc, capsys, cluster, cluster_model, data,
                                                   tmp_path):
    pkl, model = cluster_model
    path, _, _, _ = data
    args = ["--data", path, "--existing_model_pkl", pkl, "--steps", "2", "--seed", 11]
    out = tmp_path / "step2.lopq"
    on_cluster(cluster, "train_model.py", *args, "--model_proto", out)
    resumed = LOPQModel.load_proto(out)
    np.testing.assert_array_equal(resumed.Cs, model.Cs)
    np.testing.assert_array_equal(resumed.Rs, model.Rs)
    in_local_mode(sc, capsys, "train_model", *args, "--model_proto", tmp_path / "local.lopq")
    assert models_equal(resumed, LOPQModel.load_proto(tmp_path / "local.lopq"))


def test_train_pca_runs_on_the_cluster(cluster, data, tmp_path):
    import pickle
    path, _, X, _ = data
    out = tmp_path / "pca.pkl"
    on_cluster(cluster, "train_pca.py", "--data", path, "--output", out)
    with open(out, "rb") as f:
        params = pickle.load(f)
    assert params["c"] == N_ROWS
    np.testing.assert_allclose(params["mu"], X.astype(np.float64).mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(params["A"], np.cov(X.T.astype(np.float64)), rtol=1e-9,
                               atol=1e-9)


@pytest.fixture(scope="module")
def cluster_codes(cluster, cluster_model, data, tmp_path_factory):
    """compute_codes.py on the cluster, once for the tests that read its codes:
    (codes folder, driver output)."""
    pkl, _ = cluster_model
    path, _, _, _ = data
    out = tmp_path_factory.mktemp("cluster_codes") / "codes"
    return out, on_cluster(cluster, "compute_codes.py", "--data", path, "--output", out,
                           "--model_pkl", pkl)


def test_compute_codes_runs_on_the_cluster(cluster, cluster_model, cluster_codes, data):
    _, model = cluster_model
    _, ids, X, _ = data
    out, output = cluster_codes
    assert f"wrote codes of {N_ROWS} vectors" in output
    # (a) lopq installed in the executors' Python: the compiled backend, said once per
    # Python worker in each executor's log.
    backends = executor_backends(cluster, application_id(output))
    assert backends and all("kernel backend cython (C loops " in line for line in backends)
    codes = read_codes(out)
    assert len(codes) == N_ROWS
    assert_codes_equal_encode(model, X, ids, codes)


def test_compute_codes_from_parquet_runs_on_the_cluster(cluster, cluster_model, data,
                                                        tmp_path):
    """Parquet in, Parquet out: the executors read the row groups and write the parts."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    _, model = cluster_model
    _, ids, X, _ = data
    path = tmp_path / "data.parquet"
    n, d = X.shape
    vectors = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * d, d, np.int32)),
                                       pa.array(X.ravel()))
    pq.write_table(pa.table({"id": ids, "features": vectors}), str(path),
                   row_group_size=n // 4 + 1)
    out = tmp_path / "codes"
    model_file = tmp_path / "model.lopq"
    model.export_proto(str(model_file))
    output = on_cluster(cluster, "compute_codes.py", "--data", path, "--output", out,
                        "--model_proto", model_file, "--output_format", "parquet")
    assert "executors read them with pyarrow" in output
    rows = pq.read_table(str(out)).to_pydict()
    codes = {key: (c, f) for key, c, f in zip(rows["id"], rows["coarse"], rows["fine"])}
    assert len(codes) == len(rows["id"]) == N_ROWS
    assert_codes_equal_encode(model, X, ids, codes)


def test_search_runs_on_the_cluster_and_equals_the_searcher(cluster, cluster_model,
                                                           cluster_codes, data, tmp_path):
    """spark/search.py on compute_codes output, both submitted to the cluster: the
    scoring ran in executors on both workers (several shards), and every query gets the
    searcher's neighbours on the same codes."""
    import json

    from lopq import LOPQSearcher
    pkl, model = cluster_model
    path, ids, X, queries = data
    codes, _ = cluster_codes
    query_path = tmp_path / "queries.txt"
    write_vector_file(query_path, queries, ids=[f"q{i}" for i in range(len(queries))])
    out = tmp_path / "neighbours"
    output = on_cluster(cluster, "search.py", "--model_pkl", pkl, "--codes", codes,
                        "--data", query_path, "--k", 10, "--quota", 800,
                        "--rows_per_shard", 700, "--output", out)
    assert f"wrote neighbours of {len(queries)} queries" in output
    got = {}
    for part in sorted(out.glob("part-*")):
        for line in part.read_text().splitlines():
            key, payload = line.split("\t")
            got[key] = json.loads(payload)
    searcher = LOPQSearcher(model)
    searcher.add_data(X, ids=ids)
    assert len(got) == len(queries)
    for i, x in enumerate(queries):
        want, _ = searcher.search(x, quota=800, limit=10, with_dists=True)
        found, dists = got[f"q{i}"]
        np.testing.assert_allclose(dists, [r.dist for r in want], rtol=1e-4, atol=1e-4)
        # ids equal, except where two distances tie within float rounding
        for k, (a, r) in enumerate(zip(found, want)):
            assert a == r.id or abs(dists[k] - r.dist) <= 1e-4 * max(1.0, r.dist)


def test_py_files_zip_reaches_the_executors(cluster, data, tmp_path):
    """Executors without lopq on their path import it from a --py-files zip."""
    path, _, _, _ = data
    archive = tmp_path / "lopq.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in (ROOT / "lopq").rglob("*"):
            if file.is_file() and "__pycache__" not in file.parts:
                zf.write(file, file.relative_to(ROOT))
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from lopq.spark import cli\n"
        "cli.configure_logging()\n"
        "with cli.spark_context('probe') as sc:\n"
        "    def where(_):\n"
        "        import numpy as np, lopq\n"
        "        from lopq import _kernels as K\n"
        "        labels, _ = K.assign(np.eye(3), np.eye(3))\n"
        "        return lopq.__file__, labels.tolist()\n"
        "    print('PROBE', sc.parallelize(range(8), 8).map(where).collect())\n")
    cmd = [spark_submit_path(), "--master", cluster.master_url, "--py-files", str(archive),
           "--conf", f"spark.executorEnv.NUMBA_CACHE_DIR={tmp_path / 'numba'}", str(probe)]
    proc = subprocess.run(cmd, env=spark_env(PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert_ran_on_cluster(cluster, application_id(proc.stdout + proc.stderr))
    probe_line = [line for line in proc.stdout.splitlines() if line.startswith("PROBE")][0]
    assert "lopq.zip" in probe_line and "[0, 1, 2]" in probe_line, probe_line
    # (c) the executors say they run numba from the zip, and how to get the compiled one.
    backends = executor_backends(cluster, application_id(proc.stdout + proc.stderr))
    assert backends and all("kernel backend numba" in line and "lopq.zip" in line
                            and "--archives" in line for line in backends), backends


def test_packed_environment_reaches_the_executors(cluster, cluster_model, data, wheel_venv,
                                                  tmp_path):
    """(b) Executors whose Python lacks lopq run it, compiled, from a venv-pack archive
    shipped with --archives env.tar.gz#environment (Spark's Python package management):
    the packaging test's fresh venv with the built wheel installed."""
    pytest.importorskip("venv_pack")
    import sys
    _, env_dir = wheel_venv
    archive = tmp_path / "env.tar.gz"
    subprocess.run([sys.executable, "-m", "venv_pack", "-p", str(env_dir), "-o", str(archive)],
                   check=True, capture_output=True)
    pkl, model = cluster_model
    path, ids, X, _ = data
    out = tmp_path / "codes"
    env = spark_env(PYSPARK_PYTHON="./environment/bin/python", PYTHONPATH="")
    proc = spark_submit("compute_codes.py", "--data", path, "--output", out, "--model_pkl",
                        pkl, master=cluster.master_url, env=env,
                        spark_args=["--archives", f"{archive}#environment"])
    app_id = application_id(proc.stdout + proc.stderr)
    assert_ran_on_cluster(cluster, app_id)
    backends = executor_backends(cluster, app_id)
    assert backends and all("kernel backend cython" in line and
                            "/environment/lib/" in line for line in backends), backends
    assert_codes_equal_encode(model, X, ids, read_codes(out))


# --------------------------------------------------------------------- faults
def start_on_cluster(cluster, script, *args, spark_args=()):
    return RunningJob(submit_command(script, args, cluster.master_url, spark_args),
                      spark_env())


def kill_executor_of_worker_2(cluster, job):
    app_id = application_id(job.output)
    pids = cluster.kill_executor(app_id, worker=2)
    assert pids, f"no executor of {app_id} was running on worker 2"
    return app_id


def executors_launched(cluster, app_id, worker):
    folder = cluster.work_dir(worker) / app_id
    return len([p for p in folder.iterdir() if p.is_dir()]) if folder.is_dir() else 0


def kill_driver_at(tmp_path, job, progress, out):
    """Kill ``job``'s driver once its output shows ``progress``: nothing is left at
    ``out``, and any temporary output is hidden beside it."""
    job.wait_for(progress)
    job.kill_driver()
    assert not out.exists(), f"the killed driver left {out}"
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p.name != out.name)


# A fault each, then the rerun a user would make, itself through an executor lost: two
# applications per test instead of three (each submission costs 20-30 s on 2 cores).
def test_training_driver_killed_then_a_rerun_survives_an_executor_killed_in_step_2(
        cluster, cluster_model, data, tmp_path):
    _, undisturbed = cluster_model
    path, _, X, queries = data
    out = tmp_path / "model.lopq"
    args = ["--data", path, *TRAIN_ARGS, "--model_proto", out]
    kill_driver_at(tmp_path, start_on_cluster(cluster, "train_model.py", *args),
                   r"subquantizers \(step 2\): Lloyd iteration 1/", out)
    job = start_on_cluster(cluster, "train_model.py", *args)
    job.wait_for(r"subquantizers \(step 2\): Lloyd iteration 2/")
    app_id = kill_executor_of_worker_2(cluster, job)
    code, output = job.finish()
    assert code == 0, output[-5000:]
    assert "Lloyd iteration 3/" in output.split("subquantizers (step 2)", 1)[1], \
        "the executor was killed after step 2 ended"
    assert executors_launched(cluster, app_id, 2) >= 2, "worker 2 never replaced its executor"
    assert_ran_on_cluster(cluster, app_id)
    assert_as_good_as(LOPQModel.load_proto(out), undisturbed, X, queries)


def test_codes_driver_killed_then_a_rerun_survives_an_executor_killed(cluster, cluster_model,
                                                                      data, tmp_path):
    pkl, model = cluster_model
    path, ids, X, _ = data
    out = tmp_path / "codes"
    args = ["--data", path, "--output", out, "--model_pkl", pkl]
    # Local text: one job reads, encodes and writes each split; its tasks start here.
    progress = r"reading \d+ input split"
    kill_driver_at(tmp_path, start_on_cluster(cluster, "compute_codes.py", *args),
                   progress, out)
    job = start_on_cluster(cluster, "compute_codes.py", *args)
    job.wait_for(progress)
    app_id = kill_executor_of_worker_2(cluster, job)
    code, output = job.finish()
    assert code == 0, output[-5000:]
    assert_ran_on_cluster(cluster, app_id, workers=(1,))
    assert_codes_equal_encode(model, X, ids, read_codes(out))


def test_worker_lost_for_good_in_mid_job(cluster, cluster_model, data, tmp_path):
    _, undisturbed = cluster_model
    path, _, X, queries = data
    out = tmp_path / "model.lopq"
    job = start_on_cluster(cluster, "train_model.py", "--data", path, *TRAIN_ARGS,
                           "--model_proto", out)
    job.wait_for(r"coarse \(step 0\): Lloyd iteration 2/")
    try:
        cluster.stop_worker(2)
        code, output = job.finish()
    finally:
        cluster.start_worker(2)
    assert code == 0, output[-5000:]
    assert_ran_on_cluster(cluster, application_id(output), workers=(1,))
    assert_as_good_as(LOPQModel.load_proto(out), undisturbed, X, queries)


SYNTHETIC_UDF = '''"""Synthetic vectors made on the executors; --data is "rows,dim,partitions"."""
import numpy as np


def udf(sc, data_path, sampling_ratio, seed):
    rows, dim, parts = (int(v) for v in data_path.split(","))

    def generate(index):
        rng = np.random.RandomState(index)
        centres = np.random.RandomState(0).standard_normal((16, dim)).astype(np.float32)
        n = rows // parts
        labels = rng.randint(16, size=n)
        X = centres[labels] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
        return list(X)

    return sc.parallelize(range(parts), parts).flatMap(generate)
'''


def test_cached_blocks_larger_than_executor_memory_spill(cluster, tmp_path):
    """1.1M x 128 float32 (563 MB of blocks) against --executor-memory 512m."""
    udf = tmp_path / "synthetic_udf.py"
    udf.write_text(SYNTHETIC_UDF)
    out = tmp_path / "model.lopq"
    output = on_cluster(
        cluster, "train_model.py", "--data", "1100000,128,22", "--data_udf", "synthetic_udf",
        "--V", 4, "--M", 4, "--subquantizer_clusters", 16, "--coarse_iters", 2,
        "--local_iters", 2, "--subquantizer_sampling_ratio", 0.05,
        "--rotation_refinement_iters", 0, "--model_proto", out,
        spark_args=["--executor-memory", "512m", "--py-files", str(udf)])
    app = cluster.application(application_id(output))
    assert app["memoryperexecutor"] == 512, app
    spill_lines = [line for line in output.splitlines() if "spilled to disk" in line]
    assert len(spill_lines) == 1, output[-5000:]
    assert LOPQModel.load_proto(out).D == 128
