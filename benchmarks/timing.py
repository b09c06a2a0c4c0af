"""How every benchmark times its contenders and summarises the repeats.

- `timed`: wall-clock and CPU seconds of one measure (`cpu_seconds` counts this process
  and its children: Spark's JVM and Python workers in local mode);
- `seconds`: wall-clock seconds of one call, with what it returned;
- `rounds`: measures run in turn, round after round, so that load from other work on
  the machine falls on all of them alike;
- `stats` and `summarise_runs`: the median, min and max that ``benchmarks/run.py``
  recognises as a measured figure;
- `session`: the benchmarks' local SparkSession; `finish`: a command's table and JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.timing")


def cpu_seconds() -> float:
    """User and system CPU seconds of this process and all its children so far."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += times.user + times.system
    return total


def timed(measure: Callable, *args) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process and its children) of one measure.

    CPU seconds include Spark's JVM and its Python workers (children of this process in
    local mode); they are far less sensitive than wall-clock time to other work on the
    machine, so both are reported.
    """
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    measure(*args)
    wall = time.perf_counter() - started
    return wall, cpu_seconds() - cpu_before


def seconds(fn: Callable[[], object]) -> tuple[float, object]:
    """(wall-clock seconds, return value) of one call of `fn`."""
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def rounds(
    measures: dict[str, Callable[[str], object]], repeats: int, scratch: str | Path, label: str = ""
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and CPU seconds, by name, of `repeats` rounds of every measure in turn.

    Each measure gets a fresh output folder in a temporary directory under `scratch`,
    removed after it is timed.
    """
    wall: dict[str, list[float]] = {name: [] for name in measures}
    cpu: dict[str, list[float]] = {name: [] for name in measures}
    with tempfile.TemporaryDirectory(dir=scratch, prefix="bench-out-") as outputs:
        for repeat in range(repeats):
            for name, measure in measures.items():
                out = os.path.join(outputs, f"{name}-{repeat}")
                taken, used = timed(measure, out)
                wall[name].append(taken)
                cpu[name].append(used)
                log.info(
                    "%s repeat %d: %.2f s (%.1f CPU s, load %.1f)",
                    f"{label} {name}".strip(),
                    repeat + 1,
                    taken,
                    used,
                    os.getloadavg()[0],
                )
                shutil.rmtree(out, ignore_errors=True)
    return wall, cpu


def stats(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median, min, max and every value (``runs``), rounded to `digits`; NaN when empty."""
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "runs": []}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "runs": [round(v, digits) for v in values],
    }


def summarise_runs(
    runs: Sequence[dict[str, Any]],
    skip: Iterable[str] = (),
    settings: Iterable[str] = (),
    digits: int = 4,
) -> dict[str, Any]:
    """`stats` of every number the repeats of one contender recorded, by key.

    Other values, and the keys in `settings` (numbers that are chosen, not measured),
    are given once when every repeat recorded the same, else as the list of them.
    """
    skip, settings = set(skip), set(settings)
    summary: dict[str, Any] = {}
    for key, first in runs[0].items():
        if key in skip:
            continue
        values = [r.get(key) for r in runs]
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numbers and key not in settings:
            summary[key] = stats(values, digits)
        else:
            summary[key] = first if len({json.dumps(v) for v in values}) == 1 else values
    return summary


def session(app_name: str, driver_memory: str = "4g", **settings: Any):
    """A SparkSession for a benchmark: no progress bar, no UI, `settings` as in SparkSettings."""
    from pipeline.config import SparkSettings
    from pipeline.session import build_session

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return build_session(
        SparkSettings(
            app_name=app_name,
            show_progress=False,
            conf={"spark.driver.memory": driver_memory, "spark.ui.enabled": "false"},
            **settings,
        )
    )


def finish(table: str, result: dict[str, Any], json_path: str | None) -> int:
    """Print a command's table and, when asked, write its figures as JSON; exit code 0."""
    print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
