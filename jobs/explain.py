"""spark-submit jobs/explain.py --input DATA --model-dir MODEL --output EXPL: explanations."""

from pipeline.cli import job_parser, load_job_config, run, table


def main(args) -> int:
    config = load_job_config(args, __file__)

    from pipeline.explain.run import run_explain
    from pipeline.session import build_session

    spark = build_session(config.spark)
    result = run_explain(spark, config, args.input, args.model_dir, args.output)
    counts = result.counts
    curves = result.deletion
    rows = [
        ["rows in", counts.rows_in],
        ["rows explained", counts.rows_out],
        ["rows rejected", counts.rows_rejected],
        ["completeness error, mean", round(result.completeness_mean, 5)],
        ["completeness error, max", round(result.completeness_max, 5)],
        [f"deletion area, attribution ({curves.rows:,} rows)", round(curves.attribution_area, 4)],
        [f"deletion area, random ({curves.rows:,} rows)", round(curves.random_area, 4)],
        ["seconds", round(result.seconds, 1)],
        ["rows/s", round(result.rows_per_second)],
    ]
    print(f"\nexplain: {result.layout} input -> {result.output}")
    print(table(rows, ["", "value"]))
    print(f"\nreport: {result.output}/_report.json   pictures: {', '.join(result.pictures)}")
    if counts.rows_rejected:
        print(f"rejected rows: {result.output}/_rejected/")
    return 0


def parser():
    p = job_parser(
        "Explain a trained model's predictions with integrated gradients: for every row of "
        "DATA (ingested features or any raw layout, preprocessed as for scoring), the "
        "attribution of the predicted (or true) class's probability to each pixel. Writes "
        "them with the predictions to OUTPUT, the completeness and faithfulness checks to "
        "OUTPUT/_report.json, and pictures beside it.",
        set_example="explain.steps=64",
        epilog=(
            "example:\n  spark-submit jobs/explain.py --input out/features/split=test "
            "--model-dir out/model --output out/explanations --set explain.steps=64"
        ),
    )
    from pipeline.outputs import EXPLAIN, output_help

    p.add_argument("--input", required=True, help="Parquet file or directory (any Spark URI)")
    p.add_argument("--model-dir", required=True, help="model directory written by training")
    p.add_argument("--output", required=True, help=output_help(EXPLAIN))
    return p


if __name__ == "__main__":
    run(main, parser())
