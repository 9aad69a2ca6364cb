"""The Spark jobs: real spark-submit runs in local mode on small data, plus bad input
checked in-process on one shared SparkContext."""

import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from spark_helpers import load_driver, read_codes, spark_env, spark_submit, submit_command

from lopq import LOPQModel
from lopq.datasets import make_clustered
from lopq.formats import encode_vector_line, write_vector_file

pytestmark = pytest.mark.spark
pyspark = pytest.importorskip("pyspark")

SMALL = dict(V=4, M=4, S=16)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("spark")


@pytest.fixture(scope="session")
def small_data(workdir):
    X = make_clustered(3000, 16, n_clusters=12, seed=3)
    path = workdir / "small.txt"
    write_vector_file(path, X, ids=[f"item{i}" for i in range(len(X))])
    return path, X


@pytest.fixture(scope="session")
def trained(workdir, small_data):
    """A full spark-submit training run: (pickle path, proto path, model)."""
    path, _ = small_data
    pkl, proto = workdir / "full.pkl", workdir / "full.lopq"
    spark_submit("train_model.py", "--data", path, "--V", SMALL["V"], "--M", SMALL["M"],
                 "--subquantizer_clusters", SMALL["S"], "--seed", 7,
                 "--model_pkl", pkl, "--model_proto", proto)
    model = LOPQModel.load_proto(proto)
    return pkl, proto, model


def test_train_model_writes_pickle_and_proto(trained):
    pkl, proto, model = trained
    with open(pkl, "rb") as f:
        from_pickle = pickle.load(f)
    assert (model.V, model.M, model.D, model.subquantizer_clusters) == (4, 4, 16, 16)
    for a, b in zip(model.parameters, from_pickle.parameters):
        np.testing.assert_array_equal(a, b)
    assert not list(pkl.parent.glob(".*tmp*")), "temporary outputs left behind"


def test_trained_model_quantizes_well(trained, small_data):
    _, _, model = trained
    _, X = small_data
    from lopq.eval import relative_reconstruction_error
    local = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X, n_init=1, random_state=1)
    assert relative_reconstruction_error(X, model) < 1.15 * relative_reconstruction_error(
        X, local)


def test_compute_codes_writes_reference_format(trained, small_data, workdir):
    _, proto, model = trained
    path, X = small_data
    out = workdir / "codes"
    spark_submit("compute_codes.py", "--data", path, "--output", out,
                 "--model_proto", proto.name, spark_args=["--files", str(proto)])
    lines = [line for part in sorted(out.glob("part-*")) for line in
             part.read_text().splitlines()]
    assert len(lines) == len(X)
    key, payload = lines[0].split("\t")
    parsed = json.loads(payload)
    assert len(parsed) == 2 and len(parsed[0]) == 2 and len(parsed[1]) == model.M
    assert payload == json.dumps(parsed)  # `[[c0, c1], [f0, ...]]` exactly as json.dumps
    codes = read_codes(out)
    for i, x in enumerate(X):
        code = model.predict(x)
        assert codes[f"item{i}"] == (code.coarse, code.fine)


def test_train_model_resumes_from_existing_proto(trained, small_data, workdir):
    _, proto, model = trained
    path, _ = small_data
    out = workdir / "resumed.lopq"
    spark_submit("train_model.py", "--data", path, "--existing_model_proto", proto.name,
                 "--steps", "1,2", "--subquantizer_clusters", 16, "--seed", 3,
                 "--model_proto", out, spark_args=["--files", str(proto)])
    resumed = LOPQModel.load_proto(out)
    np.testing.assert_array_equal(resumed.Cs, model.Cs)
    assert resumed.Rs.shape == model.Rs.shape and resumed.codebooks.shape == (4, 16, 4)


def test_train_model_step_2_from_pickle(trained, small_data, workdir):
    pkl, _, model = trained
    path, _ = small_data
    out = workdir / "step2.pkl"
    spark_submit("train_model.py", "--data", path, "--existing_model_pkl", pkl,
                 "--steps", "2", "--subquantizer_clusters", 16, "--seed", 11,
                 "--model_pkl", out)
    with open(out, "rb") as f:
        again = pickle.load(f)
    np.testing.assert_array_equal(again.Cs, model.Cs)
    np.testing.assert_array_equal(again.Rs, model.Rs)
    assert again.codebooks.shape == model.codebooks.shape


def test_pca_then_preparation_then_training_through_a_udf(small_data, workdir):
    path, X = small_data
    pca = workdir / "pca.pkl"
    spark_submit("train_pca.py", "--data", path, "--output", pca)
    with open(pca, "rb") as f:
        params = pickle.load(f)
    np.testing.assert_allclose(params["A"], np.cov(X.T.astype(np.float64)), rtol=1e-3,
                               atol=1e-3)
    assert params["c"] == len(X)
    prepared = workdir / "pca_prepared.pkl"
    subprocess.run([sys.executable, str(ROOT / "spark" / "pca_preparation.py"),
                    "--pca_params", str(pca), "--D", "8", "--output", str(prepared)],
                   check=True, env=spark_env())
    out = workdir / "pca_model.lopq"
    spark_submit("train_model.py", "--data", path, "--data_udf", "example_udf",
                 "--V", 4, "--M", 2, "--subquantizer_clusters", 16,
                 "--model_proto", out,
                 spark_args=["--py-files", str(ROOT / "spark" / "example_udf.py")],
                 env=spark_env(LOPQ_PCA_PARAMS=str(prepared)))
    assert LOPQModel.load_proto(out).D == 8


# PySpark's worker daemon may print this when the JVM closes an idle reused worker's
# socket while the context stops (a race inside Spark, not our driver; see
# apache/spark#53055). Only tracebacks entirely inside pyspark/daemon.py are removed.
DAEMON_SHUTDOWN_TRACE = re.compile(
    r"Traceback \(most recent call last\):\n"
    r"(?:  File \"[^\"\n]*pyspark/daemon\.py\", line \d+, in \w+\n(?:    [^\n]*\n)*)+"
    r"BrokenPipeError: [^\n]*\n?")


def without_daemon_shutdown_noise(output):
    return DAEMON_SHUTDOWN_TRACE.sub("", output)


def test_daemon_shutdown_noise_filter_keeps_other_tracebacks():
    noise = ('Traceback (most recent call last):\n'
             '  File "/v/pyspark.zip/pyspark/daemon.py", line 264, in manager\n'
             '  File "/v/pyspark.zip/pyspark/daemon.py", line 95, in worker\n'
             'BrokenPipeError: [Errno 32] Broken pipe\n')
    ours = ('Traceback (most recent call last):\n'
            '  File "/work/spark/train_model.py", line 9, in main\n'
            'BrokenPipeError: [Errno 32] Broken pipe\n')
    assert without_daemon_shutdown_noise("a\n" + noise + "b\n") == "a\nb\n"
    assert "Traceback" in without_daemon_shutdown_noise(noise + ours)


def test_spark_submit_reports_bad_input_without_partial_output(workdir):
    bad = workdir / "bad.txt"
    bad.write_text(encode_vector_line("a", np.ones(4)) + "\nnot a record\n")
    out = workdir / "never.lopq"
    proc = spark_submit("train_model.py", "--data", bad, "--V", 2, "--M", 2,
                        "--model_proto", out, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr  # spark-submit merges the driver's stderr into stdout
    assert "train_model.py: error: 1 malformed record(s)" in output
    assert "--skip_bad_records" in output
    assert "Traceback" not in without_daemon_shutdown_noise(output), output
    assert not out.exists()


def test_oxford5k_model_trained_on_spark_reaches_the_recall_bar(oxford, workdir, train_model):
    """The driver in this process, on the shared session (spark-submit itself is tested
    above): one JVM for the three seeds."""
    from lopq.eval import rank_by_lopq_distance, recall_at
    train, test, nns = oxford
    data = workdir / "oxford_train.txt"
    write_vector_file(data, train)
    recalls = []
    for seed in (40, 41, 42):
        out = workdir / f"oxford_{seed}.lopq"
        train_model.main(["--data", str(data), "--V", "16", "--M", "8", "--seed", str(seed),
                          "--model_proto", str(out)])
        model = LOPQModel.load_proto(out)
        coarse, fine = model.encode(train)
        recalls.append(recall_at(rank_by_lopq_distance(model, test, coarse, fine, 100),
                                 nns, (1, 10, 100)))
    mean = np.mean(recalls, axis=0)
    # The reference's Spark pipeline (Python 3 port) measured [0.499, 0.925, 0.978].
    assert np.all(mean >= [0.51, 0.93, 0.98]), mean


# ----------------------------------------------------------------- in-process bad input
@pytest.fixture(scope="module")
def train_model(sc):
    return load_driver("train_model")


def test_mixed_dimensions_are_reported(sc, train_model, tmp_path):
    data = tmp_path / "mixed.txt"
    data.write_text("\n".join(encode_vector_line(i, np.ones(4 if i % 2 else 6))
                              for i in range(40)))
    with pytest.raises(ValueError, match="dimension"):
        train_model.main(["--data", str(data), "--V", "2", "--M", "2", "--model_proto",
                          str(tmp_path / "m.lopq")])
    assert not (tmp_path / "m.lopq").exists()


def test_skip_bad_records_drops_them(sc, train_model, tmp_path):
    X = make_clustered(600, 8, seed=1)
    lines = [encode_vector_line(i, x) for i, x in enumerate(X)] + ["garbage", "1\tAAAA"]
    data = tmp_path / "some_bad.txt"
    data.write_text("\n".join(lines))
    out = tmp_path / "m.lopq"
    train_model.main(["--data", str(data), "--V", "2", "--M", "2", "--subquantizer_clusters",
                      "8", "--model_proto", str(out), "--skip_bad_records"])
    assert LOPQModel.load_proto(out).D == 8


@pytest.mark.parametrize("module_text,match", [
    (None, "cannot import"),
    ("def udf(sc, path, ratio, seed):\n    return [1, 2, 3]\n", "expected an RDD"),
    ("def udf(sc, path, ratio, seed):\n    return sc.parallelize(['a', 'b'])\n",
     "malformed"),
    ("x = 1\n", "no function named `udf"),
])
def test_bad_udf_modules_are_reported(sc, train_model, tmp_path, module_text, match,
                                      monkeypatch):
    name = f"udf_{abs(hash(module_text)) % 10 ** 8}"
    if module_text is not None:
        (tmp_path / f"{name}.py").write_text(module_text)
        monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=match):
        train_model.main(["--data", "x", "--data_udf", name, "--V", "2", "--M", "2",
                          "--model_proto", str(tmp_path / "m.lopq")])


def test_existing_model_of_another_dimension_is_reported(sc, train_model, tmp_path, trained,
                                                         ):
    _, proto, _ = trained
    data = tmp_path / "d8.txt"
    write_vector_file(data, make_clustered(300, 8, seed=2))
    with pytest.raises(ValueError, match="vectors of dimension 16 but --data"):
        train_model.main(["--data", str(data), "--existing_model_proto", str(proto),
                          "--steps", "2", "--model_proto", str(tmp_path / "m.lopq")])


def test_existing_output_is_refused_unless_overwrite(sc, train_model, tmp_path, small_data):
    path, _ = small_data
    out = tmp_path / "exists.lopq"
    out.write_bytes(b"keep me")
    args = ["--data", str(path), "--V", "2", "--M", "2", "--subquantizer_clusters", "8",
            "--model_proto", str(out)]
    with pytest.raises(ValueError, match="already exists.*--overwrite"):
        train_model.main(args)
    assert out.read_bytes() == b"keep me"
    train_model.main(args + ["--overwrite"])
    assert LOPQModel.load_proto(out).V == 2


@pytest.mark.parametrize("argv,match", [
    (["--V", "4"], "--M"),
    (["--M", "4", "--steps", "1,2"], "coarse quantizers of an existing model"),
    (["--M", "4"], "needs --V"),
])
def test_argument_validation(sc, train_model, tmp_path, small_data, argv, match):
    path, _ = small_data
    with pytest.raises(ValueError, match=match):
        train_model.main(["--data", str(path), "--model_proto", str(tmp_path / "m.lopq"),
                          *argv])


def test_steps_0_and_2_without_1_is_refused(train_model, capsys):
    with pytest.raises(SystemExit):
        train_model.parse_args(["--data", "x", "--V", "2", "--M", "2", "--steps", "0,2",
                                "--model_proto", "m"])
    assert "skips step 1" in capsys.readouterr().err


def test_an_output_is_required(train_model, capsys):
    with pytest.raises(SystemExit):
        train_model.parse_args(["--data", "x", "--V", "2", "--M", "2"])
    assert "--model_pkl and --model_proto" in capsys.readouterr().err


def test_index_from_codes_parsed_on_executors(sc, tmp_path):
    from lopq.formats import format_code_line
    from lopq.spark.codes import searcher_from_codes
    X = make_clustered(400, 8, seed=2)
    model = LOPQModel(V=2, M=2, subquantizer_clusters=8).fit(X, n_init=1, random_state=0)
    coarse, fine = model.encode(X)
    folder = tmp_path / "codes"
    folder.mkdir()
    for part, rows in enumerate((range(0, 150), range(150, 400))):
        (folder / f"part-{part:05d}").write_text("".join(
            format_code_line(f"k{i}", coarse[i], fine[i]) + "\n" for i in rows))
    searcher = searcher_from_codes(sc, model, str(folder))
    assert searcher.size == 400
    assert searcher.search(X[123], quota=20)[0][0].id == "k123"
    (folder / "part-00002").write_text("k9\t[[0, 1], [2]]\n")
    with pytest.raises(ValueError, match="different models"):
        searcher_from_codes(sc, model, str(folder))
    (folder / "part-00002").write_text("k9\t[[0, 1], [2, x]]\n")
    bad_line = re.escape(repr("k9\t[[0, 1], [2, x]]"))
    with pytest.raises(ValueError, match=rf"partition \d+\): code line 1 is not .*{bad_line}"):
        searcher_from_codes(sc, model, str(folder))


# ----------------------------------------------------------------- whose Spark it is
def test_spark_submit_settings_reach_the_drivers_context(tmp_path):
    """--master, --name, --conf and spark-defaults.conf win over lopq's defaults, which
    fill only the gaps (the bug: a SparkConf read before the JVM existed saw none of
    them and forced local[*])."""
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "spark-defaults.conf").write_text("spark.executorEnv.MKL_NUM_THREADS 5\n")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from lopq.spark import cli\n"
        "with cli.spark_context('lopq probe') as sc:\n"
        "    conf = sc.getConf()\n"
        "    print('PROBE', sc.master, sc.appName, *[conf.get('spark.executorEnv.' + v) for v"
        " in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'NUMBA_NUM_THREADS')])\n")
    cmd = submit_command("x", [], "local[1]", ["--name", "my job", "--conf",
                                                "spark.executorEnv.OMP_NUM_THREADS=3"])
    cmd[-1] = str(probe)
    proc = subprocess.run(cmd, env=spark_env(SPARK_CONF_DIR=str(conf_dir)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("PROBE")][0]
    assert line == "PROBE local[1] my job 3 5 1", line


def test_lopq_defaults_fill_only_what_nobody_set(sc):
    from pyspark import SparkConf

    from lopq.spark.session import defaults_to_add
    conf = (SparkConf(loadDefaults=False).set("spark.master", "spark://10.0.0.1:7077")
            .set("spark.app.name", "theirs").set("spark.executorEnv.OMP_NUM_THREADS", "4"))
    added = dict(defaults_to_add(conf, "lopq job"))
    assert "spark.master" not in added and "spark.app.name" not in added
    assert "spark.executorEnv.OMP_NUM_THREADS" not in added
    assert added["spark.executorEnv.NUMBA_NUM_THREADS"] == "1"
    nothing_set = dict(defaults_to_add(SparkConf(loadDefaults=False), "lopq job"))
    assert nothing_set["spark.master"] == "local[*]"
    assert nothing_set["spark.app.name"] == "lopq job"
    from lopq.spark.session import spark_version
    if spark_version() >= (4, 1):
        # Python workers talk to their executor over Unix sockets, unless the user says no
        assert nothing_set["spark.python.unix.domain.socket.enabled"] == "true"
        assert sc.getConf().get("spark.python.unix.domain.socket.enabled") == "true"
        theirs = SparkConf(loadDefaults=False).set("spark.python.unix.domain.socket.enabled",
                                                   "false")
        assert "spark.python.unix.domain.socket.enabled" not in dict(defaults_to_add(theirs, "x"))


def test_library_takes_a_users_session_and_leaves_it_running(sc, small_data, train_model,
                                                             tmp_path):
    from pyspark.sql import SparkSession

    from lopq.spark import load_blocks
    from lopq.spark import train_model as train_on_spark
    path, _ = small_data
    spark = SparkSession.builder.getOrCreate()  # the user's session, on the test context
    assert spark.sparkContext is sc and sc.master == "local[2]"  # PYSPARK_SUBMIT_ARGS'
    blocks, n, D = load_blocks(spark, str(path))
    model = train_on_spark(spark, blocks, 2, 2, 8, n_rows=n, rotation_refinement_iters=0)
    assert (model.D, n) == (D, 3000)
    train_model.main(["--data", str(path), "--V", "2", "--M", "2", "--subquantizer_clusters",
                      "8", "--model_proto", str(tmp_path / "m.lopq")])
    assert SparkSession.getActiveSession() is spark
    assert sc.parallelize([1, 2]).sum() == 3  # neither call stopped it


# ------------------------------------------------------- the training flags, one by one
def lloyd_lines(text, step):
    return re.findall(rf"{re.escape(step)}: Lloyd iteration (\d+)/(\d+)", text)


def test_steps_alone_and_iteration_flags_do_what_they_say(sc, small_data, workdir, capsys):
    """--steps 0 then --steps 1 (each alone) give what --steps 0,1,2 gives for those
    parameters; --coarse_iters / --local_iters bound the Lloyd iterations."""
    from spark_helpers import run_driver
    path, _ = small_data
    common = ["--data", str(path), "--V", "4", "--M", "4", "--subquantizer_clusters", "16",
              "--seed", "5", "--coarse_iters", "2"]
    # A constant shrinkage: "auto" compares candidates on a sample drawn after step 0,
    # and step 1 run alone draws it from a fresh seed, so the two may choose apart.
    full = workdir / "flags-full.pkl"
    code, streams = run_driver("train_model", [*common, "--local_iters", "3",
                                               "--rotation_refinement_iters", "0",
                                               "--rotation_shrinkage", "1.0",
                                               "--model_pkl", str(full)], capsys)
    assert code == 0, streams.err
    assert lloyd_lines(streams.err, "coarse (step 0)")[-1] == ("2", "2")
    assert lloyd_lines(streams.err, "subquantizers (step 2)")[-1][1] == "3"
    step0 = workdir / "flags-step0.pkl"
    code, streams = run_driver("train_model", [*common, "--steps", "0", "--model_pkl",
                                               str(step0)], capsys)
    assert code == 0, streams.err
    assert not lloyd_lines(streams.err, "subquantizers (step 2)")
    with open(full, "rb") as f:
        want = pickle.load(f)
    with open(step0, "rb") as f:
        coarse_only = pickle.load(f)
    assert coarse_only.Rs is None and coarse_only.codebooks is None
    np.testing.assert_array_equal(coarse_only.Cs, want.Cs)  # same seed, drawn first
    step1 = workdir / "flags-step1.pkl"
    code, streams = run_driver("train_model", ["--data", str(path), "--steps", "1",
                                               "--rotation_shrinkage", "1.0",
                                               "--existing_model_pkl", str(step0),
                                               "--model_pkl", str(step1)], capsys)
    assert code == 0, streams.err
    with open(step1, "rb") as f:
        rotations = pickle.load(f)
    assert rotations.codebooks is None and (rotations.V, rotations.M) == (4, 4)
    # Rotations come from the data and Cs alone, in the same passes: equal.
    np.testing.assert_array_equal(rotations.Rs, want.Rs)
    np.testing.assert_array_equal(rotations.mus, want.mus)


def test_sampling_ratios_train_on_a_sample(sc, small_data, workdir, capsys):
    from spark_helpers import run_driver
    path, X = small_data
    n = len(X)
    code, streams = run_driver("train_model", [
        "--data", str(path), "--V", "4", "--M", "4", "--subquantizer_clusters", "16",
        "--seed", "2", "--sampling_ratio", "0.5", "--subquantizer_sampling_ratio", "0.5",
        "--rotation_refinement_iters", "0", "--model_proto", str(workdir / "s.lopq")],
        capsys)
    assert code == 0, streams.err
    loaded = int(re.search(r"loaded (\d+) vectors", streams.err).group(1))
    assert abs(loaded - n / 2) < 5 * (n / 4) ** 0.5  # Bernoulli(0.5) rows: within 5 sigma
    step2 = int(re.search(r"subquantizers \(step 2\): \d+ group\(s\), k=16, n=(\d+)",
                          streams.err).group(1))
    assert abs(step2 - loaded / 2) < 5 * (loaded / 4) ** 0.5


def test_agg_depth_sums_the_same(sc, small_data):
    """treeAggregate at any depth (what --agg_depth sets) adds up the same statistics,
    checked against numpy."""
    from lopq.spark import load_blocks
    from lopq.spark.kmeans import column_stats
    path, X = small_data
    blocks, n, _ = load_blocks(sc, str(path))
    for depth in (1, 2, 3):
        count, sums, sumsq = column_stats(blocks.repartition(8), depth)
        assert count == n
        np.testing.assert_allclose(sums, X.astype(np.float64).sum(axis=0), rtol=1e-9)
        np.testing.assert_allclose(sumsq, (X.astype(np.float64) ** 2).sum(axis=0),
                                   rtol=1e-9)
    blocks.unpersist()


def test_lloyd_pass_at_every_depth_matches_numpy(sc, small_data, monkeypatch):
    """A Lloyd pass gives the same sums and counts whether the driver sums the
    partitions' statistics (the default below `DRIVER_AGGREGATION_BYTES`) or a tree
    does (forced by a tiny threshold, or by an explicit depth)."""
    from lopq.spark import load_blocks
    from lopq.spark import rows as spark_rows
    path, X = small_data
    blocks, n, _ = load_blocks(sc, str(path))
    blocks = blocks.repartition(8).cache()
    centers = X[:2 * 5].reshape(2, 5, -1)[:, :, :X.shape[1] // 2].copy()
    centers[1] = X[10:15, X.shape[1] // 2:]
    expected_counts = []
    for g in range(2):
        half = X[:, g * (X.shape[1] // 2):(g + 1) * (X.shape[1] // 2)].astype(np.float64)
        d = ((half[:, None, :] - centers[g][None].astype(np.float64)) ** 2).sum(-1)
        expected_counts.append(np.bincount(d.argmin(1), minlength=5))
    results = []
    for threshold, depth in ((64 << 20, None), (1, None), (64 << 20, 3)):
        monkeypatch.setattr(spark_rows, "DRIVER_AGGREGATION_BYTES", threshold)
        step = spark_rows.BlockRows(sc, blocks, depth).lloyd_pass(centers)
        np.testing.assert_array_equal(step.counts, np.stack(expected_counts))
        results.append(step.sums)
    for sums in results[1:]:
        np.testing.assert_allclose(sums, results[0], rtol=1e-9)
    blocks.unpersist()


def test_step_1_on_spark_shrinks_small_clusters_as_fit_does(sc, small_data):
    """Spark step 1 and `LOPQModel.fit`'s step 1 are one estimator: with clusters smaller
    than D/2 rows, both give the same shrunk (non-identity) rotations."""
    from lopq.spark import load_blocks
    from lopq.spark.training import train_rotations_on_blocks
    from lopq.training import train_coarse_splits, train_rotations
    path, X = small_data
    blocks, n, D = load_blocks(sc, str(path))
    h = D // 2
    Cs = train_coarse_splits(X, 400, 2, 1, random_state=0)  # ~7 rows per cluster
    Rs, mus = train_rotations_on_blocks(sc, blocks, Cs, 4)
    want_R, want_mu = train_rotations(X, Cs, 4)
    blocks.unpersist()
    signs = np.sign((Rs * want_R).sum(axis=3, keepdims=True))
    np.testing.assert_allclose(Rs * signs, want_R, atol=2e-3)
    np.testing.assert_allclose(mus, want_mu, atol=1e-4)
    identity = np.all(np.isclose(Rs, np.eye(h)), axis=(2, 3))
    assert not identity.any()


def test_spark_training_is_fits_training_on_the_same_rows_and_seed(sc, small_data):
    """One training sequence: Spark (row blocks in several partitions) and `fit` (an
    array) draw the same samples from the same seed, so they give the same model up to
    summation order, and the same reconstruction error."""
    from lopq.eval import relative_reconstruction_error
    from lopq.spark import load_blocks
    from lopq.spark.training import train_model
    path, X = small_data
    blocks, n, _ = load_blocks(sc, str(path), block_rows=700)
    assert blocks.getNumPartitions() > 1
    V, M, S = 8, 4, 32  # 3000 rows >= 4 * 64 rows per centroid: the sample warm start runs
    spark_model = train_model(sc, blocks, V, M, S, seed=11, local_iters=12)
    local = LOPQModel(V, M, S).fit(X, n_init=1, random_state=11, kmeans_local_iters=12)
    blocks.unpersist()
    np.testing.assert_allclose(spark_model.Cs, local.Cs, atol=1e-4)
    np.testing.assert_allclose(spark_model.mus, local.mus, atol=1e-4)
    signs = np.sign((spark_model.Rs * local.Rs).sum(axis=3, keepdims=True))
    np.testing.assert_allclose(spark_model.Rs * signs, local.Rs, atol=2e-3)
    np.testing.assert_allclose(spark_model.codebooks, local.codebooks, atol=2e-3)
    errors = [relative_reconstruction_error(X, m) for m in (spark_model, local)]
    assert errors[0] == pytest.approx(errors[1], rel=0.005)


def _mixed_line_bytes(rng, n_lines):
    """Lines of text, ids and base64 alike, ended by LF, CRLF or CR, some empty, some
    with multi-byte or invalid UTF-8, the file opened by a byte order mark."""
    pieces = [b"\xef\xbb\xbf"]
    for i in range(n_lines):
        body = rng.choice([b"", b"key%d\tAAAA" % i, "é%d".encode() % i, b"\xff%d" % i])
        pieces.append(body + rng.choice([b"\n", b"\r\n", b"\r"]))
    return b"".join(pieces) + b"no terminator at the end"


def test_split_lines_reads_every_line_once_whatever_the_splits(tmp_path):
    """The executors' reader of local text splits: cut anywhere, read in chunks of any
    size, the splits' lines together are the file's lines (bytes.splitlines), once each."""
    import random

    from lopq.spark.data import split_lines
    rng = random.Random(0)
    for trial in range(300):
        data = _mixed_line_bytes(rng, rng.randint(0, 12))
        path = tmp_path / f"t{trial}.txt"
        path.write_bytes(data)
        cuts = sorted({0, len(data), *(rng.randint(0, len(data)) for _ in range(4))})
        got = [line for a, b in zip(cuts, cuts[1:])
               for chunk in split_lines(str(path), a, b - a, rng.randint(1, 9))
               for line in chunk]
        want = [line.decode("utf-8", "replace") for line in data.splitlines()]
        want[0] = want[0].removeprefix("\ufeff")
        assert got == want, (data, cuts)


def test_split_lines_reads_the_lines_spark_reads_split_by_split(sc, tmp_path):
    """Against Spark's own reader (sc.textFile) on the same input splits: each split
    holds the same lines, so line numbers in messages do not change."""
    import random

    from lopq.spark.data import _local_text_splits, _text_splits, split_lines
    path = tmp_path / "mixed.txt"
    path.write_bytes(_mixed_line_bytes(random.Random(1), 4000))
    lines = sc.textFile(str(path), minPartitions=7)
    local = _local_text_splits(sc, _text_splits(lines))
    assert local is not None and len(local) == lines.getNumPartitions() >= 7
    spark_splits = lines.glom().collect()
    ours = [[line for chunk in split_lines(*split, 1000) for line in chunk]
            for split in local]
    assert ours == spark_splits


def test_local_text_is_read_on_the_executors_and_compressed_text_by_spark(sc, tmp_path):
    """Uncompressed local files take the executors' reader; a gzip file is left to
    Spark (it decompresses); both load the same rows."""
    import gzip

    from lopq.formats import encode_vector_line
    from lopq.spark.data import _local_text_splits, _text_splits
    X = np.random.RandomState(3).randn(500, 8).astype(np.float32)
    text = "".join(encode_vector_line(i, x) + "\n" for i, x in enumerate(X))
    plain, packed = tmp_path / "plain.txt", tmp_path / "packed.txt.gz"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    assert _local_text_splits(sc, _text_splits(sc.textFile(str(plain)))) is not None
    assert _local_text_splits(sc, _text_splits(sc.textFile(str(packed)))) is None
    from lopq.spark import load_blocks
    for path in (plain, packed):
        blocks, n, D = load_blocks(sc, str(path))
        got = np.concatenate([b[1] for b in blocks.collect()])
        blocks.unpersist()
        assert (n, D) == (500, 8)
        np.testing.assert_array_equal(got, X)


def test_row_files_give_the_cached_blocks_results(sc, small_data):
    """Local mode's row files (one memory-mapped .npy per partition) change where a
    pass reads its rows, not what it computes: Lloyd and covariance passes, samples,
    projections and subsets equal those of the JVM-cached blocks; a lost file is
    written again; `release` removes the files. Each pass is a Spark job of one task
    per partition (the status tracker's stages)."""
    from pyspark import SparkFiles

    from lopq.spark import load_blocks
    from lopq.spark.rows import BlockRows
    path, X = small_data
    blocks, n, _ = load_blocks(sc, str(path), block_rows=700)
    parts = blocks.getNumPartitions()
    assert parts > 1
    on_files = BlockRows(sc, blocks, row_files=True)
    on_blocks = BlockRows(sc, blocks, row_files=False)
    rng = np.random.RandomState(5)
    h = X.shape[1] // 2
    centers = np.stack([X[rng.choice(n, 6, replace=False), g * h:(g + 1) * h]
                        for g in range(2)]).astype(np.float32)
    sc.setJobGroup("row-files", "row files pass")
    try:
        a, b = on_files.lloyd_pass(centers), on_blocks.lloyd_pass(centers)
    finally:  # later tests count the jobs of no group (spark_helpers.tasks_since)
        sc.setLocalProperty("spark.jobGroup.id", None)
    tracker = sc.statusTracker()
    jobs = [tracker.getJobInfo(j) for j in tracker.getJobIdsForGroup("row-files")]
    tasks = [tracker.getStageInfo(s).numTasks for job in jobs for s in job.stageIds
             if tracker.getStageInfo(s) is not None]
    assert tasks.count(parts) >= 2, tasks  # file writing and the pass: one task each
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-9)
    folder = on_files._folder
    assert folder.startswith(SparkFiles.getRootDirectory())
    assert sorted(os.listdir(folder)) == sorted(f"{p}.npy" for p in range(parts))
    indices = np.sort(rng.choice(n, 300, replace=False))
    np.testing.assert_array_equal(on_files.take(indices), X[indices])
    os.remove(os.path.join(folder, "1.npy"))  # lost: written again from the blocks
    for x, y in zip(on_files.covariance_pass(centers), on_blocks.covariance_pass(centers)):
        np.testing.assert_allclose(x, y, rtol=1e-9)
    Rs = np.stack([np.stack([np.linalg.qr(rng.randn(h, h))[0] for _ in range(6)])
                   for _ in range(2)]).astype(np.float32)
    mus = (0.1 * rng.randn(2, 6, h)).astype(np.float32)
    # the covariance pass left each partition's coarse labels beside its file: the
    # nearest centroids (by distance: a float32 near-tie may pick another)
    from lopq.rows import centroid_tag
    tag = centroid_tag(centers)
    labels = np.concatenate([np.load(os.path.join(folder, f"labels-{tag}-{p}.npy"))
                             for p in range(parts)])
    for g in range(2):
        d = ((X[:, None, g * h:(g + 1) * h] - centers[g][None]) ** 2).sum(-1)
        np.testing.assert_allclose(d[np.arange(n), labels[:, g]], d.min(1), rtol=1e-5)
    projected = [s.projected(centers, Rs, mus) for s in (on_files, on_blocks)]
    np.testing.assert_allclose(projected[0].take(indices), projected[1].take(indices),
                               rtol=1e-5, atol=1e-5)
    # ... and the projections read them: labels of another cell change the rows of that
    # partition; other centroids (another tag) assign again
    poisoned = os.path.join(folder, f"labels-{tag}-0.npy")
    np.save(poisoned, (np.load(poisoned) + 1) % 6)
    first = np.arange(on_files.partition_rows[0])
    stored = on_files.projected(centers, Rs, mus)
    assert not np.allclose(stored.take(first), projected[1].take(first), atol=1e-4)
    # a pass over projections mapped on the fly reads them too
    mapped = on_files.projected(centers, Rs, mus, passes=1)
    starts = np.stack([projected[1].take(indices[:3])[:, g * h:(g + 1) * h]
                       for g in range(2)])
    a, b = mapped.lloyd_pass(starts), stored.lloyd_pass(starts)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-6)
    moved = centers + np.float32(0.5)
    again = [s.projected(moved, Rs, mus) for s in (on_files, on_blocks)]
    np.testing.assert_allclose(again[0].take(first), again[1].take(first), rtol=1e-5,
                               atol=1e-5)
    projected += [stored, mapped, *again]
    subset = on_files.subset(indices)
    np.testing.assert_array_equal(subset.take(np.arange(50)), X[indices[:50]])
    for source in (*projected, subset, on_files, on_blocks):
        source.release()
    assert not os.path.exists(folder)
    blocks.unpersist()


def test_training_on_row_files_alone_never_reads_the_input_again(sc, small_data, tmp_path):
    """``load_blocks(row_files=True, cache=False)`` (train_model.py under L2, local mode)
    caches nothing in Spark: the training, a subquantizer subset included, reads the
    row files only. Proof: the input file is deleted right after loading, so any job
    that read it again would fail; and the model equals that trained on cached blocks
    of the same file with the same seed."""
    import shutil

    from lopq.spark import load_blocks
    from lopq.spark.training import train_model
    path, X = small_data
    copy = tmp_path / "copy.txt"
    shutil.copy(path, copy)
    args = dict(V=4, M=4, S=16, seed=7, subquantizer_sampling_ratio=0.5, coarse_iters=4,
                local_iters=4, rotation_refinement_iters=1, rotation_shrinkage=1.0)
    cached_before = {r.id() for r in sc._jsc.sc().getRDDStorageInfo()}
    blocks, n, D = load_blocks(sc, str(copy), row_files=True, cache=False, block_rows=500)
    assert {r.id() for r in sc._jsc.sc().getRDDStorageInfo()} == cached_before
    os.remove(copy)
    alone = train_model(sc, blocks, n_rows=n, dim=D, **args)
    cached, n2, _ = load_blocks(sc, str(path), row_files=True, block_rows=500)
    assert sc._jsc.sc().getRDDStorageInfo()  # this one is cached
    with_cache = train_model(sc, cached, n_rows=n2, dim=D, **args)
    cached.unpersist()
    for a, b in zip((alone.Cs, alone.Rs, alone.mus, alone.codebooks),
                    (with_cache.Cs, with_cache.Rs, with_cache.mus, with_cache.codebooks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loading_writes_the_row_files_the_training_reads(sc, small_data, tmp_path):
    """``load_blocks(row_files=True)`` in local mode writes each partition's rows as a
    row file while it checks them; the training source takes those files over (no job
    writes them again, no job counts rows) and computes what the cached blocks give.
    Partitions of rows of another dimension (kept out by ``--skip_bad_records``) leave
    no file behind: a pass writes it from the blocks."""
    from lopq.spark import load_blocks
    from lopq.spark.rows import ROW_FILES_ATTRIBUTE, BlockRows
    path, X = small_data
    blocks, n, D = load_blocks(sc, str(path), row_files=True, block_rows=500)
    folder = getattr(blocks, ROW_FILES_ATTRIBUTE).folder
    parts = blocks.getNumPartitions()
    assert sorted(os.listdir(folder)) == sorted(f"{p}.npy" for p in range(parts))
    for p, part in enumerate(blocks.glom().collect()):
        want = np.concatenate([b[1] for b in part]) if part else np.empty((0, D))
        np.testing.assert_array_equal(np.load(os.path.join(folder, f"{p}.npy")).reshape(
            -1, D), want)
    jobs_before = set(sc.statusTracker().getJobIdsForGroup())
    source = BlockRows(sc, blocks, row_files=True)
    indices = np.sort(np.random.RandomState(0).choice(n, 200, replace=False))
    np.testing.assert_array_equal(source.take(indices), X[indices])
    assert set(sc.statusTracker().getJobIdsForGroup()) == jobs_before  # read on the driver
    on_blocks = BlockRows(sc, blocks, row_files=False)
    centers = X[:5, None, :].transpose(1, 0, 2).astype(np.float32)
    a, b = source.lloyd_pass(centers), on_blocks.lloyd_pass(centers)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-9)
    source.release()
    assert not os.path.exists(folder)
    blocks.unpersist()

    # Two files: the 16-d rows and fewer 6-d ones; the 6-d ones are skipped.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_vector_file(mixed / "a.txt", X[:1000])
    write_vector_file(mixed / "b.txt", X[:300, :6])
    blocks, n, D = load_blocks(sc, str(mixed), row_files=True, skip_bad_records=True)
    assert (n, D) == (1000, 16)
    folder = getattr(blocks, ROW_FILES_ATTRIBUTE).folder
    for name in os.listdir(folder):
        shape = np.load(os.path.join(folder, name), mmap_mode="r").shape
        assert shape[0] == 0 or shape[1] == 16, (name, shape)
    source = BlockRows(sc, blocks, row_files=True)
    assert source.n_rows == 1000
    np.testing.assert_array_equal(np.sort(source.take(np.arange(1000)), axis=0),
                                  np.sort(X[:1000], axis=0))
    source.release()
    blocks.unpersist()
