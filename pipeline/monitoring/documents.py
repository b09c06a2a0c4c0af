"""Markdown a person reads: the model card of a model directory and a scoring run's report.

Both are rendered from what the pipeline already records (``metadata.json``, the
scoring ``_report.json``), so they never say more than the JSON beside them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MODEL_CARD = "model_card.md"
REPORT_MD = "_report.md"

INTENDED_INPUT = (
    "28×28 grayscale digits, centred by their centre of mass and scaled to fit a 20×20 "
    "box as in MNIST, light ink on a black background, pixel values scaled to [0, 1]."
)
KNOWN_LIMITS = (
    "Trained on handwritten MNIST-style digits only: inverted images (dark ink on white), "
    "digits far off-centre, printed fonts, several digits in one image or non-digits get "
    "confident but meaningless predictions. Scoring reports drift from the training "
    "profile (`drift.status`) to catch such inputs. Confidence is only as calibrated as "
    "the calibration section shows."
)


def model_card(
    metadata: Mapping[str, Any],
    validation: Mapping[str, Any] | None = None,
    command: str | None = None,
) -> str:
    """``MODEL/model_card.md`` from the model's metadata (as a dict) and, when there was
    validation data, its per-class metrics and calibration (``validation``)."""
    data = metadata.get("data") or {}
    train = metadata.get("train") or {}
    lines = [
        "# Model card: digit classifier",
        "",
        f"Model file `{metadata.get('model_file', 'model.keras')}`, sha256 "
        f"`{metadata.get('model_sha256', '?')}`; created {metadata.get('created') or '?'}.",
        "",
        "## Architecture and settings",
        "",
        f"Input {metadata.get('feature_dim')} features → hidden layers "
        f"{train.get('hidden_units')} ({train.get('activation')}) → "
        f"{metadata.get('classes')} softmax outputs. {metadata.get('epochs_completed')} epochs "
        f"on {metadata.get('workers')} worker(s), seed {metadata.get('seed')}.",
        "",
        _table(
            [[key, _value(value)] for key, value in train.items()],
            ["train setting", "value"],
        ),
        "",
        "## Data",
        "",
        f"{data.get('rows', '?'):,} input rows from `{data.get('path', '?')}`, validation "
        f"rows split off by train.validation_fraction included "
        f"(fingerprint sha256 `{str(data.get('sha256', '?'))[:16]}…`)."
        if isinstance(data.get("rows"), int)
        else "No data fingerprint recorded.",
        "",
    ]
    counts = data.get("class_counts") or {}
    if counts:
        lines += [
            _table([[k, v] for k, v in counts.items()], ["class", "input rows"]),
            "",
        ]
    splits = [
        f"validation: {train.get('validation_path')}" if train.get("validation_path") else None,
        f"validation fraction: {train.get('validation_fraction')}"
        if train.get("validation_fraction")
        else None,
    ]
    splits = [s for s in splits if s]
    lines += [f"Splits: {'; '.join(splits) if splits else 'no validation data'}.", ""]
    history = metadata.get("history") or []
    if history:
        keys = [k for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in history[0]]
        lines += [
            "## Training per epoch",
            "",
            _table(
                [[int(h["epoch"]), *(round(h[k], 4) for k in keys)] for h in history],
                ["epoch", *keys],
            ),
            "",
        ]
    if validation:
        per_class = validation.get("per_class") or []
        lines += ["## Validation", ""]
        if validation.get("accuracy") is not None:
            lines += [
                f"Accuracy {validation['accuracy']:.4f} on {validation.get('rows')} rows.",
                "",
            ]
        if per_class:
            lines += [
                _table(
                    [
                        [
                            k,
                            round(c["precision"], 4),
                            round(c["recall"], 4),
                            round(c["f1"], 4),
                            c["support"],
                        ]
                        for k, c in enumerate(per_class)
                    ],
                    ["class", "precision", "recall", "F1", "rows"],
                ),
                "",
            ]
        calibration = validation.get("calibration")
        if not calibration and validation.get("ece") is not None:
            lines += [
                f"Expected calibration error {validation['ece']:.4f} (no temperature scaling: "
                f"train.calibrate is off).",
                "",
            ]
        if calibration:
            lines += [
                f"Expected calibration error {calibration['ece_before']:.4f} before temperature "
                f"scaling, {calibration['ece_after']:.4f} after (temperature "
                f"{calibration['temperature']:.3f}, fitted on these rows).",
                "",
            ]
    lines += [
        "## Intended input",
        "",
        INTENDED_INPUT,
        "",
        "## Known limits",
        "",
        KNOWN_LIMITS,
        "",
        "## How to reproduce",
        "",
        "```",
        command or "spark-submit jobs/train.py --input FEATURES --model-dir MODEL",
        "```",
        "",
        "with the train settings above (`--set train.KEY=VALUE`), on the data whose "
        "fingerprint is given.",
    ]
    return "\n".join(lines) + "\n"


def scoring_report_md(report: Mapping[str, Any], pictures: Sequence[str] = ()) -> str:
    """``PRED/_report.md``: the scoring ``_report.json`` for a person."""
    sha = str(report.get("model_sha256", ""))[:12]
    lines = [
        f"# Scoring report: {report.get('status', '?')}",
        "",
        f"Input `{report.get('input')}` ({report.get('layout')}), "
        f"model `{report.get('model_dir')}` (sha256 `{sha}…`), "
        f"output `{report.get('output')}`.",
        "",
        "## Rows",
        "",
        _table(
            [
                ["in", report.get("rows_in")],
                ["scored", report.get("rows_out")],
                ["rejected", report.get("rows_rejected")],
                *[
                    [f"  {r}", n]
                    for r, n in sorted((report.get("rejected_by_reason") or {}).items())
                ],
            ],
            ["rows", "count"],
        ),
        "",
    ]
    evaluation = report.get("evaluation") or {}
    if evaluation:
        metrics = [
            ["mean confidence", evaluation.get("mean_confidence")],
            ["rows below the confidence threshold", evaluation.get("rows_below_threshold")],
            ["accuracy", evaluation.get("accuracy")],
            ["log loss", evaluation.get("log_loss")],
        ]
        lines += [
            "## Metrics",
            "",
            _table([[k, _value(v)] for k, v in metrics if v is not None], ["metric", "value"]),
            "",
        ]
    calibration = report.get("calibration")
    if calibration:
        scaled = (
            f" after temperature scaling (T = {calibration['temperature']:.3f})"
            if calibration.get("temperature")
            else ""
        )
        lines += [
            "## Calibration",
            "",
            f"Expected calibration error {calibration['ece']:.4f}{scaled}, largest bin gap "
            f"{calibration['mce']:.4f}, over {calibration['bins']} equal-width confidence bins "
            f"and {calibration['rows']:,} labelled rows.",
            "",
        ]
    drift = report.get("drift")
    if drift:
        lines += [
            f"## Drift: {drift['status']}",
            "",
            _table(
                [
                    ["ink histogram PSI", drift["ink_psi"], drift["checks"].get("ink_psi")],
                    [
                        "class mix PSI (predictions vs training labels)",
                        drift.get("class_mix_psi"),
                        drift["checks"].get("class_mix_psi"),
                    ],
                    [
                        "per-pixel mean, mean absolute difference",
                        drift["pixel_mean_mad"],
                        drift["checks"].get("pixel_mean_mad"),
                    ],
                    [
                        "mean intensity (training → scored)",
                        f"{drift['ink_mean']['training']:.4f} → {drift['ink_mean']['scored']:.4f}",
                        "",
                    ],
                    [
                        "non-zero pixels (training → scored)",
                        f"{drift['nonzero_share']['training']:.4f} → "
                        f"{drift['nonzero_share']['scored']:.4f}",
                        "",
                    ],
                ],
                ["measure", "value", "status"],
            ),
            "",
        ]
    if pictures:
        lines += ["## Pictures", "", *[f"- [{name}]({name})" for name in pictures], ""]
    return "\n".join(lines) + "\n"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        out.append("| " + " | ".join(_value(v) if v is not None else "" for v in row) + " |")
    return "\n".join(out)
