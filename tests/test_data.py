"""Loading, label maps, prompt masking, collation and the tokenisation cache."""

import json

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from checkpoints import MEMORISE, memorise_texts, word_tokenizer, write_jsonl
from hkft.config import validate_config
from hkft.data import IGNORE_INDEX, label_names_from, load_source, make_collator, parse_hub_spec, prepare_data
from hkft.errors import DataError
from hkft.modeling import resolve_model_path

ROWS = [{"premise": f"a {i}", "hypothesis": f"b {i}", "label": i % 3, "text": f"t {i}"} for i in range(12)]


@pytest.fixture(scope="module")
def bert_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))


def config(**data):
    return validate_config({"model": {"name": "x", "task": data.pop("task", "classification")}, "data": data})


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_local_format_loads_the_same_rows(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    frame = pd.DataFrame(ROWS)
    if suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    dataset = load_source(str(path))
    assert dataset["premise"] == [row["premise"] for row in ROWS] and list(dataset["label"]) == [r["label"] for r in ROWS]


def test_hub_spec_parsing():
    spec = parse_hub_spec("hub:nyu-mll/glue:rte:validation")
    assert (spec.hub, spec.config, spec.split) == ("nyu-mll/glue", "rte", "validation")
    assert parse_hub_spec("hub:imdb").split == "train" and parse_hub_spec("hub:imdb").config is None
    with pytest.raises(DataError, match="not a hub dataset spec"):
        parse_hub_spec("hub:")


def test_text_pairs_integer_labels_and_held_out_validation(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    cfg = config(train=str(path), text_column=["premise", "hypothesis"], validation_split=0.25)
    data = prepare_data(cfg, bert_tokenizer)
    assert data.label_names == ["0", "1", "2"]
    assert len(data.train) == 9 and len(data.validation) == 3
    first = data.train[0]
    assert first["token_type_ids"].count(1) > 0  # the pair was encoded as two segments
    expected = bert_tokenizer(*first_pair(data, ROWS, bert_tokenizer))["input_ids"]
    assert first["input_ids"] == expected


def first_pair(data, rows, tokenizer):
    decoded = tokenizer.decode(data.train[0]["input_ids"], skip_special_tokens=True)
    row = next(r for r in rows if decoded == f"{r['premise']} {r['hypothesis']}")
    return row["premise"], row["hypothesis"]


def test_string_labels_sorted_and_numeric_labels_sorted_numerically():
    from datasets import Dataset

    assert label_names_from(Dataset.from_dict({"l": ["pos", "neg", "pos"]}), "l") == ["neg", "pos"]
    assert label_names_from(Dataset.from_dict({"l": [10, 2, 1]}), "l") == ["1", "2", "10"]


def test_eval_uses_the_training_label_map(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": "b"}, {"text": "y", "label": "a"}])
    data = prepare_data(config(test=str(path), train=str(path)), bert_tokenizer, label_names=["b", "a"], splits=("test",))
    assert data.test["labels"] == [0, 1]


def test_regression_labels_are_floats(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "x", "label": 3}, {"text": "y", "label": 1.5}])
    data = prepare_data(config(train=str(path), validation=str(path), task="regression"), bert_tokenizer)
    assert data.label_names is None and data.validation["labels"] == [3.0, 1.5]


def test_prompt_tokens_are_masked_out_of_the_loss(tmp_path):
    tokenizer = word_tokenizer(memorise_texts())
    path = write_jsonl(tmp_path / "m.jsonl", MEMORISE)
    cfg = config(train=str(path), validation=str(path), task="causal-lm", template="Q: {prompt}")
    data = prepare_data(cfg, tokenizer)
    for row, example in zip(data.validation, MEMORISE):
        prompt_ids = tokenizer("Q: " + example["prompt"])["input_ids"]
        completion_ids = tokenizer(example["completion"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == prompt_ids + completion_ids
        assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    assert data.raw_validation["prompt_text"][0] == "Q: " + MEMORISE[0]["prompt"]
    assert data.raw_validation["reference"][0] == [MEMORISE[0]["completion"]]


def test_generation_references_are_grouped_per_prompt(tmp_path):
    rows = [{"prompt": "p1", "completion": "a"}, {"prompt": "p1", "completion": "b"}, {"prompt": "p2", "completion": "c"}]
    tokenizer = word_tokenizer(["p1 p2 a b c"])
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    data = prepare_data(config(train=str(path), test=str(path), validation=str(path), task="causal-lm"), tokenizer)
    assert data.raw_test["prompt_text"] == ["p1", "p2"] and data.raw_test["reference"] == [["a", "b"], ["c"]]


def test_plain_text_causal_lm_supervises_every_token(tmp_path):
    tokenizer = word_tokenizer(["one two three"])
    path = write_jsonl(tmp_path / "plain.jsonl", [{"text": "one two three"}])
    data = prepare_data(config(train=str(path), validation=str(path), task="causal-lm"), tokenizer, splits=("validation",))
    assert data.validation[0]["labels"] == data.validation[0]["input_ids"]


def test_causal_collator_pads_labels_with_ignore_index():
    tokenizer = word_tokenizer(["a b c"])
    batch = make_collator("causal-lm", tokenizer)([
        {"input_ids": [4, 5, 6], "attention_mask": [1, 1, 1], "labels": [-100, 5, 6]},
        {"input_ids": [4], "attention_mask": [1], "labels": [4]},
    ])
    assert batch["input_ids"].shape == (2, 3)
    assert batch["labels"][1].tolist() == [4, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"][1].tolist() == [1, 0, 0]


def test_tokenisation_is_cached_and_the_cache_follows_max_length(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "word " * 50, "label": "a"}, {"text": "b", "label": "b"}])
    def prepared(max_length):
        cfg = config(train=str(path), validation=str(path), max_length=max_length)
        return prepare_data(cfg, bert_tokenizer, label_names=["a", "b"], splits=("validation",))

    first, again, longer = prepared(16), prepared(16), prepared(32)
    assert first.validation._fingerprint == again.validation._fingerprint
    assert first.validation.cache_files == again.validation.cache_files
    assert longer.validation._fingerprint != first.validation._fingerprint
    assert len(first.validation[0]["input_ids"]) == 16 and len(longer.validation[0]["input_ids"]) == 32


def test_max_samples_and_length_column(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": f"x {i}", "label": i % 2} for i in range(10)])
    data = prepare_data(config(train=str(path), validation=str(path), max_samples=4, group_by_length=True), bert_tokenizer)
    assert len(data.train) == 4 and data.train[0]["length"] == len(data.train[0]["input_ids"])
