"""spark-submit jobs/ingest.py --input RAW --output FEATURES: validate raw digits into features."""

from pipeline.cli import job_parser, load_job_config, run, table


def main(args) -> int:
    config = load_job_config(args, __file__)

    from pipeline.ingest import run_ingest
    from pipeline.session import build_session

    spark = build_session(config.spark)
    result = run_ingest(spark, config, args.input, args.output)
    counts = result.counts
    rows = [
        ["rows in", counts.rows_in],
        ["rows out", counts.rows_out],
        ["rows rejected", counts.rows_rejected],
    ]
    rows += [[f"  {reason}", n] for reason, n in sorted(counts.rejected_by_reason.items())]
    rows += [["seconds", round(result.seconds, 1)], ["rows/s", round(result.rows_per_second)]]
    print(f"\ningest: {result.layout} layout -> {result.output}")
    print(table(rows, ["", "count"]))
    rejected = f"   rejected rows: {result.output}/_rejected/" if counts.rows_rejected else ""
    print(f"report: {result.output}/_report.json{rejected}")
    return 0


def parser():
    from pipeline.outputs import INGEST, output_help

    p = job_parser(
        "Validate raw digits (Parquet with image bytes, a 784-value array or pixel0..pixel783 "
        "columns; or CSV with a header, as the Kaggle files) into 784 features scaled to "
        "[0, 1] with one-hot labels; bad rows go to OUTPUT/_rejected with their reason.",
        set_example="ingest.max_reject_fraction=0.01",
        epilog=(
            "examples:\n  spark-submit jobs/ingest.py --input raw.parquet --output out/features\n"
            "  spark-submit jobs/ingest.py --input train.csv --output out/features"
        ),
    )
    p.add_argument(
        "--input", required=True, help="Parquet or CSV file or directory (any Spark URI)"
    )
    p.add_argument("--output", required=True, help=output_help(INGEST))
    return p


if __name__ == "__main__":
    run(main, parser())
