"""Datasets for the three tasks: load (local files or the hub), check, tokenise once (cached), collate.

Tokenisation goes through `Dataset.map`, whose fingerprint hashes the input dataset (for a local
file: its path and modification time) and the map function with everything it closes over: the
tokenizer, the columns, the template, max_length and the label map. The cache is therefore reused
exactly when none of those changed. Padding is dynamic (per batch, in the collator).
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets import Dataset
from datasets.exceptions import DatasetGenerationError
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, PreTrainedTokenizerBase

from hkft import chat
from hkft.chat import IGNORE_INDEX
from hkft.config.schema import DataConfig, HkftConfig, HubSource
from hkft.errors import DataError
from hkft.hub import offline_unless_hub_reachable

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLITS = ("train", "validation", "test")
# A class held by at most this share of the training rows (or by a single row) is worth a warning:
# most often a typo in the label column, which silently becomes a class of its own.
RARE_LABEL_SHARE = 0.01


@dataclass(frozen=True)
class PreparedData:
    train: Dataset | None
    validation: Dataset | None
    test: Dataset | None
    label_names: list[str] | None
    # Untokenised rows, in the order of the tokenised split: a causal LM's prompts and references
    # (generation), a classifier's or regressor's text columns (for predictions.jsonl).
    raw_validation: Dataset | None = None
    raw_test: Dataset | None = None
    notices: tuple[str, ...] = ()  # what the user should know about the data (rare labels, truncated conversations)


# --- loading ---------------------------------------------------------------------------------------

def parse_hub_spec(spec: str) -> HubSource:
    """``hub:ID[:CONFIG][:SPLIT]``, e.g. ``hub:nyu-mll/glue:rte:validation`` (SPLIT may be a slice, ``train[:10%]``)."""
    parts = spec.removeprefix("hub:").split(":", 2)
    if not parts[0] or (len(parts) == 3 and not parts[2]):
        raise DataError(f"{spec!r} is not a hub dataset spec", "write hub:ID[:CONFIG][:SPLIT], e.g. hub:nyu-mll/glue:rte:train")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    return HubSource(hub=parts[0], config=config, split=parts[2] if len(parts) == 3 else "train")


def load_source(source: str | HubSource, setting: str = "data.*") -> Dataset:
    """A local .jsonl/.json/.csv/.parquet file, a ``hub:`` spec string, or a HubSource; ``setting``
    (``data.train``, ``--data``) is where the user gave it, for the hints."""
    if isinstance(source, str) and source.startswith("hub:"):
        source = parse_hub_spec(source)
    dataset = _load_hub(source) if isinstance(source, HubSource) else _load_local(Path(source), setting)
    if len(dataset) == 0:
        raise DataError(f"{describe_source(source)} has no examples", "check the file or the split name")
    return dataset


def describe_source(source: str | HubSource) -> str:
    if isinstance(source, str):
        return source
    return ":".join(["hub", source.hub, *([source.config] if source.config else []), source.split])


@contextmanager
def _datasets_silenced() -> Iterator[None]:
    """datasets logs a failed read before raising; the DataError raised instead says it once."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_local_source(source: str, setting: str) -> None:
    """Fail before any model loads on a local file that is missing or of the wrong type."""
    if not source.startswith("hub:"):
        _check_local_file(Path(source), setting)


def _check_local_file(path: Path, setting: str) -> None:
    if not path.exists():
        raise DataError(f"data file {path} does not exist", f"check {setting}")
    if not path.is_file():
        raise DataError(f"{path} is not a file", f"point {setting} at a {', '.join(LOCAL_FORMATS)} file")
    if path.suffix.lower() not in LOCAL_FORMATS:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}", f"use one of {', '.join(LOCAL_FORMATS)}")


def _load_local(path: Path, setting: str) -> Dataset:
    _check_local_file(path, setting)
    builder = LOCAL_FORMATS[path.suffix.lower()]
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty", "add examples to the file")
    if builder != "parquet":
        _require_utf8(path)  # pyarrow's JSON reader stores invalid bytes and fails only when they are read
    try:
        with _datasets_silenced():
            return _read_local(path, builder)
    except Exception as err:  # datasets raises many types (pyarrow, pandas, its own) for one bad file
        raise _local_load_error(path, builder, err) from None


def _read_local(path: Path, builder: str) -> Dataset:
    """datasets' reader; for a JSON file whose strings it changed or refused, Python's (see below)."""
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:
        if builder == "json" and _failed_on_a_date(err):
            return _json_as_written(path, None)
        raise
    if builder == "json" and not _reads_as_written(dataset.features.arrow_schema):
        return _json_as_written(path, dataset.features)
    return dataset


def _local_load_error(path: Path, builder: str, err: Exception) -> DataError:
    if "corresponds to no data" in str(err):
        return DataError(f"{path} has no examples", "add examples to the file")
    cause = err.__cause__ if isinstance(err, DatasetGenerationError) and err.__cause__ else err
    if isinstance(cause, PermissionError):
        return DataError(f"{path}: cannot read the file (permission denied)", "check its permissions")
    first_line = next(iter(str(cause).strip().splitlines()), "") or type(cause).__name__
    return DataError(f"{path}: cannot parse as {builder} ({first_line[:200]})", "check the file's format")


# datasets' JSON reader (pyarrow) changes two kinds of JSON strings. A string that looks like a date
# or a time ("2025-05-03") comes back as a timestamp, and converting it back does not give the text
# written ("2025-05-03 00:00:00"); when the file's first 10 MB hold only dates in a field, a later
# string there fails the whole file. In a field of mixed types (strings and numbers, or lists) every
# value is kept as JSON text, except a string that is itself valid JSON text, which comes back
# decoded: "42" as 42, "null" as None, '"hi"' as 'hi'. A file where any of this happened is read
# again with Python's json module, each field keeping the type datasets inferred (a date a string),
# and the values of mixed fields written as their JSON text, which datasets decodes exactly.

def _failed_on_a_date(err: Exception) -> bool:
    cause = err.__cause__ if isinstance(err, DatasetGenerationError) and err.__cause__ else err
    return re.search(r"\b(timestamp|date32|date64|time32|time64)\b", str(cause)) is not None


def _reads_as_written(schema: pa.Schema) -> bool:
    return all(_as_written(field.type) == field.type and not _has_mixed_types(field.type) for field in schema)


def _as_written(data_type: pa.DataType) -> pa.DataType:
    """``data_type`` with every date, time or timestamp in it (nested in lists and structs) a string."""
    if pa.types.is_temporal(data_type):
        return pa.string()
    if pa.types.is_struct(data_type):
        return pa.struct([field.with_type(_as_written(field.type)) for field in data_type])
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        value_field = data_type.value_field.with_type(_as_written(data_type.value_type))
        return pa.list_(value_field) if pa.types.is_list(data_type) else pa.large_list(value_field)
    return data_type


def _has_mixed_types(data_type: pa.DataType) -> bool:
    if isinstance(data_type, pa.JsonType):
        return True
    if pa.types.is_struct(data_type):
        return any(_has_mixed_types(field.type) for field in data_type)
    return (pa.types.is_list(data_type) or pa.types.is_large_list(data_type)) and _has_mixed_types(data_type.value_type)


def _json_as_written(path: Path, inferred: datasets.Features | None) -> Dataset:
    """``inferred``: the features datasets read; None (it failed): inferred from the Python values."""
    features = None
    if inferred is not None:
        schema = pa.schema([field.with_type(_as_written(field.type)) for field in inferred.arrow_schema])
        features = datasets.Features.from_arrow_schema(schema)
    stat = path.stat()
    # Cached like load_dataset's own copy: keyed on the reader, the features, the path, the file's size and mtime.
    return Dataset.from_generator(_json_rows, features=features, gen_kwargs={
        "path": str(path.resolve()), "features": features, "stamp": (stat.st_size, stat.st_mtime_ns)})


def _json_rows(path: str, features: datasets.Features | None, stamp: tuple[int, int]) -> Iterator[dict]:
    """The rows datasets' JSON reader reads: one object per line (JSON Lines), or a top-level list
    of objects (or of strings, each a row's ``text``). ``stamp`` only keys the cache."""
    types = {field.name: field.type for field in features.arrow_schema} if features is not None else None
    for row in _json_values(Path(path)):
        row = {"text": row} if isinstance(row, str) else row
        yield row if types is None else {name: _json_text_where_mixed(row.get(name), data_type) for name, data_type in types.items()}


def _json_values(path: Path) -> Iterator[object]:
    with path.open("rb") as handle:
        if handle.read(4096).removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"["):
            handle.seek(0)
            yield from json.loads(handle.read().decode("utf-8-sig"))
            return
        handle.seek(0)
        for line in handle:  # binary lines end at line feeds alone: U+2028 and its kind are valid inside JSON text
            if line.strip():
                yield json.loads(line.decode("utf-8-sig"))


def _json_text_where_mixed(value: object, data_type: pa.DataType) -> object:
    """``value`` with each value of a mixed-type field replaced by its JSON text."""
    if value is None:
        return None
    if isinstance(data_type, pa.JsonType):
        return json.dumps(value, ensure_ascii=False)
    if pa.types.is_struct(data_type) and isinstance(value, dict):
        return {field.name: _json_text_where_mixed(value.get(field.name), field.type) for field in data_type}
    if (pa.types.is_list(data_type) or pa.types.is_large_list(data_type)) and isinstance(value, list):
        return [_json_text_where_mixed(item, data_type.value_type) for item in value]
    return value


def _csv_text_as_written(dataset: Dataset, source: str | HubSource, columns: list[str], limit: int | None) -> Dataset:
    """A CSV file's text columns as written: pandas reads "007" as the number 7 and "1.50" as 1.5
    (CSV has no quotes that say "text"), so a text column of anything else is read again as strings."""
    if not isinstance(source, str) or LOCAL_FORMATS.get(Path(source).suffix.lower()) != "csv":
        return dataset
    text = datasets.Value("string")
    retyped = {column for column in columns if column in dataset.features and dataset.features[column] != text}
    if not retyped:
        return dataset
    features = datasets.Features({name: text if name in retyped else feature for name, feature in dataset.features.items()})
    try:
        with _datasets_silenced():
            return _first(datasets.load_dataset("csv", data_files=source, split="train", features=features), limit)
    except Exception as err:  # as in _load_local
        raise _local_load_error(Path(source), "csv", err) from None


def _require_utf8(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"{path}: line {number} is not UTF-8 text (byte {err.start + 1} of the line)",
                        "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8",
                    ) from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err})", "check its permissions") from None


def _load_hub(source: HubSource) -> Dataset:
    offline_unless_hub_reachable()
    try:
        with _datasets_silenced():
            return datasets.load_dataset(source.hub, source.config, split=source.split)
    except ConnectionError:
        raise DataError(
            f"cannot load hub dataset {describe_source(source)}: the hub cannot be reached (offline mode or no network)",
            "it needs network once to download it (then it is cached), or point data.* at a local copy",
        ) from None
    except Exception as err:  # unknown id, config or split: datasets' own message names the choices
        first_line = next(iter(str(err).strip().splitlines()), "") or type(err).__name__
        raise DataError(f"cannot load hub dataset {describe_source(source)}: {first_line[:300]}") from None


# --- checks ------------------------------------------------------------------------------------------

def render_prompt(template: str, example: dict) -> str:
    try:
        return template.format(**example)
    except KeyError as err:
        raise DataError(
            f"data.template {template!r} uses field {err.args[0]!r}, which the data does not have",
            f"available fields: {', '.join(example)}",
        ) from None
    except (IndexError, ValueError) as err:
        raise DataError(f"data.template {template!r} is not a valid template ({err})", "name fields in braces: {prompt}") from None


def _require_columns(dataset: Dataset, columns: list[str], split: str) -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise DataError(
            f"{split} data has no column {missing[0]!r}",
            f"available columns: {', '.join(dataset.column_names)}; set data.text_column / data.label_column",
        )


def _require_values(dataset: Dataset, columns: list[str], split: str) -> None:
    for column in columns:
        row = next((index for index, value in enumerate(dataset[column]) if value is None), None)
        if row is not None:
            raise DataError(f"{split} data: row {row} has no value in column {column!r}", "fill it in or drop the row")


def label_names_from(dataset: Dataset, column: str) -> list[str]:
    """Sorted label values as strings: numerically when every label is an integer."""
    values = {str(value) for value in dataset[column]}
    if all(value.lstrip("-").isdigit() for value in values):
        return sorted(values, key=int)
    return sorted(values)


def _require_strings(dataset: Dataset, columns: list[str], where: str) -> None:
    """Checked up front: the tokenizer's own error for a number or a list is a traceback."""
    for column in columns:
        feature = dataset.features[column]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            continue  # typed as text for every row: nothing to scan
        found = next(((row, value) for row, value in enumerate(dataset[column]) if not isinstance(value, str)), None)
        if found is not None:
            raise DataError(
                f"{where}: column {column!r} holds {type(found[1]).__name__} values (row {found[0]})",
                "text columns must be strings: quote them in the file, or choose another column",
            )


def _require_some_text(dataset: Dataset, columns: list[str], where: str) -> None:
    """Every text empty trains on nothing but special tokens, and scores the same."""
    if all(not value.strip() for column in columns for value in dataset[column]):
        raise DataError(f"{where}: every text in {', '.join(map(repr, columns))} is empty", "check data.text_column and the file")


def _check_room(tokenizer: PreTrainedTokenizerBase, data: DataConfig, task: str) -> None:
    """data.max_length must leave room for a text token after the tokenizer's special tokens (and,
    for a causal LM, for a second token to predict)."""
    pair = task != "causal-lm" and len(data.text_columns) == 2
    special = tokenizer.num_special_tokens_to_add(pair=pair)
    needed = max(special + 1, 2 if task == "causal-lm" else 1)
    if data.max_length < needed:
        raise DataError(
            f"data.max_length {data.max_length} leaves no room for text (the tokenizer adds {special} special tokens"
            f"{'; a causal LM needs two tokens to predict one' if task == 'causal-lm' else ''})",
            "raise data.max_length (the presets use 128 to 512)",
        )


def rare_label_warnings(raw: dict[str, Dataset], column: str) -> list[str]:
    """Classes held by a single training row or by at most RARE_LABEL_SHARE of them, and missing
    from the validation data when it is given: most often a stray value. A warning, not an error:
    imbalanced data has rare classes too."""
    counts: dict[str, int] = {}
    for value in raw["train"][column]:
        counts[str(value)] = counts.get(str(value), 0) + 1
    total = sum(counts.values())
    evaluated = {str(value) for split in ("validation", "test") if split in raw for value in raw[split][column]}
    warnings = []
    for label, count in sorted(counts.items()):
        if (count == 1 or count <= RARE_LABEL_SHARE * total) and (not evaluated or label not in evaluated):
            warnings.append(
                f"warning: label {label!r} is in {count} of {total} training rows{' and in no validation or test row' if evaluated else ''}: "
                f"it becomes a class of its own; if it is a typo, fix data.label_column's values"
            )
    return warnings


def _check_known_labels(dataset: Dataset, column: str, label_names: list[str], split: str) -> None:
    known = set(label_names)
    unknown = next((value for value in dataset[column] if str(value) not in known), None)
    if unknown is not None:
        raise DataError(
            f"{split} data has label {unknown!r}, which training never saw",
            f"labels seen in training: {', '.join(label_names)}",
        )


def _check_numeric_labels(dataset: Dataset, column: str, split: str) -> None:
    try:
        np.asarray(dataset[column], dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{split} data: regression labels must be numbers", f"column {column!r} holds other values") from None


# --- tokenisation --------------------------------------------------------------------------------

def _with_length(features: dict, with_length: bool) -> dict:
    if with_length:
        features["length"] = [len(ids) for ids in features["input_ids"]]
    return features


def _classification_encoder(tokenizer, text_columns: list[str], max_length: int, label_column: str,
                            label_index: dict[str, int] | None, with_length: bool) -> Callable[[dict], dict]:
    """``label_index`` maps labels to class ids; None means regression (float32 targets)."""

    def encode(batch: dict) -> dict:
        features = dict(tokenizer(*(batch[column] for column in text_columns), truncation=True, max_length=max_length))
        labels = batch[label_column]
        if label_index is None:
            features["labels"] = np.asarray(labels, dtype=np.float32)
        else:
            features["labels"] = [label_index[str(label)] for label in labels]
        return _with_length(features, with_length)

    return encode


def _eos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _causal_features(input_ids: list[list[int]], labels: list[list[int]], with_length: bool) -> dict:
    features = {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids], "labels": labels}
    return _with_length(features, with_length)


def _rows(batch: dict) -> list[dict]:
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def _prompted_encoder(tokenizer, template: str, completion_column: str, max_length: int,
                      with_length: bool) -> Callable[[dict], dict]:
    """Prompt and completion are tokenised apart, so the prompt's tokens are exactly those the model
    sees at generation time; only completion tokens (and EOS) carry a loss."""
    eos = _eos_ids(tokenizer)

    def encode(batch: dict) -> dict:
        prompts = tokenizer([render_prompt(template, row) for row in _rows(batch)])["input_ids"]
        completions = tokenizer(batch[completion_column], add_special_tokens=False)["input_ids"]
        input_ids = [(prompt + completion + eos)[:max_length] for prompt, completion in zip(prompts, completions)]
        labels = [([IGNORE_INDEX] * len(prompt) + completion + eos)[:max_length] for prompt, completion in zip(prompts, completions)]
        return _causal_features(input_ids, labels, with_length)

    return encode


def _text_encoder(tokenizer, text_column: str, max_length: int, with_length: bool) -> Callable[[dict], dict]:
    eos = _eos_ids(tokenizer)

    def encode(batch: dict) -> dict:
        input_ids = [(ids + eos)[:max_length] for ids in tokenizer(batch[text_column])["input_ids"]]
        return _causal_features(input_ids, [list(ids) for ids in input_ids], with_length)

    return encode


def _generation_set(raw: Dataset, template: str, completion_column: str) -> Dataset:
    """One row per rendered prompt with all its references (E2E lists one row per reference)."""
    grouped: dict[str, list[str]] = {}
    for row in raw:
        grouped.setdefault(render_prompt(template, row), []).append(row[completion_column])
    return Dataset.from_dict({"prompt_text": list(grouped), "reference": list(grouped.values())})


# --- the whole preparation -----------------------------------------------------------------------

def _first(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def _hold_out(train: Dataset, share: float, seed: int) -> tuple[Dataset, Dataset]:
    try:
        parts = train.train_test_split(test_size=share, seed=seed)
    except ValueError:
        raise DataError(
            f"data.train has {len(train)} examples, too few to hold out data.validation_split={share}",
            "give data.validation or more training data",
        ) from None
    return parts["train"], parts["test"]


def _load_splits(data: DataConfig, splits: Sequence[str]) -> dict[str, Dataset]:
    return {
        split: _first(load_source(getattr(data, split), f"data.{split}"), data.max_samples)
        for split in splits
        if getattr(data, split) is not None
    }


def _is_prompted(raw: dict[str, Dataset], data: DataConfig) -> bool:
    return all({data.prompt_column, data.completion_column} <= set(dataset.column_names) for dataset in raw.values())


def _causal_encoder(data: DataConfig, tokenizer, prompted: bool) -> Callable[[dict], dict]:
    if prompted:
        return _prompted_encoder(tokenizer, data.template, data.completion_column, data.max_length, data.group_by_length)
    return _text_encoder(tokenizer, data.text_columns[0], data.max_length, data.group_by_length)


def _build_label_names(raw: dict[str, Dataset], column: str) -> list[str]:
    if "train" not in raw:
        raise DataError("classification needs the training labels to build the label map", "set data.train")
    names = label_names_from(raw["train"], column)
    if len(names) < 2:
        raise DataError(f"the training data has a single label ({names[0]!r})", "classification needs at least two")
    return names


def prepare_data(
    cfg: HkftConfig,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str] | None = None,
    splits: Sequence[str] = SPLITS,
) -> PreparedData:
    """Tokenised splits (unpadded) with ``labels``; ``label_names`` is passed in at eval time (the
    saved label map) and built from the training labels otherwise."""
    data, task = cfg.data, cfg.model.task
    # A validation set held out from train is rebuilt the same way (same share, same seed) when
    # validation is asked for alone: `hkft eval` scores the split training selected on.
    held_out = "validation" in splits and data.validation is None
    raw = _load_splits(data, [*splits, "train"] if held_out and "train" not in splits else splits)
    layout = _chat_layout(raw, data) if task == "causal-lm" else None
    prompted = task == "causal-lm" and layout is None and (
        data.format == "prompt-completion" or (data.format == "auto" and _is_prompted(raw, data))
    )
    if layout is not None:
        texts, needed = [], chat.required_columns(layout)
    elif task == "causal-lm":
        texts = [data.prompt_column, data.completion_column] if prompted else data.text_columns[:1]
        needed = texts
    else:
        texts = data.text_columns
        needed = [*texts, data.label_column]
    for split, dataset in raw.items():
        raw[split] = dataset = _csv_text_as_written(dataset, getattr(data, split), chat.text_columns(layout) if layout else texts,
                                                    data.max_samples)
        where = f"{describe_source(getattr(data, split))} (data.{split})"
        _require_columns(dataset, needed, split)
        _require_values(dataset, needed, split)
        _require_strings(dataset, texts, where)
        if texts:  # conversations are checked message by message (hkft.chat)
            _require_some_text(dataset, texts, where)
    _check_room(tokenizer, data, task)
    if held_out and "train" in raw:
        raw["train"], raw["validation"] = _hold_out(raw["train"], data.validation_split, cfg.train.seed)
        if "train" not in splits:
            del raw["train"]
    if layout is not None:
        return _prepare_chat(raw, data, tokenizer, layout, cfg.model.name)
    training = task == "classification" and label_names is None and "train" in raw
    notices = rare_label_warnings(raw, data.label_column) if training else []

    if task == "classification":
        label_names = label_names if label_names is not None else _build_label_names(raw, data.label_column)
        for split, dataset in raw.items():
            _check_known_labels(dataset, data.label_column, label_names, split)
        encode = _classification_encoder(tokenizer, data.text_columns, data.max_length, data.label_column,
                                         {name: index for index, name in enumerate(label_names)}, data.group_by_length)
    elif task == "regression":
        label_names = None
        for split, dataset in raw.items():
            _check_numeric_labels(dataset, data.label_column, split)
        encode = _classification_encoder(tokenizer, data.text_columns, data.max_length, data.label_column, None, data.group_by_length)
    else:
        label_names = None
        encode = _causal_encoder(data, tokenizer, prompted)

    tokenised = {
        split: dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenising {split}")
        for split, dataset in raw.items()
    }
    scored = [split for split in ("validation", "test") if split in raw]
    untokenised = {}
    if prompted:
        untokenised = {split: _generation_set(raw[split], data.template, data.completion_column) for split in scored}
    elif task != "causal-lm":
        untokenised = {split: raw[split].select_columns(texts) for split in scored}
    return _prepared(tokenised, untokenised, label_names, notices)


def _prepared(tokenised: dict[str, Dataset], generation: dict[str, Dataset], label_names: list[str] | None,
              notices: Sequence[str] = ()) -> PreparedData:
    return PreparedData(
        train=tokenised.get("train"),
        validation=tokenised.get("validation"),
        test=tokenised.get("test"),
        label_names=label_names,
        raw_validation=generation.get("validation"),
        raw_test=generation.get("test"),
        notices=tuple(notices),
    )


def _chat_layout(raw: dict[str, Dataset], data: DataConfig) -> chat.ChatLayout | None:
    layouts = {split: chat.chat_format(data, dataset) for split, dataset in raw.items()}
    if len(set(layouts.values())) > 1:
        found = ", ".join(f"{split}: {layout or 'not chat'}" for split, layout in layouts.items())
        raise DataError(f"the data splits have different layouts ({found})", "give every split the same columns, or set data.format")
    return next(iter(layouts.values()), None)


def _prepare_chat(raw: dict[str, Dataset], data: DataConfig, tokenizer: PreTrainedTokenizerBase, layout: chat.ChatLayout,
                  model_name: str) -> PreparedData:
    """Conversations: rendered with the chat template, labels on the assistant's tokens (hkft.chat)."""
    chat.use_chat_template(tokenizer, data, model_name)
    tokenised, notices = {}, []
    for split, dataset in raw.items():
        encoded = dataset.map(chat.chat_encoder(tokenizer, data, layout, split), batched=True, with_indices=True,
                              remove_columns=dataset.column_names, desc=f"tokenising {split}")
        tokenised[split], notice = chat.count_truncation(encoded, split, data.max_length)
        notices += [notice] if notice else []
    generation = {split: chat.chat_generation_set(tokenizer, raw[split], layout, split)
                  for split in ("validation", "test") if split in raw}
    return _prepared(tokenised, generation, None, notices)


def make_collator(task: str, tokenizer: PreTrainedTokenizerBase) -> Callable:
    """Dynamic padding; causal-LM labels are padded with IGNORE_INDEX so padding carries no loss."""
    if task == "causal-lm":
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    return DataCollatorWithPadding(tokenizer)
