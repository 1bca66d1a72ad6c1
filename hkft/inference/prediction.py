"""`hkft predict`: a trained classifier's labels and probabilities (a regressor's values) for new texts.

Texts are tokenised as in training (the run's text column or pair of columns, truncated at its
data.max_length, padded by the same collator) and scored in batches of eval.batch_size (else
train.batch_size). A class's probability is the softmax of the model's logits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from hkft.errors import ConfigError, DataError
from hkft.inference.targets import Target, load_target
from hkft.run.files import atomic_write_text, check_can_create_dir
from hkft.tasks.registry import task_for

FILE_HINT = 'one JSON object per line, e.g. {"text": "..."}'


def run_predict(target: Path, texts: list[str], file: Path | None, output: Path | None, overrides: list[str], *,
                as_json: bool, console: Console, progress_console: Console) -> None:
    """Texts from the command line are shown as a table (JSON lines with --json); a --file's rows
    are written with their predictions to --output (atomically), else to standard output."""
    if texts and file is not None:
        raise ConfigError("both TEXT arguments and --file given", "score either the texts or the file")
    if not texts and file is None:
        raise ConfigError("nothing to score", "give texts (hkft predict RUN \"a text\" ...) or --file IN.jsonl")
    if output is not None:
        check_output(output, file)
    if file is not None:
        check_input_file(file)
    loaded = load_target(target, overrides, "predict")
    columns = loaded.cfg.data.text_columns
    if file is not None:
        rows = read_rows(file, columns)
    elif len(columns) == 2:
        raise ConfigError(f"{target} scores pairs of texts ({columns[0]}, {columns[1]}): a TEXT argument is one text",
                          f'give the pairs with --file, one JSON object per line: {{"{columns[0]}": "...", "{columns[1]}": "..."}}')
    else:
        rows = [{columns[0]: text} for text in texts]
    with progress_bar(progress_console, -(-len(rows) // batch_size(loaded))) as advance:
        predicted = predict_rows(loaded, rows, advance)
    if output is not None:
        atomic_write_text(output, jsonl(predicted))
        console.print(f"{len(predicted)} predictions written to {escape(str(output))}", highlight=False, soft_wrap=True)
    elif file is not None or as_json:
        print(jsonl(predicted), end="", flush=True)
    else:
        console.print(prediction_table(predicted, columns, labelled=loaded.label_names is not None))


def check_output(output: Path, file: Path | None) -> None:
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder", "give a file name, e.g. --output predictions.jsonl")
    if file is not None and output.resolve() == file.resolve():
        raise ConfigError(f"--output {output} is the --file it would read", "write the predictions to another file")
    check_can_create_dir(output.parent, "--output")


def check_input_file(path: Path) -> None:
    """Before any model loads."""
    if not path.exists():
        raise DataError(f"--file {path} does not exist", "check the path")
    if not path.is_file():
        raise DataError(f"--file {path} is not a file", f"give a JSONL file: {FILE_HINT}")


def read_rows(path: Path, columns: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, each with a string in every text column; blank lines skipped."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"--file {path}: cannot read the file ({err.strerror or err})", "check its permissions") from None
    rows = []
    for number, line in enumerate(raw.splitlines(), start=1):
        where = f"{path} line {number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where} is not UTF-8 text", "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as err:
            raise DataError(f"{where} is not valid JSON ({err})", FILE_HINT) from None
        if not isinstance(row, dict):
            raise DataError(f"{where} is a JSON {type(row).__name__}, not an object", FILE_HINT)
        for column in columns:
            if not isinstance(row.get(column), str):
                problem = "has no" if column not in row else "has a non-string"
                raise DataError(f"{where} {problem} {column!r} text",
                                f"each line needs the text column{'s' if len(columns) > 1 else ''} the run trained on: "
                                f"{', '.join(columns)} (--set data.text_column=NAME reads another)")
        rows.append(row)
    if not rows:
        raise DataError(f"--file {path} has no lines to score", FILE_HINT)
    return rows


def batch_size(loaded: Target) -> int:
    return loaded.cfg.eval.batch_size or loaded.cfg.train.batch_size


@torch.no_grad()
def predict_rows(loaded: Target, rows: list[dict[str, Any]], advance: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """Each row followed by its prediction: a label and every label's probability, or a value."""
    model, tokenizer, data = loaded.model, loaded.tokenizer, loaded.cfg.data
    model.eval()
    collate = task_for(loaded.task).collator(tokenizer)
    device = next(model.parameters()).device
    size = batch_size(loaded)
    predicted = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        encoded = tokenizer(*([row[column] for row in chunk] for column in data.text_columns), truncation=True,
                            max_length=data.max_length)
        features = [dict(zip(encoded, values)) for values in zip(*encoded.values())]
        logits = model(**collate(features).to(device)).logits.float().cpu()
        predicted += [{**row, **prediction(scores, loaded)} for row, scores in zip(chunk, logits)]
        advance()
    return predicted


def prediction(logits: torch.Tensor, loaded: Target) -> dict[str, Any]:
    if loaded.label_names is None:  # a regressor: one value
        return {"prediction": logits[0].item()}
    probabilities = torch.softmax(logits, dim=-1).tolist()
    names = loaded.label_names
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return {"prediction": names[best], "probabilities": dict(zip(names, probabilities))}


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


@contextmanager
def progress_bar(console: Console, batches: int) -> Iterator[Callable[[], None]]:
    """A bar on a terminal (transient); nothing in a pipe or a log. Yields "one batch done"."""
    bar = Progress(TextColumn("[bold]predicting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True, disable=not console.is_terminal)
    task = bar.add_task("predicting", total=batches)
    with bar:
        yield lambda: bar.advance(task)


def prediction_table(rows: list[dict[str, Any]], columns: list[str], *, labelled: bool) -> Table:
    table = Table(title="hkft predict", header_style="bold")
    for column in columns:
        table.add_column(column)
    table.add_column("prediction")
    if labelled:
        table.add_column("probabilities")
    for row in rows:
        cells = [escape(row[column]) for column in columns]
        if labelled:
            shown = ", ".join(f"{name} {value:.3f}" for name, value in row["probabilities"].items())
            table.add_row(*cells, escape(row["prediction"]), escape(shown))
        else:
            table.add_row(*cells, f"{row['prediction']:.4g}")
    return table
