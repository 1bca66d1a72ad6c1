"""Loading, label maps, prompt masking, collation and the tokenisation cache."""

import json
import logging
import os

import numpy as np
import pandas as pd
import pytest
import torch
from checkpoints import MEMORISE, memorise_texts, word_tokenizer, write_jsonl
from datasets import Dataset
from transformers import AutoTokenizer

from hkft.config import validate_config
from hkft.config.schema import HubSource
from hkft.data.files import check_local_source, load_source, parse_hub_spec
from hkft.data.preparation import (
    IGNORE_INDEX,
    label_names_from,
    render_prompt,
)
from hkft.errors import DataError
from hkft.models.loading import resolve_model_path
from hkft.tasks.base import prepare_data
from hkft.tasks.registry import task_for

ROWS = [{"premise": f"a {i}", "hypothesis": f"b {i}", "label": i % 3, "text": f"t {i}"} for i in range(12)]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def bert_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path(MINILM))


def config(**data):
    return validate_config({"model": {"name": "x", "task": data.pop("task", "classification")}, "data": data})


# --- loading -------------------------------------------------------------------------------------

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
    assert list(dataset["premise"]) == [row["premise"] for row in ROWS]
    assert list(dataset["label"]) == [row["label"] for row in ROWS]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "empty.jsonl is empty"),
        ("blank.jsonl", b"\n\n", "blank.jsonl has no examples"),
        ("header.csv", b"text,label\n", "header.csv has no examples"),
        ("latin.jsonl", b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n', "latin.jsonl: line 2 is not UTF-8"),
        ("latin.csv", b"text,label\ncaf\xe9,1\n", "latin.csv: line 2 is not UTF-8"),
        ("ragged.csv", b"text,label\nx,1\ny,2,3\n", "ragged.csv: cannot parse as csv (Error tokenizing data. C error: Expected 2 fields in line 3"),
        ("broken.jsonl", b'{"text": "x"}\n{"text": oops}\n', "broken.jsonl: cannot parse as json (JSON parse error: Invalid value. in row 1)"),
        ("notes.txt", b"hello\n", "unsupported file type '.txt' (use one of .jsonl, .json, .csv, .parquet)"),
    ],
)
def test_bad_local_files_are_one_line_data_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    logged = Records()
    logging.getLogger("datasets").addHandler(logged)
    try:
        with pytest.raises(DataError) as caught:
            load_source(str(tmp_path / name))
    finally:
        logging.getLogger("datasets").removeHandler(logged)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not logged.records  # datasets' own error log would repeat the error on stderr


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_non_utf8_error_says_how_to_fix_it(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="re-encode the file as UTF-8"):
        load_source(str(tmp_path / "latin.jsonl"))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=f"data file {tmp_path / 'nope.jsonl'} does not exist"):
        load_source(str(tmp_path / "nope.jsonl"))
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(DataError, match="folder.jsonl is not a file"):
        load_source(str(tmp_path / "folder.jsonl"))


def test_missing_file_hint_names_the_setting_it_came_from(tmp_path, bert_tokenizer):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"nope.jsonl does not exist \(check data.test\)"):
        prepare_data(config(train=missing, test=missing), bert_tokenizer, splits=("test",), label_names=["a", "b"])
    with pytest.raises(DataError, match=r"nope.jsonl does not exist \(check --data\)"):
        check_local_source(missing, "--data")
    check_local_source("hub:nyu-mll/glue:rte:test", "--data")  # hub specs are checked when they load


def test_hub_spec_parsing():
    spec = parse_hub_spec("hub:nyu-mll/glue:rte:validation")
    assert (spec.hub, spec.config, spec.split) == ("nyu-mll/glue", "rte", "validation")
    assert (parse_hub_spec("hub:imdb").config, parse_hub_spec("hub:imdb").split) == (None, "train")
    assert parse_hub_spec("hub:nyu-mll/glue:rte").split == "train"
    assert (parse_hub_spec("hub:imdb::test").config, parse_hub_spec("hub:imdb::test").split) == (None, "test")
    assert parse_hub_spec("hub:imdb:plain_text:train[:10%]").split == "train[:10%]"
    for bad in ("hub:", "hub::rte", "hub:imdb:plain_text:"):
        with pytest.raises(DataError, match="not a hub dataset spec"):
            parse_hub_spec(bad)


@pytest.mark.parametrize("source", ["hub:hkft-tests/no-such-dataset:default:validation",
                                    HubSource(hub="hkft-tests/no-such-dataset", config="default", split="validation")])
def test_hub_dataset_offline_is_a_data_error(source):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(DataError) as caught:
        load_source(source)
    message = str(caught.value)
    assert "hub:hkft-tests/no-such-dataset:default:validation" in message and "cannot be reached" in message
    assert "needs network once" in message and "point data.* at a local copy" in message


# --- classification and regression ---------------------------------------------------------------

def test_text_pairs_integer_labels_and_held_out_validation(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    cfg = config(train=str(path), text_column=["premise", "hypothesis"], validation_split=0.25)
    data = prepare_data(cfg, bert_tokenizer)
    assert data.label_names == ["0", "1", "2"]
    assert len(data.train) == 9 and len(data.validation) == 3
    by_ids = {tuple(bert_tokenizer(row["premise"], row["hypothesis"])["input_ids"]): row for row in ROWS}
    seen = []
    for split in (data.train, data.validation):
        for example in split:
            row = by_ids[tuple(example["input_ids"])]  # each example is its row's pair, encoded as two segments
            assert example["labels"] == row["label"] and example["token_type_ids"].count(1) > 0
            seen.append(row["premise"])
    assert sorted(seen) == sorted(row["premise"] for row in ROWS)  # the hold-out splits train, losing nothing


def test_held_out_validation_follows_the_seed(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)

    def held_out(seed):
        cfg = validate_config({"model": {"name": "x"}, "data": {"train": str(path)}, "train": {"seed": seed}})
        return prepare_data(cfg, bert_tokenizer).validation["input_ids"]

    assert held_out(1) == held_out(1)
    assert any(held_out(seed) != held_out(1) for seed in (2, 3, 4))


def test_validation_alone_is_the_same_hold_out_as_in_training(tmp_path, bert_tokenizer):
    """`hkft eval` asks for the validation split alone: it is rebuilt from train as training built it."""
    cfg = config(train=str(write_jsonl(tmp_path / "rows.jsonl", ROWS)), validation_split=0.25)
    in_training = prepare_data(cfg, bert_tokenizer)
    alone = prepare_data(cfg, bert_tokenizer, label_names=in_training.label_names, splits=("validation",))
    assert alone.train is None and len(alone.validation) == 3
    assert alone.validation["input_ids"] == in_training.validation["input_ids"]
    assert alone.validation["labels"] == in_training.validation["labels"]


def test_too_few_examples_to_hold_out(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": "x", "label": "a"}])
    with pytest.raises(DataError, match="1 examples, too few to hold out data.validation_split"):
        prepare_data(config(train=str(path)), bert_tokenizer)


def test_string_labels_map_to_sorted_ids(tmp_path, bert_tokenizer):
    rows = [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}, {"text": "z", "label": "neu"}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    data = prepare_data(config(train=str(path), validation=str(path)), bert_tokenizer)
    assert data.label_names == ["neg", "neu", "pos"]
    assert data.validation["labels"] == [2, 0, 1]


def test_label_names_sort_numbers_numerically():
    assert label_names_from(Dataset.from_dict({"l": ["pos", "neg", "pos"]}), "l") == ["neg", "pos"]
    assert label_names_from(Dataset.from_dict({"l": [10, 2, 1, -1]}), "l") == ["-1", "1", "2", "10"]


def test_eval_uses_the_training_label_map(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": "b"}, {"text": "y", "label": "a"}])
    data = prepare_data(config(test=str(path), train=str(path)), bert_tokenizer, label_names=["b", "a"], splits=("test",))
    assert data.test["labels"] == [0, 1] and data.label_names == ["b", "a"]


def test_eval_label_never_seen_in_training(tmp_path, bert_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "z", "label": "pos"}, {"text": "w", "label": "neutral"}])
    with pytest.raises(DataError, match="test data has label 'neutral', which training never saw.*neg, pos"):
        prepare_data(config(train=str(train), validation=str(train), test=str(test)), bert_tokenizer)


def test_missing_column_lists_the_available_ones(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"sentence": "x", "label": 0}, {"sentence": "y", "label": 1}])
    with pytest.raises(DataError, match="train data has no column 'text'.*available columns: sentence, label"):
        prepare_data(config(train=str(path), validation=str(path)), bert_tokenizer)
    with pytest.raises(DataError, match="has no column 'gold'"):
        prepare_data(config(train=str(path), validation=str(path), text_column="sentence", label_column="gold"), bert_tokenizer)


def test_missing_value_names_row_and_column(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": "a"}, {"text": None, "label": "b"}])
    with pytest.raises(DataError, match="validation data: row 1 has no value in column 'text'"):
        prepare_data(config(train=str(path), validation=str(path)), bert_tokenizer, splits=("validation",), label_names=["a", "b"])


@pytest.mark.parametrize(("rows", "settings", "message"), [
    ([{"text": "x", "label": "a"}, {"text": 5, "label": "b"}], {}, "column 'text' holds int values (row 1)"),
    ([{"text": ["x"], "label": "a"}, {"text": ["y"], "label": "b"}], {}, "column 'text' holds list values (row 0)"),
    ([{"a": "x", "b": "y", "label": "a"}, {"a": "x", "b": 2.5, "label": "b"}], {"text_column": ["a", "b"]},
     "column 'b' holds float values (row 1)"),
    ([{"prompt": "p", "completion": 7}], {"task": "causal-lm"}, "column 'completion' holds int values (row 0)"),
    ([{"prompt": {"q": "p"}, "completion": "c"}], {"task": "causal-lm"}, "column 'prompt' holds dict values (row 0)"),
    ([{"text": 1}], {"task": "causal-lm"}, "column 'text' holds int values (row 0)"),
])
def test_text_columns_must_hold_strings(tmp_path, bert_tokenizer, rows, settings, message):
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError) as caught:
        prepare_data(config(train=str(path), validation=str(path), **settings), bert_tokenizer)
    assert str(caught.value).startswith(f"{path} (data.train): {message}")
    assert "text columns must be strings" in str(caught.value)


def test_single_training_label(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": "a"}] * 3)
    with pytest.raises(DataError, match="single label"):
        prepare_data(config(train=str(path), validation=str(path)), bert_tokenizer)


def test_regression_labels_are_float32(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "x", "label": 3}, {"text": "y", "label": 1.5}])
    data = prepare_data(config(train=str(path), validation=str(path), task="regression"), bert_tokenizer)
    assert data.label_names is None and data.validation["labels"] == [3.0, 1.5]
    assert data.validation.features["labels"].dtype == "float32"


def test_regression_rejects_text_labels(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "x", "label": "high"}, {"text": "y", "label": "low"}])
    with pytest.raises(DataError, match="train data: regression labels must be numbers"):
        prepare_data(config(train=str(path), validation=str(path), task="regression"), bert_tokenizer)


def test_max_samples_truncation_and_length_column(tmp_path, bert_tokenizer):
    rows = [{"text": "word " * (i + 1), "label": i % 2} for i in range(10)]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    cfg = config(train=str(path), validation=str(path), max_samples=4, max_length=5, group_by_length=True)
    data = prepare_data(cfg, bert_tokenizer)
    assert len(data.train) == 4 and len(data.validation) == 4
    assert data.train["input_ids"] == [bert_tokenizer(row["text"], truncation=True, max_length=5)["input_ids"] for row in rows[:4]]
    assert data.train["length"] == [3, 4, 5, 5]


def test_classification_collator_pads_per_batch(bert_tokenizer):
    features = [{**bert_tokenizer(text), "labels": label} for text, label in (("a b c d e", 1), ("a", 0))]
    batch = task_for("classification").collator(bert_tokenizer)(features)
    assert batch["input_ids"].shape == (2, 7)  # [CLS] + 5 words + [SEP]: padded to the longest, no further
    assert batch["input_ids"][1, 3:].tolist() == [bert_tokenizer.pad_token_id] * 4
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert batch["labels"].tolist() == [1, 0]


# --- causal LM -----------------------------------------------------------------------------------

def test_prompt_tokens_are_masked_out_of_the_loss(tmp_path):
    tokenizer = word_tokenizer(memorise_texts())
    path = write_jsonl(tmp_path / "m.jsonl", MEMORISE)
    cfg = config(train=str(path), validation=str(path), task="causal-lm", template="Q: {prompt}")
    data = prepare_data(cfg, tokenizer)
    for row, example in zip(data.validation, MEMORISE):
        prompt_ids = tokenizer("Q: " + example["prompt"])["input_ids"]
        completion_ids = tokenizer(example["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert row["input_ids"] == prompt_ids + completion_ids
        assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert data.raw_validation["prompt_text"][0] == "Q: " + MEMORISE[0]["prompt"]
    assert data.raw_validation["reference"][0] == [MEMORISE[0]["completion"]]


def test_prompted_examples_are_truncated_at_max_length(tmp_path):
    tokenizer = word_tokenizer(memorise_texts())
    path = write_jsonl(tmp_path / "m.jsonl", MEMORISE[:1])
    prompt_ids = tokenizer(MEMORISE[0]["prompt"])["input_ids"]
    completion_ids = tokenizer(MEMORISE[0]["completion"], add_special_tokens=False)["input_ids"]
    limit = len(prompt_ids) + 2
    assert len(completion_ids) > 2
    cfg = config(train=str(path), validation=str(path), task="causal-lm", max_length=limit)
    row = prepare_data(cfg, tokenizer, splits=("validation",)).validation[0]
    assert row["input_ids"] == prompt_ids + completion_ids[:2]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids[:2]


def test_generation_references_are_grouped_per_prompt(tmp_path):
    rows = [{"prompt": "p1", "completion": "a"}, {"prompt": "p1", "completion": "b"}, {"prompt": "p2", "completion": "c"}]
    tokenizer = word_tokenizer(["p1 p2 a b c"])
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    data = prepare_data(config(train=str(path), test=str(path), validation=str(path), task="causal-lm"), tokenizer)
    assert data.raw_test["prompt_text"] == ["p1", "p2"] and data.raw_test["reference"] == [["a", "b"], ["c"]]
    assert len(data.test) == 3  # every reference is a training target; generation scores each prompt once


def test_plain_text_causal_lm_supervises_every_token(tmp_path):
    tokenizer = word_tokenizer(["one two three"])
    path = write_jsonl(tmp_path / "plain.jsonl", [{"text": "one two three"}])
    data = prepare_data(config(train=str(path), validation=str(path), task="causal-lm"), tokenizer, splits=("validation",))
    expected = tokenizer("one two three")["input_ids"] + [tokenizer.eos_token_id]
    assert data.validation[0]["input_ids"] == expected and data.validation[0]["labels"] == expected
    assert data.raw_validation is None


def test_render_prompt_errors_name_the_field_and_template():
    assert render_prompt("{a} -> {b}", {"a": 1, "b": "x"}) == "1 -> x"
    with pytest.raises(DataError, match=r"data.template '\{question\}\\n' uses field 'question'.*available fields: prompt"):
        render_prompt("{question}\n", {"prompt": "p"})
    with pytest.raises(DataError, match="is not a valid template"):
        render_prompt("{0}", {"prompt": "p"})


def test_causal_collator_pads_labels_with_ignore_index():
    tokenizer = word_tokenizer(["a b c"])
    batch = task_for("causal-lm").collator(tokenizer)([
        {"input_ids": [4, 5, 6], "attention_mask": [1, 1, 1], "labels": [-100, 5, 6]},
        {"input_ids": [4], "attention_mask": [1], "labels": [4]},
    ])
    assert batch["input_ids"].tolist() == [[4, 5, 6], [4, tokenizer.pad_token_id, tokenizer.pad_token_id]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"][1].tolist() == [1, 0, 0]
    assert batch["labels"].dtype == torch.long


# --- the tokenisation cache ----------------------------------------------------------------------

def test_cache_is_reused_exactly_when_nothing_changed(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "word " * 50, "label": "a"}, {"text": "b", "label": "b"}])

    def prepared(tokenizer, **data):
        cfg = config(**{"train": str(path), "validation": str(path), "max_length": 16, **data})
        return prepare_data(cfg, tokenizer, label_names=["a", "b"], splits=("validation",)).validation

    first = prepared(bert_tokenizer)
    bert_tokenizer("warm it up", truncation=True, max_length=4, padding="max_length")
    fresh_tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    for again in (prepared(bert_tokenizer), prepared(fresh_tokenizer)):
        assert again._fingerprint == first._fingerprint and again.cache_files == first.cache_files

    longer = prepared(bert_tokenizer, max_length=32)
    other_tokenizer = prepared(word_tokenizer(["word b"]))
    assert len({first._fingerprint, longer._fingerprint, other_tokenizer._fingerprint}) == 3
    assert len(first[0]["input_ids"]) == 16 and len(longer[0]["input_ids"]) == 32

    write_jsonl(path, [{"text": "other words", "label": "a"}, {"text": "b", "label": "b"}])
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    edited = prepared(bert_tokenizer)
    assert edited._fingerprint != first._fingerprint
    assert edited[0]["input_ids"] == bert_tokenizer("other words")["input_ids"]


def test_cache_follows_the_template(tmp_path):
    tokenizer = word_tokenizer(memorise_texts() + ["Q:"])
    path = write_jsonl(tmp_path / "m.jsonl", MEMORISE)

    def prepared(template):
        cfg = config(train=str(path), validation=str(path), task="causal-lm", template=template)
        return prepare_data(cfg, tokenizer, splits=("validation",)).validation

    plain, again, prefixed = prepared("{prompt}"), prepared("{prompt}"), prepared("Q: {prompt}")
    assert plain._fingerprint == again._fingerprint != prefixed._fingerprint
    assert prefixed[0]["input_ids"][:2] == tokenizer("Q:")["input_ids"]
    assert np.count_nonzero(np.array(prefixed[0]["labels"]) == IGNORE_INDEX) == np.count_nonzero(np.array(plain[0]["labels"]) == IGNORE_INDEX) + 2


@pytest.mark.parametrize("group_by_length,strategy", [(True, "group_by_length"), (False, "random")])
def test_training_arguments_use_the_length_grouped_sampler_and_count_tokens(tmp_path, group_by_length, strategy):
    from hkft.config import load_config
    from hkft.recipes.train import training_arguments
    from hkft.run.directory import RunDir

    cfg = load_config("quickstart", [f"data.group_by_length={str(group_by_length).lower()}"])
    args = training_arguments(cfg, RunDir(tmp_path / "run"), has_eval=True)
    assert args.train_sampling_strategy == strategy
    assert args.include_num_input_tokens_seen == "non_padding"  # tokens per second in the logs
