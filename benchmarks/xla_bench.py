"""What XLA gives the training loop: steps per second with ``train.jit_compile`` on and off.

    python benchmarks/xla_bench.py --steps 3000 --repeats 5 [--augment]

Trains the reference model with the pipeline's own `Trainer` (one worker, one TensorFlow
thread as under ``spark.task.cpus=1``, the embedded sample in its store, 100 steps fused
per compiled call), once with ``train.jit_compile`` false and once true, alternating
within each repeat so that load from other processes falls on both alike. ``--augment``
turns ``train.augment.enabled`` on for both. Tracing and compilation happen before the
clock starts; the first call's time (tracing, and XLA's compilation when on) is reported
apart: a one-off cost of every training run.

The measurement runs in a fresh Python process (TensorFlow's thread pools are fixed when
it starts); `measure()` returns its figures as a dict.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def measure(steps: int = 3000, repeats: int = 5, augment: bool = False) -> dict[str, Any]:
    """Run the benchmark in a subprocess; its figures (steps/s on, off and their ratio)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, str(Path(__file__).resolve()), "--steps", str(steps)]
    command += ["--repeats", str(repeats), "--json"] + (["--augment"] if augment else [])
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"XLA benchmark failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_here(steps: int, repeats: int, augment: bool) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    from pipeline.config import AugmentSettings, TrainSettings
    from pipeline.contract import NUM_CLASSES
    from pipeline.generate import load_base_digits
    from pipeline.training.data import Segment
    from pipeline.training.loop import Trainer

    pixels, labels = load_base_digits()
    x = (pixels.astype(np.float64) / 255.0).astype(np.float32)
    y = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    rng = np.random.default_rng(0)
    trainers = {}
    first_call: dict[str, float] = {}
    for name, jit in (("off", False), ("on", True)):
        settings = TrainSettings(jit_compile=jit, augment=AugmentSettings(enabled=augment))
        trainer = Trainer(settings, workers=1)
        trainer.make_store(len(x))
        trainer.fill_store([(x, y)])
        per_call = settings.steps_per_call
        warm_up = rng.integers(0, len(x), (per_call, settings.batch_size)).astype(np.int32)
        started = time.perf_counter()
        trainer.train([Segment(None, warm_up)], per_call)  # trace and compile
        first_call[name] = time.perf_counter() - started
        trainers[name] = trainer

    rates: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(repeats):
        for name, trainer in trainers.items():
            batch_size = trainer.settings.batch_size
            batches = rng.integers(0, len(x), (steps, batch_size)).astype(np.int32)
            started = time.perf_counter()
            trainer.train([Segment(None, batches)], steps)
            rates[name].append(steps / (time.perf_counter() - started))
    ratios = [on / off for on, off in zip(rates["on"], rates["off"], strict=True)]
    return {
        "steps": steps,
        "augment": augment,
        "steps_per_call": TrainSettings().steps_per_call,
        "batch_size": TrainSettings().batch_size,
        "tensorflow_threads": 1,
        "steps_per_second_off": _summary(rates["off"]),
        "steps_per_second_on": _summary(rates["on"]),
        "ratio_on_vs_off": _summary(ratios),
        # the first call of 100 steps: tracing, plus XLA's compilation when on
        "first_call_seconds": first_call,
    }


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": [round(v, 4) for v in values],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--augment", action="store_true", help="train.augment.enabled for both")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = parser.parse_args(argv)
    result = _measure_here(args.steps, args.repeats, args.augment)
    if args.json:
        print(json.dumps(result))
        return 0
    ratio = result["ratio_on_vs_off"]
    print(
        f"steps/s{' with augmentation' if args.augment else ''}, XLA off: "
        f"{result['steps_per_second_off']['median']:,.0f}; on: "
        f"{result['steps_per_second_on']['median']:,.0f}; on/off ratio "
        f"{ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}] "
        f"(medians of {args.repeats} repeats); first call (tracing, compiling) "
        f"{result['first_call_seconds']['off']:.2f} s off, "
        f"{result['first_call_seconds']['on']:.2f} s on"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
