"""Running the spark/*.py drivers the way users do: spark-submit in a subprocess."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from conftest import ROOT

from lopq.formats import parse_code_line


def load_driver(name):
    """A ``spark/<name>.py`` driver imported as a module, to call its ``main`` in-process."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"driver_{name}",
                                                  ROOT / "spark" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_driver(name, argv, capsys):
    """``spark/<name>.py argv`` in-process through `cli.run`, as ``python spark/...``
    runs it: (exit code, captured (out, err))."""
    from lopq.spark import cli
    module = load_driver(name)
    capsys.readouterr()
    try:
        cli.run(module.main, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr()


def spark_submit_path():
    import pyspark
    return str(Path(pyspark.__file__).parent / "bin" / "spark-submit")


#: JVM options of the tests' short-lived Spark JVMs (drivers, standalone daemons): the
#: client compiler only and the serial collector. A trivial spark-submit on 2 cores:
#: 6.2-7.0 s of CPU instead of 10.8-11.6 (wall 7.0-7.8 s instead of 8.2-8.8), and the
#: suite runs two such JVMs side by side. The tests' data is small: nothing in the JVM
#: runs long enough to need the optimising compiler.
TEST_JVM_OPTS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


def spark_env(**extra):
    env = dict(os.environ)
    env.pop("PYSPARK_SUBMIT_ARGS", None)  # the in-process fixture's, not spark-submit's
    env.update(SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               SPARK_SUBMIT_OPTS=TEST_JVM_OPTS, SPARK_DAEMON_JAVA_OPTS=TEST_JVM_OPTS,
               PYSPARK_DRIVER_PYTHON=sys.executable, SPARK_CONF_DIR=str(ROOT / "conf"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "spark")]))
    env.update(extra)
    return env


def submit_command(script, args, master="local[2]", spark_args=()):
    return [spark_submit_path(), "--master", master, *spark_args,
            str(ROOT / "spark" / script), *map(str, args)]


def spark_submit(script, *args, master="local[2]", spark_args=(), env=None, check=True,
                 timeout=900):
    cmd = submit_command(script, args, master, spark_args)
    proc = subprocess.run(cmd, env=env or spark_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def application_id(output):
    """The application id the driver logged (`lopq.spark.session.driver_session`)."""
    match = re.search(r"Spark application (\S+) \(", output)
    assert match, f"the driver did not log its application id:\n{output[-3000:]}"
    return match.group(1)


class RunningJob:
    """A spark-submit in the background whose merged output is read line by line, so a
    test can act (kill an executor, a worker, the driver) at a chosen point of the job."""

    def __init__(self, cmd, env):
        self.cmd = cmd
        self.lines = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self):
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, pattern, timeout=300):
        """The first output line matching ``pattern``; fails if the job ends first."""
        regex = re.compile(pattern)
        deadline = time.time() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"the job ended before printing {pattern!r}:\n"
                                         f"{''.join(self.lines)[-4000:]}")
                if time.time() > deadline:
                    raise AssertionError(f"no {pattern!r} within {timeout} s")
                self._changed.wait(1.0)

    def finish(self, timeout=900):
        """Wait for the job; returns (exit code, merged output)."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return code, self.output

    def kill_driver(self):
        """SIGKILL spark-submit's whole process group: the driver JVM and its Python."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=30)


def read_codes(folder):
    """{id: (coarse, fine)} of a compute_codes output; fails on a duplicated id."""
    codes = {}
    for part in sorted(Path(folder).glob("part-*")):
        for line in part.read_text().splitlines():
            key, coarse, fine = parse_code_line(line)
            assert key not in codes, f"id {key} appears twice in {folder}"
            codes[key] = (coarse, fine)
    return codes


def assert_codes_equal_encode(model, X, ids, codes):
    """Every id once, with ``model.encode``'s codes; a code that differs must be a float
    near-tie: it reconstructs the vector at the same distance (relative 1e-5)."""
    assert sorted(codes) == sorted(ids), "the output does not hold every input id once"
    coarse, fine = model.encode(X)
    got_coarse = np.array([codes[key][0] for key in ids])
    got_fine = np.array([codes[key][1] for key in ids])
    differ = np.flatnonzero((got_coarse != coarse).any(axis=1)
                            | (got_fine != fine).any(axis=1))
    if differ.size:
        X64 = X[differ].astype(np.float64)
        want = ((model.decode((coarse[differ], fine[differ])) - X64) ** 2).sum(axis=1)
        got = ((model.decode((got_coarse[differ], got_fine[differ])) - X64) ** 2).sum(axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert differ.size <= max(1, len(ids) // 1000), f"{differ.size} codes differ"


def tasks_since(sc, jobs_before):
    """Tasks of the stages of the jobs started after ``jobs_before`` (status tracker)."""
    tracker = sc.statusTracker()
    tasks = []
    for job in sorted(set(tracker.getJobIdsForGroup()) - jobs_before):
        info = tracker.getJobInfo(job)
        for stage in info.stageIds if info else []:
            stage_info = tracker.getStageInfo(stage)
            if stage_info:
                tasks.append(stage_info.numTasks)
    return tasks
