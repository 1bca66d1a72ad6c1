"""Chat data: rendering with the template, labels on assistant tokens only (token by token), the three
layouts, truncation accounting, and chat training/evaluation end to end on a tiny LLaMA."""

import json

import pytest
import yaml
from chat_models import CHATML, CHATML_PLAIN, chat_tokenizer, save_tiny_chat_model
from checkpoints import write_jsonl
from conftest import assert_one_line_error

from hkft.config.schema import HkftConfig
from hkft.data.chat import IGNORE_INDEX, encode_chat
from hkft.errors import DataError
from hkft.tasks.base import prepare_data

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
MULTI_TURN = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Colour of the sky?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green."},
]


def expected_tokens(tokenizer, messages, supervised_turns):
    """The ChatML rendering built segment by segment, independently of hkft: each message is
    ``<|im_start|>role\\n`` + content + ``<|im_end|>`` + ``\\n``; content and ``<|im_end|>`` of the
    supervised assistant turns carry labels. chat_tokenizer has one token per byte, so segments
    tokenise on their own as inside the whole."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
        supervised_turns = {index + 1 for index in supervised_turns}
    input_ids, labels = [], []
    for index, message in enumerate(messages):
        head, body, tail = ids(f"<|im_start|>{message['role']}\n"), ids(message["content"] + "<|im_end|>"), ids("\n")
        input_ids += head + body + tail
        labels += [IGNORE_INDEX] * len(head) + (body if index in supervised_turns else [IGNORE_INDEX] * len(body))
        labels += [IGNORE_INDEX] * len(tail)
    return input_ids, labels


def config(tmp_path, **data):
    return HkftConfig.model_validate({"model": {"name": "unused", "task": "causal-lm"},
                                      "data": {"max_length": 512, **data}})


@pytest.mark.parametrize(("train_on", "supervised"), [("all_assistant", {2, 4}), ("last_assistant", {4})])
def test_multi_turn_labels_cover_exactly_the_assistant_turns(train_on, supervised):
    tokenizer = chat_tokenizer()
    encoded = encode_chat(tokenizer, MULTI_TURN, train_on, 512, "row 0")
    assert (encoded.input_ids, encoded.labels) == expected_tokens(tokenizer, MULTI_TURN, supervised)
    assert encoded.input_ids == tokenizer.apply_chat_template(MULTI_TURN, tokenize=True, return_dict=False)


def test_a_template_that_adds_a_default_system_message_is_followed():
    tokenizer = chat_tokenizer()
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    encoded = encode_chat(tokenizer, messages, "all_assistant", 512, "row 0")
    assert (encoded.input_ids, encoded.labels) == expected_tokens(tokenizer, messages, {1})
    supervised = tokenizer.decode([label for label in encoded.labels if label != IGNORE_INDEX])
    assert supervised == "4<|im_end|>"


def rows_in_three_layouts():
    messages = [{"messages": MULTI_TURN[1:3]}, {"messages": MULTI_TURN}]
    sharegpt = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                    "value": m["content"]} for m in row["messages"]]} for row in messages]
    alpaca = [{"instruction": "Colour of the sky?", "input": "", "output": "Blue."},
              {"instruction": "Colour of", "input": "grass", "output": "Green.", "system": "Be brief."}]
    alpaca_as_messages = [
        [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour of\n\ngrass"},
         {"role": "assistant", "content": "Green."}],
    ]
    return {"messages": (messages, [row["messages"] for row in messages]),
            "sharegpt": (sharegpt, [row["messages"] for row in messages]),
            "alpaca": (alpaca, alpaca_as_messages)}


@pytest.mark.parametrize("layout", ["messages", "sharegpt", "alpaca"])
@pytest.mark.parametrize("explicit", [False, True])
def test_every_layout_is_detected_and_mapped_onto_messages(tmp_path, layout, explicit):
    rows, conversations = rows_in_three_layouts()[layout]
    path = write_jsonl(tmp_path / f"{layout}.jsonl", rows)
    tokenizer = chat_tokenizer()
    cfg = config(tmp_path, train=str(path), validation=str(path), **({"format": layout} if explicit else {}))
    data = prepare_data(cfg, tokenizer)
    for row, messages in zip(data.validation, conversations):
        assistant = {index for index, message in enumerate(messages) if message["role"] == "assistant"}
        assert (row["input_ids"], row["labels"]) == expected_tokens(tokenizer, messages, assistant)
    assert data.raw_validation["reference"] == [messages[-1]["content"] for messages in conversations]
    assert data.raw_validation["conversation"] == [messages[:-1] for messages in conversations]
    assert data.raw_validation["prompt_text"][0] == tokenizer.apply_chat_template(
        conversations[0][:-1], tokenize=False, add_generation_prompt=True)


def test_truncation_is_counted_and_conversations_left_without_supervision_are_dropped(tmp_path):
    tokenizer = chat_tokenizer()
    long_user = [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "never seen"}]
    cut_reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * 200}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in (long_user, cut_reply, short)])
    full = {name: encode_chat(tokenizer, m, "all_assistant", 10_000, "") for name, m in
            (("cut", cut_reply), ("short", short))}
    data = prepare_data(config(tmp_path, train=str(path), validation=str(path), max_length=150), tokenizer)
    assert data.train["input_ids"] == [full["cut"].input_ids[:150], full["short"].input_ids]
    assert data.train["labels"] == [full["cut"].labels[:150], full["short"].labels]
    assert data.notices == tuple(
        f"notice: {split} data: 2 of 3 conversations are longer than data.max_length=150: 1 lose the end of their "
        "assistant tokens, 1 lose all of them and are left out (raise data.max_length to keep them)"
        for split in ("train", "validation")
    )


def test_every_conversation_losing_its_supervision_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MULTI_TURN}])
    with pytest.raises(DataError, match="every conversation loses all its assistant tokens at data.max_length=8"):
        prepare_data(config(tmp_path, train=str(path), validation=str(path), max_length=8), chat_tokenizer())


@pytest.mark.parametrize(("rows", "message"), [
    ([{"messages": [{"role": "bot", "content": "x"}]}], "train data row 0: message 1 has role 'bot' (use one of system, user, assistant)"),
    ([{"messages": [{"role": "user", "content": "x"}]}], "train data row 0: the conversation has no assistant message"),
    ([{"messages": [{"role": "user"}]}], "message 1 is not a {role, content} mapping"),
    ([{"messages": []}], "column 'messages' must hold a non-empty list of messages"),
    ([{"conversations": [{"from": "robot", "value": "x"}]}], "message 1 has from 'robot' (use one of system, human, user, gpt, assistant)"),
    ([{"instruction": "", "output": "x"}], "alpaca rows need an instruction and an output"),
])
def test_malformed_conversations_are_data_errors_naming_the_row(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError) as caught:
        prepare_data(config(tmp_path, train=str(path), validation=str(path)), chat_tokenizer(), splits=("train",))
    assert message in str(caught.value)


def test_no_chat_template_is_an_error_and_data_chat_template_fills_in(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MULTI_TURN}])
    with pytest.raises(DataError, match="has no chat template, which chat data needs"):
        prepare_data(config(tmp_path, train=str(path), validation=str(path)), chat_tokenizer(None))
    tokenizer = chat_tokenizer(None)
    data = prepare_data(config(tmp_path, train=str(path), validation=str(path), chat_template=CHATML), tokenizer)
    assert tokenizer.chat_template == CHATML  # saved with the adapter's tokenizer
    assert data.train["input_ids"][0] == expected_tokens(tokenizer, MULTI_TURN, {2, 4})[0]


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """Rendering only the last assistant turn's content differently when it is last (as templates
    that strip reasoning from history do) breaks the prefix rule: an error, never wrong labels."""
    rewriting = ("{% for m in messages %}{{ m['role'] }}: {% if loop.last %}{{ m['content'] }}{% else %}"
                 "{{ m['content'][:1] }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match="does not render this conversation's beginning as a prefix"):
        encode_chat(chat_tokenizer(rewriting), MULTI_TURN, "all_assistant", 512, "train data row 0")


@pytest.mark.parametrize(("override", "message"), [
    ("data.formt=messages", "data.formt: unknown key (did you mean data.format?)"),
    ("data.train_on=everything", "data.train_on"),
    ("data.messages_colum=chat", "did you mean data.messages_column?"),
    ("data.chat_templat=x", "did you mean data.chat_template?"),
    ("data.format=openai", "data.format"),
    ("model.gguf=x.gguf", "did you mean model.gguf_file?"),
])
def test_new_keys_are_validated_with_did_you_mean(tmp_path, cli, override, message):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"model": {"name": "m", "task": "causal-lm"}, "data": {"train": "t.jsonl"}}))
    assert_one_line_error(cli("config", preset, "--set", override), message)


def test_data_format_is_for_causal_lm(tmp_path, cli):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"model": {"name": "m"}, "data": {"train": "t.jsonl", "format": "messages"}}))
    assert_one_line_error(cli("config", preset), "data.format messages is for causal-lm")


def chat_preset(tmp_path, rows, **data):
    model_dir = save_tiny_chat_model(tmp_path / "model", CHATML_PLAIN)
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    preset = {
        "model": {"name": str(model_dir), "task": "causal-lm"},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {"train": str(path), "validation": str(path), "test": str(path), "max_length": 64, **data},
        "dropout": {"method": "none"},
        "train": {"epochs": 20, "lr": 3e-2, "batch_size": 4, "warmup_ratio": 0.0, "eval_strategy": "no"},
        "eval": {"generation": {"max_new_tokens": 6}},
    }
    (tmp_path / "chat.yaml").write_text(yaml.safe_dump(preset))
    return tmp_path / "chat.yaml"


ANSWERS = [("a?", "yes"), ("b?", "no"), ("c?", "maybe"), ("d?", "soon")]


def test_chat_training_learns_replies_and_evaluation_generates_after_the_generation_prompt(tmp_path, cli):
    rows = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            for question, answer in ANSWERS]
    result = cli("train", chat_preset(tmp_path, rows), "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())["eval"]
    assert metrics["exact_match"] == 100.0 and metrics["perplexity"] < 1.5, metrics

    evaluated = cli("eval", tmp_path / "run")
    assert evaluated.exit_code == 0, evaluated.stderr
    predictions = [json.loads(line) for line in (tmp_path / "run/predictions.jsonl").read_text().splitlines()]
    assert predictions == [{"conversation": [{"role": "user", "content": q}], "prediction": a, "reference": a}
                           for q, a in ANSWERS]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "run/adapter").chat_template == CHATML_PLAIN


def test_truncation_notice_is_printed_by_train(tmp_path, cli):
    rows = [{"messages": [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "lost"}]},
            *({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in ANSWERS)]
    preset = chat_preset(tmp_path, rows)
    result = cli("train", preset, "--output-dir", tmp_path / "run", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.stderr
    assert "train data: 1 of 5 conversations are longer than data.max_length=64" in " ".join(result.stdout.split())
