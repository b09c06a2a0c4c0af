"""Run every stage's benchmark in one invocation and write the results.

    python benchmarks/run.py --rows 1000000 --repeats 3 [--stages ingest train score]
        [--process-rows 300000 --process-small-rows 60000 --process-epochs 10]
        [--process-contenders train start_floor] [--process-train-set KEY=VALUE]

Each stage lives in ``benchmarks/<stage>_bench.py`` and exposes
``run(rows: int, repeats: int, **optional) -> dict``; the optional keywords it may accept
are ``spark`` (a shared SparkSession), ``data_dir`` and ``layouts``, plus any keywords
given for that stage alone in ``stage_options``. Inside the returned
dict a measured figure is a dict with ``median``, ``min`` and ``max`` (and ``runs``), and a
ratio is any key that starts with ``ratio``. A stage whose module is missing or fails is
recorded as skipped or failed; the other stages still run.

Writes ``benchmarks/results/latest.json`` (everything) and ``latest.md`` (tables).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import inspect
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks")

HERE = Path(__file__).resolve().parent
STAGES = ("ingest", "train", "score", "explain", "memory", "process")
PACKAGES = ("pyspark", "tensorflow", "keras", "pandas", "pyarrow", "numpy", "pillow")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import psutil

    return {
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "java": _java_version(),
    }


def _cpu_model() -> str | None:
    """The CPU's model name where Linux says it (the same count of cores can differ in
    speed several times over from one machine to the next)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    if found.get("tensorflow") == "not installed":
        with contextlib.suppress(metadata.PackageNotFoundError):
            found["tensorflow"] = metadata.version("tensorflow-cpu")
    return found


def run_all(
    rows: int,
    repeats: int,
    stages: Sequence[str] = STAGES,
    rows_by_stage: dict[str, int] | None = None,
    layouts: Sequence[str] = ("array",),
    data_dir: str | None = None,
    stage_options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the stages' benchmarks in turn; returns the whole results document."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    rows_by_stage = rows_by_stage or {}
    optional = {"layouts": list(layouts), "data_dir": data_dir}
    results: dict[str, Any] = {}
    for stage in stages:
        stage_rows = rows_by_stage.get(stage, rows)
        started = time.monotonic()
        try:
            module = importlib.import_module(f"{stage}_bench")
        except ModuleNotFoundError as exc:
            if exc.name != f"{stage}_bench":
                raise
            log.warning("no benchmarks/%s_bench.py: %s skipped", stage, stage)
            results[stage] = {"status": "skipped", "reason": f"no benchmarks/{stage}_bench.py"}
            continue
        accepted = inspect.signature(module.run).parameters
        kwargs = {k: v for k, v in optional.items() if k in accepted and v is not None}
        kwargs |= (stage_options or {}).get(stage, {})
        log.info("%s: %d rows, %d repeats", stage, stage_rows, repeats)
        try:
            figures = module.run(rows=stage_rows, repeats=repeats, **kwargs)
        except Exception as exc:  # one stage's failure must not lose the others' figures
            log.error("%s benchmark failed: %s", stage, exc)
            results[stage] = {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
            continue
        results[stage] = {
            "status": "ok",
            "rows": stage_rows,
            "wall_seconds": round(time.monotonic() - started, 1),
            **figures,
        }
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "repeats": repeats,
        "machine": machine(),
        "versions": versions(),
        "stages": results,
    }


def to_markdown(doc: dict[str, Any]) -> str:
    """The results document as Markdown tables: one row per figure, then the ratios."""
    m = doc["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"- date: {doc['date']}",
        f"- command: `{doc['command']}`",
        f"- machine: {m['logical_cpus']} CPUs ({m['processor']}), {m['memory_gib']} GiB, "
        f"{m['platform']}, "
        f"Python {m['python']}, {m['java']}; load average at start "
        f"{', '.join(str(x) for x in m['load_average_at_start'])}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()),
        f"- every figure: median (min - max) of {doc['repeats']} runs",
        "",
    ]
    for stage, result in doc["stages"].items():
        lines.append(f"## {stage}")
        lines.append("")
        if result.get("status") != "ok":
            lines += [f"{result.get('status')}: {result.get('reason') or result.get('error')}", ""]
            continue
        figures, ratios = [], []
        _walk(result, (), figures, ratios)
        if figures:
            lines += ["| figure | median | min | max |", "|---|---:|---:|---:|"]
            lines += [
                f"| {name} | {_num(s['median'])} | {_num(s['min'])} | {_num(s['max'])} |"
                for name, s in figures
            ]
            lines.append("")
        if ratios:
            lines += ["| ratio | value |", "|---|---:|"]
            lines += [f"| {name} | {_num(v)} |" for name, v in ratios]
            lines.append("")
    return "\n".join(lines) + "\n"


def _walk(node: Any, path: tuple[str, ...], figures: list, ratios: list) -> None:
    if not isinstance(node, dict):
        return
    if {"median", "min", "max"} <= node.keys():
        figures.append((" / ".join(path), node))
        return
    for key, value in node.items():
        if key.startswith("ratio") and isinstance(value, (int, float)):
            ratios.append((" / ".join((*path, key)), value))
        elif key.startswith("ratio") and isinstance(value, dict) and "median" in value:
            figures.append((" / ".join((*path, key)), value))
        else:
            _walk(value, (*path, str(key)), figures, ratios)


def _num(value: float) -> str:
    return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"


def _java_version() -> str:
    try:
        out = subprocess.run(
            ["java", "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "java: unknown"
    first = (out.stderr or out.stdout).splitlines()
    return first[0].strip() if first else "java: unknown"


def main(argv: Sequence[str] | None = None) -> int:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from process_bench import add_selection_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for every stage")
    parser.add_argument("--train-rows", type=int, default=None, help="rows for training")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument(
        "--layouts", nargs="+", default=["array"], choices=["array", "image", "columns"]
    )
    parser.add_argument("--data-dir", default=None, help="generated data (default benchmarks/data)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument(
        "--process-rows",
        type=int,
        default=300_000,
        help="whole-process stage: rows of the large train and score runs",
    )
    parser.add_argument(
        "--process-small-rows",
        type=int,
        default=60_000,
        help="whole-process stage: rows of the train run against the reference script",
    )
    parser.add_argument(
        "--process-epochs", type=int, default=10, help="whole-process stage: training epochs"
    )
    add_selection_arguments(parser, prefix="process-")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    if args.repeats < 3:
        log.warning("--repeats %d: the results ask for at least 3 runs per figure", args.repeats)

    rows_by_stage = {"train": args.train_rows} if args.train_rows else {}
    rows_by_stage["process"] = args.process_rows
    process = {
        "small_rows": args.process_small_rows,
        "epochs": args.process_epochs,
        "contenders": args.process_contenders,
        "train_settings": args.process_train_set,
    }
    doc = run_all(
        args.rows,
        args.repeats,
        args.stages,
        rows_by_stage,
        args.layouts,
        args.data_dir,
        stage_options={"process": process},
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    markdown = to_markdown(doc)
    (out / "latest.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    failed = [s for s, r in doc["stages"].items() if r.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
