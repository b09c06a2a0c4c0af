"""Spark's Python processes import pyspark from its installed package, with bytecode.

``spark-submit`` puts ``pyspark.zip`` first on the path of every Python process it
starts: the driver and Spark's Python workers. Python keeps no compiled bytecode for
modules it imports from a zip, so each of those processes compiles pyspark again: on a
2-core machine ``import pyspark.worker`` takes 0.8 s from the zip and 0.16 s from the
package, and a process's first Python job takes 1.5-2 times as long
(``benchmarks/startup_bench.py``). When the zip is the
one inside the installed pyspark package (``pip install pyspark``), the package is the
same release, and `prefer_installed_pyspark` puts the zip behind it.

``python -m pipeline.spark_python`` is Spark's Python daemon with that done first
(``spark.python.daemon.module``, which `pipeline.session` sets in local mode, where the
workers run this installation). It imports nothing else before pyspark's daemon forks
its workers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

ZIP = "pyspark.zip"


def installed_first(path: Sequence[str]) -> list[str] | None:
    """`path` with the installed pyspark package's own ``pyspark.zip`` moved to its end.

    None when nothing should move: no ``pyspark.zip`` on `path`, no installed package
    beside it, or a zip of another Spark installation (another release, perhaps).
    """
    zips = [p for p in path if os.path.basename(p) == ZIP]
    if not zips:
        return None
    from importlib.machinery import PathFinder

    spec = PathFinder.find_spec("pyspark", [p for p in path if p not in zips])
    if spec is None or not spec.submodule_search_locations:
        return None
    package = next(iter(spec.submodule_search_locations))
    bundled = os.path.realpath(os.path.join(package, "python", "lib", ZIP))
    if any(os.path.realpath(p) != bundled for p in zips):
        return None
    return [p for p in path if p not in zips] + zips


def prefer_installed_pyspark() -> bool:
    """Reorder `sys.path` as `installed_first` says, unless pyspark is imported already.

    True when it moved the zip.
    """
    if "pyspark" in sys.modules:
        return False
    reordered = installed_first(sys.path)
    if reordered is None:
        return False
    sys.path[:] = reordered
    return True


if __name__ == "__main__":
    prefer_installed_pyspark()
    from pyspark.daemon import manager

    manager()
