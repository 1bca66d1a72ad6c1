"""Reading data files: local JSONL/JSON/CSV/Parquet as written, or a hub dataset, with one clear line when a file is unreadable."""

from __future__ import annotations

import codecs
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import pyarrow as pa
from datasets import Dataset
from datasets.exceptions import DatasetGenerationError

from hkft.config.schema import HubSource
from hkft.errors import DataError
from hkft.hub import offline_unless_hub_reachable

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


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


def csv_text_as_written(dataset: Dataset, source: str | HubSource, columns: list[str], limit: int | None) -> Dataset:
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
            return first_rows(datasets.load_dataset("csv", data_files=source, split="train", features=features), limit)
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


def first_rows(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset
