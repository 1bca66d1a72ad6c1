"""The task as an object: what a task trains and measures.

Each task (`classification`, `regression`, `causal-lm`; chat is a data format of causal LM) owns its
model class and peft task type, the columns it reads and its encoding and collation, its head's
`from_pretrained` arguments, the consistency-loss flavour, its metrics and the one that picks the best
checkpoint, and its evaluation. The recipes resolve `model.task` once (`registry.task_for`) and ask
the task. A new task is one module here (a `Task` subclass exported as `TASK`) and one line in
`hkft/config/tasks.py`.
"""
