"""Bad input on every driver: one clear line naming the flag, the file and the record, a
non-zero exit, nothing at the output path, existing outputs untouched.

The drivers run in-process (``cli.run(main, argv)``, as ``python spark/<driver>.py``
does) on the shared local SparkContext.
"""

import base64
import gzip
import os
import pickle

import numpy as np
import pytest
from spark_helpers import load_driver, run_driver

from lopq import LOPQModel
from lopq.formats import encode_vector_line

pytestmark = pytest.mark.spark
pytest.importorskip("pyspark")

DRIVERS = ("train_pca", "train_model", "compute_codes")
DIM = 4
GOOD = np.random.RandomState(0).standard_normal((40, DIM)).astype(np.float32)


class Evil:
    """A pickle that would run a shell command when loaded by plain ``pickle.loads``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pickled_line(key, obj):
    return f"{key}\t{base64.b64encode(pickle.dumps(obj, protocol=2)).decode()}"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    model = LOPQModel(V=2, M=2, subquantizer_clusters=4).fit(GOOD, n_init=1, random_state=0)
    path = tmp_path_factory.mktemp("bad_input") / "model.lopq"
    model.export_proto(str(path))
    return path


def driver_args(driver, data, out, model_file):
    if driver == "train_pca":
        return ["--data", str(data), "--output", str(out)]
    if driver == "train_model":
        return ["--data", str(data), "--V", "2", "--M", "2", "--subquantizer_clusters", "4",
                "--model_proto", str(out)]
    return ["--data", str(data), "--output", str(out), "--model_proto", str(model_file)]


def run(driver, argv, capsys):
    """(exit code, stderr) of ``spark/<driver>.py argv`` run in-process."""
    code, streams = run_driver(driver, argv, capsys)
    return code, streams.err


def assert_one_line_error(code, err, *fragments):
    assert code != 0, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Py4J" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def data_with(tmp_path, bad_line, name="data.txt"):
    """40 good records with the bad one as line 6."""
    lines = [encode_vector_line(f"r{i}", x) for i, x in enumerate(GOOD)]
    lines.insert(5, bad_line)
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


BAD_RECORDS = {
    "no tab": ("r-bad " + "A" * 20, "no TAB"),
    "not base64": ("bad\tnot base64 at all!", "not base64"),
    "not a pickle": ("bad\t" + base64.b64encode(b"plain bytes").decode(), "not a pickle"),
    "int": (pickled_line("bad", 7), "holds a int"),
    "2-D": (pickled_line("bad", np.ones((2, 2))), "shape (2, 2)"),
    "0-length": (pickled_line("bad", np.ones(0)), "empty (0 values)"),
    "object": (pickled_line("bad", np.array([None, 1.0], dtype=object)), "object"),
    "other length": (encode_vector_line("bad", np.ones(DIM + 2)),
                     "1 of dimension 6 (the first: "),
    "nan": (encode_vector_line("bad", np.array([1.0, np.nan, 0, 0])), "NaN or infinite"),
    "inf": (encode_vector_line("bad", np.array([1.0, np.inf, 0, 0])), "NaN or infinite"),
}


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_is_named_by_file_line_and_id(sc, driver, case, tmp_path, model_file,
                                                 capsys):
    bad_line, message = BAD_RECORDS[case]
    data = data_with(tmp_path, bad_line)
    out = tmp_path / "out"
    code, err = run(driver, driver_args(driver, data, out, model_file), capsys)
    assert_one_line_error(code, err, "--data", str(data), "line 6", message,
                          "--skip_bad_records")
    if case != "no tab":
        assert "id 'bad'" in err
    assert not out.exists()


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_pickle_that_runs_code_is_refused_and_never_run(sc, driver, tmp_path, model_file,
                                                          capsys):
    marker = tmp_path / "pwned"
    data = data_with(tmp_path, pickled_line("evil", Evil(marker)))
    code, err = run(driver, driver_args(driver, data, tmp_path / "out", model_file), capsys)
    assert_one_line_error(code, err, "line 6", "system", "not allowed")
    assert not marker.exists(), "reading the data ran the pickle's command"


@pytest.mark.parametrize("driver", DRIVERS)
def test_skip_bad_records_skips_counts_and_goes_on(sc, driver, tmp_path, model_file, capsys,
                                                   caplog):
    lines = [encode_vector_line(f"r{i}", x) for i, x in enumerate(GOOD)]
    lines[3] = "garbage"
    lines[7] = encode_vector_line("short", np.ones(DIM - 2))
    data = tmp_path / "data.txt"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code, err = run(driver, driver_args(driver, data, out, model_file) + ["--skip_bad_records"],
                    capsys)
    assert code == 0, err
    assert "skipped 2 malformed record(s)" in caplog.text + err
    assert out.exists()
    if driver == "compute_codes":
        codes = [line for part in sorted(out.glob("part-*"))
                 for line in part.read_text().splitlines()]
        assert len(codes) == len(GOOD) - 2


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("empty file", "is empty (0 bytes)"),
    ("empty folder", "empty folder"),
])
def test_missing_or_empty_input(sc, driver, case, message, tmp_path, model_file, capsys):
    data = tmp_path / "data"
    if case == "empty file":
        data.write_text("")
    elif case == "empty folder":
        data.mkdir()
        (data / "_SUCCESS").write_text("")  # hidden from readers, like Hadoop does
    out = tmp_path / "out"
    code, err = run(driver, driver_args(driver, data, out, model_file), capsys)
    assert_one_line_error(code, err, "--data", str(data), message)
    assert not out.exists()


@pytest.mark.parametrize("driver", DRIVERS)
def test_gzip_text_input_works(sc, driver, tmp_path, model_file, capsys):
    data = tmp_path / "data.txt.gz"
    with gzip.open(data, "wt") as f:
        f.write("".join(encode_vector_line(f"r{i}", x) + "\n" for i, x in enumerate(GOOD)))
    out = tmp_path / "out"
    code, err = run(driver, driver_args(driver, data, out, model_file), capsys)
    assert code == 0, err
    if driver == "compute_codes":
        lines = [line for part in sorted(out.glob("part-*"))
                 for line in part.read_text().splitlines()]
        assert len(lines) == len(GOOD)
    else:
        assert out.exists()


UDF_DRIVER_RAISES = "def udf(sc, path, ratio, seed):\n    raise ValueError('udf says no')\n"
UDF_EXECUTOR_RAISES = (
    "def fail(x):\n    raise KeyError('udf lost key 17')\n\n"
    "def udf(sc, path, ratio, seed):\n    return sc.parallelize(range(4), 2).map(fail)\n")


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("module_text,message", [
    (None, "cannot import"),
    ("import no_such_module_anywhere\n", "cannot import"),
    ("raise RuntimeError('broken at import')\n", "RuntimeError: broken at import"),
    (UDF_DRIVER_RAISES, "ValueError: udf says no"),
    (UDF_EXECUTOR_RAISES, "KeyError: 'udf lost key 17'"),
])
def test_data_udf_errors_show_the_udfs_own_line(sc, driver, module_text, message, tmp_path,
                                                model_file, capsys, monkeypatch):
    name = f"udf_{abs(hash((module_text, driver))) % 10 ** 8}"
    if module_text is not None:
        (tmp_path / f"{name}.py").write_text(module_text)
        monkeypatch.syspath_prepend(str(tmp_path))
        if module_text == UDF_EXECUTOR_RAISES:  # as spark-submit --py-files would
            sc.addPyFile(str(tmp_path / f"{name}.py"))
    out = tmp_path / "out"
    argv = driver_args(driver, tmp_path / "x", out, model_file) + ["--data_udf", name]
    code, err = run(driver, argv, capsys)
    assert_one_line_error(code, err, "--data_udf", name, message)
    assert not out.exists()


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("value", ["0", "1.5", "half"])
def test_sampling_ratio_outside_0_1_is_refused(driver, value, tmp_path, model_file, capsys):
    argv = driver_args(driver, tmp_path / "x", tmp_path / "out", model_file)
    code, err = run(driver, argv + ["--sampling_ratio", value], capsys)
    assert_one_line_error(code, err, "--sampling_ratio", value)


@pytest.fixture
def good_data(tmp_path):
    path = tmp_path / "good.txt"
    path.write_text("".join(encode_vector_line(f"r{i}", x) + "\n"
                            for i, x in enumerate(GOOD)))
    return path


@pytest.mark.parametrize("argv,message", [
    (["--V", "50", "--M", "2"], "--V 50 is more than the 40 vectors"),
    (["--V", "2", "--M", "2", "--subquantizer_clusters", "64"],
     "--subquantizer_clusters 64 is more than the 40 vectors"),
    (["--V", "2", "--M", "8"], "divisible by --M 8"),
    (["--V", "2", "--M", "2", "--steps", "1,2"], "existing model"),
    (["--M", "2", "--steps", "2"], "existing model"),
    (["--V", "2", "--M", "2", "--subquantizer_sampling_ratio", "0"],
     "--subquantizer_sampling_ratio"),
])
def test_train_model_argument_errors(sc, argv, message, good_data, tmp_path, capsys):
    out = tmp_path / "out.lopq"
    code, err = run("train_model", ["--data", str(good_data), "--model_proto", str(out),
                                    *argv], capsys)
    assert_one_line_error(code, err, message)
    assert not out.exists()


def model_files(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x08\x96\x01 this is not a model \xff\xfe" * 10)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Evil(tmp_path / "pwned")))
    not_model = tmp_path / "list.pkl"
    not_model.write_bytes(pickle.dumps([1, 2, 3]))
    return {
        "missing proto": ("proto", tmp_path / "nope.lopq", "does not exist"),
        "missing pickle": ("pkl", tmp_path / "nope.pkl", "does not exist"),
        "corrupt proto": ("proto", garbage, "is not a .lopq model"),
        "corrupt pickle": ("pkl", garbage, "is not a pickled LOPQModel"),
        "pickle that runs code": ("pkl", evil, "not allowed"),
        "pickle of a list": ("pkl", not_model, "holds a list"),
    }


@pytest.mark.parametrize("driver", ["train_model", "compute_codes"])
@pytest.mark.parametrize("case", ["missing proto", "missing pickle", "corrupt proto",
                                  "corrupt pickle", "pickle that runs code",
                                  "pickle of a list"])
def test_missing_or_corrupt_model_file(sc, driver, case, good_data, tmp_path, capsys):
    kind, path, message = model_files(tmp_path)[case]
    out = tmp_path / "out"
    if driver == "train_model":
        flag = f"--existing_model_{kind}"
        argv = ["--data", str(good_data), flag, str(path), "--steps", "2",
                "--model_proto", str(out)]
    else:
        flag = f"--model_{kind}"
        argv = ["--data", str(good_data), "--output", str(out), flag, str(path)]
    code, err = run(driver, argv, capsys)
    assert_one_line_error(code, err, flag, str(path), message)
    assert not out.exists()
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("driver", DRIVERS + ("pca_preparation",))
def test_existing_output_is_untouched_without_overwrite(sc, driver, good_data, tmp_path,
                                                        model_file, capsys):
    out = tmp_path / "exists"
    out.write_bytes(b"keep me")
    if driver == "pca_preparation":
        pca = tmp_path / "pca.pkl"
        pca.write_bytes(pickle.dumps({"P": np.eye(DIM), "E": np.arange(DIM, dtype=float),
                                      "mu": np.zeros(DIM)}))
        argv = ["--pca_params", str(pca), "--D", "2", "--output", str(out)]
        module = load_driver(driver)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            module.main(argv)
        code, err = exit_.value.code, capsys.readouterr().err
    else:
        code, err = run(driver, driver_args(driver, good_data, out, model_file), capsys)
    assert_one_line_error(code, err, str(out), "--overwrite")
    assert out.read_bytes() == b"keep me"
