"""Training throughput and memory, against the reference ``model.fit`` script.

    python benchmarks/train_bench.py --rows 30000 --epochs 10

The embedded sample is ingested once and tiled to ``--rows`` rows (copies of a digit hash
to the same side of the validation split, so the held-out 20 % is never trained on).
Measured, on the same rows and machine:

- ``reference``: the seed script, ``model.fit(numpy, batch_size=32)`` in this process;
- ``one_worker``: `run_training` with one worker (target: at least 5x the reference);
- ``two_workers_local_sgd`` and ``two_workers_exact``: two workers in one barrier stage,
  averaging every 100 steps or exact synchronous SGD (target for local SGD: at least 1.2x
  one worker at the same held-out accuracy; exact mode's ratio is reported);
- ``memory``: one worker's peak resident memory at rows/10 and at rows, with a 64 MB
  in-memory budget so the larger partition streams from local disk (target: < 20 % growth).

Samples per second are training samples over training seconds (compilation included, as
for the reference); ``steady_*`` figures use the median epoch after the first. Other
Spark jobs on the machine make the figures noisy. `run()`
returns the figures as a dict for ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.train")

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"
TARGETS = {"one_worker_vs_reference": 5.0, "local_sgd_vs_one_worker": 1.2, "rss_growth": 0.20}


def run(
    rows: int = 30_000,
    epochs: int = 10,
    data_dir: str | Path | None = None,
    spark=None,
    memory_budget_mb: int = 64,
) -> dict[str, Any]:
    """Measure training; returns ``{"stage": "train", ...}`` with every figure."""
    from pipeline.config import Config

    data_dir = Path(data_dir or DEFAULT_DATA_DIR)
    spark = spark or _session()
    base = Config().with_overrides({"train": {"epochs": epochs, "validation_fraction": 0.2}})
    full = _tiled_features(spark, data_dir, rows)
    small = _tiled_features(spark, data_dir, max(rows // 10, 1000))
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    try:
        reference = _reference(full, base.train, epochs)
        runs = {
            "one_worker": _train(spark, base, full, work, workers=1),
            "two_workers_local_sgd": _train(spark, base, full, work, workers=2, sync="local_sgd"),
            "two_workers_exact": _train(spark, base, full, work, workers=2, sync="exact"),
        }
        memory = {}
        for name, path in (("small", small), ("large", full)):
            config = base.with_overrides(
                {"train": {"epochs": 1, "memory_budget_mb": memory_budget_mb}}
            )
            memory[name] = _train(spark, config, path, work, workers=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    one = runs["one_worker"]["samples_per_second"]
    growth = memory["large"]["peak_rss_mb"] / memory["small"]["peak_rss_mb"] - 1
    return {
        "stage": "train",
        "rows": rows,
        "epochs": epochs,
        "spark_master": spark.sparkContext.master,
        "reference": reference,
        "runs": runs,
        "memory": memory,
        "one_worker_vs_reference": one / reference["samples_per_second"],
        "local_sgd_vs_one_worker": runs["two_workers_local_sgd"]["samples_per_second"] / one,
        "exact_vs_one_worker": runs["two_workers_exact"]["samples_per_second"] / one,
        "steady_one_worker_vs_reference": runs["one_worker"]["steady_samples_per_second"]
        / reference["samples_per_second"],
        "steady_local_sgd_vs_one_worker": runs["two_workers_local_sgd"]["steady_samples_per_second"]
        / runs["one_worker"]["steady_samples_per_second"],
        "rss_growth": growth,
        "targets": TARGETS,
    }


def _session():
    from pipeline.config import SparkSettings
    from pipeline.session import build_session

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return build_session(
        SparkSettings(
            master="local[2]",
            app_name="train-bench",
            show_progress=False,
            log_level="ERROR",
            conf={"spark.driver.memory": "2g", "spark.ui.enabled": "false"},
        )
    )


def _tiled_features(spark, data_dir: Path, rows: int) -> str:
    """The ingested sample repeated to `rows` rows, written once and reused."""
    from pyspark.sql import functions as F

    from pipeline.config import Config
    from pipeline.ingest import run_ingest
    from pipeline.sample import sample_path

    sample = data_dir / "train-bench-sample"
    if not (sample / "_SUCCESS").exists():
        run_ingest(spark, Config(), sample_path(), str(sample))
    target = data_dir / f"train-bench-{rows}"
    if not (target / "_SUCCESS").exists():
        features = spark.read.parquet(str(sample))
        copies = -(-rows // features.count())
        (
            features.withColumn("copy", F.explode(F.sequence(F.lit(1), F.lit(copies))))
            .drop("copy")
            .limit(rows)
            .repartition(4)
            .write.mode("overwrite")
            .parquet(str(target))
        )
    return str(target)


def _train(spark, config, features: str, work: Path, workers: int, sync: str = "exact"):
    from pipeline.training import run_training

    config = config.with_overrides({"train": {"sync": sync}})
    model_dir = work / f"model-{workers}-{sync}-{time.monotonic_ns()}"
    result = run_training(spark, config, features, str(model_dir), workers=workers, fresh=True)
    epochs = [h["samples_per_second"] for h in result.history]
    last = result.history[-1]
    figures = {
        "workers": workers,
        "sync": sync if workers > 1 else "single",
        "samples_per_second": result.fit.samples_per_second,
        "steady_samples_per_second": statistics.median(epochs[1:] or epochs),
        "epoch_samples_per_second": [round(e) for e in epochs],
        "val_accuracy": last.get("val_accuracy"),
        "job_seconds": result.seconds,
        "peak_rss_mb": max(w["peak_rss_mb"] for w in result.fit.workers),
        "in_memory": all(w["in_memory"] for w in result.fit.workers),
    }
    log.info("%s", figures)
    return figures


def _reference(features: str, settings, epochs: int) -> dict[str, Any]:
    """The seed script: model.fit on NumPy arrays, batch 32, same rows as training sees."""
    import numpy as np
    import pyarrow.parquet as pq
    from pyspark.sql import SparkSession

    from pipeline.contract import FEATURE_DIM, FEATURES, LABEL_ONEHOT, NUM_CLASSES
    from pipeline.model import build_model, build_optimizer
    from pipeline.training import prepare_training_data

    spark = SparkSession.getActiveSession()
    flagged = prepare_training_data(spark.read.parquet(features), settings)
    local = Path(tempfile.mkdtemp(prefix="train-bench-ref-"))
    try:
        flagged.write.parquet(str(local / "flagged"))
        table = pq.read_table(str(local / "flagged"))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    flag = table.column("is_validation").to_numpy(zero_copy_only=False)
    x = table.column(FEATURES).combine_chunks().flatten().to_numpy().reshape(-1, FEATURE_DIM)
    y = table.column(LABEL_ONEHOT).combine_chunks().flatten().to_numpy().reshape(-1, NUM_CLASSES)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    model = build_model(settings)
    model.compile(
        optimizer=build_optimizer(settings), loss="categorical_crossentropy", metrics=["accuracy"]
    )
    started = time.monotonic()
    model.fit(x[~flag], y[~flag], batch_size=32, epochs=epochs, verbose=0)
    seconds = time.monotonic() - started
    _, accuracy = model.evaluate(x[flag], y[flag], batch_size=1024, verbose=0)
    return {
        "samples_per_second": int((~flag).sum()) * epochs / seconds,
        "seconds": seconds,
        "val_accuracy": float(accuracy),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"train benchmark: {result['rows']:,} rows, {result['epochs']} epochs, "
        f"{result['spark_master']}",
        f"{'run':<24}{'samples/s':>12}{'val_acc':>9}{'peak RSS MB':>13}",
    ]
    entries = {"reference model.fit": result["reference"], **result["runs"]}
    entries |= {f"memory {k} ({'mem' if v['in_memory'] else 'disk'})": v
                for k, v in result["memory"].items()}  # fmt: skip
    for name, run_ in entries.items():
        accuracy = run_.get("val_accuracy")
        rss = run_.get("peak_rss_mb")
        lines.append(
            f"{name:<24}{run_['samples_per_second']:>12,.0f}"
            f"{accuracy if accuracy is not None else float('nan'):>9.4f}"
            f"{rss if rss is not None else float('nan'):>13,.0f}"
        )
    for key, target in TARGETS.items():
        value = result[key]
        ok = value < target if key == "rss_growth" else value >= target
        lines.append(f"{key:<28}{value:>8.2f}  (target {'<' if key == 'rss_growth' else '>='} "
                     f"{target}: {'met' if ok else 'NOT met'})")  # fmt: skip
    for key in ("exact_vs_one_worker", "steady_one_worker_vs_reference",
                "steady_local_sgd_vs_one_worker"):  # fmt: skip
        lines.append(f"{key:<32}{result[key]:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--memory-budget-mb", type=int, default=64)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    result = run(args.rows, args.epochs, args.data_dir, memory_budget_mb=args.memory_budget_mb)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
