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
import sys
from typing import Any

from augment_bench import in_fresh_process, on_off


def measure(steps: int = 3000, repeats: int = 5, augment: bool = False) -> dict[str, Any]:
    """Run the benchmark in a subprocess; its figures (steps/s on, off and their ratio)."""
    args = ["--steps", str(steps), "--repeats", str(repeats)] + (["--augment"] if augment else [])
    return in_fresh_process(__file__, args)


def _measure_here(steps: int, repeats: int, augment: bool) -> dict[str, Any]:
    from pipeline.config import AugmentSettings, TrainSettings

    off, on = (
        TrainSettings(jit_compile=jit, augment=AugmentSettings(enabled=augment))
        for jit in (False, True)
    )
    return {**on_off(off, on, steps, repeats), "augment": augment}


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
