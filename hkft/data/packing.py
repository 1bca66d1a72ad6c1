"""Sequence packing for causal-LM training (``data.packing``): several tokenised examples per row.

Rows are filled best-fit decreasing up to ``data.max_length`` tokens (TRL's ``bfd`` strategy): no
randomness, so the same data always gives the same rows, and ``Dataset.map`` caches them like the
tokenisation (keyed on the tokenised split and max_length). Each row is its examples flattened by
transformers' `DataCollatorWithFlattening`: position ids restart at every example and each
example's first label is IGNORE_INDEX, so the last token of one example is never trained to predict
the first token of the next, while every example keeps its own supervision (the first token of an
example is never a target unpacked either). Batches carry no attention mask: from the restarting
position ids transformers' masking builds a block-diagonal causal mask (sdpa and eager), so no
token attends across an example boundary, and hkft's dropout draws its spans and NEFTune's lengths
per example from the same position ids (`hkft.dropout.patterns.packed_extent`).

Only the training split is packed: evaluation batches stay one example per row, so a packed and an
unpacked run report the same evaluation loss for the same model.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import DataCollatorWithFlattening

from hkft.data.chat import IGNORE_INDEX
from hkft.data.preparation import PreparedData
from hkft.dropout.architecture import eval_mode, transformers_model
from hkft.errors import ConfigError


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the examples in each row: longest first, each into the row it fills best (the
    fullest row it still fits in), a new row when none has room. Empty examples are left out."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row), sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length == 0:
            continue
        slot = bisect.bisect_left(room, (length, -1))
        if slot == len(room):
            row, left = len(rows), capacity - length
            rows.append([index])
        else:
            left, row = room.pop(slot)
            rows[row].append(index)
            left -= length
        if left > 0:
            bisect.insort(room, (left, row))
    return rows


def _packer(max_length: int) -> Callable[[dict], dict]:
    """For ``Dataset.map(batched=True, batch_size=None)``: the whole split in, its packed rows out."""
    flatten = DataCollatorWithFlattening(return_tensors="np", separator_id=IGNORE_INDEX)

    def pack(split: dict) -> dict:
        examples = [{"input_ids": ids, "labels": labels} for ids, labels in zip(split["input_ids"], split["labels"])]
        packed = [flatten([examples[index] for index in row])
                  for row in best_fit_decreasing([len(ids) for ids in split["input_ids"]], max_length)]
        rows = {key: [row[key][0] for row in packed] for key in ("input_ids", "labels", "position_ids")}
        if "length" in split:  # data.group_by_length
            rows["length"] = [len(ids) for ids in rows["input_ids"]]
        return rows

    return pack


def pack_dataset(dataset: Dataset, max_length: int) -> Dataset:
    return dataset.map(_packer(max_length), batched=True, batch_size=None, remove_columns=dataset.column_names,
                       desc="packing train")


def pack_training_data(data: PreparedData, max_length: int) -> PreparedData:
    """``data`` with its training split packed, and a notice of how full the rows are."""
    if data.train is None or len(data.train) == 0:
        return data
    packed = pack_dataset(data.train, max_length)
    tokens = sum(len(ids) for ids in packed["input_ids"])
    notice = (f"notice: data.packing: {len(data.train)} training examples in {len(packed)} rows of up to "
              f"{max_length} tokens ({tokens / (len(packed) * max_length):.0%} full); train.batch_size counts rows")
    return dataclasses.replace(data, train=packed, notices=(*data.notices, notice))


@dataclass(frozen=True)
class PackedCollator:
    """Pads packed rows to the batch's longest with ``pad_token_id`` (labels IGNORE_INDEX) and no
    attention mask: the padding gets position ids from 0, so transformers takes it for one more
    example, which attends to nothing else and carries no loss. Rows without position ids (the
    evaluation splits, never packed) go to ``unpacked``."""

    pad_token_id: int
    unpacked: Callable[[list[dict]], dict]

    def __call__(self, rows: list[dict]) -> dict:
        if "position_ids" not in rows[0]:
            return self.unpacked(rows)
        width = max(len(row["input_ids"]) for row in rows)

        def column(key: str, fill: Callable[[int], list[int]]) -> torch.Tensor:
            return torch.tensor([list(row[key]) + fill(width - len(row[key])) for row in rows], dtype=torch.long)

        return {
            "input_ids": column("input_ids", lambda n: [self.pad_token_id] * n),
            "labels": column("labels", lambda n: [IGNORE_INDEX] * n),
            "position_ids": column("position_ids", lambda n: list(range(n))),
        }


@torch.no_grad()
def check_packed_attention(model: torch.nn.Module) -> None:
    """Refuse a model whose attention would cross example boundaries in a packed row: two examples
    are packed into one row, the first one's first token is changed, and the second one's logits
    must not move. Families whose mask code ignores packed position ids fail here, in one line,
    before any training."""
    base = transformers_model(model)
    vocabulary = base.get_input_embeddings().num_embeddings
    ids = torch.tensor([[1, 2, 3, 1, 2, 3]], device=base.device) % vocabulary
    changed = ids.clone()
    changed[0, 0] = 4 % vocabulary
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]], device=base.device)
    with eval_mode(model):
        first, second = (model(input_ids=row, position_ids=positions, use_cache=False).logits[0, 3:].float()
                         for row in (ids, changed))
    if not torch.allclose(first, second, rtol=1e-3, atol=1e-3):
        raise ConfigError(
            f"data.packing: {type(base).__name__} attends across the examples packed into a row (its attention "
            "does not follow the restarted position ids)",
            "set data.packing=false for this model",
        )
