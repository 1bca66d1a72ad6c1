"""The task object for a preset's `model.task`, resolved once and then asked instead of comparing names.
Which names exist, and which module implements each, is `hkft/config/tasks.py`."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from hkft.config.tasks import TASK_MODULES

if TYPE_CHECKING:
    from hkft.tasks.base import Task


def task_for(name: str) -> Task:
    return importlib.import_module(TASK_MODULES[name]).TASK
