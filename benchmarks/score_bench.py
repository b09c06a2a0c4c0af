"""Scoring speed against the two yardsticks of the scoring issue, on the same data and machine.

    python benchmarks/score_bench.py --rows 300000 1000000 [--runs 3] [--workdir benchmarks/data]

For each size, builds N rows of ingested features once (the ingested sample repeated,
with an `id` column, in 50,000-row files, marked as an ingest output) and times, in
interleaved rounds so that load from other jobs on the machine falls on every figure
alike:

- ``score``: the whole scoring job, `run_scoring` with the defaults: the executors read
  the ingest output's row groups themselves, check them, run the model; Spark writes the
  predictions; then the evaluation report, both plots and the atomic publish;
- ``score_spark_reader``: the same job with ``score.ingested_reader=spark`` (the route
  before: Spark reads the features and hands them to Python over Arrow);
- ``copy``: a plain Spark Parquet read -> write of the same features data (all columns);
- ``mllib``: Spark MLlib ``MultilayerPerceptronClassifier`` ([784, 32, 10]) ``transform``
  plus a write of id, label, prediction and probabilities, reading the same Parquet.
  The conversion of the `features` array to the vector MLlib requires is included, as
  our job's conversion of the same column to a NumPy matrix is;
- ``predict``: Keras ``model.predict`` over the same rows already in memory as float32
  (the floor: no reading, no writing, no evaluation).

The scoring jobs' own phase timings (``seconds_by_phase`` of their reports: prepare,
score_and_write, plots) are summarised under ``phases``.

Every figure is the median, min and max of `--runs` rounds, after one warm-up round
whose times are reported apart (``first_run``): it includes the JVM's JIT warm-up and,
for scoring, the TensorFlow import and model build in each Python worker, which a
one-off ``spark-submit`` pays once per executor Python worker.

The targets: ``score / copy <= 1`` and ``score / mllib <= 2/3``. `run_benchmark` returns
the figures as a dict; `run` is the entry point of ``benchmarks/run.py``; the command
prints JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import timing

log = logging.getLogger("score_bench")

SAMPLE_ROWS = 6000
ROWS_PER_FILE = 50_000
MEASUREMENTS = ("score", "score_spark_reader", "copy", "mllib", "predict")


def run_benchmark(
    rows: int = 300_000,
    runs: int = 3,
    workdir: str | os.PathLike = "benchmarks/data",
    master: str = "local[2]",
    batch_size: int | None = None,
    measurements: tuple[str, ...] = MEASUREMENTS,
    spark=None,
) -> dict:
    """Median, min and max seconds of each measurement and the two ratios of the targets."""
    from pipeline.config import Config

    spark, workdir, features, model_dir = setup(rows, workdir, master, spark, "score-bench")
    config = Config()
    if batch_size is not None:
        config = config.with_overrides({"score": {"batch_size": batch_size}})
    spark_reader = config.with_overrides({"score": {"ingested_reader": "spark"}})
    mllib_model = _mllib_model(spark, workdir)
    x = _in_memory_rows(spark, workdir, rows)

    from pipeline.scoring import run_scoring

    out = workdir / "out"
    steps: dict[str, Callable[[], object]] = {
        "score": lambda: run_scoring(spark, config, features, model_dir, str(out / "pred")),
        "score_spark_reader": lambda: run_scoring(
            spark, spark_reader, features, model_dir, str(out / "pred-spark")
        ),
        "copy": lambda: _copy(spark, features, str(out / "copy")),
        "mllib": lambda: _mllib(spark, mllib_model, features, str(out / "mllib")),
        "predict": lambda: _keras_predict(model_dir, spark, x),
    }
    steps = {name: steps[name] for name in measurements}
    first = {name: timing.seconds(step)[0] for name, step in steps.items()}
    timings: dict[str, list[float]] = {name: [] for name in steps}
    phases: dict[str, dict[str, list[float]]] = {}
    for round_ in range(runs):
        for name, step in steps.items():
            seconds, value = timing.seconds(step)
            timings[name].append(seconds)
            report = getattr(value, "report", None)
            for phase, t in (report or {}).get("seconds_by_phase", {}).items():
                phases.setdefault(name, {}).setdefault(phase, []).append(t)
        log.info("%d rows, round %d: %s", rows, round_ + 1, _brief(timings, -1))

    result: dict = {
        "rows": rows,
        "runs": runs,
        "master": spark.sparkContext.master,
        "default_parallelism": spark.sparkContext.defaultParallelism,
        "batch_size": config.score.batch_size,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "seconds": {name: timing.stats(t) for name, t in timings.items()},
        "first_run": {name: round(t, 3) for name, t in first.items()},
        "phases": {
            name: {phase: timing.stats(t) for phase, t in by_phase.items()}
            for name, by_phase in phases.items()
        },
    }
    med = {name: statistics.median(t) for name, t in timings.items()}
    for base in ("copy", "mllib", "predict"):
        if "score" in med and base in med:
            result[f"ratio_score_vs_{base}"] = round(med["score"] / med[base], 3)
            per_round = [s / b for s, b in zip(timings["score"], timings[base], strict=True)]
            result[f"ratio_score_vs_{base}_per_round"] = timing.stats(per_round)
    if "ratio_score_vs_copy" in result and "ratio_score_vs_mllib" in result:
        result["meets_copy_target"] = result["ratio_score_vs_copy"] <= 1.0
        result["meets_mllib_target"] = result["ratio_score_vs_mllib"] <= 2 / 3
    return result


def run(rows: int, repeats: int, data_dir: str | None = None, spark=None) -> dict:
    """Entry point for ``benchmarks/run.py``."""
    return run_benchmark(rows, repeats, data_dir or "benchmarks/data", spark=spark)


def _brief(timings: dict[str, list[float]], index: int) -> str:
    return ", ".join(f"{name} {t[index]:.2f} s" for name, t in timings.items())


def setup(rows: int, workdir: str | os.PathLike, master: str, spark, app_name: str):
    """(session, work directory, `rows` rows of ingested features, a model directory):
    the data and model are made in `workdir` once and reused."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spark = spark or timing.session(app_name, master=master, log_level="ERROR")
    return spark, workdir, _features_data(spark, workdir, rows), _model_dir(spark, workdir)


def _features_data(spark, workdir: Path, rows: int) -> str:
    """N rows of ingested features: the ingested sample repeated, `id` 0..N-1. Built once."""
    from pyspark.sql import functions as F

    from pipeline.config import Config, IngestSettings
    from pipeline.ingest import REPORT_FILE, run_ingest
    from pipeline.sample import sample_path
    from pipeline.storage import Storage

    target = workdir / f"features-{rows}"
    report = {
        "status": "ok",
        "note": f"benchmark data: the ingested sample repeated to {rows} rows",
        "id_columns": ["id"],
        "preprocessing": IngestSettings().model_dump(mode="json"),
    }
    if (target / "_SUCCESS").exists():
        if json.loads((target / REPORT_FILE).read_text()) != report:
            Storage(spark).write_json(f"{target}/{REPORT_FILE}", report)
        return str(target)
    sample = workdir / "sample-features"
    if not (sample / "_SUCCESS").exists():
        run_ingest(spark, Config(), sample_path(), str(sample))
    base = spark.read.parquet(str(sample))
    indexed = spark.createDataFrame(
        base.rdd.zipWithIndex().map(lambda pair: (*pair[0], pair[1])),
        base.schema.add("_i", "long"),
    )
    n = indexed.count()
    partitions = max(2, math.ceil(rows / ROWS_PER_FILE))
    repeated = (
        spark.range(0, rows, numPartitions=partitions)
        .join(F.broadcast(indexed), F.col("id") % n == F.col("_i"))
        .drop("_i")
    )
    repeated.write.mode("overwrite").parquet(str(target))
    Storage(spark).write_json(f"{target}/{REPORT_FILE}", report)
    log.info("built %s", target)
    return str(target)


def _model_dir(spark, workdir: Path) -> str:
    """A model directory with the reference architecture (weights untrained: speed only)."""
    from pipeline.artifact import model_to_bytes, new_metadata, write_model_dir
    from pipeline.config import TrainSettings
    from pipeline.model import build_model
    from pipeline.storage import Storage

    model_dir = workdir / "model"
    if (model_dir / "metadata.json").exists():
        return str(model_dir)
    settings = TrainSettings()
    model_bytes = model_to_bytes(build_model(settings))
    metadata = new_metadata(model_bytes, settings)
    write_model_dir(Storage(spark), str(model_dir), metadata, model_bytes)
    return str(model_dir)


def _mllib_model(spark, workdir: Path):
    from pyspark.ml.classification import MultilayerPerceptronClassifier
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    from pipeline.contract import FEATURE_DIM, FEATURES, LABEL, NUM_CLASSES

    sample = spark.read.parquet(str(workdir / "sample-features")).select(
        array_to_vector(F.col(FEATURES)).alias("vector"), F.col(LABEL).cast("double")
    )
    return MultilayerPerceptronClassifier(
        layers=[FEATURE_DIM, 32, NUM_CLASSES],
        featuresCol="vector",
        labelCol=LABEL,
        maxIter=10,
        seed=42,
    ).fit(sample)


def _copy(spark, features: str, output: str) -> None:
    spark.read.parquet(features).write.mode("overwrite").parquet(output)


def _mllib(spark, model, features: str, output: str) -> None:
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F

    from pipeline.contract import FEATURES, LABEL, PREDICTION, PROBABILITIES

    data = spark.read.parquet(features).withColumn("vector", array_to_vector(F.col(FEATURES)))
    model.transform(data).select(
        "id",
        LABEL,
        F.col("prediction").cast("int").alias(PREDICTION),
        vector_to_array(F.col("probability"), "float32").alias(PROBABILITIES),
    ).write.mode("overwrite").parquet(output)


def _in_memory_rows(spark, workdir: Path, rows: int):
    import numpy as np

    from pipeline.contract import FEATURES

    sample = spark.read.parquet(str(workdir / "sample-features")).select(FEATURES).toPandas()
    x = np.stack(sample[FEATURES].to_numpy()).astype(np.float32)
    return np.resize(x, (rows, x.shape[1]))


_KERAS: dict[str, object] = {}


def _keras_predict(model_dir: str, spark, x) -> None:
    if "model" not in _KERAS:
        from pipeline.artifact import model_from_bytes, read_model_dir
        from pipeline.storage import Storage

        _KERAS["model"] = model_from_bytes(*read_model_dir(Storage(spark), model_dir))
    _KERAS["model"].predict(x, batch_size=8192, verbose=0)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[300_000, 1_000_000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default="benchmarks/data", help="data and outputs (reused)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--batch-size", type=int, default=None, help="score.batch_size")
    parser.add_argument(
        "--only", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS), help="measure these"
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    spark = timing.session("score-bench", master=args.master, log_level="ERROR")
    results = []
    for rows in args.rows:
        results.append(
            run_benchmark(
                rows,
                args.runs,
                args.workdir,
                args.master,
                args.batch_size,
                tuple(args.only),
                spark=spark,
            )
        )
        print(json.dumps(results[-1], indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for r in results:
        copy, mllib = r.get("ratio_score_vs_copy"), r.get("ratio_score_vs_mllib")
        print(
            f"{r['rows']:>9,} rows: score {r['seconds']['score']['median']:.2f} s; "
            f"score/copy {copy} (target <= 1), score/mllib {mllib} (target <= 0.667)"
        )
    return results


if __name__ == "__main__":
    main()
