"""A Spark standalone cluster on this machine's loopback: one master, N workers.

For trying the cluster path on one machine before a real cluster, from a shell::

    python -m lopq.spark.localcluster --workers 2 --dir /tmp/lopq-cluster
    # prints the master URL; in another shell:
    spark-submit --master spark://127.0.0.1:<port> spark/train_model.py ...

(Ctrl-C stops the cluster), and from Python, as the cluster tests and benchmarks do::

    with StandaloneCluster("/tmp/cluster", workers=2, cores=1) as cluster:
        subprocess.run(["spark-submit", "--master", cluster.master_url, ...])
        cluster.application(app_id)        # the master's record of the application
        cluster.executor_logs(app_id)      # {worker index: [executor stderr texts]}

It uses the ``spark-daemon.sh`` that the pyspark package ships (the pip package has no
``start-master.sh``). Each worker gets its own work directory, so executor logs tell
which worker ran what.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spark_home():
    import pyspark
    return Path(pyspark.__file__).resolve().parent


class StandaloneCluster:
    """A standalone master and ``workers`` workers of ``cores`` cores each on 127.0.0.1.

    Args:
        base: folder for pid files, daemon logs and the workers' work directories.
        workers, cores, memory: worker count, cores and memory (``"2g"``) per worker.
        env: extra environment for the daemons (executors inherit the workers').
    """

    def __init__(self, base, workers=2, cores=1, memory="2g", env=None):
        self.base = Path(base)
        self.n_workers, self.cores, self.memory = workers, cores, memory
        self.port, self.webui_port = free_port(), free_port()
        self.worker_ports = [free_port() for _ in range(workers)]
        self.master_url = f"spark://127.0.0.1:{self.port}"
        self.webui_url = f"http://127.0.0.1:{self.webui_port}"
        home = spark_home()
        self.daemon = home / "sbin" / "spark-daemon.sh"
        self.env = dict(os.environ, SPARK_HOME=str(home), SPARK_LOCAL_IP="127.0.0.1",
                        SPARK_PID_DIR=str(self.base / "pid"),
                        SPARK_LOG_DIR=str(self.base / "log"),
                        PYSPARK_PYTHON=os.environ.get("PYSPARK_PYTHON", sys.executable))
        self.env.update(env or {})
        # The daemons' own configuration folder: Spark's default logging (INFO), so each
        # executor's stderr records the tasks it finished.
        self.env["SPARK_CONF_DIR"] = str(self.base / "conf")

    # ------------------------------------------------------------------ lifecycle
    def work_dir(self, worker):
        """Work directory of worker ``worker`` (1-based): ``app-*/<executor>/stderr``."""
        return self.base / f"work{worker}"

    def _daemon(self, action, cls, instance, *args):
        proc = subprocess.run(["bash", str(self.daemon), action, cls, str(instance), *args],
                              env=self.env, capture_output=True, text=True)
        if proc.returncode != 0 and action == "start":
            raise RuntimeError(f"spark-daemon.sh {action} {cls} failed: "
                               f"{proc.stdout}{proc.stderr}")

    def start(self, timeout=120):
        """Start the master and every worker; return once all workers are ALIVE."""
        (self.base / "conf").mkdir(parents=True, exist_ok=True)
        self._daemon("start", MASTER_CLASS, 1, "--host", "127.0.0.1", "--port",
                     str(self.port), "--webui-port", str(self.webui_port))
        for worker in range(1, self.n_workers + 1):
            self.start_worker(worker, wait=False)
        self.wait_for_workers(self.n_workers, timeout)
        return self

    def start_worker(self, worker, wait=True, timeout=120):
        self._daemon("start", WORKER_CLASS, worker, "--host", "127.0.0.1",
                     "--webui-port", str(self.worker_ports[worker - 1]),
                     "--cores", str(self.cores), "--memory", self.memory,
                     "--work-dir", str(self.work_dir(worker)), self.master_url)
        if wait:
            self.wait_for_workers(self.n_workers, timeout)

    def stop_worker(self, worker):
        """Stop worker ``worker`` (1-based) and, with it, its executors."""
        self._daemon("stop", WORKER_CLASS, worker)

    def stop(self):
        for worker in range(self.n_workers, 0, -1):
            self.stop_worker(worker)
        self._daemon("stop", MASTER_CLASS, 1)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # ------------------------------------------------------------------ master state
    def state(self):
        """The master's ``/json/`` state: workers, active and completed applications."""
        with urllib.request.urlopen(f"{self.webui_url}/json/", timeout=10) as response:
            return json.loads(response.read().decode())

    def alive_workers(self):
        try:
            return sum(w.get("state") == "ALIVE" for w in self.state().get("workers", []))
        except OSError:
            return 0

    def wait_for_workers(self, count, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.alive_workers() >= count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{count} Spark worker(s) did not register with "
                           f"{self.master_url} within {timeout} s; see {self.base / 'log'}")

    def applications(self):
        """Every application the master knows, active and completed: a list of dicts
        with ``id``, ``name``, ``state``, ..."""
        state = self.state()
        return state.get("activeapps", []) + state.get("completedapps", [])

    def application(self, app_id):
        """The master's record of ``app_id``, or None if it never registered."""
        for app in self.applications():
            if app.get("id") == app_id:
                return app
        return None

    def wait_for_active_application(self, timeout=120):
        """The id of the first application seen running on the master."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                active = self.state().get("activeapps", [])
            except OSError:
                active = []
            if active:
                return active[0]["id"]
            time.sleep(0.2)
        raise TimeoutError(f"no application registered with {self.master_url}")

    # ------------------------------------------------------------------ executors
    def executor_logs(self, app_id):
        """``{worker: [stderr text of each executor it launched for app_id]}``."""
        logs = {}
        for worker in range(1, self.n_workers + 1):
            folder = self.work_dir(worker) / app_id
            logs[worker] = [p.read_text(errors="replace")
                            for p in sorted(folder.glob("*/stderr"))] if folder.is_dir() else []
        return logs

    def workers_that_ran_tasks(self, app_id):
        """Workers (1-based) whose executors logged a finished task of ``app_id``."""
        return sorted(worker for worker, texts in self.executor_logs(app_id).items()
                      if any("Finished task" in text for text in texts))

    def executor_pids(self, app_id, worker=None):
        """Process ids of the executor JVMs of ``app_id`` (on one worker if given)."""
        pids = []
        worker_url = (None if worker is None else
                      f"127.0.0.1:{self._worker_port(worker)}")
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = [a.decode(errors="replace") for a in cmdline]
            if "org.apache.spark.executor.CoarseGrainedExecutorBackend" not in args:
                continue
            if app_id not in args:
                continue
            if worker_url is not None and not any(worker_url in a for a in args):
                continue
            pids.append(int(proc.name))
        return pids

    def _worker_port(self, worker):
        """The RPC port of worker ``worker``, from the master's worker list."""
        for record in self.state().get("workers", []):
            if record.get("webuiaddress", "").endswith(f":{self.worker_ports[worker - 1]}"):
                return int(record["port"])
        raise LookupError(f"worker {worker} is not registered with {self.master_url}")

    def kill_executor(self, app_id, worker):
        """SIGKILL the executor of ``app_id`` on ``worker``; returns the killed pids."""
        pids = self.executor_pids(app_id, worker)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids


def main(argv=None):
    """``python -m lopq.spark.localcluster``: run a loopback standalone cluster until
    interrupted, printing its master URL."""
    import argparse
    parser = argparse.ArgumentParser(
        prog="python -m lopq.spark.localcluster",
        description="Run a Spark standalone cluster (one master, N workers) on this "
                    "machine's loopback until Ctrl-C, to try spark-submit --master "
                    "spark://... before a real cluster.",
        epilog="example:\n  python -m lopq.spark.localcluster --workers 2 --cores 1 "
               "--dir /tmp/lopq-cluster",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="worker count (default 2)")
    parser.add_argument("--cores", type=int, default=1, help="cores per worker (default 1)")
    parser.add_argument("--memory", default="2g", help="memory per worker (default 2g)")
    parser.add_argument("--dir", default="lopq-cluster",
                        help="folder for daemon logs, pid files and the workers' work "
                             "directories (default ./lopq-cluster)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.cores < 1:
        parser.error("--workers and --cores must be at least 1")
    cluster = StandaloneCluster(Path(args.dir).resolve(), workers=args.workers,
                                cores=args.cores, memory=args.memory)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        cluster.start()
        print(f"master {cluster.master_url} (web UI {cluster.webui_url}), "
              f"{args.workers} worker(s) of {args.cores} core(s); logs in "
              f"{cluster.base / 'log'}; Ctrl-C stops it", flush=True)
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
