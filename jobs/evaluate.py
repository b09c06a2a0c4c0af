"""spark-submit jobs/evaluate.py --predictions PRED: recompute a scoring run's evaluation."""

from pipeline.cli import job_parser, load_job_config, run


def main(args) -> int:
    config = load_job_config(args, __file__)

    from pipeline.evaluation import console_summary, run_evaluation
    from pipeline.session import build_session

    spark = build_session(config.spark)
    result = run_evaluation(spark, config, args.predictions)
    print(f"\nevaluate: {result.output}")
    print(console_summary(result.evaluation))
    print("\nwritten: " + ", ".join(result.files))
    if result.evaluation.accuracy is not None:
        print(f"accuracy: {result.evaluation.accuracy:.4f}")
    return 0


def parser():
    p = job_parser(
        "Recompute the evaluation of an existing scoring output (report, confusion matrix, "
        "confidence histogram) from its predictions, without scoring again; e.g. with "
        "another score.confidence_threshold.",
        set_example="score.confidence_threshold=0.9",
        epilog=(
            "example:\n  spark-submit jobs/evaluate.py --predictions out/predictions "
            "--set score.confidence_threshold=0.9"
        ),
    )
    p.add_argument(
        "--predictions",
        required=True,
        help="output directory of jobs/score.py; its report and plots are rewritten. A "
        "directory that also holds files the pipeline did not write is refused with exit "
        "code 2 and left untouched",
    )
    return p


if __name__ == "__main__":
    run(main, parser())
