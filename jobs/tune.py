"""spark-submit jobs/tune.py --input FEATURES --output TUNE_DIR: search the model's structure."""

from pipeline.cli import job_parser, load_job_config, run, table

_SHOWN_TRIALS = 10


def main(args) -> int:
    config = load_job_config(args, __file__)

    from pipeline.session import build_session
    from pipeline.tracking import record_tuning
    from pipeline.tuning import BEST_FILE, PLOT_FILE, RESULTS_MD, run_tuning

    # Trials log their epochs; Spark's progress bar would garble them.
    spark = build_session(config.spark.model_copy(update={"show_progress": False}))
    result = run_tuning(spark, config, args.input, args.output, fresh=args.fresh)
    record_tuning(spark, config.tracking, result, config)  # when tracking.enabled

    trials = [
        [
            r.trial.name,
            r.trial.structure,
            round(r.val_accuracy, 4) if r.val_accuracy is not None else "",
            f"{r.epoch}/{r.epochs_run}" if r.epoch is not None else "",
            round(r.seconds, 1),
            r.status if r.status != "failed" else f"failed ({r.error_type})",
        ]
        for r in result.results[:_SHOWN_TRIALS]
    ]
    confirmed = [
        [
            c.trial.name,
            c.trial.structure,
            f"{c.mean:.4f} ± {c.std:.4f}" if c.measured else "",
            ", ".join(f"{a:.4f}" for a in c.accuracies),
            round(c.search_accuracy, 4) if c.search_accuracy is not None else "",
        ]
        for c in result.confirmations
    ]
    counts = (
        f"{len(result.results)} trials: {sum(r.ok for r in result.results)} finished, "
        f"{len(result.pruned)} pruned, {len(result.failed)} failed"
    )
    print(f"\ntune: {args.input} -> {result.output}  ({result.seconds / 60:.1f} min, {counts})")
    print(table(trials, ["trial", "structure", "val_accuracy", "epoch", "seconds", "status"]))
    if len(result.results) > _SHOWN_TRIALS:
        print(f"... {len(result.results) - _SHOWN_TRIALS} more in {RESULTS_MD}")
    if confirmed:
        print("\nconfirmation (validation accuracy over seeds):")
        print(table(confirmed, ["trial", "structure", "mean ± std", "per seed", "search"]))
    print(f"\n{result.decision}")
    for note in result.notes:
        print(f"note: {note}")
    print(
        f"table: {result.output}/{RESULTS_MD}   plot: {result.output}/{PLOT_FILE}   "
        f"best: {result.output}/{BEST_FILE}"
    )
    return 0


def parser():
    p = job_parser(
        "Search the MLP's structure and training settings with Optuna (tune.strategy tpe, "
        "random or grid over tune.space): every trial trains as its own one-task Spark job "
        "on the features (tune.parallelism at once), judged on a validation split; trials "
        "that trail the others are pruned. The study lives in TUNE_DIR/study.db: rerunning "
        "the same command resumes an interrupted search. Then the best tune.confirm_top "
        "trials and the reference are retrained with tune.confirm_seeds seeds, and "
        "TUNE_DIR gets results.parquet, results.md, val_accuracy.png and best.yaml (a conf "
        "file for jobs/train.py, naming the winner only when it beats the reference by "
        "more than the noise). The job fails only when no trial finished.",
        set_example="tune.trials=16",
        epilog=(
            "examples:\n"
            "  spark-submit jobs/tune.py --input out/features --output out/tune\n"
            "  spark-submit jobs/tune.py --input out/features --output out/tune --fresh "
            "--set tune.budget_minutes=5\n"
            "  spark-submit jobs/tune.py --input out/features --output out/tune "
            "--set tune.strategy=grid --set 'tune.space={hidden_units: [[32], [64]]}'\n"
            "  spark-submit jobs/train.py --input out/features --model-dir out/model "
            "--conf out/tune/best.yaml"
        ),
    )
    p.add_argument("--input", required=True, help="features directory (any Spark URI)")
    p.add_argument(
        "--output",
        required=True,
        help="search directory (local): study, trials, reports. If it exists it must be "
        "empty or a search directory of an earlier run (resumed, or started over with "
        "--fresh); anything else there (your files, a regular file, an input, the current "
        "or home directory) is refused with exit code 2 and left untouched",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="delete the search this directory holds and start over (default: resume it)",
    )
    return p


if __name__ == "__main__":
    run(main, parser())
