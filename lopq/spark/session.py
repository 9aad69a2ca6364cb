"""The Spark session the jobs run in: the launcher's, never one of our own choosing.

Whatever started Python decides where the work runs: ``spark-submit --master ...``
(with its ``--conf``s, ``--deploy-mode`` and ``spark-defaults.conf``), the ``pyspark``
shell, or a user's own ``SparkSession``. lopq only fills in what nobody set:

- ``local[*]`` when no master is set at all (``python spark/train_model.py ...``);
- one numba/BLAS thread per task (``spark.executorEnv.*_NUM_THREADS``), because Spark
  already runs one task per core;
- the driver's address when ``SPARK_LOCAL_IP`` asks for loopback;
- on Spark 4.1 and later, Unix domain sockets between each executor and its Python
  workers (``spark.python.unix.domain.socket.enabled``) instead of loopback TCP. On a
  Linux 6.18 VM, loopback TCP stalled for good twice in about 40 runs of a 1M-row
  ``mapInArrow`` job (``LOPQSparkModel.transform``). Both sides had full send queues, and
  each retransmitted at the 120 s maximum back-off. A Unix socket has no windows or
  retransmits to stall. ``--conf spark.python.unix.domain.socket.enabled=false`` turns it
  off.

Library functions take the caller's ``SparkContext`` or ``SparkSession`` and never
replace or stop it.
"""

import logging
import os
import socket

logger = logging.getLogger(__name__)

#: Thread pools of the native libraries the kernels call, pinned to one per task.
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS")


def as_context(spark):
    """The ``SparkContext`` of a ``SparkContext`` or ``SparkSession``."""
    from pyspark import SparkContext
    if isinstance(spark, SparkContext):
        return spark
    context = getattr(spark, "sparkContext", None)
    if isinstance(context, SparkContext):
        return context
    raise TypeError(f"expected a SparkContext or SparkSession, got {type(spark).__name__}")


def driver_threads(sc):
    """Threads the driver may use for its own numerical work: the cores of ``local[N]``
    (the executors idle meanwhile), else ``spark.driver.cores`` (default 1)."""
    sc = as_context(sc)
    if sc.master.startswith("local"):
        return max(1, sc.defaultParallelism)
    return max(1, int(sc.getConf().get("spark.driver.cores", "1")))


def launcher_conf():
    """The configuration the launcher set, read from the JVM once it is running.

    A ``SparkConf()`` built before the JVM gateway exists sees none of spark-submit's
    settings; starting the gateway first (as ``SparkContext`` does) makes them visible.
    """
    from pyspark import SparkConf, SparkContext
    SparkContext._ensure_initialized()
    return SparkConf()


def spark_version():
    """``(major, minor)`` of the installed pyspark, ``(0, 0)`` if unreadable."""
    import re

    import pyspark
    found = re.match(r"(\d+)\.(\d+)", pyspark.__version__)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def defaults_to_add(conf, app_name):
    """``(key, value)`` settings lopq adds to ``conf``: only keys that nobody set."""
    added = []

    def default(key, value):
        if not conf.contains(key):
            added.append((key, value))

    default("spark.master", "local[*]")
    if conf.get("spark.app.name", "pyspark-shell") == "pyspark-shell":  # pyspark's filler
        added.append(("spark.app.name", app_name))
    for var in THREAD_VARIABLES:
        default(f"spark.executorEnv.{var}", os.environ.get(f"LOPQ_EXECUTOR_{var}", "1"))
    if spark_version() >= (4, 1) and hasattr(socket, "AF_UNIX"):
        default("spark.python.unix.domain.socket.enabled", "true")
    local_ip = os.environ.get("SPARK_LOCAL_IP")
    if local_ip and not conf.contains("spark.driver.host"):
        default("spark.driver.host", local_ip)
        default("spark.driver.bindAddress", local_ip)
    return added


def get_session(app_name="lopq"):
    """The active ``SparkSession``, or a new one configured by the launcher.

    Settings from spark-submit, ``spark-defaults.conf`` and ``PYSPARK_SUBMIT_ARGS`` win;
    lopq's defaults (module docstring) fill only the gaps. Returns ``(session, created)``
    where ``created`` tells whether this call started it (and so should stop it).
    """
    from pyspark import SparkContext
    from pyspark.sql import SparkSession
    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    if SparkContext._active_spark_context is not None:  # a user's context, no session yet
        return SparkSession.builder.getOrCreate(), False
    builder = SparkSession.builder
    for key, value in defaults_to_add(launcher_conf(), app_name):
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    context = session.sparkContext
    if not context.getConf().contains("spark.log.level"):
        context.setLogLevel(os.environ.get("LOPQ_SPARK_LOG_LEVEL", "WARN"))
    return session, True


class driver_session:
    """``with driver_session(name) as sc``: what a ``spark/*.py`` driver runs in.

    The active session if there is one (left running), else a new one from
    `get_session`, stopped on exit. Logs where the work runs, so a user can see that
    ``--master`` took effect.
    """

    def __init__(self, app_name):
        self.app_name = app_name
        self.session = None
        self.created = False

    def __enter__(self):
        self.session, self.created = get_session(self.app_name)
        sc = self.session.sparkContext
        logger.info("Spark application %s (%s) on master %s", sc.applicationId,
                    sc.appName, sc.master)
        return sc

    def __exit__(self, *exc):
        if self.created:
            self.session.stop()
        return False
