"""Which tasks exist: a preset's `model.task` name -> the module that implements it.

A new task is one module in `hkft/tasks/` (a `Task` subclass, exported as `TASK`) and one line in
`TASK_MODULES`; the config accepts every name here. The modules are imported on first use, so that
reading a preset (`hkft config`, `hkft presets`) stays instant. This module imports nothing of hkft.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hkft.tasks.base import Task

TASK_MODULES: dict[str, str] = {
    "classification": "hkft.tasks.classification",
    "regression": "hkft.tasks.regression",
    "causal-lm": "hkft.tasks.causal_lm",
}


def task_names() -> tuple[str, ...]:
    return tuple(TASK_MODULES)


def register_task(name: str, module: str) -> None:
    """Add a task implemented outside hkft (a module exporting ``TASK``) under ``name``."""
    TASK_MODULES[name] = module


def task_for(name: str) -> Task:
    """The task object for a validated ``model.task``: resolved once, then asked instead of comparing names."""
    return importlib.import_module(TASK_MODULES[name]).TASK
