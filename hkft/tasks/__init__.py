"""The task as an object: what a task trains and measures.

Each task (`classification`, `regression`, `causal-lm`; chat is a data format of causal LM) owns its
model class and peft task type, encoding and collation, the consistency-loss flavour, the metrics and
the one that picks the best checkpoint, evaluation, and the facts it writes beside the adapter. The
recipes resolve `model.task` once (`registry.task_for`) and ask the task; `registry.py` says how a
new task is added.
"""
