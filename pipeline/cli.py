"""What every job's command line shares: arguments, config, logging, exit codes, summaries."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.spark_python import prefer_installed_pyspark

prefer_installed_pyspark()  # before anything imports pyspark: jobs import this module first

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402

log = logging.getLogger("pipeline")

EXIT_CODES_HELP = """exit codes:
  0  success
  1  unexpected failure (a bug: please report it with the traceback)
  2  invalid command line or configuration, or an output path the job may not write
  3  environment problem (Java or a package missing, too few task slots)
  4  unusable input (missing columns, unknown layout, corrupt file)
  5  data quality (too many rejected rows, counts that do not reconcile)
  6  model refused (missing, tampered with, or does not fit the data)
  7  training failed (worker lost, a worker stalled)
"""


def job_parser(description: str, set_example: str, epilog: str = "") -> argparse.ArgumentParser:
    """An argument parser with the options every job takes.

    `set_example` is a ``key.path=value`` of this job's own settings, shown in ``--help``.
    """
    parser = argparse.ArgumentParser(
        description=description,
        epilog=(epilog + "\n\n" if epilog else "") + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML config layered over conf/base.yaml and conf/local.yaml (repeatable)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help=f"override one config value, e.g. --set {set_example} (repeatable)",
    )
    parser.add_argument(
        "--conf-dir",
        default=None,
        metavar="DIR",
        help="directory with base.yaml and local.yaml (default: the project's conf/)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    return parser


def load_job_config(args: argparse.Namespace, job_file: str) -> Config:
    """The validated config for a job started from `job_file` (``jobs/NAME.py``)."""
    conf_dir = args.conf_dir or Path(job_file).resolve().parent.parent / "conf"
    return load_config(conf_dir, args.conf, args.overrides)


def run(
    main: Callable[[argparse.Namespace], int | None],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> None:
    """Parse arguments, run `main` and exit with a code scripts can trust."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("py4j", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code = main(args) or 0
    except PipelineError as exc:
        # On a line of its own: Spark's progress bar may have left the cursor mid-line.
        print(f"\nerror: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """A plain-text table, right-aligning numbers."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [
        max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
        for i, h in enumerate(headers)
    ]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]

    def line(values):
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line([str(h) for h in headers]), rule, *(line(r) for r in cells)])


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
