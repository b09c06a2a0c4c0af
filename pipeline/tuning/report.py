"""What a finished search writes into ``TUNE_DIR``: the table (Parquet and markdown), the
plot and ``best.yaml``, a conf file that ``jobs/train.py --conf`` takes unchanged."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import yaml
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from pipeline.config import Config, TrainSettings
from pipeline.plots import Bar, bars_png
from pipeline.storage import Storage

if TYPE_CHECKING:
    from pipeline.tuning.search import TrialResult, TuneResult

__all__ = [
    "BEST_FILE",
    "PLOT_FILE",
    "RESULTS_MD",
    "RESULTS_PARQUET",
    "TRIALS_DIR",
    "accuracy_png",
    "best_config_yaml",
    "results_markdown",
    "write_outputs",
]

RESULTS_PARQUET = "results.parquet"
RESULTS_MD = "results.md"
PLOT_FILE = "val_accuracy.png"
BEST_FILE = "best.yaml"
TRIALS_DIR = "trials"


def write_outputs(
    spark: SparkSession,
    storage: Storage,
    directory: str,
    result: TuneResult,
    config: Config,
    input_path: str,
) -> None:
    """Write the table, the plot and (when a trial finished) ``best.yaml`` into `directory`."""
    keys = list(config.tune.space)
    results_frame(spark, result.results, keys).coalesce(1).write.mode("overwrite").parquet(
        f"{directory}/{RESULTS_PARQUET}"
    )
    storage.write_text(f"{directory}/{RESULTS_MD}", results_markdown(result, config, input_path))
    storage.write_bytes(f"{directory}/{PLOT_FILE}", accuracy_png(result.results))
    if result.best is not None:
        storage.write_text(f"{directory}/{BEST_FILE}", best_config_yaml(result.best, result.output))


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


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


def results_frame(spark: SparkSession, results: list[TrialResult], keys: list[str]) -> DataFrame:
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
        trial = r.trial.name + (" (reference)" if r.trial.reference else "")
        status = r.status if r.ok else f"failed: {r.error_type}: {_short(r.error)}"
        cells = [
            str(rank),
            trial,
            *(_md_value(_value(r.trial.settings, k)) for k in keys),
            f"{r.val_accuracy:.4f}" if finite(r.val_accuracy) else "",
            f"{r.val_loss:.4f}" if finite(r.val_loss) else "",
            f"{r.epoch}/{r.epochs_run}" if r.epoch is not None else "",
            f"{r.seconds:.1f}",
            status.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    best = result.best
    if best is not None:
        lines.append(
            f"Best: trial {best.trial.name} ({best.trial.structure}), val_accuracy "
            f"{best.val_accuracy:.4f}; its train section is `{BEST_FILE}`."
        )
        reference = next((r for r in result.results if r.trial.reference and r.ok), None)
        if reference is not None and reference is not best:
            lines.append(
                f"Reference (trial {reference.trial.name}): val_accuracy "
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
    ok = [r for r in results if r.ok and finite(r.val_accuracy)]
    bars = [
        Bar(
            f"{r.trial.name} {r.trial.structure} "
            + ("(reference)" if r.trial.reference else _distinct(r)),
            float(r.val_accuracy or 0.0),
            reference=r.trial.reference,
        )
        for r in ok
    ]
    failed = len(results) - len(ok)
    return bars_png(
        bars,
        title="Structure search: validation accuracy by trial (reference in orange)"
        + (f"; {failed} failed, not shown" if failed else ""),
        xlabel="validation accuracy",
    )


def _distinct(result: TrialResult) -> str:
    shown = {"hidden_units", "activation"}
    return " ".join(f"{k}={_md_value(v)}" for k, v in result.trial.params.items() if k not in shown)


def best_config_yaml(best: TrialResult, output: str) -> str:
    """The best trial's train section as a conf file for ``jobs/train.py --conf``."""
    header = (
        f"# Best trial {best.trial.name} of the structure search in {output}:\n"
        f"# {best.trial.structure}, val_accuracy {best.val_accuracy:.4f} at epoch {best.epoch}.\n"
        "# spark-submit jobs/train.py --input FEATURES --model-dir MODEL --conf best.yaml\n"
    )
    body = yaml.safe_dump(
        {"train": best.trial.settings.model_dump(mode="json")}, sort_keys=False, width=100
    )
    return header + body
