"""spark-submit jobs/train.py --input FEATURES --model-dir MODEL: train the digits MLP."""

from pipeline.cli import job_parser, load_job_config, run, table


def main(args) -> int:
    config = load_job_config(args, __file__)
    if args.workers is not None:
        config = config.with_overrides({"train": {"workers": args.workers}})

    from pipeline.session import build_session
    from pipeline.training import run_training

    # Worker 0's epoch lines are the progress display; Spark's bar would garble them.
    # The SparkSession only if a DataFrame is needed: the files route needs none.
    spark = build_session(config.spark.model_copy(update={"show_progress": False}), on_demand=True)
    result = run_training(spark, config, args.input, args.model_dir, fresh=args.fresh)
    from pipeline.tracking import record_training

    record_training(spark, config.tracking, result, input_path=args.input)  # if enabled

    metadata = result.metadata
    last = metadata.history[-1] if metadata.history else {}
    rows = [
        ["workers", metadata.workers],
        # The same word as metadata.json's train.sync; one worker needs no collectives.
        ["sync", metadata.train.sync + (" (one worker)" if metadata.workers == 1 else "")],
        ["epochs completed", metadata.epochs_completed],
        ["input rows", metadata.data.get("rows", 0)],
    ]
    splits = metadata.data.get("splits")
    if splits:  # a split ingest output: which splits were used, with their rows
        rows.append(["splits", ", ".join(f"{name} {n:,}" for name, n in splits.items())])
    if result.fit.resumed_from:
        rows.append(["resumed from epoch", max(result.fit.resumed_from)])
    rows += [[name, round(last[name], 4)] for name in _METRICS if name in last]
    rows += [
        ["samples/s", round(metadata.samples_per_second or 0)],
        ["training seconds", round(metadata.training_seconds or 0, 1)],
        ["job seconds", round(result.seconds, 1)],
    ]
    print(f"\ntrain: {args.input} -> {result.model_dir}")
    print(table(rows, ["", "value"]))
    print(f"model: {result.model_dir}/model.keras   history: {result.model_dir}/history.png")
    return 0


_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def parser():
    from pipeline.outputs import MODEL, output_help

    p = job_parser(
        "Train the Keras MLP (784 -> 32 relu -> 10 softmax by default) on the output of "
        "jobs/ingest.py, on one worker or as a Spark barrier stage of N workers with "
        "synchronous all-reduce SGD. Checkpoints every epoch under MODEL/checkpoints/; "
        "rerunning the same command resumes from the newest one. MODEL/ (model.keras, "
        "metadata.json, history.png) is published atomically.",
        set_example="train.epochs=5",
        epilog=(
            "examples:\n"
            "  spark-submit jobs/train.py --input out/features --model-dir out/model\n"
            "  spark-submit --master 'local[2]' jobs/train.py --input out/features "
            "--model-dir out/model --workers 2 --set train.sync=local_sgd\n"
            "  spark-submit jobs/train.py --input out/features --model-dir out/model "
            "--set train.validation_fraction=0.1 --set train.early_stopping.enabled=true"
        ),
    )
    p.add_argument("--input", required=True, help="features directory (any Spark URI)")
    p.add_argument("--model-dir", required=True, help=output_help(MODEL, "model directory"))
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="training workers, one Spark task slot each (default: train.workers, 1)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="delete MODEL/checkpoints and start from epoch 0 instead of resuming",
    )
    return p


if __name__ == "__main__":
    run(main, parser())
