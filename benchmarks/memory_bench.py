"""Peak memory of the ingest and scoring jobs at 1x and 10x the rows.

    python benchmarks/memory_bench.py --rows 1000000 [--repeats 3]

Runs ``spark-submit jobs/ingest.py`` and ``jobs/score.py`` (local[2]) on ``rows / 100`` and
on ``rows / 10`` generated array-layout rows (1x and 10x: sizes at which every run of the
harness stays affordable), and samples the resident memory of every process
of the job five times a second: the driver's JVM (which holds the executor in local mode),
the driver's Python process and the Python workers. Memory that stays bounded as the data
grows shows as a growth ratio near 1. Training's per-worker memory is measured by
``train_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA_DIR = HERE / "data"
ROLES = ("driver_jvm", "driver_python", "python_workers")

log = logging.getLogger("benchmarks.memory")


def run(
    rows: int, repeats: int = 3, data_dir: str | Path | None = None, spark=None
) -> dict[str, Any]:
    """Peak RSS (MB) per process role of ingest and scoring at rows/10 and rows."""
    sys.path.insert(0, str(HERE))
    import ingest_bench
    import score_bench
    import timing

    from pipeline.config import Config

    data_dir = Path(data_dir or DEFAULT_DATA_DIR)
    data_dir.mkdir(parents=True, exist_ok=True)
    session = spark or timing.session("memory-bench")
    sizes = {"1x": max(rows // 100, 1000), "10x": max(rows // 100, 1000) * 10}
    raws = {
        name: ingest_bench._raw_data(session, Config(), data_dir, n, "array", 0, False)
        for name, n in sizes.items()
    }
    model_dir = score_bench._model_dir(session, data_dir)
    result: dict[str, Any] = {"rows": sizes}
    with tempfile.TemporaryDirectory(dir=data_dir, prefix="memory-") as scratch:
        for stage in ("ingest", "score"):
            result[stage] = {}
            for name, raw in raws.items():
                peaks: dict[str, list[float]] = {role: [] for role in (*ROLES, "total")}
                for attempt in range(repeats):
                    features = f"{scratch}/features-{name}"
                    if stage == "ingest":
                        args = ["ingest.py", "--input", raw, "--output", features]
                    else:
                        if attempt == 0 and not Path(features).exists():
                            _job(["ingest.py", "--input", raw, "--output", features])
                        args = ["score.py", "--input", features, "--model-dir", model_dir,
                                "--output", f"{scratch}/pred-{name}"]  # fmt: skip
                    for role, peak in _job(args).items():
                        peaks[role].append(peak)
                    log.info("%s %s run %d: %s", stage, name, attempt + 1,
                             {r: round(v[-1]) for r, v in peaks.items()})  # fmt: skip
                result[stage][name] = {role: timing.stats(v, 1) for role, v in peaks.items()}
            for role in (*ROLES, "total"):
                small = result[stage]["1x"][role]["median"]
                large = result[stage]["10x"][role]["median"]
                result[stage][f"ratio_{role}_10x_over_1x"] = (
                    round(large / small, 3) if small else None
                )
    if spark is None:
        session.stop()
    return result


def _job(args: Sequence[str]) -> dict[str, float]:
    """Run one job under spark-submit; the peak RSS in MB of each process role."""
    env = dict(
        os.environ,
        PYSPARK_PYTHON=sys.executable,
        SPARK_CONF_DIR=str(REPO / "conf"),
        TF_CPP_MIN_LOG_LEVEL="2",
        SPARK_LOCAL_IP="127.0.0.1",
    )
    command = [str(Path(sys.executable).with_name("spark-submit")), "--master", "local[2]",
               str(REPO / "jobs" / args[0]), *args[1:]]  # fmt: skip
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peaks = dict.fromkeys((*ROLES, "total"), 0.0)
    done = threading.Event()
    output: list[str] = []
    reader = threading.Thread(target=lambda: (output.append(job.stdout.read()), done.set()))
    reader.start()
    while not done.wait(0.2):
        sample = _sample(job.pid)
        for role, mb in sample.items():
            peaks[role] = max(peaks[role], mb)
    reader.join()
    if job.wait() != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{output[0][-3000:]}")
    return peaks


def _sample(pid: int) -> dict[str, float]:
    """Current RSS in MB of the job's processes, summed by role (workers: the largest)."""
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    found = dict.fromkeys((*ROLES, "total"), 0.0)
    for process in processes:
        try:
            rss = process.memory_info().rss / 2**20
            command = " ".join(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "java" in process.name() or "org.apache.spark" in command:
            found["driver_jvm"] += rss
        elif "pyspark.daemon" in command or "pyspark/daemon" in command or "worker" in command:
            found["python_workers"] = max(found["python_workers"], rss)
        elif "jobs/" in command:
            found["driver_python"] += rss
        found["total"] += rss
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="10x is rows / 10")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(json.dumps(run(args.rows, args.repeats, args.data_dir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
