"""Which tasks a preset may name: `model.task` -> the module in `hkft/tasks/` that implements it.

A new task is one module in `hkft/tasks/` (a `Task` subclass, exported as `TASK`) and one line in
`TASK_MODULES`; the schema accepts every name here. The names live with the rest of the preset's
vocabulary, below the tasks themselves: the modules are named, not imported, so reading a preset
(`hkft config`, `hkft presets`) stays instant and hkft.config imports nothing above it.
"""

from __future__ import annotations

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
