"""Faults injected into real jobs: executors killed mid-run, the driver killed mid-write.

These run the jobs under spark-submit on `local-cluster` (real executor JVMs) and kill
processes while they work; each checks the output against a clean run's.
"""

from __future__ import annotations

import time

import pytest

from pipeline.config import Config
from pipeline.errors import InputDataError
from pipeline.ingest import read_features, run_ingest
from tests import faults

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROWS = 120_000


@pytest.fixture(scope="module")
def raw_array(spark, tmp_path_factory) -> str:
    """Augmented digits in the array layout, in several files, with an id column."""
    from pipeline.generate import run_generate

    out = tmp_path_factory.mktemp("faults") / "raw"
    config = Config().with_overrides({"generate": {"rows_per_file": ROWS // 8}})
    run_generate(spark, config, ROWS, str(out), layout="array", seed=11)
    return str(out)


@pytest.fixture(scope="module")
def clean_ingest(spark, raw_array, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("clean") / "features"
    run_ingest(spark, Config(), raw_array, str(out))
    return faults.fingerprint(spark.read.parquet(str(out)))


def test_executor_killed_during_ingest_changes_nothing(spark, raw_array, clean_ingest, tmp_path):
    out = tmp_path / "features"
    job = faults.submit(
        "ingest.py",
        "--input",
        raw_array,
        "--output",
        str(out),
        "--set",
        "ingest.max_rows_per_file=5000",
    )
    try:
        faults.wait_for(lambda: len(faults.executors(job)) == 2, 120, "two executors", job)
        faults.wait_for(lambda: faults.staging_dirs(out), 120, "the write to start", job)
        time.sleep(1.0)
        victims = faults.executors(job)
        assert job.poll() is None, "the job finished before the fault could be injected"
        victims[0].kill()
        code, log = faults.finish(job)
    finally:
        if job.poll() is None:
            faults.kill_process_group(job)
    assert code == 0, log[-4000:]
    assert "Lost executor" in log, log[-4000:]  # the fault really hit the job
    assert faults.fingerprint(spark.read.parquet(str(out))) == clean_ingest
    assert clean_ingest["rows"] == clean_ingest["keys"] == ROWS  # one row per input row
    leftovers = [p for p in out.rglob("*") if "_temporary" in p.parts or p.name.startswith(".")]
    assert [p for p in leftovers if not p.name.endswith(".crc")] == []
    assert faults.staging_dirs(out) == []


def test_driver_killed_during_write_leaves_nothing_that_looks_complete(
    spark, raw_array, clean_ingest, tmp_path
):
    out = tmp_path / "features"
    job = faults.submit("ingest.py", "--input", raw_array, "--output", str(out), master="local[2]")
    try:
        faults.wait_for(lambda: faults.staging_dirs(out), 120, "the write to start", job)
        time.sleep(1.0)
        assert job.poll() is None, "the job finished before the fault could be injected"
        faults.kill_process_group(job)
    finally:
        if job.poll() is None:
            faults.kill_process_group(job)
    assert not out.exists()
    with pytest.raises(InputDataError, match="input not found"):
        read_features(spark, str(out))

    rerun = faults.submit(
        "ingest.py", "--input", raw_array, "--output", str(out), master="local[2]"
    )
    code, log = faults.finish(rerun)
    assert code == 0, log[-4000:]
    assert faults.fingerprint(spark.read.parquet(str(out))) == clean_ingest
    assert faults.staging_dirs(out) == []  # the rerun removed the dead run's staging directory
