"""Training throughput and memory, against the reference ``model.fit`` script.

    python benchmarks/train_bench.py --rows 300000 --epochs 10 --repeats 3

The embedded sample is ingested once and tiled to ``--rows`` rows (copies of a digit hash
to the same side of the validation split, so the held-out 20 % is never trained on).
Measured, on the same rows and machine, ``--repeats`` times in turn (so that load from
other jobs falls on every contender alike):

- ``reference``: the seed script, ``model.fit(numpy, batch_size=32)`` in this process;
- ``one_worker``: `run_training` with one worker (target: at least 5x the reference);
- ``two_workers_local_sgd``: two workers in one barrier stage averaging every
  ``train.average_every`` steps, the default (target: at least 1.2x one worker at the same
  held-out accuracy);
- ``two_workers_exact``: exact synchronous SGD (its ratio is reported; ``--exact-repeats``);
- ``memory``: one worker's peak resident memory, one epoch, at ``--memory-rows``/10 rows
  (in memory) and at ``--memory-rows`` and 10x that (streamed from local disk under a
  ``--memory-budget-mb`` budget) (target: < 20 % growth for 10x the data);
- ``augmentation``: steps/s of the fused loop with ``train.augment`` on and off
  (``benchmarks/augment_bench.py``; target: on/off ratio at least 0.5).

``samples_per_second`` is training samples over training seconds (every epoch, tracing
included, as ``model.fit``'s time includes its own); ``steady_samples_per_second`` is the
median epoch after the first; ``job_samples_per_second`` divides by the whole
`run_training` call (Spark read, spool, TensorFlow start-up). Ratios are taken within a
repeat and summarised as median, min and max; ``phases`` are worker 0's seconds per phase
(spool, TensorFlow import, cluster start, data load, epochs). `run()` returns every
figure as a dict for ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import timing

log = logging.getLogger("benchmarks.train")

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"
TARGETS = {
    "one_worker_vs_reference": 5.0,
    "local_sgd_vs_one_worker": 1.2,
    "rss_growth": 0.20,
    "augment_on_vs_off": 0.5,
}


def run(
    rows: int = 300_000,
    epochs: int = 10,
    data_dir: str | Path | None = None,
    spark=None,
    memory_budget_mb: int = 64,
    repeats: int = 3,
    exact_repeats: int = 1,
    memory_rows: int = 30_000,
) -> dict[str, Any]:
    """Measure training; returns ``{"stage": "train", ...}`` with every figure."""
    from pipeline.config import Config

    data_dir = Path(data_dir or DEFAULT_DATA_DIR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    spark = spark or timing.session(
        "train-bench", driver_memory="2g", master="local[2]", log_level="ERROR"
    )
    base = Config().with_overrides({"train": {"epochs": epochs, "validation_fraction": 0.2}})
    full = _tiled_features(spark, data_dir, rows)
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    samples: dict[str, list[dict[str, Any]]] = {
        "reference": [],
        "one_worker": [],
        "two_workers_local_sgd": [],
        "two_workers_exact": [],
    }
    try:
        for repeat in range(repeats):
            log.info("repeat %d of %d", repeat + 1, repeats)
            samples["reference"].append(_reference(full, base.train, epochs))
            samples["one_worker"].append(_train(spark, base, full, work, workers=1))
            samples["two_workers_local_sgd"].append(
                _train(spark, base, full, work, workers=2, sync="local_sgd")
            )
            if repeat < exact_repeats:
                samples["two_workers_exact"].append(
                    _train(spark, base, full, work, workers=2, sync="exact")
                )
        memory = {}
        sizes = {
            "small": max(memory_rows // 10, 1000),
            "large": memory_rows,
            "xlarge": 10 * memory_rows,
        }
        for name, size in sizes.items():
            config = base.with_overrides(
                {"train": {"epochs": 1, "memory_budget_mb": memory_budget_mb}}
            )
            path = _tiled_features(spark, data_dir, size)
            memory[name] = {"rows": size, **_train(spark, config, path, work, workers=1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from augment_bench import measure as measure_augmentation

    augmentation = measure_augmentation(repeats=max(repeats, 3))

    def ratios(numerator: str, denominator: str, key: str) -> dict[str, Any]:
        pairs = zip(samples[numerator], samples[denominator], strict=False)
        return timing.stats([a[key] / b[key] for a, b in pairs], 4)

    runs = {
        name: {"repeats": len(values), **timing.summarise_runs(values)}
        for name, values in samples.items()
        if values
    }
    return {
        "stage": "train",
        "rows": rows,
        "epochs": epochs,
        "repeats": repeats,
        "spark_master": spark.sparkContext.master,
        "reference": runs.pop("reference"),
        "runs": runs,
        "memory": memory,
        "one_worker_vs_reference": ratios("one_worker", "reference", "samples_per_second"),
        "steady_one_worker_vs_reference": ratios(
            "one_worker", "reference", "steady_samples_per_second"
        ),
        "local_sgd_vs_one_worker": ratios(
            "two_workers_local_sgd", "one_worker", "samples_per_second"
        ),
        "steady_local_sgd_vs_one_worker": ratios(
            "two_workers_local_sgd", "one_worker", "steady_samples_per_second"
        ),
        "exact_vs_one_worker": ratios("two_workers_exact", "one_worker", "samples_per_second"),
        "steady_exact_vs_one_worker": ratios(
            "two_workers_exact", "one_worker", "steady_samples_per_second"
        ),
        "val_accuracy_local_sgd_minus_one_worker": ratios_difference(
            samples["two_workers_local_sgd"], samples["one_worker"], "val_accuracy"
        ),
        "rss_growth": memory["large"]["peak_rss_mb"] / memory["small"]["peak_rss_mb"] - 1,
        "rss_growth_100x": memory["xlarge"]["peak_rss_mb"] / memory["small"]["peak_rss_mb"] - 1,
        "augmentation": augmentation,
        "augment_on_vs_off": augmentation["ratio_on_vs_off"],
        "targets": TARGETS,
    }


def ratios_difference(a: list[dict], b: list[dict], key: str) -> dict[str, Any]:
    return timing.stats([x[key] - y[key] for x, y in zip(a, b, strict=False)], 4)


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
        "training_seconds": max(w["train_seconds"] for w in result.fit.workers),
        "job_seconds": result.seconds,
        "job_samples_per_second": sum(w["samples"] for w in result.fit.workers) / result.seconds,
        "peak_rss_mb": max(w["peak_rss_mb"] for w in result.fit.workers),
        "in_memory": all(w["in_memory"] for w in result.fit.workers),
        "phases": {k: round(v, 3) for k, v in result.fit.workers[0]["phases"].items()},
    }
    log.info("%s", figures)
    return figures


_REFERENCE_DATA: dict[str, Any] = {}


def _reference_data(features: str, settings):
    """(x, y, validation flag) of the rows training sees, loaded once per path."""
    if features in _REFERENCE_DATA:
        return _REFERENCE_DATA[features]
    import numpy as np
    import pyarrow.parquet as pq
    from pyspark.sql import SparkSession

    from pipeline.contract import FEATURE_DIM, FEATURES, LABEL_ONEHOT, NUM_CLASSES
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
    _REFERENCE_DATA.clear()
    _REFERENCE_DATA[features] = (np.asarray(x, np.float32), np.asarray(y, np.float32), flag)
    return _REFERENCE_DATA[features]


def _reference(features: str, settings, epochs: int) -> dict[str, Any]:
    """The seed script: model.fit on NumPy arrays, batch 32, same rows as training sees."""
    import keras

    from pipeline.model import build_model, build_optimizer

    x, y, flag = _reference_data(features, settings)
    model = build_model(settings)
    model.compile(
        optimizer=build_optimizer(settings), loss="categorical_crossentropy", metrics=["accuracy"]
    )
    epoch_seconds: list[float] = []

    class _Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.monotonic() - self.started)

    train_x, train_y = x[~flag], y[~flag]
    started = time.monotonic()
    model.fit(train_x, train_y, batch_size=32, epochs=epochs, verbose=0, callbacks=[_Timer()])
    seconds = time.monotonic() - started
    _, accuracy = model.evaluate(x[flag], y[flag], batch_size=1024, verbose=0)
    per_epoch = [len(train_x) / s for s in epoch_seconds]
    return {
        "samples_per_second": len(train_x) * epochs / seconds,
        "steady_samples_per_second": statistics.median(per_epoch[1:] or per_epoch),
        "epoch_samples_per_second": [round(e) for e in per_epoch],
        "seconds": seconds,
        "val_accuracy": float(accuracy),
    }


def format_table(result: dict[str, Any]) -> str:
    def median(value):
        return value["median"] if isinstance(value, dict) else value

    lines = [
        f"train benchmark: {result['rows']:,} rows, {result['epochs']} epochs, "
        f"{result['repeats']} repeats, {result['spark_master']} (medians)",
        f"{'run':<26}{'samples/s':>12}{'steady/s':>12}{'job/s':>10}{'val_acc':>9}"
        f"{'peak RSS MB':>13}",
    ]
    entries = {"reference model.fit": result["reference"], **result["runs"]}
    entries |= {f"memory {v['rows']:,} ({'mem' if v['in_memory'] else 'disk'})": v
                for v in result["memory"].values()}  # fmt: skip
    nan = float("nan")
    for name, run_ in entries.items():
        values = [median(run_.get(k, nan)) for k in (
            "samples_per_second", "steady_samples_per_second", "job_samples_per_second",
            "val_accuracy", "peak_rss_mb")]  # fmt: skip
        values = [nan if v is None else v for v in values]
        lines.append(
            f"{name:<26}{values[0]:>12,.0f}{values[1]:>12,.0f}{values[2]:>10,.0f}"
            f"{values[3]:>9.4f}{values[4]:>13,.0f}"
        )
    for key, target in TARGETS.items():
        value = median(result[key])
        ok = value < target if key == "rss_growth" else value >= target
        lines.append(f"{key:<36}{value:>8.2f}  (target {'<' if key == 'rss_growth' else '>='} "
                     f"{target}: {'met' if ok else 'NOT met'})")  # fmt: skip
    for key in ("steady_one_worker_vs_reference", "steady_local_sgd_vs_one_worker",
                "exact_vs_one_worker", "steady_exact_vs_one_worker",
                "val_accuracy_local_sgd_minus_one_worker", "rss_growth_100x"):  # fmt: skip
        value = result[key]
        spread = f"  [{value['min']:.2f}, {value['max']:.2f}]" if isinstance(value, dict) else ""
        lines.append(f"{key:<40}{median(value):>8.3f}{spread}")
    one = result["runs"]["one_worker"]["phases"]
    lines.append(f"one worker's phases (s, worker 0, last repeat): {one}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exact-repeats", type=int, default=1)
    parser.add_argument("--memory-rows", type=int, default=30_000)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--memory-budget-mb", type=int, default=64)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    result = run(
        args.rows,
        args.epochs,
        args.data_dir,
        memory_budget_mb=args.memory_budget_mb,
        repeats=args.repeats,
        exact_repeats=args.exact_repeats,
        memory_rows=args.memory_rows,
    )
    return timing.finish(format_table(result), result, args.json)


if __name__ == "__main__":
    sys.exit(main())
