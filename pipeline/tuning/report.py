"""What a search writes into ``TUNE_DIR`` besides its study and trial models: the table
(``results.parquet``, ``results.md``), the plot and ``best.yaml``, a conf file that
``jobs/train.py --conf`` takes unchanged."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import yaml
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from pipeline.config import Config, TrainSettings
from pipeline.plots import Entry, ranking_png
from pipeline.storage import Storage
from pipeline.tuning.study import CONFIRM_DIR

if TYPE_CHECKING:
    from pipeline.tuning.confirm import Confirmation
    from pipeline.tuning.search import TrialResult, TuneResult

__all__ = [
    "BEST_FILE",
    "OWNED",
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
# Everything a search writes into TUNE_DIR besides its study (what --fresh deletes).
OWNED = (TRIALS_DIR, CONFIRM_DIR, RESULTS_PARQUET, RESULTS_MD, PLOT_FILE, BEST_FILE)


def write_outputs(
    spark: SparkSession,
    storage: Storage,
    directory: str,
    result: TuneResult,
    config: Config,
    input_path: str,
) -> None:
    """Write the table, the plot and (when a trial finished) ``best.yaml`` into
    `directory`, each file replaced whole."""
    keys = list(config.tune.space)
    confirmed = {c.trial.number: c for c in result.confirmations if not c.trial.reference}
    if result.results:
        results_frame(spark, result.results, keys, confirmed).coalesce(1).write.mode(
            "overwrite"
        ).parquet(f"{directory}/{RESULTS_PARQUET}")
    storage.write_text(f"{directory}/{RESULTS_MD}", results_markdown(result, config, input_path))
    if result.confirmations:
        storage.write_bytes(f"{directory}/{PLOT_FILE}", accuracy_png(result))
        storage.write_text(f"{directory}/{BEST_FILE}", best_config_yaml(result, config))


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _value(settings: TrainSettings, key: str) -> Any:
    value: Any = settings.model_dump(mode="json")
    for part in key.split("."):
        value = value[part]
    return value


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


def results_frame(
    spark: SparkSession,
    results: list[TrialResult],
    keys: list[str],
    confirmed: dict[int, Confirmation],
) -> DataFrame:
    """The search trials as a small DataFrame (made on the driver), best first; a space
    key ``section.field`` is the column ``section_field``."""
    types = {k: _column_type([_value(r.trial.settings, k) for r in results]) for k in keys}
    fields = [
        T.StructField("rank", T.IntegerType(), False),
        T.StructField("trial", T.IntegerType(), False),
        T.StructField("structure", T.StringType(), False),
        *(T.StructField(k.replace(".", "_"), types[k], True) for k in keys),
        T.StructField("val_accuracy", T.DoubleType(), True),
        T.StructField("val_loss", T.DoubleType(), True),
        T.StructField("epoch", T.IntegerType(), True),
        T.StructField("epochs_run", T.IntegerType(), False),
        T.StructField("train_seconds", T.DoubleType(), False),
        T.StructField("status", T.StringType(), False),
        T.StructField("confirmed_mean", T.DoubleType(), True),
        T.StructField("confirmed_std", T.DoubleType(), True),
        T.StructField("error_type", T.StringType(), True),
        T.StructField("error", T.StringType(), True),
        T.StructField("params", T.StringType(), False),
        T.StructField("model_dir", T.StringType(), True),
    ]
    rows = []
    for rank, r in enumerate(results, start=1):
        c = confirmed.get(r.trial.number)
        rows.append(
            (
                rank,
                r.trial.number,
                r.trial.structure,
                *(_cell(_value(r.trial.settings, k), types[k]) for k in keys),
                r.val_accuracy,
                r.val_loss,
                r.epoch,
                r.epochs_run,
                float(r.seconds),
                r.status,
                c.mean if c is not None and c.accuracies else None,
                c.std if c is not None and c.measured else None,
                r.error_type,
                r.error,
                json.dumps(r.trial.params, sort_keys=True),
                r.model_dir if r.ok else None,
            )
        )
    return spark.createDataFrame(rows, T.StructType(fields))


def _md_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def results_markdown(result: TuneResult, config: Config, input_path: str) -> str:
    """The confirmation table and the decision, then every search trial, best first."""
    tune = config.tune
    keys = list(tune.space)
    counts = {s: sum(1 for r in result.results if r.status == s) for s in ("ok", "pruned")}
    stopping = tune.early_stopping
    pruning = (
        f", pruned by the {tune.pruner} rule after a warm-up of {tune.prune_warmup_epochs} epochs"
        if tune.pruner != "none"
        else ""
    )
    lines = [
        "# Structure search",
        "",
        f"{len(result.results)} trials ({tune.strategy}: {counts['ok']} finished, "
        f"{counts['pruned']} pruned, {len(result.failed)} failed), {result.parallelism} at "
        f"a time, on `{input_path}`; each judged on a {tune.validation_fraction:g} validation "
        "split"
        + (
            f" with early stopping on {stopping.monitor} (patience {stopping.patience})"
            if stopping.enabled
            else ""
        )
        + f"{pruning}. The search took {result.seconds / 60:.1f} minutes.",
        "",
    ]
    if result.confirmations:
        seeds = sorted({s for c in result.confirmations for s in c.seeds})
        lines += [
            "## Confirmation",
            "",
            f"The best {_trials(len(result.confirmations) - 1)} and the reference, each retrained "
            f"with seeds {', '.join(map(str, seeds))} (new initial weights, batch order and "
            "validation rows), ranked by mean validation accuracy:",
            "",
            "| rank | trial | structure | settings | mean ± std | per seed | search | epochs |",
            "|---:|---|---|---|---:|---|---:|---|",
        ]
        for rank, c in enumerate(result.confirmations, start=1):
            spread = f" ± {c.std:.4f}" if c.measured else ""
            cells = [
                str(rank),
                c.trial.name + (" (reference)" if c.trial.reference else ""),
                c.trial.structure,
                _distinct(c.trial.params),
                f"{c.mean:.4f}{spread}" if c.accuracies else "failed",
                ", ".join(f"{a:.4f}" for a in c.accuracies),
                f"{c.search_accuracy:.4f}" if finite(c.search_accuracy) else "",
                ", ".join(map(str, c.epochs)),
            ]
            lines.append("| " + " | ".join(cells).replace("\n", " ") + " |")
        lines += ["", f"Decision: {result.decision}.", ""]
        for c in result.confirmations:
            for error in c.errors:
                lines.append(f"- {c.trial.name} failed on a seed: {_short(error)}")
        lines.append("")
    lines += ["## Search trials", ""]
    headers = ["rank", "trial", *keys, "val_accuracy", "val_loss", "epoch", "seconds", "status"]
    lines.append("| " + " | ".join(headers) + " |")
    numeric = {"rank", "val_accuracy", "val_loss", "seconds"}
    lines.append("|" + "|".join("---:" if h in numeric else "---" for h in headers) + "|")
    for rank, r in enumerate(result.results, start=1):
        status = r.status if r.status != "failed" else f"failed: {r.error_type}: {_short(r.error)}"
        cells = [
            str(rank),
            r.trial.name,
            *(_md_value(_value(r.trial.settings, k)) for k in keys),
            f"{r.val_accuracy:.4f}" if finite(r.val_accuracy) else "",
            f"{r.val_loss:.4f}" if finite(r.val_loss) else "",
            f"{r.epoch}/{r.epochs_run}" if r.epoch is not None else "",
            f"{r.seconds:.1f}",
            status.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "`epoch` is the epoch whose weights the model holds, of the epochs run (a pruned "
        "trial: its last); `seconds` is training time.",
    ]
    lines += [f"Note: {note}." for note in result.notes]
    return "\n".join(lines) + "\n"


def _trials(count: int) -> str:
    return "trial" if count == 1 else f"{count} trials"


def _short(text: str | None, limit: int = 160) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _distinct(params: dict[str, Any]) -> str:
    shown = {"hidden_units", "activation"}
    return " ".join(f"{k}={_md_value(v)}" for k, v in params.items() if k not in shown)


def accuracy_png(result: TuneResult) -> bytes:
    """The confirmed trials and the reference: mean ± std over the seeds, best at the top,
    with the reference's mean ± std as a band."""
    shown = [c for c in result.confirmations if c.accuracies]
    bars = [
        Entry(
            f"{c.trial.name} {c.trial.structure}"
            + (" (reference)" if c.trial.reference else "\n" + _wrapped(c.trial.params)),
            c.mean,
            error=c.std if c.measured else None,
            reference=c.trial.reference,
        )
        for c in shown
    ]
    reference = result.reference
    band = (
        (reference.mean - reference.std, reference.mean + reference.std)
        if reference is not None and reference.measured
        else None
    )
    seeds = max((len(c.seeds) for c in shown), default=0)
    verdict = f"trial {result.winner.trial.name} wins" if result.winner else "the reference is kept"
    return ranking_png(
        bars,
        title=f"Confirmation: validation accuracy, mean ± std over {seeds} seeds; {verdict}",
        xlabel="validation accuracy",
        band=band,
        band_label="reference mean ± std",
    )


def _wrapped(params: dict[str, Any]) -> str:
    """A trial's settings for a plot label: short lines."""
    return "\n".join(_wrap(_distinct(params), width=48))


def best_config_yaml(result: TuneResult, config: Config) -> str:
    """``best.yaml``: the winner's train section for training on all the data, or the
    reference's when no trial beat it by more than the noise."""
    winner = result.winner
    decision = "\n# ".join(_wrap(f"Decision: {result.decision}."))
    if winner is None:
        header = f"# Structure search in {result.output}.\n# {decision}\n"
        settings = config.train
    else:
        epochs = config.tune.final_epochs or winner.epochs_kept
        source = (
            "tune.final_epochs"
            if config.tune.final_epochs
            else "the median epoch its confirmation runs kept"
        )
        header = (
            f"# Structure search in {result.output}: trial {winner.trial.name} "
            f"({winner.trial.structure}).\n# {decision}\n"
            "# Its train section for the final model: all the training data (the rows the "
            "search\n# validated on, and a split ingest output's split=validation rows "
            "too), the train\n# section's own validation and workers, "
            f"{epochs} epochs ({source}; its\n# confirmation runs kept epoch "
            f"{winner.epochs_kept}).\n"
        )
        settings = winner.trial.settings.model_copy(
            update={
                "workers": config.train.workers,
                "validation_fraction": config.train.validation_fraction,
                "validation_path": config.train.validation_path,
                "include_validation_split": True,
                "early_stopping": config.train.early_stopping,
                "seed": config.train.seed,
                "epochs": epochs,
            }
        )
    usage = "# spark-submit jobs/train.py --input FEATURES --model-dir MODEL --conf best.yaml\n"
    body = yaml.safe_dump({"train": settings.model_dump(mode="json")}, sort_keys=False, width=100)
    return header + usage + body


def _wrap(text: str, width: int = 88) -> Sequence[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines
