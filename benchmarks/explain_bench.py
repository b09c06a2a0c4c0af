"""Explaining against scoring, on the same rows, machine and command form.

    python benchmarks/explain_bench.py --rows 100000 [--runs 3] [--workdir benchmarks/data]

Builds N rows of ingested features once (as `score_bench` does) and times, in
interleaved rounds so that load from other work on the machine falls on both alike,
`run_scoring` and `run_explain` with the defaults (32 integrated-gradients steps a row,
all 784 attributions written). The target of the explain issue: explain / score <= 5.
Every figure is the median, min and max of `--runs` rounds after one warm-up round
(``first_run``), which includes the TensorFlow import and, for explaining, the XLA
compilation in each Python worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics

import score_bench
import timing

log = logging.getLogger("explain_bench")


def run_benchmark(
    rows: int = 100_000,
    runs: int = 3,
    workdir: str | os.PathLike = "benchmarks/data",
    master: str = "local[2]",
    spark=None,
) -> dict:
    """Median, min and max seconds of scoring and explaining, and their ratio."""
    from pipeline.config import Config
    from pipeline.explain.run import run_explain
    from pipeline.scoring import run_scoring

    spark, workdir, features, model_dir = score_bench.setup(
        rows, workdir, master, spark, "explain-bench"
    )
    config = Config()
    out = workdir / "out"
    steps = {
        "score": lambda: run_scoring(spark, config, features, model_dir, str(out / "pred")),
        "explain": lambda: run_explain(spark, config, features, model_dir, str(out / "expl")),
    }
    first = {name: timing.seconds(step)[0] for name, step in steps.items()}
    timings: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(runs):
        for name, step in steps.items():
            timings[name].append(timing.seconds(step)[0])
        log.info("%d rows, round %d: %s", rows, round_ + 1, score_bench._brief(timings, -1))
    per_round = [e / s for e, s in zip(timings["explain"], timings["score"], strict=True)]
    ratio = statistics.median(timings["explain"]) / statistics.median(timings["score"])
    return {
        "rows": rows,
        "runs": runs,
        "master": spark.sparkContext.master,
        "steps": config.explain.steps,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "seconds": {name: timing.stats(t) for name, t in timings.items()},
        "first_run": {name: round(t, 3) for name, t in first.items()},
        "ratio_explain_vs_score": round(ratio, 3),
        "ratio_explain_vs_score_per_round": timing.stats(per_round),
        "meets_target": ratio <= 5.0,
    }


def run(rows: int, repeats: int, data_dir: str | None = None, spark=None) -> dict:
    """Entry point for ``benchmarks/run.py`` (at most 100,000 rows: the issue's size)."""
    return run_benchmark(min(rows, 100_000), repeats, data_dir or "benchmarks/data", spark=spark)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default="benchmarks/data")
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(json.dumps(run_benchmark(args.rows, args.runs, args.workdir, args.master), indent=2))


if __name__ == "__main__":
    main()
