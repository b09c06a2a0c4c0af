"""Where a job may write, and how it publishes: the output check and `staged_output`.

A job replaces only what this pipeline wrote. Before Spark does any work, `check_output`
accepts an output path only when it is absent, an empty directory, or an earlier output
of the same kind: recognised by the marker that kind writes (the ``_report.json`` of an
ingest or scoring run names its job; a model directory has ``metadata.json``, or only the
``checkpoints/`` of an interrupted training run; a search directory has ``_tune.json``)
and holding nothing but the entries that kind writes. Anything else is refused with
`OutputPathError` (exit 2), naming what is there: there is no option that deletes it.
An output may not overlap an input either, nor be the working directory, one of its
parents, the home directory or a file-system root.

`staged_output` writes the output into a hidden directory beside it and moves it into
place when the block ends, checking the path again just before: a run never leaves a
half-written output, and never replaces what changed while it ran. Every check goes
through `Storage` (Hadoop's FileSystem), so ``hdfs://`` and ``s3a://`` behave as local
paths do.

A job that starts writing a new file into its output adds its name to its kind's
`entries` here; otherwise its next run into the same path is refused.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from pipeline.errors import OutputPathError
from pipeline.storage import SUCCESS_MARKER, Storage

REPORT_FILE = "_report.json"
GENERATE_FILE = "_generate.json"
TUNE_FILE = "_tune.json"
METADATA_FILE = "metadata.json"
CHECKPOINTS_DIR = "checkpoints"

# What Spark's Parquet writer leaves in any dataset directory; Hadoop's checksum files;
# staging directories of an interrupted run of an output inside this one.
_DATASET = (SUCCESS_MARKER, "part-*")
_OWN_HIDDEN = (".*.crc", ".*.staging-*")


@dataclass(frozen=True)
class OutputKind:
    """One kind of output: how to recognise an earlier one, and what it may hold."""

    job: str  # the job that writes it, as its marker names it
    what: str  # "an ingest output", for messages
    marker: str  # the file that marks it
    entries: tuple[str, ...]  # glob patterns of the names it holds at its top level
    # Keys of a marker written before it named its job (version 0.1.0): all present.
    legacy_keys: tuple[str, ...] = ()
    # Whether a directory without the marker is still this kind's (an interrupted run).
    partial: Callable[[Storage, str, list[tuple[str, bool]]], bool] | None = None

    def marks(self, storage: Storage, directory: str) -> bool:
        """Whether `directory` holds this kind's marker."""
        path = f"{directory}/{self.marker}"
        if not storage.is_file(path):
            return False
        data = _json_object(storage, path)
        if self.marker == METADATA_FILE:
            return "model_sha256" in data
        if "job" not in data and self.legacy_keys:
            return all(key in data for key in self.legacy_keys)
        return data.get("job") == self.job

    def owns(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in (*self.entries, *_OWN_HIDDEN))


def _interrupted_training(storage: Storage, directory: str, entries) -> bool:
    """Only the checkpoints (and TensorBoard logs) a killed training run leaves behind."""
    names = {name for name, is_dir in entries if is_dir}
    if CHECKPOINTS_DIR not in names or names - {CHECKPOINTS_DIR, "logs"}:
        return False
    if any(not is_dir for _, is_dir in entries):
        return False
    return all(
        fnmatch.fnmatchcase(name, "epoch-*.npz") or name.startswith(".")
        for name, _ in storage.entries(f"{directory}/{CHECKPOINTS_DIR}")
    )


INGEST = OutputKind(
    "ingest",
    "an ingest output",
    REPORT_FILE,
    (REPORT_FILE, "_rejected", "split=*", *_DATASET),
    legacy_keys=("rows_in", "pixel_max", "preprocessing"),
)
SCORE = OutputKind(
    "score",
    "a scoring output",
    REPORT_FILE,
    (REPORT_FILE, "_report.md", "_rejected", "split=*", "_*.png", *_DATASET),
    legacy_keys=("rows_in", "model_dir", "model_sha256"),
)
EXPLAIN = OutputKind(
    "explain",
    "an explain output",
    REPORT_FILE,
    (REPORT_FILE, "_rejected", "split=*", "_*.png", *_DATASET),
)
GENERATE = OutputKind(
    "generate",
    "a generated dataset",
    GENERATE_FILE,
    (GENERATE_FILE, *_DATASET),
    legacy_keys=("rows", "seed", "augmentation"),
)
MODEL = OutputKind(
    "train",
    "a model directory",
    METADATA_FILE,
    (METADATA_FILE, "model.*", "model_card.md", "*.png", CHECKPOINTS_DIR, "logs"),
    partial=_interrupted_training,
)
TUNE = OutputKind(
    "tune",
    "a search directory",
    TUNE_FILE,
    (
        TUNE_FILE,
        "study.db",
        "study.db-*",
        ".search.lock",
        "results.*",
        "best.yaml",
        "*.png",
        "trials",
        "confirm",
    ),
)
KINDS = (INGEST, SCORE, EXPLAIN, GENERATE, MODEL, TUNE)


def output_help(kind: OutputKind, what: str = "output directory") -> str:
    """The ``--help`` text of an output option: what an existing path there gets."""
    return (
        f"{what}, written whole or not at all. If it exists it must be empty or "
        f"{kind.what} of an earlier run, which is replaced; anything else there (your "
        f"files, a regular file, an input, the current or home directory) is refused with "
        f"exit code 2 and left untouched"
    )


def check_output(
    storage: Storage,
    path: str,
    kind: OutputKind,
    inputs: Mapping[str, str | None] | None = None,
    option: str = "--output",
) -> str:
    """The qualified `path`, if the job writing `kind` there may replace what it holds.

    `inputs` maps each input's option (``--input``, ``--model-dir``) to its path; the
    output may not equal, contain or lie inside any of them. `option` names the output
    in messages. Raises `OutputPathError` otherwise.
    """
    shown = f"{option} {path}"
    if storage.is_root(path):
        raise OutputPathError(
            f"{shown} is the root of its file system; name a directory for the output"
        )
    output = storage.qualify(path).rstrip("/")
    here = _canonical(storage, output)
    for name, other in (inputs or {}).items():
        if other:
            _refuse_overlap(shown, here, f"{name} {other}", _canonical(storage, other))
    _refuse_special_dirs(storage, shown, output, here)
    check_contents(storage, output, kind, shown)
    return output


def check_contents(storage: Storage, output: str, kind: OutputKind, shown: str = "") -> None:
    """Refuse `output` unless it is absent, empty, or an earlier output of `kind`."""
    shown = shown or output
    if not storage.exists(output):
        return
    if not storage.is_dir(output):
        raise OutputPathError(
            f"{shown} is a file, not a directory; name a directory for {kind.what} "
            f"(the file stays as it is)"
        )
    entries = storage.entries(output)
    if not entries:
        return
    if kind.marks(storage, output):
        foreign = [(name, is_dir) for name, is_dir in entries if not kind.owns(name)]
    else:
        other = next((k for k in KINDS if k is not kind and k.marks(storage, output)), None)
        if other is not None:
            raise OutputPathError(
                f"{shown} is {other.what}, not {kind.what}; the {kind.job} job does not "
                f"replace it. Choose another directory"
            )
        if kind.partial is not None and kind.partial(storage, output, entries):
            return
        foreign = [(n, d) for n, d in entries if not fnmatch.fnmatchcase(n, ".*.staging-*")]
    if foreign:
        names = [name + ("/" if is_dir else "") for name, is_dir in foreign]
        several = len(foreign) > 1
        raise OutputPathError(
            f"{shown} holds {len(foreign)} {'entries' if several else 'entry'} this pipeline "
            f"did not write, e.g. {', '.join(names[:3])}. The {kind.job} job replaces only "
            f"an empty directory or {kind.what} of its own: move {'them' if several else 'it'} "
            f"away or choose another directory"
        )


def publish(
    storage: Storage, staging: str, output: str, kind: OutputKind, option: str = "--output"
) -> None:
    """Move the finished `staging` directory to `output`, checking `output` once more first.

    For a job whose staging does not fit one block (`staged_output` calls it too).
    """
    check_contents(storage, output, kind, f"{option} {output}")
    storage.publish(staging, output)


@contextmanager
def staged_output(
    storage: Storage, output: str, kind: OutputKind, option: str = "--output"
) -> Iterator[str]:
    """Write `output` in one piece: yield a hidden staging directory, publish it on exit.

    On an exception the staging directory is deleted and `output` left as it was. Just
    before publishing, `output` is checked again (`check_contents`), so only an earlier
    output of `kind` is ever replaced. Staging directories of killed runs beside
    `output` are removed first.
    """
    output = storage.qualify(output).rstrip("/")
    check_contents(storage, output, kind, f"{option} {output}")
    storage.clear_stale_staging(output)
    staging = storage.staging_dir(output)
    try:
        yield staging
        publish(storage, staging, output, kind, option)
    except BaseException:
        storage.delete(staging)
        raise


def _json_object(storage: Storage, path: str) -> dict:
    try:
        data = json.loads(storage.read_bytes(path))
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _canonical(storage: Storage, path: str) -> str:
    """`path` qualified, and for local paths with symbolic links resolved."""
    qualified = storage.qualify(path)
    scheme, _, rest = qualified.partition(":")
    if scheme == "file":
        return "file:" + os.path.realpath("/" + rest.lstrip("/"))
    return qualified.rstrip("/")


def _within(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies inside it (both canonical)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _refuse_overlap(shown: str, output: str, input_shown: str, source: str) -> None:
    if output == source:
        relation = "is also"
    elif _within(output, source):
        relation = "lies inside"
    elif _within(source, output):
        relation = "contains"
    else:
        return
    raise OutputPathError(
        f"{shown} {relation} {input_shown}: writing it would replace the input. "
        f"Name an output directory outside every input"
    )


def _refuse_special_dirs(storage: Storage, shown: str, output: str, here: str) -> None:
    home, working = storage.home_and_working_dirs(output)
    workings = {_canonical(storage, working)}
    homes = {_canonical(storage, home)}
    if output.startswith("file:"):
        workings.add(_canonical(storage, os.getcwd()))
        homes.add(_canonical(storage, os.path.expanduser("~")))
    for directory in workings:
        if _within(directory, here):
            what = "is" if directory == here else "contains"
            raise OutputPathError(
                f"{shown} {what} the current directory ({directory}): the output would "
                f"replace it. Name a new directory, e.g. {output}/out"
            )
    for directory in homes:
        if _within(directory, here):
            what = "is" if directory == here else "contains"
            raise OutputPathError(
                f"{shown} {what} the home directory ({directory}); name a new directory "
                f"for the output"
            )
