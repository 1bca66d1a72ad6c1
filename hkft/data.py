"""Datasets for the three tasks: load (local files or the hub), check, tokenise once (cached), collate.

Tokenisation goes through `Dataset.map`, whose fingerprint covers the data, the tokenizer and every
setting the map function closes over, so a cache is reused exactly when nothing changed.
Padding is dynamic (per batch, in the collator).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, PreTrainedTokenizerBase

from hkft.config.schema import DataConfig, HkftConfig, HubSource
from hkft.errors import DataError

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE_INDEX = -100
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class PreparedData:
    train: Dataset | None
    validation: Dataset | None
    test: Dataset | None
    label_names: list[str] | None
    raw_validation: Dataset | None = None
    raw_test: Dataset | None = None


def parse_hub_spec(spec: str) -> HubSource:
    """``hub:ID[:CONFIG][:SPLIT]``, e.g. ``hub:nyu-mll/glue:rte:validation``."""
    parts = spec.removeprefix("hub:").split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"{spec!r} is not a hub dataset spec", "write hub:ID[:CONFIG][:SPLIT], e.g. hub:nyu-mll/glue:rte:train")
    return HubSource(hub=parts[0], config=parts[1] if len(parts) > 1 and parts[1] else None, split=parts[2] if len(parts) > 2 else "train")


def load_source(source: str | HubSource) -> Dataset:
    if isinstance(source, str) and source.startswith("hub:"):
        source = parse_hub_spec(source)
    dataset = _load_hub(source) if isinstance(source, HubSource) else _load_local(Path(source))
    if len(dataset) == 0:
        raise DataError(f"{_describe(source)} has no examples", "check the file or the split name")
    return dataset


def _describe(source: str | HubSource) -> str:
    return source if isinstance(source, str) else f"hub:{source.hub}:{source.config or ''}:{source.split}"


def _load_local(path: Path) -> Dataset:
    if not path.exists():
        raise DataError(f"data file {path} does not exist", "check data.train / data.validation / data.test")
    if not path.is_file():
        raise DataError(f"{path} is not a file", "point data.* at a .jsonl, .json, .csv or .parquet file")
    builder = LOCAL_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}", f"use one of {', '.join(LOCAL_FORMATS)}")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: cannot read the file (permission denied)")
    if builder != "parquet":
        _check_utf8(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty", "add examples to the file")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types for malformed files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: cannot parse as {builder} ({first_line[:200]})", "check the file's format") from None


def _check_utf8(path: Path) -> None:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}: line {number} is not UTF-8 text (byte {err.start})",
                    "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8",
                ) from None


def _load_hub(source: HubSource) -> Dataset:
    try:
        return datasets.load_dataset(source.hub, source.config, split=source.split)
    except Exception as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        reason = "the hub is offline here" if offline else str(err).strip().splitlines()[0][:200]
        raise DataError(
            f"cannot load hub dataset {_describe(source)}: {reason}",
            "it needs network once (then it is cached), or point data.* at a local file",
        ) from None


def render_prompt(template: str, example: dict) -> str:
    try:
        return template.format(**example)
    except KeyError as err:
        raise DataError(
            f"data.template {template!r} uses field {err.args[0]!r}, which the data does not have",
            f"available fields: {', '.join(example)}",
        ) from None


def _require_columns(dataset: Dataset, columns: list[str], split: str) -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise DataError(
            f"{split} data has no column {missing[0]!r}",
            f"available columns: {', '.join(dataset.column_names)}; set data.text_column / data.label_column",
        )


def label_names_from(dataset: Dataset, column: str) -> list[str]:
    """Sorted label values as strings: numerically when every label is an integer."""
    values = {str(value) for value in dataset[column]}
    if all(value.lstrip("-").isdigit() for value in values):
        return sorted(values, key=int)
    return sorted(values)


def _classification_features(data: DataConfig, tokenizer, label_names: list[str] | None, split: str):
    columns = data.text_columns
    index = {name: i for i, name in enumerate(label_names)} if label_names is not None else None

    def encode(batch: dict) -> dict:
        texts = [batch[column] for column in columns]
        encoded = tokenizer(*texts, truncation=True, max_length=data.max_length)
        if index is not None:
            labels = []
            for value in batch[data.label_column]:
                if str(value) not in index:
                    raise DataError(
                        f"{split} data has label {value!r}, which training never saw",
                        f"labels seen in training: {', '.join(label_names)}",
                    )
                labels.append(index[str(value)])
        else:
            try:
                labels = [float(value) for value in batch[data.label_column]]
            except (TypeError, ValueError):
                raise DataError(f"{split} data: regression labels must be numbers", f"column {data.label_column!r}") from None
        encoded["labels"] = labels
        return encoded

    return encode


def _causal_features(data: DataConfig, tokenizer, prompted: bool):
    eos = tokenizer.eos_token or ""

    def encode(batch: dict) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        input_ids, attention, labels = [], [], []
        for row in rows:
            if prompted:
                prompt = tokenizer(render_prompt(data.template, row), add_special_tokens=True)["input_ids"]
                completion = tokenizer(str(row[data.completion_column]) + eos, add_special_tokens=False)["input_ids"]
                ids = (prompt + completion)[: data.max_length]
                target = ([IGNORE_INDEX] * len(prompt) + completion)[: data.max_length]
            else:
                ids = tokenizer(str(row[data.text_columns[0]]) + eos, truncation=True, max_length=data.max_length)["input_ids"]
                target = list(ids)
            input_ids.append(ids)
            attention.append([1] * len(ids))
            labels.append(target)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    return encode


def _with_generation_columns(raw: Dataset, data: DataConfig) -> Dataset:
    """Prompts with all their references (E2E lists one row per reference): one row per prompt."""
    grouped: dict[str, list[str]] = {}
    for row in raw:
        grouped.setdefault(render_prompt(data.template, row), []).append(str(row[data.completion_column]))
    return Dataset.from_dict({"prompt_text": list(grouped), "reference": list(grouped.values())})


def _select(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def prepare_data(
    cfg: HkftConfig,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str] | None = None,
    splits: Sequence[str] = SPLITS,
) -> PreparedData:
    data, task = cfg.data, cfg.model.task
    raw = {split: _select(load_source(getattr(data, split)), data.max_samples) for split in splits if getattr(data, split) is not None}
    if "train" in splits and "validation" in splits and "validation" not in raw and "train" in raw:
        held_out = raw["train"].train_test_split(test_size=data.validation_split, seed=cfg.train.seed)
        raw["train"], raw["validation"] = held_out["train"], held_out["test"]

    prompted = task == "causal-lm" and all(
        data.prompt_column in dataset.column_names and data.completion_column in dataset.column_names for dataset in raw.values()
    )
    for split, dataset in raw.items():
        if task == "causal-lm":
            _require_columns(dataset, [data.prompt_column, data.completion_column] if prompted else data.text_columns[:1], split)
        else:
            _require_columns(dataset, [*data.text_columns, data.label_column], split)

    if task == "classification" and label_names is None:
        if "train" not in raw:
            raise DataError("classification needs the training labels to build the label map")
        label_names = label_names_from(raw["train"], data.label_column)
        if len(label_names) < 2:
            raise DataError(f"the training data has a single label ({label_names[0]!r})", "classification needs at least two")

    tokenized = {}
    for split, dataset in raw.items():
        if task == "causal-lm":
            encode = _causal_features(data, tokenizer, prompted)
        else:
            encode = _classification_features(data, tokenizer, label_names if task == "classification" else None, split)
        features = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenising {split}")
        if data.group_by_length:
            features = features.map(lambda row: {"length": len(row["input_ids"])})
        tokenized[split] = features

    generation = {}
    if task == "causal-lm" and prompted:
        generation = {split: _with_generation_columns(raw[split], data) for split in ("validation", "test") if split in raw}
    return PreparedData(
        train=tokenized.get("train"),
        validation=tokenized.get("validation"),
        test=tokenized.get("test"),
        label_names=label_names if task == "classification" else None,
        raw_validation=generation.get("validation"),
        raw_test=generation.get("test"),
    )


def make_collator(task: str, tokenizer: PreTrainedTokenizerBase) -> Callable:
    if task == "causal-lm":
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    return DataCollatorWithPadding(tokenizer)
