"""spark-submit jobs/tune.py --input FEATURES --output TUNE_DIR: search the model's structure."""

from pipeline.cli import job_parser, load_job_config, run, table


def main(args) -> int:
    config = load_job_config(args, __file__)

    from pipeline.session import build_session
    from pipeline.tracking import record_tuning
    from pipeline.tuning import BEST_FILE, PLOT_FILE, RESULTS_MD, run_tuning

    # Trials log their epochs; Spark's progress bar would garble them.
    spark = build_session(config.spark.model_copy(update={"show_progress": False}))
    result = run_tuning(spark, config, args.input, args.output)
    record_tuning(spark, config.tracking, result, config)  # when tracking.enabled

    rows = [
        [
            f"{r.trial.number:03d}" + (" ref" if r.trial.reference else ""),
            r.trial.structure,
            round(r.val_accuracy, 4) if r.val_accuracy is not None else "",
            f"{r.epoch}/{r.epochs_run}" if r.epoch is not None else "",
            round(r.seconds, 1),
            r.status if r.ok else f"failed ({r.error_type})",
        ]
        for r in result.results
    ]
    print(f"\ntune: {args.input} -> {result.output}  ({result.seconds:.0f} s)")
    print(table(rows, ["trial", "structure", "val_accuracy", "epoch", "seconds", "status"]))
    for note in result.notes:
        print(f"note: {note}")
    print(
        f"table: {result.output}/{RESULTS_MD}   plot: {result.output}/{PLOT_FILE}   "
        f"best: {result.output}/{BEST_FILE}"
    )
    return 0


def parser():
    p = job_parser(
        "Search the MLP's structure and training settings: expand tune.space (a grid, or "
        "tune.trials random samples), train every trial as its own one-task Spark job on "
        "the features (tune.parallelism at once), judge each on a validation split with "
        "early stopping, and publish TUNE_DIR: results.parquet, results.md (best first), "
        "val_accuracy.png, best.yaml (a conf file for jobs/train.py) and trials/NNN/ "
        "models. A failed trial is recorded with its error; the job fails only when "
        "every trial failed.",
        epilog=(
            "examples:\n"
            "  spark-submit jobs/tune.py --input out/features --output out/tune\n"
            "  spark-submit jobs/tune.py --input out/features --output out/tune "
            "--set tune.strategy=grid --set 'tune.space={hidden_units: [[32], [64]]}'\n"
            "  spark-submit jobs/train.py --input out/features --model-dir out/model "
            "--conf out/tune/best.yaml"
        ),
    )
    p.add_argument("--input", required=True, help="features directory (any Spark URI)")
    p.add_argument("--output", required=True, help="search directory, published atomically")
    return p


if __name__ == "__main__":
    run(main, parser())
