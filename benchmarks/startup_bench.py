"""How soon a job's first Python stage runs: pyspark's own daemon against ours.

    python benchmarks/startup_bench.py --repeats 5

In local mode the session sets ``spark.python.daemon.module`` to
``pipeline.spark_python``, which imports pyspark from its installed package (with
compiled bytecode) rather than from ``spark-submit``'s ``pyspark.zip``. Each repeat runs,
in turn, one ``spark-submit`` process with that default and one with
``--conf spark.python.daemon.module=pyspark.daemon`` (Spark's own), so that load from
other work falls on both alike. Each process builds the session as the jobs do
(`pipeline.session.build_session`), then times a two-task Python job on cold worker
processes and the same job again on warm ones. Printed: the seconds of each, per
daemon, as median (min-max), and the paired ratio of the cold jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each daemon and the spark-submit options that choose it (ours is the local default).
DAEMONS = {
    "pipeline.spark_python": [],
    "pyspark.daemon": ["--conf", "spark.python.daemon.module=pyspark.daemon"],
}


def child() -> None:
    """Inside ``spark-submit``: the two timed Python jobs, printed as one JSON line."""
    from pipeline.config import SparkSettings
    from pipeline.session import build_session

    spark = build_session(SparkSettings(log_level="ERROR"))
    seconds = []
    for _ in range(2):
        started = time.monotonic()
        spark.sparkContext.parallelize(range(2), 2).mapPartitions(lambda it: [sum(it)]).collect()
        seconds.append(time.monotonic() - started)
    daemon = spark.conf.get("spark.python.daemon.module")
    print(json.dumps({"daemon": daemon, "cold": seconds[0], "warm": seconds[1]}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child()
        return 0
    submit = Path(sys.executable).parent / "spark-submit"
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_CONF_DIR=str(ROOT / "conf"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    runs: dict[str, list[dict]] = {name: [] for name in DAEMONS}
    for repeat in range(args.repeats):
        for name, options in DAEMONS.items():
            command = [str(submit) if submit.exists() else "spark-submit", "--master", "local[*]"]
            command += [*options, str(Path(__file__).resolve()), "--child"]
            done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if result["daemon"] != name:
                print(f"expected daemon {name}, ran {result['daemon']}", file=sys.stderr)
                return 1
            runs[name].append(result)
            print(f"repeat {repeat + 1}: {name:<22} first Python job {result['cold']:.2f} s, "
                  f"second {result['warm']:.2f} s")  # fmt: skip
    for name, results in runs.items():
        for key in ("cold", "warm"):
            values = [r[key] for r in results]
            print(f"{name:<22} {key:<5} {statistics.median(values):.2f} s "
                  f"({min(values):.2f}-{max(values):.2f})")  # fmt: skip
    pairs = zip(runs["pipeline.spark_python"], runs["pyspark.daemon"], strict=True)
    ratios = [ours["cold"] / theirs["cold"] for ours, theirs in pairs]
    print(f"first Python job, ours / pyspark's: {statistics.median(ratios):.2f} "
          f"({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
