"""spark-submit jobs/score.py --input DATA --model-dir MODEL --output PRED: batch scoring."""

from pipeline.cli import job_parser, load_job_config, run, table


def main(args) -> int:
    config = load_job_config(args, __file__)

    from pipeline.evaluation import console_summary, split_summary
    from pipeline.scoring import run_scoring
    from pipeline.session import build_session

    # The SparkSession only if a DataFrame is needed: the files route needs none.
    spark = build_session(config.spark, on_demand=True)
    result = run_scoring(spark, config, args.input, args.model_dir, args.output)
    counts = result.counts
    rows = [
        ["rows in", counts.rows_in],
        ["rows scored", counts.rows_out],
        ["rows rejected", counts.rows_rejected],
    ]
    rows += [[f"  {reason}", n] for reason, n in sorted(counts.rejected_by_reason.items())]
    rows += [["seconds", round(result.seconds, 1)], ["rows/s", round(result.rows_per_second)]]
    print(f"\nscore: {result.layout} input -> {result.output}")
    print(table(rows, ["", "count"]))
    print()
    print(console_summary(result.evaluation))
    if result.by_split:
        print()
        print(split_summary(result.by_split))
    plots = "_confusion_matrix.png, " if result.evaluation.has_labels else ""
    print(
        f"\nreport: {result.output}/_report.json (_report.md to read)   "
        f"plots: {plots}_confidence_histogram.png"
    )
    if counts.rows_rejected:
        print(f"rejected rows: {result.output}/_rejected/")
    if result.evaluation.accuracy is not None:
        print(f"accuracy: {result.evaluation.accuracy:.4f}")
    watch = result.watch
    if watch is not None and watch.calibration is not None:
        print(f"calibration: ECE {watch.calibration.ece:.4f} ({result.output}/_calibration.png)")
    if watch is not None and watch.drift is not None:
        print(watch.drift.summary())
    elif watch is not None:
        why = (
            "score.drift.enabled is false"
            if not config.score.drift.enabled
            else "the model records no training profile: retrain it"
        )
        print(f"drift: not measured ({why})")
    return 0


def parser():
    from pipeline.outputs import SCORE, output_help

    p = job_parser(
        "Score digits with a trained model: ingested features or any raw layout the ingest "
        "job accepts (preprocessed with the settings recorded in the model). Writes "
        "predictions, probabilities and confidence to OUTPUT, rejected rows to "
        "OUTPUT/_rejected, and the evaluation to OUTPUT/_report.json with its plots.",
        set_example="score.confidence_threshold=0.8",
        epilog=(
            "example:\n  spark-submit jobs/score.py --input out/features --model-dir out/model "
            "--output out/predictions --set score.confidence_threshold=0.8"
        ),
    )
    p.add_argument(
        "--input", required=True, help="Parquet or CSV file or directory (any Spark URI)"
    )
    p.add_argument("--model-dir", required=True, help="model directory written by training")
    p.add_argument("--output", required=True, help=output_help(SCORE))
    return p


if __name__ == "__main__":
    run(main, parser())
