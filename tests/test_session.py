"""The job's Spark: its Python processes import pyspark from the installed package
(`pipeline.spark_python`), and its SparkSession is made on demand."""

from __future__ import annotations

import os
import sys

import pyspark

from pipeline.session import SessionOnDemand, _workers_import
from pipeline.spark_python import installed_first


def _package(root, name="pyspark"):
    package = root / name
    (package / "python" / "lib").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "python" / "lib" / "pyspark.zip").write_bytes(b"")
    return str(package / "python" / "lib" / "pyspark.zip")


def test_only_the_installed_packages_own_zip_moves_behind_it(tmp_path):
    site = tmp_path / "site"
    own = _package(site)
    py4j = str(site / "pyspark" / "python" / "lib" / "py4j-src.zip")
    path = ["/jobs", own, py4j, str(site)]
    assert installed_first(path) == ["/jobs", py4j, str(site), own]

    other = _package(tmp_path / "spark-home" / "python")  # another Spark installation's zip
    assert installed_first(["/jobs", other, py4j, str(site)]) is None
    assert installed_first(["/jobs", own, str(tmp_path / "empty")]) is None  # no package
    assert installed_first(["/jobs", str(site)]) is None  # no zip on the path


def test_local_python_workers_import_pyspark_from_the_package(spark):
    assert spark.conf.get("spark.python.daemon.module") == "pipeline.spark_python"

    def where(_):
        import sys

        import pyspark

        yield sys.argv[0], pyspark.__file__

    seen = spark.sparkContext.parallelize([0, 1], 2).mapPartitions(where).collect()
    for daemon, package in seen:
        assert daemon.endswith(os.path.join("pipeline", "spark_python.py"))
        assert os.path.realpath(package) == os.path.realpath(pyspark.__file__)
        assert ".zip" not in package


def test_the_daemon_is_set_only_when_the_workers_can_import_it(tmp_path, monkeypatch):
    path = os.environ.get("PYTHONPATH")
    assert _workers_import("pipeline.spark_python", sys.executable, path)
    assert not _workers_import("pipeline.no_such_module", sys.executable, path)
    assert not _workers_import("pipeline.spark_python", "/nonexistent/python", path)

    # A package the driver alone reaches (a --py-files wheel on its path): not for workers.
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert not _workers_import("shipped", sys.executable, None)
    assert _workers_import("shipped", sys.executable, str(tmp_path))


def test_a_session_on_demand_is_made_when_something_other_than_its_context_is_used(spark):
    lazy = SessionOnDemand(spark.sparkContext)
    assert lazy.sparkContext is spark.sparkContext and not lazy.started
    assert lazy.sparkContext.parallelize(range(4), 2).sum() == 6  # an RDD job needs none
    assert not lazy.started

    assert lazy.range(3).count() == 3  # a DataFrame: the session is made, and is the one
    assert lazy.started and lazy.session is spark
    assert lazy.conf.get("spark.sql.shuffle.partitions") == spark.conf.get(
        "spark.sql.shuffle.partitions"
    )
