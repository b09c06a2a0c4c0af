"""The one place that builds a SparkSession from the config.

Under ``spark-submit`` the session takes what spark-submit set (master, ``--conf``) and
our settings only fill the gaps. Started from plain Python, the job launches Spark in
local mode itself, after checking that Java is there.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from pipeline.config import SparkSettings
from pipeline.errors import EnvironmentProblem

log = logging.getLogger(__name__)

MIN_JAVA = 17
# The project's conf/ (in a source checkout): its log4j2.properties keeps the console quiet.
_PROJECT_CONF = Path(__file__).resolve().parent.parent / "conf"
_LOG4J_FILE = "log4j2.properties"

# Spark's Python daemon for workers of a local master (see `pipeline.spark_python`).
_DAEMON_MODULE = "spark.python.daemon.module"
_DAEMON = "pipeline.spark_python"

# Our defaults; anything spark-submit or the config's `spark.conf` set wins.
_DEFAULT_CONF = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.shuffle.partitions": "8",
    "spark.sql.adaptive.enabled": "true",
    "spark.sql.parquet.compression.codec": "snappy",
    # Plans over the 784 pixel columns of the Kaggle layout are long; do not warn about it.
    "spark.sql.debug.maxToStringFields": "1000",
    # Tasks that hold a Python worker with TensorFlow: one at a time per core.
    "spark.python.worker.reuse": "true",
}


def build_session(settings: SparkSettings, *, on_demand: bool = False):
    """Return the active SparkSession, creating it from `settings` if needed.

    `on_demand` (the train and score jobs): when no session exists yet, start the
    SparkContext and return a `SessionOnDemand`, which makes the SparkSession only when
    something asks for it."""
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    launched_by_submit = "PYSPARK_GATEWAY_PORT" in os.environ
    if not launched_by_submit:
        check_java()
        if "SPARK_CONF_DIR" not in os.environ and (_PROJECT_CONF / _LOG4J_FILE).is_file():
            # The JVM about to start reads the project's quiet logging (as under the Makefile).
            os.environ["SPARK_CONF_DIR"] = str(_PROJECT_CONF)

    # Connect to (or start) the JVM first: only then does SparkConf() see the
    # --master and --conf values that spark-submit passed as system properties.
    SparkContext._ensure_initialized()
    conf = SparkConf()
    _set_jvm_log_level(conf, settings.log_level)
    if not conf.contains("spark.master"):
        conf.setMaster(settings.master)
    if not conf.contains("spark.app.name"):
        conf.setAppName(settings.app_name)
    for key, value in {**_DEFAULT_CONF, **settings.conf}.items():
        conf.setIfMissing(key, value)
    conf.setIfMissing("spark.ui.showConsoleProgress", str(settings.show_progress).lower())

    master = conf.get("spark.master")
    if master.startswith("local") and "PYSPARK_PYTHON" not in os.environ:
        # Python workers otherwise start the system python3, without our packages.
        os.environ["PYSPARK_PYTHON"] = sys.executable
    starting = SparkContext._active_spark_context is None  # else getOrCreate keeps its conf
    if starting and master.startswith("local") and not conf.contains(_DAEMON_MODULE):
        python = conf.get("spark.pyspark.python", None) or os.environ["PYSPARK_PYTHON"]
        # The workers' path is the JVM's, without the driver's --py-files.
        path = SparkContext._jvm.java.lang.System.getenv("PYTHONPATH")
        if _workers_import(_DAEMON, python, path):
            conf.set(_DAEMON_MODULE, _DAEMON)

    if on_demand and SparkSession.getActiveSession() is None:
        spark = SessionOnDemand(SparkContext.getOrCreate(conf), conf)
    else:
        spark = SparkSession.builder.config(conf=conf).getOrCreate()
    sc = spark.sparkContext
    sc.setLogLevel(settings.log_level)
    ui = sc.uiWebUrl
    log.info("Spark %s, master %s%s", sc.version, master, f", UI {ui}" if ui else "")
    return spark


class SessionOnDemand:
    """A job's SparkSession, made the first time something other than its SparkContext
    is asked for; until then, only the SparkContext runs.

    On a fresh JVM the SparkSession takes seconds (Spark SQL's classes load then: about
    as long as the SparkContext itself), and the file routes of training and scoring
    need none: their RDD jobs read and write the files with pyarrow. Any other
    attribute is the session's, made then (`started` says whether it has been).
    """

    def __init__(self, sc, conf=None) -> None:
        self.sparkContext = sc
        self._conf = conf  # the SparkConf the session is built with, as build_session's
        self._session = None
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._session is not None

    @property
    def session(self):
        """The SparkSession, made now if it was not (from the conf the context started with)."""
        with self._lock:
            if self._session is None:
                from pyspark.sql import SparkSession

                log.debug("starting the SparkSession (a DataFrame is needed)")
                builder = SparkSession.builder
                self._session = (
                    builder.config(conf=self._conf) if self._conf is not None else builder
                ).getOrCreate()
            return self._session

    def __getattr__(self, name: str):  # only for what this class does not define
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.session, name)

    def __repr__(self) -> str:
        return f"SessionOnDemand({self.sparkContext!r}, started={self.started})"


def _workers_import(module: str, python: str, path: str | None) -> bool:
    """Whether `python`, started as a local master starts its Python workers (this
    working directory, `path` as PYTHONPATH, before any task ships files), imports `module`.

    Asked of the interpreter itself (40 ms): the package may be installed, on PYTHONPATH
    or in the working directory for the workers, or reachable by the driver alone (a
    ``--py-files`` wheel, a path the driver added).
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if path:
        env["PYTHONPATH"] = path
    try:
        done = subprocess.run(
            [python, "-c", f"import {module}"],
            capture_output=True,
            env=env,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _set_jvm_log_level(conf, level: str) -> None:
    """Quiet Spark's own logging before the context starts, unless a log4j2 config is given."""
    from pyspark import SparkContext

    jvm = SparkContext._jvm
    if jvm.java.lang.System.getProperty("log4j2.configurationFile") is not None:
        return
    # Let Spark install its default log4j2 profile first, then lower the level it set.
    conf._jconf.initializeLogIfNecessary(False)
    log4j = jvm.org.apache.logging.log4j
    log4j.core.config.Configurator.setRootLevel(log4j.Level.toLevel(level))


def check_java() -> None:
    """Fail with one clear line when no usable Java runtime is installed."""
    java_home = os.environ.get("JAVA_HOME")
    java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    if not java or not os.path.exists(java):
        where = f"JAVA_HOME={java_home} has no bin/java" if java_home else "no java on PATH"
        raise EnvironmentProblem(
            f"Spark needs Java {MIN_JAVA} or newer and found none ({where}): install a JDK "
            f"(e.g. apt-get install openjdk-{MIN_JAVA}-jre-headless) or set JAVA_HOME"
        )
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvironmentProblem(f"could not run {java} -version: {exc}") from exc
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match:
        major = int(match.group(1))
        if major == 1 and match.group(2):  # "1.8.0" style
            major = int(match.group(2))
        if major < MIN_JAVA:
            raise EnvironmentProblem(
                f"Spark needs Java {MIN_JAVA} or newer; {java} is Java {major}: "
                f"install a newer JDK or point JAVA_HOME at one"
            )


if __name__ == "__main__":  # `python -m pipeline.session`: the Makefile's Java check
    try:
        check_java()
    except EnvironmentProblem as problem:
        sys.exit(f"error: {problem}")


_STARTED: list[bool] = []  # a job of this process has asked for its start already


def start_seconds() -> float | None:
    """Seconds from this process's start (or from the ``spark-submit`` JVM that launched
    it, its Java parent) until now: what a user waited before the first job of the process
    began. None for every later call: a second job in one process waited for no start."""
    import time

    import psutil

    if _STARTED:
        return None
    _STARTED.append(True)
    process = psutil.Process()
    born = process.create_time()
    parent = process.parent()
    if parent is not None and "java" in parent.name().lower():
        born = min(born, parent.create_time())
    return time.time() - born
