"""Ingesting a Kaggle-layout CSV against a plain Spark CSV -> Parquet copy of the same file.

    python benchmarks/csv_bench.py --rows 100000 --repeats 3

The CSV (``label,pixel0,...,pixel783``, one file, as the Kaggle digit-recognizer files
are) is made once from the generator's ``columns`` layout and reused. Each repeat then
measures, in turn:

- ``ingest``: `pipeline.ingest.run_ingest` on the CSV with the default config (header
  read, integer pixels, validation, quarantine, report);
- ``csv_to_parquet``: ``spark.read.csv(csv, header=True, schema=...).write.parquet(out)``
  with the same integer schema, the floor any Spark job reading this file pays.

Figures are wall-clock and CPU seconds (median, min and max of the repeats) and the ratio
ingest / csv_to_parquet. `run()` returns them as a dict for ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing
from ingest_bench import DEFAULT_DATA_DIR, _raw_data

log = logging.getLogger("benchmarks.csv")


def run(
    rows: int = 100_000,
    repeats: int = 3,
    data_dir: str | Path | None = None,
    seed: int = 0,
    spark=None,
) -> dict[str, Any]:
    """Measure CSV ingest and its baseline; returns ``{"stage": "csv_ingest", ...}``."""
    from pipeline.config import Config

    data_dir = Path(data_dir or DEFAULT_DATA_DIR)
    data_dir.mkdir(parents=True, exist_ok=True)
    spark = spark or timing.session("csv-bench")
    config = Config()
    csv = _kaggle_csv(spark, config, data_dir, rows, seed)
    measures = {
        "csv_to_parquet": functools.partial(_measure_copy, spark, csv),
        "ingest": functools.partial(_measure_ingest, spark, config, csv),
    }
    timings, cpu = timing.rounds(measures, repeats, data_dir)
    figures = {name: timing.stats(values) for name, values in timings.items()}
    paired = [i / c for i, c in zip(timings["ingest"], timings["csv_to_parquet"], strict=True)]
    return {
        "stage": "csv_ingest",
        "rows": rows,
        "repeats": repeats,
        "csv_file": Path(csv).name,  # under the data directory
        "csv_mb": round(Path(csv).stat().st_size / 1e6, 1),
        "seconds": figures,
        "rows_per_second": {name: round(rows / s["median"]) for name, s in figures.items()},
        "ratio_ingest_to_csv_to_parquet": round(
            figures["ingest"]["median"] / figures["csv_to_parquet"]["median"], 3
        ),
        "ratio_ingest_to_csv_to_parquet_paired": timing.stats(paired),
        "cpu_seconds": {name: timing.stats(values) for name, values in cpu.items()},
        "ratio_ingest_to_csv_to_parquet_cpu": round(
            statistics.median(cpu["ingest"]) / statistics.median(cpu["csv_to_parquet"]), 3
        ),
        "spark_master": spark.sparkContext.master,
    }


def _kaggle_csv(spark, config, data_dir: Path, rows: int, seed: int) -> str:
    """One CSV file in the Kaggle layout, written once from generated ``columns`` data."""
    from pipeline.contract import LABEL, pixel_columns

    path = data_dir / f"kaggle-{rows}-seed{seed}.csv"
    if path.is_file():
        log.info("reusing %s", path)
        return str(path)
    raw = _raw_data(spark, config, data_dir, rows, "columns", seed, False)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix="csv-parts-") as parts:
        target = os.path.join(parts, "csv")
        (
            spark.read.parquet(raw)
            .select(LABEL, *pixel_columns())
            .coalesce(1)
            .write.csv(target, header=True)
        )
        (part,) = Path(target).glob("part-*.csv")
        shutil.move(str(part), path)
    log.info("wrote %s (%d rows)", path, rows)
    return str(path)


def _measure_ingest(spark, config, csv: str, out: str) -> None:
    from pipeline.ingest import run_ingest

    result = run_ingest(spark, config, csv, out)
    if result.counts.rows_rejected:
        log.warning("ingest rejected %d rows of generated data", result.counts.rows_rejected)


def _measure_copy(spark, csv: str, out: str) -> None:
    from pyspark.sql import types as T

    names = spark.read.option("header", True).csv(csv).columns
    schema = T.StructType([T.StructField(name, T.IntegerType()) for name in names])
    spark.read.csv(csv, header=True, schema=schema).write.parquet(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=None, help="generated data (default benchmarks/data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    print(json.dumps(run(args.rows, args.repeats, args.data_dir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
