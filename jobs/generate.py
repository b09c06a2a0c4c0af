"""spark-submit jobs/generate.py --rows N --output RAW: scale data from the embedded digits."""

from pipeline.cli import job_parser, load_job_config, run, table


def main(args) -> int:
    config = load_job_config(args, __file__)

    from pipeline.generate import run_generate
    from pipeline.session import build_session

    spark = build_session(config.spark)
    result = run_generate(spark, config, args.rows, args.output, args.layout, args.seed)
    rows = [
        ["rows", result.rows],
        ["files", result.files],
        ["MB", round(result.bytes / 1e6, 1)],
        ["seconds", round(result.seconds, 1)],
        ["rows/s", round(result.rows_per_second)],
    ]
    print(f"\ngenerate: {result.layout} layout -> {result.output}")
    print(table(rows, ["", "value"]))
    return 0


def parser():
    from pipeline.outputs import GENERATE, output_help

    p = job_parser(
        "Write a raw digits dataset of any size by augmenting the 6,000 embedded MNIST digits "
        "(random shifts, small rotations and scaling, thicker or thinner strokes, noise). "
        "The same --rows and --seed give the same rows, however Spark splits the work.",
        set_example="generate.seed=7",
        epilog=(
            "example:\n  spark-submit jobs/generate.py --rows 1000000 --layout array "
            "--output data/raw-1m"
        ),
    )
    p.add_argument("--rows", required=True, type=int, help="number of rows to write")
    p.add_argument("--output", required=True, help=output_help(GENERATE))
    p.add_argument(
        "--layout",
        choices=["image", "array", "columns"],
        default=None,
        help="image: PNG bytes in struct<bytes, path>; array: `pixels` array<int>; "
        "columns: pixel0..pixel783 (default: generate.layout, image)",
    )
    p.add_argument("--seed", type=int, default=None, help="default: generate.seed (0)")
    return p


if __name__ == "__main__":
    run(main, parser())
