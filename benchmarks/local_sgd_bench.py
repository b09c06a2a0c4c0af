"""Local SGD's averaging interval: one worker against two averaging every N steps.

    python benchmarks/local_sgd_bench.py --rows 300000 --every 100 200 --repeats 3

Each round trains one worker, then two workers (``train.sync=local_sgd``) once per
interval in ``--every``, on the steady-state training benchmark's tiled rows
(`train_bench`), in this order, so that load from other work falls on all of them alike.
Printed per run: samples/s of the training epochs (the first epoch's compilation
included), of the later epochs, and the validation accuracy (the benchmark's 20 % of
tiled rows, copies of training digits: it measures fit, not generalisation); then the
two-worker ratios per round. This is how the default ``train.average_every`` was chosen.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import timing
import train_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--every", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=str(train_bench.DEFAULT_DATA_DIR))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from pipeline.config import Config

    spark = timing.session("local-sgd-bench", driver_memory="2g", master="local[2]",
                           log_level="ERROR")  # fmt: skip
    features = train_bench._tiled_features(spark, Path(args.data_dir), args.rows)
    work = Path(tempfile.mkdtemp(prefix="local-sgd-bench-"))
    runs = [("one worker", 1, args.every[0])] + [
        (f"2 workers, every {n}", 2, n) for n in args.every
    ]
    keys = ("samples_per_second", "steady_samples_per_second", "val_accuracy")
    try:
        for repeat in range(args.repeats):
            figures = {}
            for name, workers, every in runs:
                config = Config().with_overrides(
                    {
                        "train": {
                            "epochs": args.epochs,
                            "validation_fraction": 0.2,
                            "average_every": every,
                        }
                    }
                )
                run = train_bench._train(spark, config, features, work, workers, "local_sgd")
                figures[name] = run
                print(f"round {repeat + 1} {name:>22}: "
                      + ", ".join(f"{k} {run[k]:,.4g}" for k in keys), flush=True)  # fmt: skip
            one = figures["one worker"]
            for name, run in list(figures.items())[1:]:
                speed = run["samples_per_second"] / one["samples_per_second"]
                steady = run["steady_samples_per_second"] / one["steady_samples_per_second"]
                points = 100 * (run["val_accuracy"] - one["val_accuracy"])
                print(
                    f"round {repeat + 1} {name:>22}: {speed:.2f}x one worker "
                    f"(steady {steady:.2f}x), accuracy {points:+.2f} pt",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
