"""The jobs as users run them: spark-submit subprocesses, --help, exit codes, one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from tests.faults import REPO, run_job
from tests.faults import job_env as _env

JOBS = sorted(p.name for p in (REPO / "jobs").glob("*.py"))
# The config section each job's --set example should come from.
OWN_SECTION = {
    "evaluate.py": "score",
    "explain.py": "explain",
    "generate.py": "generate",
    "ingest.py": "ingest",
    "score.py": "score",
    "train.py": "train",
    "tune.py": "tune",
}

# The option naming each job's output, whose help says what an existing path there gets.
OUTPUT_OPTION = {
    "evaluate.py": "--predictions",
    "explain.py": "--output",
    "generate.py": "--output",
    "ingest.py": "--output",
    "score.py": "--output",
    "train.py": "--model-dir",
    "tune.py": "--output",
}


def _python_job(name: str, *args: str, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or _env(),
        cwd=REPO,
    )


@pytest.mark.parametrize("job", JOBS)
def test_every_job_has_help(job):
    """Usage, exit codes, a valid --set example from the job's own section, and (for the
    jobs that write) what an existing output path gets."""
    result = _python_job(job, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert "exit codes:" in result.stdout
    assert "--set KEY=VALUE" in result.stdout
    example = re.search(r"e\.g\.\s+--set\s+(\S+)", result.stdout)
    assert example, result.stdout
    assert example.group(1).split(".")[0] == OWN_SECTION[job]
    load_config(overrides=[example.group(1)])  # the example is a valid setting
    if job in OUTPUT_OPTION:
        option = OUTPUT_OPTION[job]
        text = " ".join(result.stdout.split())
        metavar = option.strip("-").upper().replace("-", "_")
        described = text[text.rindex(f"{option} {metavar} ") :]
        assert "refused with exit code 2 and left untouched" in described[:700]


def test_invalid_config_stops_before_spark_with_exit_2(tmp_path):
    result = _python_job(
        "ingest.py",
        "--input",
        "x",
        "--output",
        str(tmp_path / "o"),
        "--set",
        "ingest.max_reject_fraction=2",
    )
    assert result.returncode == 2
    assert "ingest.max_reject_fraction" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Spark" not in result.stderr  # nothing was started


def test_missing_java_is_one_clear_line(tmp_path):
    env = _env(JAVA_HOME=str(tmp_path / "no-jdk"), PATH=str(Path(sys.executable).parent))
    result = _python_job("ingest.py", "--input", "x", "--output", str(tmp_path / "o"), env=env)
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: Spark needs Java 17 or newer")
    assert "install a JDK" in lines[-1]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_spark_submit_ingest_on_the_sample(tmp_path, sample_file):
    out = tmp_path / "features"
    result = run_job(
        "ingest.py", "--input", sample_file, "--output", str(out), cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "_report.json").read_text())
    assert (report["rows_in"], report["rows_out"], report["rows_rejected"]) == (6000, 6000, 0)
    assert (out / "_SUCCESS").exists()
    assert "rows in" in result.stdout and "6,000" in result.stdout


# Two inputs the ingest job cannot read: (the file written, its bytes, what the one error
# line says, whether the console is free of Java stack traces). --input names the file's
# top entry: a folder holding it, or the file itself. A corrupt Parquet file fails a Spark
# task, and Spark's executor logs that task's exception; a JSON file is refused before.
UNREADABLE = {
    "corrupt-parquet": (
        "raw/bad.parquet",
        b"PAR1" + b"\0" * 100 + b"PAR1",
        ["bad.parquet", "corrupt"],
        False,
    ),
    "json": (
        "digits.json",
        b'{"label": 1, "pixel0": 0}\n',
        ["digits.json is not a Parquet file", "CSV"],
        True,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(UNREADABLE))
def test_spark_submit_ingest_names_an_unreadable_input_in_one_line_and_exits_4(tmp_path, case):
    name, content, said, no_java_trace = UNREADABLE[case]
    raw = tmp_path / name
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_bytes(content)
    result = run_job(
        "ingest.py",
        "--input",
        str(tmp_path / Path(name).parts[0]),
        "--output",
        str(tmp_path / "out"),
        master="local[1]",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 4, result.stderr[-3000:]
    # spark-submit merges the Python driver's stderr into its stdout
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    for fragment in said:
        assert fragment in errors[0]
    if no_java_trace:
        assert "\tat " not in output and "Exception" not in output
    assert not (tmp_path / "out").exists()
