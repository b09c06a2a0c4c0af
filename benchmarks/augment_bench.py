"""What augmentation costs the training loop: steps per second with it on and off.

    python benchmarks/augment_bench.py --steps 2000 --repeats 5
    python benchmarks/augment_bench.py --steps 2000 --repeats 5 --cores 1

Trains the reference model with the pipeline's own `Trainer` (one worker, one TensorFlow
thread as under ``spark.task.cpus=1``, the embedded sample in its store, 100 steps fused
per compiled call), once with ``train.augment.enabled`` false and once true, alternating
within each repeat so that load from other processes falls on both alike. Tracing and
compilation happen before the clock starts. Target: on/off ratio at least 0.5.

With augmentation on, the loop augments the next call's batches on a second thread while
the current call trains, as in a training job: that thread uses a free core when there
is one (a one-worker job on a machine of several cores). ``--cores 1`` pins the process
to one core, as when every core runs a task: the figure then is what the transform itself
costs.

The measurement runs in a fresh Python process (TensorFlow's thread pools are fixed when
it starts); `measure()` returns its figures as a dict for ``benchmarks/train_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import timing

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.5


def measure(steps: int = 2000, repeats: int = 5) -> dict[str, Any]:
    """Run the benchmark in a subprocess; its figures (steps/s on, off and their ratio),
    and the same pinned to one core under ``one_core``."""
    args = ["--steps", str(steps), "--repeats", str(repeats)]
    figures = in_fresh_process(__file__, args)
    if hasattr(os, "sched_setaffinity"):
        figures["one_core"] = in_fresh_process(__file__, [*args, "--cores", "1"])
    return figures


def in_fresh_process(script: str, args: list[str]) -> dict[str, Any]:
    """The figures a benchmark script prints as its last JSON line (``--json``), run in a
    fresh Python process: TensorFlow's thread pools are fixed when a process starts."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, str(Path(script).resolve()), *args, "--json"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(script).name} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def on_off(off: Any, on: Any, steps: int, repeats: int) -> dict[str, Any]:
    """Training steps per second with the `TrainSettings` `off` and `on`, alternating
    within each repeat, their ratio, and the seconds of each one's first call (tracing,
    and XLA's compilation when on), which happens before the clock starts.

    The pipeline's own `Trainer`: one worker, one TensorFlow thread as under
    ``spark.task.cpus=1``, the embedded sample in its store.
    """
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)

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
    # "on" compiles first: XLA takes its flags at a process's first compilation, and a
    # training job with augmentation keeps XLA's default optimisation level
    # (`pipeline.tf_runtime.XLA_OPTIMIZATION`); at that level "off" runs as fast.
    variants = {"on": on, "off": off}
    for name, settings in variants.items():
        trainer = Trainer(settings, workers=1)
        trainer.make_store(len(x))
        trainer.fill_store([(x, y)])
        per_call = settings.steps_per_call
        warm_up = rng.integers(0, len(x), (per_call, settings.batch_size)).astype(np.int32)
        started = time.perf_counter()
        trainer.train([Segment(None, warm_up)], per_call)  # trace and compile
        first_call[name] = time.perf_counter() - started
        trainers[name] = trainer

    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, trainer in trainers.items():
            batch_size = trainer.settings.batch_size
            batches = rng.integers(0, len(x), (steps, batch_size)).astype(np.int32)
            started = time.perf_counter()
            trainer.train([Segment(None, batches)], steps)
            rates[name].append(steps / (time.perf_counter() - started))
    ratios = [r_on / r_off for r_on, r_off in zip(rates["on"], rates["off"], strict=True)]
    return {
        "steps": steps,
        "steps_per_call": off.steps_per_call,
        "batch_size": off.batch_size,
        "tensorflow_threads": 1,
        "steps_per_second_off": timing.stats(rates["off"], 4),
        "steps_per_second_on": timing.stats(rates["on"], 4),
        "ratio_on_vs_off": timing.stats(ratios, 4),
        # the first call of `steps_per_call` steps: tracing, plus XLA's compilation when on
        "first_call_seconds": first_call,
    }


def _measure_here(steps: int, repeats: int) -> dict[str, Any]:
    from pipeline.config import AugmentSettings, TrainSettings

    off, on = (TrainSettings(augment=AugmentSettings(enabled=e)) for e in (False, True))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {**on_off(off, on, steps, repeats), "cores": cores, "target_ratio": TARGET}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--cores", type=int, help="run on this many cores only (Linux; default: all)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = parser.parse_args(argv)
    if args.cores:  # before TensorFlow starts its threads
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    result = _measure_here(args.steps, args.repeats)
    if args.json:
        print(json.dumps(result))
        return 0
    ratio = result["ratio_on_vs_off"]
    print(
        f"steps/s, augmentation off: {result['steps_per_second_off']['median']:,.0f}; "
        f"on: {result['steps_per_second_on']['median']:,.0f}; on/off ratio "
        f"{ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}] "
        f"(target >= {TARGET}; medians of {args.repeats} repeats; {result['cores']} cores)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
