"""Data preparation shared by the tasks (hkft/tasks/): split loading, checks, encoders, the prepared splits.

Tokenisation goes through `Dataset.map`, whose fingerprint hashes the input dataset (for a local
file: its path and modification time) and the map function with everything it closes over: the
tokenizer, the columns, the template, max_length and the label map. The cache is therefore reused
exactly when none of those changed. Padding is dynamic (per batch, in the collator)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
from datasets import Dataset
from transformers import (
    PreTrainedTokenizerBase,
)

from hkft.config.schema import DataConfig
from hkft.data.chat import IGNORE_INDEX
from hkft.data.files import (
    first_rows,
    load_source,
)
from hkft.errors import DataError

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

    @classmethod
    def of(cls, tokenised: dict[str, Dataset], untokenised: dict[str, Dataset], label_names: list[str] | None,
           notices: Sequence[str] = ()) -> PreparedData:
        return cls(
            train=tokenised.get("train"),
            validation=tokenised.get("validation"),
            test=tokenised.get("test"),
            label_names=label_names,
            raw_validation=untokenised.get("validation"),
            raw_test=untokenised.get("test"),
            notices=tuple(notices),
        )


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


def require_columns(dataset: Dataset, columns: list[str], split: str) -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise DataError(
            f"{split} data has no column {missing[0]!r}",
            f"available columns: {', '.join(dataset.column_names)}; set data.text_column / data.label_column",
        )


def require_values(dataset: Dataset, columns: list[str], split: str) -> None:
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


def require_strings(dataset: Dataset, columns: list[str], where: str) -> None:
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


def require_some_text(dataset: Dataset, columns: list[str], where: str) -> None:
    """Every text empty trains on nothing but special tokens, and scores the same."""
    if all(not value.strip() for column in columns for value in dataset[column]):
        raise DataError(f"{where}: every text in {', '.join(map(repr, columns))} is empty", "check data.text_column and the file")


def check_room(tokenizer: PreTrainedTokenizerBase, data: DataConfig, *, pair: bool, min_tokens: int, note: str = "") -> None:
    """data.max_length must leave room for ``min_tokens`` text tokens after the tokenizer's special
    tokens (a causal LM needs a second token to predict); ``note`` says why, when it is more than one."""
    special = tokenizer.num_special_tokens_to_add(pair=pair)
    needed = max(special + 1, min_tokens)
    if data.max_length < needed:
        raise DataError(
            f"data.max_length {data.max_length} leaves no room for text (the tokenizer adds {special} special tokens"
            f"{'; ' + note if note else ''})",
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


def check_known_labels(dataset: Dataset, column: str, label_names: list[str], split: str) -> None:
    known = set(label_names)
    unknown = next((value for value in dataset[column] if str(value) not in known), None)
    if unknown is not None:
        raise DataError(
            f"{split} data has label {unknown!r}, which training never saw",
            f"labels seen in training: {', '.join(label_names)}",
        )


def check_numeric_labels(dataset: Dataset, column: str, split: str) -> None:
    try:
        np.asarray(dataset[column], dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{split} data: regression labels must be numbers", f"column {column!r} holds other values") from None


def _with_length(features: dict, with_length: bool) -> dict:
    if with_length:
        features["length"] = [len(ids) for ids in features["input_ids"]]
    return features


def sequence_encoder(tokenizer, text_columns: list[str], max_length: int, label_column: str,
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


def generation_set(raw: Dataset, template: str, completion_column: str) -> Dataset:
    """One row per rendered prompt with all its references (E2E lists one row per reference)."""
    grouped: dict[str, list[str]] = {}
    for row in raw:
        grouped.setdefault(render_prompt(template, row), []).append(row[completion_column])
    return Dataset.from_dict({"prompt_text": list(grouped), "reference": list(grouped.values())})


def hold_out(train: Dataset, share: float, seed: int) -> tuple[Dataset, Dataset]:
    try:
        parts = train.train_test_split(test_size=share, seed=seed)
    except ValueError:
        raise DataError(
            f"data.train has {len(train)} examples, too few to hold out data.validation_split={share}",
            "give data.validation or more training data",
        ) from None
    return parts["train"], parts["test"]


def load_splits(data: DataConfig, splits: Sequence[str]) -> dict[str, Dataset]:
    return {
        split: first_rows(load_source(getattr(data, split), f"data.{split}"), data.max_samples)
        for split in splits
        if getattr(data, split) is not None
    }


def causal_encoder(data: DataConfig, tokenizer, prompted: bool) -> Callable[[dict], dict]:
    if prompted:
        return _prompted_encoder(tokenizer, data.template, data.completion_column, data.max_length, data.group_by_length)
    return _text_encoder(tokenizer, data.text_columns[0], data.max_length, data.group_by_length)


def build_label_names(raw: dict[str, Dataset], column: str) -> list[str]:
    if "train" not in raw:
        raise DataError("classification needs the training labels to build the label map", "set data.train")
    names = label_names_from(raw["train"], column)
    if len(names) < 2:
        raise DataError(f"the training data has a single label ({names[0]!r})", "classification needs at least two")
    return names


