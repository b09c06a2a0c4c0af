"""Package faces whose names are imported from their modules on first use.

A face that imported every module at once would make each process that needs one module
pay for all of them: the training worker process (``python -m pipeline.training.worker``)
would import Spark's SQL layer before it starts TensorFlow, and every executor task would
import the driver's orchestration to run its few functions.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def exports(
    package: str, modules: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for `package`, whose public names live in its
    modules: `modules` maps each name to the module (within `package`) that defines it."""

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # once imported, a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *modules})

    return __getattr__, __dir__
