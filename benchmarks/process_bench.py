"""What users wait for: whole ``spark-submit`` jobs against whole baseline processes.

    python benchmarks/process_bench.py --rows 300000 --small-rows 60000 --epochs 10 --repeats 3

Every figure is one process timed from its start to its exit, launched as a user launches
it: the project's ``spark-submit --master local[*]`` with ``SPARK_CONF_DIR`` at the
project's ``conf/`` and ``PYSPARK_PYTHON`` at this interpreter. The data is made once,
outside the timing, by the project's own jobs (``jobs/generate.py`` then ``jobs/ingest.py``,
array layout) and reused between runs: ``--small-rows`` and ``--rows`` training rows
(generate seed 0) and ``--heldout-rows`` held-out rows (seed 1: other augmentations of
the embedded digits). Each repeat runs, in turn, so that load from other jobs on the
machine falls on every contender alike:

- ``reference_small``: the reference Keras script as a process
  (``benchmarks/reference_train.py``: import TensorFlow, pyarrow read, ``model.fit``, save)
  on the small rows;
- ``train_small``: ``jobs/train.py`` on the same rows, one worker, ``--epochs`` epochs;
- ``train``: ``jobs/train.py`` on ``--rows`` rows, one worker, held-out rows as
  ``train.validation_path``; its own SGD-step seconds come from its ``metadata.json``
  (the ``steps`` phase when the job records phases, else ``training_seconds``);
- ``train_2_workers``: the same with ``--workers 2`` and every other setting default.
  Repeat r trains both (and ``train_small``) with ``train.seed`` 42 + r, so that
  ``accuracy_points_2_workers_minus_1`` is a median of pairs from independent seeds: one
  seed's difference alone moves by half a point from seed to seed;
- ``score``: ``jobs/score.py`` on the ``--rows`` features with the model of the first
  ``train`` run;
- ``copy``: ``benchmarks/spark_baselines.py copy``: Spark reads the features, writes them;
- ``mllib``: ``benchmarks/spark_baselines.py mllib-score``: MLlib's
  ``MultilayerPerceptronClassifier`` ([784, 32, 10]) loaded, ``transform`` and write; it is
  fitted once beforehand on ``--fit-rows`` rows, outside the timing;
- ``start_floor``: ``benchmarks/spark_baselines.py start-floor``: a SparkContext and one
  task that starts a Python process importing TensorFlow, as a training job's worker
  does; nothing read, no step taken. ``ratio_start_floor_vs_steps`` (this ÷ ``train``'s
  SGD steps) says how much of ``ratio_train_vs_steps`` is start-up that no training code
  can remove.

``--contenders`` runs some of them only (``score`` needs ``train``, whose model it
scores), for instance the large training job and the floor at another size::

    python benchmarks/process_bench.py --rows 1000000 --contenders train start_floor \
        --train-set train.memory_budget_mb=4096

``--train-set KEY=VALUE`` (repeatable) is passed on to every training job as ``--set``
(here: a budget that keeps a million rows in memory, as 300,000 are by default, rather
than streamed from local disk in every epoch); the results list it under
``train_settings``.

Ratios are taken within a repeat and summarised as median, min and max; a ratio (and its
target) whose two contenders did not both run is left out. The jobs' own
phase seconds (``metadata.json`` of training, ``_report.json`` of scoring) are reported
under ``phases`` when the jobs record them. `run()` is the entry point of
``benchmarks/run.py`` (stage ``process``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import timing

log = logging.getLogger("benchmarks.process")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA_DIR = HERE / "data"
# Whole-process ratios the pipeline aims at: at most these, except the two-worker speed-up
# (at least) and its held-out accuracy (within this many points of one worker's).
TARGETS = {
    "ratio_train_small_vs_reference": 0.5,
    "ratio_train_vs_steps": 2.0,
    "ratio_score_vs_copy": 0.6,
    "ratio_score_vs_mllib": 0.5,
    "ratio_2_workers_vs_1_samples_per_second": 1.2,
    "accuracy_points_2_workers_minus_1": 0.5,
}
_WITHIN = {"accuracy_points_2_workers_minus_1"}
# Repeat r trains with train.seed = FIRST_SEED + r (the config's default seed first).
FIRST_SEED = 42
# Figures of a run that are settings, not measurements.
_SETTINGS = {"workers", "sync", "steps_from"}
_AT_LEAST = {"ratio_2_workers_vs_1_samples_per_second"}
CONTENDERS = (
    "reference_small",
    "train_small",
    "train",
    "train_2_workers",
    "score",
    "copy",
    "mllib",
    "start_floor",
)


class ProcessFailed(RuntimeError):
    """A timed or preparatory process exited with an error."""


def run(
    rows: int = 300_000,
    repeats: int = 3,
    data_dir: str | Path | None = None,
    small_rows: int = 60_000,
    epochs: int = 10,
    heldout_rows: int = 10_000,
    fit_rows: int = 6_000,
    contenders: Sequence[str] = CONTENDERS,
    train_settings: Sequence[str] = (),
) -> dict[str, Any]:
    """Time each of `contenders` (default: all) `repeats` times; returns the figures for
    ``benchmarks/run.py``."""
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown or not contenders:
        raise ValueError(f"contenders {unknown or '(none)'}: choose from {', '.join(CONTENDERS)}")
    if "score" in contenders and "train" not in contenders:
        raise ValueError("the score contender scores the train contender's model: add train")
    chosen = set(contenders)
    data_dir = Path(data_dir or DEFAULT_DATA_DIR).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="process-bench-", dir=data_dir))
    try:
        # Only the data the chosen contenders read is made.
        small = large = heldout = mllib_model = ""
        if chosen & {"reference_small", "train_small"}:
            small = _features(data_dir, work, small_rows, seed=0)
        if chosen & {"train", "train_2_workers", "score", "copy", "mllib"}:
            large = _features(data_dir, work, rows, seed=0)
        if chosen & {"train", "train_2_workers", "mllib"}:
            heldout = _features(data_dir, work, heldout_rows, seed=1)
        if "mllib" in chosen:
            mllib_model = _mllib_model(data_dir, work, heldout, fit_rows)
        train = [item for setting in train_settings for item in ("--set", setting)]
        samples = _measure(work, small, large, heldout, mllib_model, epochs, repeats, chosen, train)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = _result(samples, rows, small_rows, heldout_rows, fit_rows, epochs, repeats)
    return {**result, "train_settings": list(train_settings)}


def _measure(
    work: Path,
    small: str,
    large: str,
    heldout: str,
    mllib_model: str,
    epochs: int,
    repeats: int,
    chosen: set[str],
    train_settings: list[str],
) -> dict[str, list[dict[str, Any]]]:
    """The `chosen` contenders' figures, one dict per repeat."""
    samples: dict[str, list[dict[str, Any]]] = {}
    validate = ["--set", f"train.validation_path={heldout}"]
    two = ["--workers", "2"]
    score_model = str(work / "score-model")
    for repeat in range(repeats):
        log.info("repeat %d of %d", repeat + 1, repeats)
        out = work / f"repeat-{repeat}"
        out.mkdir()
        # Each repeat trains from its own seed (its two training jobs share it): the
        # accuracy difference is then a median of independent pairs, not one pair thrice.
        train = [
            str(ROOT / "jobs" / "train.py"),
            "--fresh",
            "--set",
            f"train.epochs={epochs}",
            "--set",
            f"train.seed={FIRST_SEED + repeat}",
            *train_settings,
            "--input",
        ]
        runs = {
            "reference_small": partial(_reference, out / "reference", small, epochs),
            "train_small": partial(_train, "train_small", out / "train-small", [*train, small]),
            "train": partial(_train, "train", out / "train", [*train, large, *validate]),
            "train_2_workers": partial(
                _train, "train_2_workers", out / "train-2", [*train, large, *validate, *two]
            ),
            "score": partial(_score, out / "score", large, score_model),
            "copy": partial(_copy, out / "copy", large),
            "mllib": partial(_mllib, out / "mllib", large, mllib_model),
            "start_floor": _start_floor,
        }
        for name, measure in runs.items():
            if name not in chosen:
                continue
            figures = measure()
            log.info("%s: %s", name, figures)
            samples.setdefault(name, []).append(figures)
            if name == "train" and repeat == 0:
                shutil.copytree(out / "train", score_model)  # scored by every repeat
        shutil.rmtree(out, ignore_errors=True)
    return samples


def _result(
    samples: dict[str, list[dict[str, Any]]],
    rows: int,
    small_rows: int,
    heldout_rows: int,
    fit_rows: int,
    epochs: int,
    repeats: int,
) -> dict[str, Any]:
    def paired(numerator: str, key_a: str, denominator: str, key_b: str) -> dict | None:
        """Figure `key_a` of `numerator` over `key_b` of `denominator`, repeat by repeat;
        None when one of the two did not run."""
        if numerator not in samples or denominator not in samples:
            return None
        pairs = zip(samples[numerator], samples[denominator], strict=True)
        return timing.stats([a[key_a] / b[key_b] for a, b in pairs if a[key_a] and b[key_b]], 4)

    train = samples.get("train", [])
    ratios = {
        "ratio_train_small_vs_reference": paired(
            "train_small", "seconds", "reference_small", "seconds"
        ),
        "ratio_train_vs_steps": timing.stats(
            [s["seconds"] / s["steps_seconds"] for s in train if s["steps_seconds"]], 4
        )
        if train
        else None,
        "ratio_score_vs_copy": paired("score", "seconds", "copy", "seconds"),
        "ratio_score_vs_mllib": paired("score", "seconds", "mllib", "seconds"),
        "ratio_2_workers_vs_1_samples_per_second": paired(
            "train_2_workers", "samples_per_second", "train", "samples_per_second"
        ),
        "ratio_2_workers_vs_1_seconds": paired("train_2_workers", "seconds", "train", "seconds"),
        "ratio_start_floor_vs_steps": paired("start_floor", "seconds", "train", "steps_seconds"),
        "accuracy_points_2_workers_minus_1": timing.stats(
            [
                100 * (two["val_accuracy"] - one["val_accuracy"])
                for two, one in zip(samples["train_2_workers"], train, strict=True)
                if two.get("val_accuracy") is not None and one.get("val_accuracy") is not None
            ],
            4,
        )
        if "train_2_workers" in samples and train
        else None,
    }
    ratios = {key: value for key, value in ratios.items() if value is not None}
    targets = {}
    for key, target in TARGETS.items():
        if key not in ratios:
            continue
        median = ratios[key]["median"]
        if key in _WITHIN:
            sign, met = "within +-", abs(median) <= target
        elif key in _AT_LEAST:
            sign, met = ">=", median >= target
        else:
            sign, met = "<=", median <= target
        targets[key] = {"target": f"{sign} {target}", "met": median == median and met}
    return {
        "stage": "process",
        "rows": rows,
        "small_rows": small_rows,
        "heldout_rows": heldout_rows,
        "mllib_fit_rows": fit_rows,
        "epochs": epochs,
        "repeats": repeats,
        "master": "local[*]",
        "seconds": {
            name: timing.stats([s["seconds"] for s in runs], 4) for name, runs in samples.items()
        },
        "jobs": {
            name: timing.summarise_runs(runs, skip={"seconds", "phases"}, settings=_SETTINGS)
            for name, runs in samples.items()
            if name.startswith(("train", "score"))
        },
        "phases": {
            name: _phase_stats([s.get("phases") or {} for s in runs])
            for name, runs in samples.items()
            if any(s.get("phases") for s in runs)
        },
        **ratios,
        "targets": targets,
        "commands": _COMMANDS,
    }


# One example command line per contender (the last one run), for the report.
_COMMANDS: dict[str, str] = {}


def _reference(output: Path, features: str, epochs: int) -> dict[str, Any]:
    script = [str(HERE / "reference_train.py"), "--input", features, "--epochs", str(epochs)]
    command = [sys.executable, *script, "--output", str(output)]
    seconds, stdout = _timed("reference_small", command)
    printed = json.loads(stdout.strip().splitlines()[-1])
    return {"seconds": seconds, "fit_seconds": printed["fit_seconds"]}


def _train(name: str, model_dir: Path, args: list[str]) -> dict[str, Any]:
    seconds, _ = _timed(name, [*_submit(), *args, "--model-dir", str(model_dir)])
    metadata = json.loads((model_dir / "metadata.json").read_text(encoding="utf-8"))
    phases = find_phases(metadata)
    last = metadata.get("history", [{}])[-1] if metadata.get("history") else {}
    steps = phases.get("steps") or metadata.get("training_seconds")
    return {
        "seconds": seconds,
        "steps_seconds": steps,
        "steps_from": "phases.steps" if phases.get("steps") else "training_seconds",
        "training_seconds": metadata.get("training_seconds"),
        "samples_per_second": metadata.get("samples_per_second"),
        "process_samples_per_second": _trained_samples(metadata) / seconds,
        "val_accuracy": last.get("val_accuracy"),
        "workers": metadata.get("workers"),
        "sync": metadata.get("sync_mode") or metadata.get("train", {}).get("sync"),
        "phases": phases,
    }


def _score(output: Path, features: str, model_dir: str) -> dict[str, Any]:
    job = [str(ROOT / "jobs" / "score.py"), "--input", features, "--model-dir", model_dir]
    seconds, _ = _timed("score", [*_submit(), *job, "--output", str(output)])
    report = json.loads((output / "_report.json").read_text(encoding="utf-8"))
    return {
        "seconds": seconds,
        "job_seconds": report.get("seconds"),
        "accuracy": (report.get("evaluation") or {}).get("accuracy"),
        "phases": find_phases(report),
    }


def _copy(output: Path, features: str) -> dict[str, Any]:
    script = [str(HERE / "spark_baselines.py"), "copy", "--input", features]
    seconds, _ = _timed("copy", [*_submit(), *script, "--output", str(output)])
    return {"seconds": seconds}


def _mllib(output: Path, features: str, model: str) -> dict[str, Any]:
    script = [str(HERE / "spark_baselines.py"), "mllib-score", "--input", features, "--model"]
    seconds, _ = _timed("mllib", [*_submit(), *script, model, "--output", str(output)])
    return {"seconds": seconds}


def _start_floor() -> dict[str, Any]:
    script = [str(HERE / "spark_baselines.py"), "start-floor"]
    seconds, _ = _timed("start_floor", [*_submit(), *script])
    return {"seconds": seconds}


def find_phases(document: dict[str, Any]) -> dict[str, float]:
    """The seconds per phase a job recorded in its output document, or {} when it has none.

    The first mapping whose key names a phase ("phases", "seconds_by_phase", ...) found
    breadth-first; a mapping of such mappings (one per worker) gives its first entry's."""
    queue: list[Any] = [document]
    while queue:
        node = queue.pop(0)
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if "phase" in str(key):
                found = _numbers(value)
                if found:
                    return found
        queue.extend(v for v in node.values() if isinstance(v, dict | list))
        queue.extend(v for v in node.values() if isinstance(v, list) for v in v)
    return {}


def _numbers(value: Any) -> dict[str, float]:
    if isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, dict) or not value:
        return {}
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()):
        return {str(k): float(v) for k, v in value.items()}
    first = value[sorted(value)[0]]
    return _numbers(first) if isinstance(first, dict) else {}


def _trained_samples(metadata: dict[str, Any]) -> float:
    """Training samples of the whole run: the rows trained on times the epochs completed."""
    data = metadata.get("data") or {}
    rows = data.get("train_rows") or data.get("rows") or 0
    return rows * (metadata.get("epochs_completed") or 0)


def _features(data_dir: Path, work: Path, rows: int, seed: int) -> str:
    """`rows` ingested generated digits (array layout, generate seed `seed`): made once."""
    features = data_dir / f"process-features-{rows}-seed{seed}"
    if (features / "_SUCCESS").exists():
        return str(features)
    raw = work / f"raw-{rows}-seed{seed}"
    log.info("generating and ingesting %d rows (seed %d) into %s", rows, seed, features)
    generate = [str(ROOT / "jobs" / "generate.py"), "--rows", str(rows), "--seed", str(seed)]
    _timed("generate", [*_submit(), *generate, "--layout", "array", "--output", str(raw)])
    ingest = [str(ROOT / "jobs" / "ingest.py"), "--input", str(raw), "--output", str(features)]
    _timed("ingest", [*_submit(), *ingest])
    shutil.rmtree(raw, ignore_errors=True)
    return str(features)


def _mllib_model(data_dir: Path, work: Path, features: str, rows: int) -> str:
    """MLlib's [784, 32, 10] perceptron fitted on `rows` rows of `features`: made once."""
    model = data_dir / f"process-mllib-{rows}"
    if (model / "metadata").exists():
        return str(model)
    script = [str(HERE / "spark_baselines.py"), "mllib-fit", "--input", features]
    staging = work / "mllib-model"
    _timed("mllib-fit", [*_submit(), *script, "--model", str(staging), "--rows", str(rows)])
    shutil.move(str(staging), model)
    return str(model)


def _submit() -> list[str]:
    submit = Path(sys.executable).parent / "spark-submit"
    return [str(submit) if submit.exists() else "spark-submit", "--master", "local[*]"]


def _environment() -> dict[str, str]:
    """The environment a user's shell has for the jobs (as the Makefile sets it)."""
    env = dict(os.environ)
    env["PYSPARK_PYTHON"] = sys.executable
    env["SPARK_CONF_DIR"] = str(ROOT / "conf")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    return env


def _timed(name: str, command: list[str]) -> tuple[float, str]:
    """Run `command` to its exit; (wall seconds from start to exit, its stdout)."""
    _COMMANDS[name] = " ".join(_readable(part) for part in command)
    started = time.monotonic()
    done = subprocess.run(
        command, env=_environment(), cwd=ROOT, capture_output=True, text=True, check=False
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-30:])
        raise ProcessFailed(f"{name} exited with {done.returncode}: {_COMMANDS[name]}\n{tail}")
    return seconds, done.stdout


def _readable(part: str) -> str:
    """A command-line word with the project's and the interpreter's directories shortened,
    also in a ``key=value`` word."""
    key, equals, value = part.rpartition("=") if "=" in part else ("", "", part)
    for prefix in (str(Path(sys.executable).parent) + os.sep, str(ROOT) + os.sep):
        if value.startswith(prefix):
            return key + equals + value[len(prefix) :]
    return part


def _phase_stats(runs: list[dict[str, float]]) -> dict[str, Any]:
    names = dict.fromkeys(name for phases in runs for name in phases)
    return {name: timing.stats([p[name] for p in runs if name in p], 4) for name in names}


def format_table(result: dict[str, Any]) -> str:
    small = result["seconds"].keys() & {"reference_small", "train_small"}
    lines = [
        f"whole processes: {result['rows']:,} rows"
        + (f" ({result['small_rows']:,} for the reference comparison)" if small else "")
        + f", {result['epochs']} epochs, {result['repeats']} repeats, "
        f"{result['master']}; seconds, median (min - max)",
    ]
    for name, s in result["seconds"].items():
        lines.append(f"  {name:<18}{s['median']:>9.2f}  ({s['min']:.2f} - {s['max']:.2f})")
    for key, target in result["targets"].items():
        s = result[key]
        state = "met" if target["met"] else "NOT met"
        lines.append(
            f"  {key:<42}{s['median']:>8.3f}  ({s['min']:.3f} - {s['max']:.3f})"
            f"  target {target['target']}: {state}"
        )
    for key in ("ratio_2_workers_vs_1_seconds", "ratio_start_floor_vs_steps"):
        s = result.get(key)
        if s:
            lines.append(f"  {key:<42}{s['median']:>8.3f}  ({s['min']:.3f} - {s['max']:.3f})")
    for name, phases in result["phases"].items():
        shown = ", ".join(f"{p} {v['median']:.2f}" for p, v in phases.items())
        lines.append(f"  phases of {name} (s): {shown}")
    return "\n".join(lines)


def add_selection_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--contenders`` and ``--train-set`` (``--process-contenders`` and
    ``--process-train-set`` in ``benchmarks/run.py``, `prefix` ``process-``)."""
    stage = "whole-process stage: " if prefix else ""
    parser.add_argument(
        f"--{prefix}contenders",
        nargs="+",
        default=list(CONTENDERS),
        choices=CONTENDERS,
        metavar="NAME",
        help=f"{stage}run only these (default: all): {', '.join(CONTENDERS)}",
    )
    parser.add_argument(
        f"--{prefix}train-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{stage}a setting passed to every training job as --set (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000, help="rows of the large runs")
    parser.add_argument("--small-rows", type=int, default=60_000, help="rows vs the reference")
    parser.add_argument("--heldout-rows", type=int, default=10_000)
    parser.add_argument("--fit-rows", type=int, default=6_000, help="rows MLlib is fitted on")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    add_selection_arguments(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(
        args.rows,
        args.repeats,
        args.data_dir,
        small_rows=args.small_rows,
        epochs=args.epochs,
        heldout_rows=args.heldout_rows,
        fit_rows=args.fit_rows,
        contenders=args.contenders,
        train_settings=args.train_set,
    )
    return timing.finish(format_table(result), result, args.json)


if __name__ == "__main__":
    sys.exit(main())
