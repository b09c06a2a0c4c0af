"""Ingest speed against its two baselines, on generated data of any size.

    python benchmarks/ingest_bench.py --rows 1000000 --repeats 3 [--layout array image columns]

For each layout the raw data is generated once (reused on later runs with the same rows,
layout and seed), then each repeat measures, in turn:

- ``ingest``: `pipeline.ingest.run_ingest` with the default config;
- ``read_write``: ``spark.read.parquet(raw).write.parquet(out)`` in the same session, the
  I/O floor any Spark job on this data pays;
- ``pyarrow``: one Python process streaming the files through PyArrow and NumPy with the
  same checks, scaling and one-hot encoding: what a user would write instead of Spark.

Figures are wall-clock seconds (median, min and max of the repeats) and the ratio
ingest / read_write, the target of the ingest issue (at most 1.5). `run()` returns the
figures as a dict for ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import timing

log = logging.getLogger("benchmarks.ingest")

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"
TARGET_RATIO = 1.5
_BATCH_ROWS = 65_536


def run(
    rows: int = 1_000_000,
    repeats: int = 3,
    layouts: Sequence[str] = ("array",),
    data_dir: str | Path | None = None,
    seed: int = 0,
    spark=None,
    baseline: bool = True,
    regenerate: bool = False,
) -> dict[str, Any]:
    """Measure ingest and its baselines; returns ``{"stage": "ingest", "layouts": {...}}``."""
    from pipeline.config import Config

    data_dir = Path(data_dir or DEFAULT_DATA_DIR)
    data_dir.mkdir(parents=True, exist_ok=True)
    spark = spark or timing.session("ingest-bench")
    config = Config()
    results: dict[str, Any] = {}
    for layout in layouts:
        raw = _raw_data(spark, config, data_dir, rows, layout, seed, regenerate)
        raw_bytes = sum(f.stat().st_size for f in Path(raw).glob("*.parquet"))
        names = ["read_write", "ingest", *(["pyarrow"] if baseline else [])]
        measures = {
            name: functools.partial(_MEASURES[name], spark, config, raw, layout) for name in names
        }
        timings, cpu = timing.rounds(measures, repeats, data_dir, layout)
        figures = {name: timing.stats(values) for name, values in timings.items()}
        paired = [i / rw for i, rw in zip(timings["ingest"], timings["read_write"], strict=True)]
        entry: dict[str, Any] = {
            "raw_data": Path(raw).name,  # under the data directory
            "raw_mb": round(raw_bytes / 1e6, 1),
            "seconds": figures,
            "rows_per_second": {
                name: round(rows / stats["median"]) for name, stats in figures.items()
            },
            "ratio_ingest_to_read_write": round(
                figures["ingest"]["median"] / figures["read_write"]["median"], 3
            ),
            "ratio_ingest_to_read_write_paired": timing.stats(paired),
            "target_ratio": TARGET_RATIO,
            "cpu_seconds": {name: timing.stats(values) for name, values in cpu.items()},
            "ratio_ingest_to_read_write_cpu": round(
                statistics.median(cpu["ingest"]) / statistics.median(cpu["read_write"]), 3
            ),
        }
        if baseline:
            entry["ratio_ingest_to_pyarrow"] = round(
                figures["ingest"]["median"] / figures["pyarrow"]["median"], 3
            )
        results[layout] = entry
    return {
        "stage": "ingest",
        "rows": rows,
        "repeats": repeats,
        "seed": seed,
        "spark_master": spark.sparkContext.master,
        "default_parallelism": spark.sparkContext.defaultParallelism,
        "layouts": results,
    }


def _raw_data(spark, config, data_dir: Path, rows, layout, seed, regenerate) -> str:
    """The generated raw dataset for (rows, layout, seed), made once and reused."""
    from pipeline.generate import METADATA_FILE, run_generate

    path = data_dir / f"raw-{layout}-{rows}-seed{seed}"
    meta = path / METADATA_FILE
    if not regenerate and meta.is_file():
        found = json.loads(meta.read_text())
        if (found.get("rows"), found.get("layout"), found.get("seed")) == (rows, layout, seed):
            log.info("reusing %s", path)
            return str(path)
    log.info("generating %d %s rows into %s", rows, layout, path)
    run_generate(spark, config, rows, str(path), layout, seed)
    return str(path)


def _measure_ingest(spark, config, raw: str, layout: str, out: str) -> None:
    from pipeline.ingest import run_ingest

    result = run_ingest(spark, config, raw, out)
    if result.counts.rows_rejected:
        log.warning("ingest rejected %d rows of generated data", result.counts.rows_rejected)


def _measure_read_write(spark, config, raw: str, layout: str, out: str) -> None:
    spark.read.parquet(raw).write.parquet(out)


def _measure_pyarrow(spark, config, raw: str, layout: str, out: str) -> None:
    pyarrow_ingest(raw, out, layout)


_MEASURES = {
    "read_write": _measure_read_write,
    "ingest": _measure_ingest,
    "pyarrow": _measure_pyarrow,
}


# --- the single-process baseline --------------------------------------------------------


def pyarrow_ingest(raw: str, out: str, layout: str, label: str = "label") -> dict[str, int]:
    """What a user would write without Spark: stream the files, check, scale, one-hot, write.

    Same checks and output columns as the ingest job for integer pixels (0-255); returns
    the counts. Reads and writes in batches, so memory stays flat at any size.
    """
    os.makedirs(out, exist_ok=True)
    os.makedirs(os.path.join(out, "_rejected"), exist_ok=True)
    files = sorted(str(p) for p in Path(raw).glob("*.parquet"))
    counts = {"rows_in": 0, "rows_out": 0, "rows_rejected": 0}
    out_schema = pa.schema(
        [
            ("id", pa.int64()),
            ("features", pa.list_(pa.float32())),
            ("label", pa.int32()),
            ("label_onehot", pa.list_(pa.float32())),
        ]
    )
    writer = pq.ParquetWriter(os.path.join(out, "part-0.parquet"), out_schema)
    rejected_writer = None
    try:
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=_BATCH_ROWS):
                pixels, reason = _pixels_and_reasons(batch, layout)
                labels = batch.column(label)
                label_values = pc.fill_null(labels, -1).to_numpy(zero_copy_only=False)
                label_reason = np.where(
                    labels.is_null().to_numpy(zero_copy_only=False),
                    "label_null",
                    np.where((label_values < 0) | (label_values > 9), "label_out_of_range", ""),
                )
                reason = np.where(label_reason != "", label_reason, reason)
                good = reason == ""
                counts["rows_in"] += len(good)
                counts["rows_out"] += int(good.sum())
                counts["rows_rejected"] += int((~good).sum())
                features = (pixels[good].astype(np.float64) / 255.0).astype(np.float32)
                label_ok = label_values[good].astype(np.int32)
                onehot = np.eye(10, dtype=np.float32)[label_ok]
                writer.write_batch(
                    pa.RecordBatch.from_arrays(
                        [
                            batch.column("id").filter(pa.array(good)),
                            _list_array(features),
                            pa.array(label_ok),
                            _list_array(onehot),
                        ],
                        schema=out_schema,
                    )
                )
                if not good.all():
                    bad = batch.filter(pa.array(~good)).append_column(
                        "reject_reason", pa.array(reason[~good])
                    )
                    if rejected_writer is None:
                        rejected_writer = pq.ParquetWriter(
                            os.path.join(out, "_rejected", "part-0.parquet"), bad.schema
                        )
                    rejected_writer.write_batch(bad)
    finally:
        writer.close()
        if rejected_writer is not None:
            rejected_writer.close()
    with open(os.path.join(out, "_report.json"), "w", encoding="utf-8") as report:
        json.dump(counts, report)
    return counts


def _list_array(matrix: np.ndarray) -> pa.ListArray:
    n, width = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)))


def _pixels_and_reasons(batch: pa.RecordBatch, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8-range pixels as int64 (n, 784), reason per row, "" when good)."""
    n = batch.num_rows
    reason = np.full(n, "", dtype=object)
    pixels = np.zeros((n, 784), dtype=np.int64)
    if layout == "image":
        from PIL import Image, UnidentifiedImageError

        for i, image in enumerate(batch.column("image").field("bytes").to_pylist()):
            if image is None:
                reason[i] = "pixels_null"
                continue
            try:
                decoded = Image.open(io.BytesIO(image))
                if decoded.size != (28, 28):
                    reason[i] = "image_wrong_size"
                    continue
                pixels[i] = np.asarray(decoded.convert("L")).reshape(-1)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
                reason[i] = "image_undecodable"
        return pixels, reason.astype(str)

    if layout == "array":
        column = batch.column("pixels")
        lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False)
        reason[lengths == -1] = "pixels_null"
        reason[(lengths != -1) & (lengths != 784)] = "wrong_length"
        ok = lengths == 784
        offsets = column.offsets.to_numpy()[:-1][ok]
        values = column.values
        flat = pc.fill_null(values, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        pixels[ok] = flat[offsets[:, None] + np.arange(784)]
    else:
        columns = [batch.column(f"pixel{i}") for i in range(784)]
        pixels[:] = np.stack(
            [pc.fill_null(c, -1).to_numpy(zero_copy_only=False) for c in columns], axis=1
        )
        ok = np.ones(n, dtype=bool)
    nulls = (pixels == -1).any(axis=1) & ok
    out_of_range = ((pixels < 0) | (pixels > 255)).any(axis=1) & ok & ~nulls
    reason[nulls] = "null_element"
    reason[out_of_range] = "pixel_out_of_range"
    return pixels, reason.astype(str)


# --- command line ---------------------------------------------------------------------


def format_table(result: dict[str, Any]) -> str:
    """The figures of `run()` as a plain-text table."""
    from pipeline.cli import table

    rows = []
    for layout, entry in result["layouts"].items():
        for name, stats in entry["seconds"].items():
            rows.append(
                [
                    layout,
                    name,
                    stats["median"],
                    stats["min"],
                    stats["max"],
                    entry["rows_per_second"][name],
                ]
            )
    for row in rows:
        row.append(result["layouts"][row[0]]["cpu_seconds"][row[1]]["median"])
    headers = ["layout", "measure", "median s", "min s", "max s", "rows/s", "CPU s"]
    lines = [table(rows, headers), ""]
    for layout, entry in result["layouts"].items():
        paired = entry["ratio_ingest_to_read_write_paired"]
        lines.append(
            f"{layout}: ingest / read_write = {entry['ratio_ingest_to_read_write']:.2f} "
            f"(paired per repeat: median {paired['median']:.2f}, min {paired['min']:.2f}, "
            f"max {paired['max']:.2f}; target <= {TARGET_RATIO}; "
            f"in CPU seconds {entry['ratio_ingest_to_read_write_cpu']:.2f})"
            + (
                f"; ingest / pyarrow = {entry['ratio_ingest_to_pyarrow']:.2f}"
                if "ratio_ingest_to_pyarrow" in entry
                else ""
            )
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--layout", nargs="+", default=["array"], choices=["array", "image", "columns"]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--no-baseline", action="store_true", help="skip the pyarrow script")
    parser.add_argument("--regenerate", action="store_true", help="generate the data again")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    result = run(
        rows=args.rows,
        repeats=args.repeats,
        layouts=args.layout,
        data_dir=args.data_dir,
        seed=args.seed,
        baseline=not args.no_baseline,
        regenerate=args.regenerate,
    )
    return timing.finish(format_table(result), result, args.json)


if __name__ == "__main__":
    sys.exit(main())
