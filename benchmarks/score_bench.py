"""Scoring speed against the two yardsticks of the scoring issue, on the same data and machine.

    python benchmarks/score_bench.py --rows 300000 [--runs 3] [--workdir benchmarks/data]

Builds N rows of features once (the ingested sample repeated, with an `id` column) and
times, as the median of `--runs` runs each:

- ``score``: the whole scoring job (`run_scoring`: validation, inference, quarantine,
  evaluation, report and plots, atomic publish);
- ``copy``: a plain Spark Parquet read -> write of the same features data;
- ``mllib``: Spark MLlib ``MultilayerPerceptronClassifier`` ([784, 32, 10]) ``transform``
  plus a write of id, label, prediction and probabilities;
- ``predict``: Keras ``model.predict`` over the same rows already in memory (the floor).

The target: ``score / copy <= 1`` and ``score / mllib <= 2/3``. `run_benchmark` returns
the figures as a dict for other harnesses; the command prints them as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("score_bench")

SAMPLE_ROWS = 6000


def run_benchmark(
    rows: int = 300_000,
    runs: int = 3,
    workdir: str | os.PathLike = "benchmarks/data",
    master: str = "local[2]",
    batch_size: int | None = None,
) -> dict:
    """Median seconds of each measurement and the two ratios the issue sets targets for."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipeline.config import Config, SparkSettings
    from pipeline.session import build_session

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spark = build_session(
        SparkSettings(
            master=master,
            app_name="score-bench",
            show_progress=False,
            log_level="ERROR",
            conf={"spark.driver.memory": "4g", "spark.ui.enabled": "false"},
        )
    )
    config = Config()
    if batch_size is not None:
        config = config.with_overrides({"score": {"batch_size": batch_size}})

    features = _features_data(spark, workdir, rows)
    model_dir = _model_dir(spark, workdir)
    mllib_model = _mllib_model(spark, workdir)
    x = _in_memory_rows(spark, workdir, rows)

    from pipeline.scoring import run_scoring

    out = workdir / "out"
    timings = {
        "score": _median(
            runs, lambda: run_scoring(spark, config, features, model_dir, str(out / "pred"))
        ),
        "copy": _median(runs, lambda: _copy(spark, features, str(out / "copy"))),
        "mllib": _median(runs, lambda: _mllib(spark, mllib_model, features, str(out / "mllib"))),
        "predict": _median(runs, lambda: _keras_predict(model_dir, spark, x)),
    }
    result = {
        "rows": rows,
        "runs": runs,
        "master": master,
        "batch_size": config.score.batch_size,
        **{f"{name}_seconds": round(statistics.median(t), 3) for name, t in timings.items()},
        **{f"{name}_all_seconds": [round(s, 3) for s in t] for name, t in timings.items()},
    }
    score = statistics.median(timings["score"])
    result["score_vs_copy"] = round(score / statistics.median(timings["copy"]), 3)
    result["score_vs_mllib"] = round(score / statistics.median(timings["mllib"]), 3)
    result["score_vs_predict"] = round(score / statistics.median(timings["predict"]), 3)
    result["meets_targets"] = result["score_vs_copy"] <= 1.0 and result["score_vs_mllib"] <= 2 / 3
    return result


def _median(runs: int, fn: Callable[[], object]) -> list[float]:
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return seconds


def _features_data(spark, workdir: Path, rows: int) -> str:
    """N rows of ingested features: the ingested sample repeated, `id` 0..N-1. Built once."""
    from pyspark.sql import functions as F

    from pipeline.config import Config, IngestSettings
    from pipeline.ingest import REPORT_FILE, run_ingest
    from pipeline.sample import sample_path
    from pipeline.storage import Storage

    target = workdir / f"features-{rows}"
    if (target / "_SUCCESS").exists():
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
    partitions = max(2, math.ceil(rows / 50_000))
    repeated = (
        spark.range(0, rows, numPartitions=partitions)
        .join(F.broadcast(indexed), F.col("id") % n == F.col("_i"))
        .drop("_i")
    )
    repeated.write.mode("overwrite").parquet(str(target))
    Storage(spark).write_json(
        f"{target}/{REPORT_FILE}",
        {
            "status": "ok",
            "note": f"benchmark data: the ingested sample repeated to {rows} rows",
            "preprocessing": IngestSettings().model_dump(mode="json"),
        },
    )
    log.info("built %s", target)
    return str(target)


def _model_dir(spark, workdir: Path) -> str:
    """A model directory with the reference architecture (weights untrained: speed only)."""
    from pipeline.artifact import Metadata, model_to_bytes, sha256_bytes, write_model_dir
    from pipeline.config import IngestSettings, TrainSettings
    from pipeline.contract import FEATURE_DIM, NUM_CLASSES
    from pipeline.model import build_model
    from pipeline.storage import Storage

    model_dir = workdir / "model"
    if (model_dir / "metadata.json").exists():
        return str(model_dir)
    settings = TrainSettings()
    model_bytes = model_to_bytes(build_model(settings))
    metadata = Metadata(
        feature_dim=FEATURE_DIM,
        classes=NUM_CLASSES,
        model_sha256=sha256_bytes(model_bytes),
        preprocessing=IngestSettings(),
        train=settings,
        workers=1,
        epochs_completed=0,
        seed=settings.seed,
    )
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default="benchmarks/data", help="data and outputs (reused)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--batch-size", type=int, default=None, help="score.batch_size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    result = run_benchmark(args.rows, args.runs, args.workdir, args.master, args.batch_size)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
