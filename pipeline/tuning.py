"""Structure search: trials of train settings trained in parallel, one Spark task each.

The search space (``tune.space``) maps train settings to candidate values. `grid` and
`sample` expand it into trials (pure functions); `plan_trials` turns those into validated
`TrainSettings`, one worker each, judged on a validation split with early stopping.
`run_tuning` trains them with `run_training` from a pool of driver threads: each trial is
a one-task Spark job that reads the same features itself, so ``tune.parallelism`` trials
run at once as Spark tasks. ``TUNE_DIR`` is published in one piece: ``results.parquet``,
``results.md`` (best first), ``val_accuracy.png``, ``best.yaml`` and ``trials/NNN/``.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import random
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError
from pyspark.sql import SparkSession
from pyspark.sql import types as T

from pipeline.config import Config, TrainSettings, TuneSettings
from pipeline.errors import ConfigError, EnvironmentProblem, PipelineError, TrainingError
from pipeline.storage import Storage

log = logging.getLogger(__name__)

__all__ = [
    "Trial",
    "TrialResult",
    "TuneResult",
    "best_config_yaml",
    "grid",
    "judged_epoch",
    "plan_trials",
    "run_tuning",
    "sample",
]

RESULTS_PARQUET = "results.parquet"
RESULTS_MD = "results.md"
PLOT_FILE = "val_accuracy.png"
BEST_FILE = "best.yaml"
TRIALS_DIR = "trials"

# A trial refused because another trial's job held the slot it needed is tried again.
_SLOT_RETRIES = 5
_SLOT_RETRY_SECONDS = 3.0
_SHUFFLE_LIMIT = 100_000  # combinations shuffled outright; above it, sampled by rejection


@dataclass(frozen=True)
class Trial:
    """One point of the search: the train settings it overrides, and all of them."""

    number: int
    params: dict[str, Any]
    settings: TrainSettings
    reference: bool = False

    @property
    def structure(self) -> str:
        """Hidden layers and activation, e.g. ``64-32 relu``."""
        units = "-".join(str(u) for u in self.settings.hidden_units)
        activations = self.settings.activations()
        names = activations[0] if len(set(activations)) == 1 else "/".join(activations)
        return f"{units} {names}"


@dataclass(frozen=True)
class TrialResult:
    """How a trial ended. Metrics are those of the epoch whose weights the model holds."""

    trial: Trial
    model_dir: str
    status: str  # "ok" or "failed"
    val_accuracy: float | None = None
    val_loss: float | None = None
    epoch: int | None = None  # the judged epoch
    epochs_run: int = 0
    seconds: float = 0.0
    history: tuple[dict[str, float], ...] = ()
    error: str | None = None
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class TuneResult:
    output: str
    results: list[TrialResult]  # best first; failed trials last
    parallelism: int
    seconds: float
    notes: list[str]

    @property
    def best(self) -> TrialResult | None:
        return self.results[0] if self.results and self.results[0].ok else None

    @property
    def failed(self) -> list[TrialResult]:
        return [r for r in self.results if not r.ok]


# -- the space, as pure functions ----------------------------------------------------------
def grid(space: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the candidates, the first key varying slowest."""
    keys = list(space)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*space.values())]


def sample(space: Mapping[str, Sequence[Any]], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` distinct combinations drawn at random without replacement (fewer if the
    space holds fewer). The same seed gives the same draws in the same order."""
    return list(itertools.islice(_random_combinations(space, seed), count))


def _random_combinations(space: Mapping[str, Sequence[Any]], seed: int) -> Iterator[dict]:
    keys = list(space)
    sizes = [len(space[k]) for k in keys]
    total = math.prod(sizes)
    rng = random.Random(seed)
    if total <= _SHUFFLE_LIMIT:
        order: Iterator[int] = iter(rng.sample(range(total), total))
    else:
        order = _distinct_randrange(rng, total)
    for index in order:
        combination = {}
        for key, size in zip(reversed(keys), reversed(sizes), strict=True):
            index, position = divmod(index, size)
            combination[key] = space[key][position]
        yield {k: combination[k] for k in keys}


def _distinct_randrange(rng: random.Random, total: int) -> Iterator[int]:
    seen: set[int] = set()
    while len(seen) < total:
        index = rng.randrange(total)
        if index not in seen:
            seen.add(index)
            yield index


def trial_base(train: TrainSettings, tune: TuneSettings) -> dict[str, Any]:
    """The train section every trial starts from: one worker, the tune section's epochs,
    validation split and early stopping."""
    return {
        **train.model_dump(mode="json"),
        "workers": 1,
        "epochs": tune.epochs,
        "validation_fraction": tune.validation_fraction,
        "validation_path": None,
        "early_stopping": tune.early_stopping.model_dump(mode="json"),
    }


def plan_trials(train: TrainSettings, tune: TuneSettings) -> list[Trial]:
    """The trials of a search, numbered from 0, each with validated, distinct settings.

    Trial 0 is the train section unchanged when ``tune.include_reference``. Combinations
    that `TrainSettings` rejects together (an activation list that does not match the
    layers) and combinations equal to an earlier trial are skipped; the random strategy
    draws further ones in their place, up to ``tune.trials`` in all.
    """
    base = trial_base(train, tune)
    if tune.strategy == "grid":
        combinations: Iterator[dict[str, Any]] = iter(grid(tune.space))
        budget = None
    else:
        combinations = _random_combinations(tune.space, tune.seed)
        budget = tune.trials
    trials: list[Trial] = []
    seen: set[str] = set()

    def add(params: dict[str, Any], reference: bool) -> None:
        settings = TrainSettings.model_validate({**base, **params})
        key = settings.model_dump_json()
        if key not in seen:
            seen.add(key)
            trials.append(Trial(len(trials), params, settings, reference))

    if tune.include_reference:
        add({}, reference=True)
    skipped = 0
    for params in combinations:
        if budget is not None and len(trials) >= budget:
            break
        try:
            add(params, reference=False)
        except ValidationError as exc:
            skipped += 1
            log.debug("skipping %s: %s", params, exc.errors()[0]["msg"])
    if skipped:
        log.info("skipped %d combinations that train settings reject together", skipped)
    if not trials:
        raise ConfigError("tune.space yields no valid combination of train settings")
    return trials


def judged_epoch(history: Sequence[Mapping[str, float]], settings: TrainSettings) -> dict | None:
    """The history record of the epoch whose weights the trained model holds.

    The training loop restores the best epoch's weights when early stopping stops it (and
    ``restore_best_weights``); otherwise the model is the last epoch's. This replays the
    same stopping rule over the recorded history.
    """
    if not history:
        return None
    stopping = settings.early_stopping
    if (
        not (stopping.enabled and stopping.restore_best_weights)
        or stopping.monitor not in (history[0])
    ):
        return dict(history[-1])
    lower_is_better = stopping.monitor.endswith("loss")
    best, wait, stopped = None, 0, False
    for record in history:
        value = record[stopping.monitor]
        if best is None or (
            value < best[stopping.monitor] if lower_is_better else value > best[stopping.monitor]
        ):
            best, wait = record, 0
        else:
            wait += 1
        stopped = wait >= stopping.patience
    return dict(best if stopped and best is not None else history[-1])


# -- running the trials --------------------------------------------------------------------
def run_tuning(
    spark: SparkSession,
    config: Config,
    input_path: str,
    output: str,
    *,
    _broken_trials: Collection[int] = (),
) -> TuneResult:
    """Train every trial of the search on the features at `input_path`; publish `output`.

    A trial that fails is recorded with its error and the others go on; `TrainingError`
    only when every trial failed (after publishing the table of errors). `_broken_trials`
    is for tests: those trials read a features path that does not exist, so they fail
    inside `run_training` as a real trial would.
    """
    from pipeline.training import run_training

    started = time.monotonic()
    tune = config.tune
    trials = plan_trials(config.train, tune)
    storage = Storage(spark)
    output = storage.qualify(output).rstrip("/")
    input_path = storage.qualify(input_path)
    storage.clear_stale_staging(output)
    staging = storage.staging_dir(output)
    parallelism, notes = _parallelism(spark, tune, len(trials))
    log.info(
        "%s search: %d trials, %d at a time, %d epochs at most each",
        tune.strategy,
        len(trials),
        parallelism,
        max(t.settings.epochs for t in trials),
    )

    lock = threading.Lock()
    done: list[TrialResult] = []

    def one(trial: Trial) -> TrialResult:
        name = f"{trial.number:03d}"
        trial_config = config.model_copy(update={"train": trial.settings})
        source = f"{input_path}/_no_such_features" if trial.number in _broken_trials else input_path
        trial_started = time.monotonic()
        for attempt in range(_SLOT_RETRIES + 1):
            try:
                result = run_training(
                    spark,
                    trial_config,
                    source,
                    f"{staging}/{TRIALS_DIR}/{name}",
                    workers=1,
                    fresh=True,
                    on_epoch=lambda record, name=name: _log_epoch(name, record),
                )
                break
            except EnvironmentProblem as exc:
                # Another trial's short jobs (counting rows) may hold the slot for a moment.
                if "free task slots" not in str(exc) or attempt == _SLOT_RETRIES:
                    return _failed(trial, output, exc, time.monotonic() - trial_started)
                log.info("trial %s waits for a free task slot", name)
                time.sleep(_SLOT_RETRY_SECONDS)
            except PipelineError as exc:
                return _failed(trial, output, exc, time.monotonic() - trial_started)
            except Exception as exc:  # anything else one trial raises must not sink the search
                log.warning("trial %s failed unexpectedly", name, exc_info=True)
                return _failed(trial, output, exc, time.monotonic() - trial_started)
        history = tuple(dict(h) for h in result.history)
        judged = judged_epoch(history, trial.settings) or {}
        return TrialResult(
            trial=trial,
            model_dir=f"{output}/{TRIALS_DIR}/{name}",
            status="ok",
            val_accuracy=judged.get("val_accuracy"),
            val_loss=judged.get("val_loss"),
            epoch=int(judged["epoch"]) if "epoch" in judged else None,
            epochs_run=result.metadata.epochs_completed,
            seconds=round(result.metadata.training_seconds or result.seconds, 3),
            history=history,
        )

    with ThreadPoolExecutor(parallelism, thread_name_prefix="trial") as pool:
        futures = [pool.submit(one, trial) for trial in trials]
        for future in as_completed(futures):
            result = future.result()
            with lock:
                done.append(result)
                count = len(done)
            if result.ok:
                log.info(
                    "trial %03d (%s) done [%d/%d]: val_accuracy %.4f at epoch %s, %.1f s",
                    result.trial.number,
                    result.trial.structure,
                    count,
                    len(trials),
                    result.val_accuracy or 0.0,
                    result.epoch,
                    result.seconds,
                )
            else:
                log.warning(
                    "trial %03d failed [%d/%d]: %s: %s",
                    result.trial.number,
                    count,
                    len(trials),
                    result.error_type,
                    result.error,
                )

    results = sorted(done, key=_rank_key)
    tune_result = TuneResult(output, results, parallelism, time.monotonic() - started, notes)
    _write_outputs(spark, storage, staging, tune_result, config, input_path)
    storage.publish(staging, output)
    if tune_result.best is None:
        first = results[0]
        raise TrainingError(
            f"all {len(results)} trials failed; trial {first.trial.number:03d}: "
            f"{first.error_type}: {first.error} (every error: {output}/{RESULTS_MD})"
        )
    return tune_result


def _parallelism(spark: SparkSession, tune: TuneSettings, trials: int) -> tuple[int, list[str]]:
    """Trials at once: ``tune.parallelism`` or the free task slots, never more than either."""
    from pipeline.training.distributed import task_slots

    slots, how = task_slots(spark)
    tracker = spark.sparkContext.statusTracker()
    busy = sum(
        info.numActiveTasks
        for info in (tracker.getStageInfo(s) for s in tracker.getActiveStageIds())
        if info is not None
    )
    free = max(1, slots - busy)
    notes = []
    wanted = tune.parallelism or free
    if wanted > free:
        notes.append(
            f"tune.parallelism {wanted} capped to {free}: the free task slots "
            f"({slots} in all, {busy} busy; {how})"
        )
        log.warning("%s", notes[-1])
    return max(1, min(wanted, free, trials)), notes


def _failed(trial: Trial, output: str, exc: BaseException, seconds: float) -> TrialResult:
    message = " ".join(str(exc).split())[:2000] or type(exc).__name__
    return TrialResult(
        trial=trial,
        model_dir=f"{output}/{TRIALS_DIR}/{trial.number:03d}",
        status="failed",
        seconds=round(seconds, 3),
        error=message,
        error_type=type(exc).__name__,
    )


def _log_epoch(name: str, record: Mapping[str, Any]) -> None:
    parts = [f"trial {name} epoch {int(record['epoch'])}/{int(record.get('epochs', 0))}"]
    parts += [f"{k} {record[k]:.4f}" for k in ("loss", "val_loss", "val_accuracy") if k in record]
    log.info("%s", "  ".join(parts))


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _rank_key(result: TrialResult) -> tuple:
    """Best first: highest validation accuracy, then lowest loss; failed trials last."""
    accuracy = result.val_accuracy if result.ok and _finite(result.val_accuracy) else -1.0
    loss = result.val_loss if _finite(result.val_loss) else math.inf
    return (-accuracy, loss, result.trial.number)


# -- outputs -------------------------------------------------------------------------------
def _write_outputs(
    spark: SparkSession,
    storage: Storage,
    staging: str,
    result: TuneResult,
    config: Config,
    input_path: str,
) -> None:
    keys = list(config.tune.space)
    _results_frame(spark, result.results, keys).coalesce(1).write.mode("overwrite").parquet(
        f"{staging}/{RESULTS_PARQUET}"
    )
    storage.write_text(f"{staging}/{RESULTS_MD}", results_markdown(result, config, input_path))
    storage.write_bytes(f"{staging}/{PLOT_FILE}", accuracy_png(result.results))
    if result.best is not None:
        storage.write_text(f"{staging}/{BEST_FILE}", best_config_yaml(result.best, result.output))


def _value(settings: TrainSettings, key: str) -> Any:
    return settings.model_dump(mode="json")[key]


def _column_type(values: list[Any]) -> T.DataType:
    if all(isinstance(v, bool) for v in values):
        return T.BooleanType()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return T.LongType()
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return T.DoubleType()
    if all(isinstance(v, list) and all(isinstance(u, int) for u in v) for v in values):
        return T.ArrayType(T.LongType())
    return T.StringType()


def _cell(value: Any, data_type: T.DataType) -> Any:
    if isinstance(data_type, T.DoubleType):
        return float(value)
    if isinstance(data_type, T.StringType) and not isinstance(value, str):
        return json.dumps(value)
    return value


def _results_frame(spark: SparkSession, results: list[TrialResult], keys: list[str]):
    """The results as a small DataFrame: a few dozen rows, made on the driver."""
    types = {k: _column_type([_value(r.trial.settings, k) for r in results]) for k in keys}
    fields = [
        T.StructField("rank", T.IntegerType(), False),
        T.StructField("trial", T.IntegerType(), False),
        T.StructField("reference", T.BooleanType(), False),
        T.StructField("structure", T.StringType(), False),
        *(T.StructField(k, types[k], True) for k in keys),
        T.StructField("val_accuracy", T.DoubleType(), True),
        T.StructField("val_loss", T.DoubleType(), True),
        T.StructField("epoch", T.IntegerType(), True),
        T.StructField("epochs_run", T.IntegerType(), False),
        T.StructField("train_seconds", T.DoubleType(), False),
        T.StructField("status", T.StringType(), False),
        T.StructField("error_type", T.StringType(), True),
        T.StructField("error", T.StringType(), True),
        T.StructField("params", T.StringType(), False),
        T.StructField("model_dir", T.StringType(), False),
    ]
    rows = [
        (
            rank,
            r.trial.number,
            r.trial.reference,
            r.trial.structure,
            *(_cell(_value(r.trial.settings, k), types[k]) for k in keys),
            r.val_accuracy,
            r.val_loss,
            r.epoch,
            r.epochs_run,
            float(r.seconds),
            r.status,
            r.error_type,
            r.error,
            json.dumps(r.trial.params, sort_keys=True),
            r.model_dir,
        )
        for rank, r in enumerate(results, start=1)
    ]
    return spark.createDataFrame(rows, T.StructType(fields))


def _md_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def results_markdown(result: TuneResult, config: Config, input_path: str) -> str:
    """The results as a markdown table, best first, with the search's settings above it."""
    tune = config.tune
    keys = list(tune.space)
    ok = [r for r in result.results if r.ok]
    lines = [
        "# Structure search",
        "",
        f"{len(result.results)} trials ({tune.strategy}, {len(ok)} finished, "
        f"{len(result.failed)} failed), {result.parallelism} at a time, on `{input_path}`; "
        f"each judged on a {tune.validation_fraction:g} validation split"
        + (
            f" with early stopping on {tune.early_stopping.monitor} "
            f"(patience {tune.early_stopping.patience})"
            if tune.early_stopping.enabled
            else ""
        )
        + f". Search took {result.seconds:.0f} s.",
        "",
    ]
    headers = ["rank", "trial", *keys, "val_accuracy", "val_loss", "epoch", "seconds", "status"]
    lines.append("| " + " | ".join(headers) + " |")
    numeric = {"rank", "val_accuracy", "val_loss", "seconds"}
    lines.append("|" + "|".join("---:" if h in numeric else "---" for h in headers) + "|")
    for rank, r in enumerate(result.results, start=1):
        trial = f"{r.trial.number:03d}" + (" (reference)" if r.trial.reference else "")
        status = r.status if r.ok else f"failed: {r.error_type}: {_short(r.error)}"
        cells = [
            str(rank),
            trial,
            *(_md_value(_value(r.trial.settings, k)) for k in keys),
            f"{r.val_accuracy:.4f}" if _finite(r.val_accuracy) else "",
            f"{r.val_loss:.4f}" if _finite(r.val_loss) else "",
            f"{r.epoch}/{r.epochs_run}" if r.epoch is not None else "",
            f"{r.seconds:.1f}",
            status.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    best = result.best
    if best is not None:
        lines.append(
            f"Best: trial {best.trial.number:03d} ({best.trial.structure}), val_accuracy "
            f"{best.val_accuracy:.4f}; its train section is `{BEST_FILE}`."
        )
        reference = next((r for r in result.results if r.trial.reference and r.ok), None)
        if reference is not None and reference is not best:
            lines.append(
                f"Reference (trial {reference.trial.number:03d}): val_accuracy "
                f"{reference.val_accuracy:.4f}."
            )
    lines.append(
        "`epoch` is the epoch whose weights the model holds, of the epochs run; "
        "`seconds` is training time."
    )
    lines += [f"Note: {note}." for note in result.notes]
    return "\n".join(lines) + "\n"


def _short(text: str | None, limit: int = 160) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def accuracy_png(results: Sequence[TrialResult]) -> bytes:
    """A horizontal bar per finished trial, best at the top; the reference in orange."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    ok = [r for r in results if r.ok and _finite(r.val_accuracy)]
    figure = Figure(figsize=(8, 1.2 + 0.35 * max(len(ok), 1)), layout="constrained")
    axes = figure.subplots()
    labels = [
        f"{r.trial.number:03d} {r.trial.structure} "
        + ("(reference)" if r.trial.reference else _distinct(r))
        for r in ok
    ]
    values = [float(r.val_accuracy or 0.0) for r in ok]
    colours = ["tab:orange" if r.trial.reference else "tab:blue" for r in ok]
    positions = list(range(len(ok)))[::-1]
    axes.barh(positions, values, color=colours)
    axes.set_yticks(positions, labels, fontsize=8)
    for y, value in zip(positions, values, strict=True):
        axes.text(value, y, f" {value:.4f}", va="center", fontsize=8)
    if values:
        low = min(values)
        axes.set_xlim(max(0.0, low - (max(values) - low) - 0.02), min(1.0, max(values) + 0.02))
    failed = len(results) - len(ok)
    axes.set_xlabel("validation accuracy")
    axes.set_title(
        "Structure search: validation accuracy by trial (reference in orange)"
        + (f"; {failed} failed, not shown" if failed else ""),
        fontsize=9,
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _distinct(result: TrialResult) -> str:
    shown = {"hidden_units", "activation"}
    return " ".join(f"{k}={_md_value(v)}" for k, v in result.trial.params.items() if k not in shown)


def best_config_yaml(best: TrialResult, output: str) -> str:
    """The best trial's train section as a conf file for ``jobs/train.py --conf``."""
    header = (
        f"# Best trial {best.trial.number:03d} of the structure search in {output}:\n"
        f"# {best.trial.structure}, val_accuracy {best.val_accuracy:.4f} at epoch {best.epoch}.\n"
        "# spark-submit jobs/train.py --input FEATURES --model-dir MODEL --conf best.yaml\n"
    )
    body = yaml.safe_dump(
        {"train": best.trial.settings.model_dump(mode="json")}, sort_keys=False, width=100
    )
    return header + body


def trial_summaries(result: TuneResult) -> list[dict[str, Any]]:
    """One plain dict per trial, best first (for reports and tracking)."""
    return [
        {
            "trial": r.trial.number,
            "structure": r.trial.structure,
            "reference": r.trial.reference,
            "params": r.trial.params,
            "status": r.status,
            "val_accuracy": r.val_accuracy,
            "val_loss": r.val_loss,
            "epoch": r.epoch,
            "epochs_run": r.epochs_run,
            "seconds": r.seconds,
            "error_type": r.error_type,
            "error": r.error,
        }
        for r in result.results
    ]
