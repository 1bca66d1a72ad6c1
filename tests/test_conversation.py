"""`hkft chat`: replies checked against plain transformers + peft generation, the scriptable mode's
JSON lines, a real pseudo-terminal session (streaming, /save, /reset, Ctrl-C in the middle of a
reply, Ctrl-D), and one-line errors."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
import yaml
from chat_models import CHATML, CHATML_PLAIN, chat_tokenizer, save_tiny_chat_model
from conftest import assert_one_line_error
from peft import PeftModel
from test_chat import ANSWERS, chat_preset
from transformers import AutoModelForCausalLM, AutoTokenizer

from hkft.data.chat import ChatLayout, conversation

PROMPT = "you> "


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny LLaMA taught four one-word replies (a? yes, b? no, ...) on the ChatML template."""
    from conftest import Cli

    tmp = tmp_path_factory.mktemp("chat")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in ANSWERS]
    result = Cli()("train", chat_preset(tmp, rows), "--output-dir", tmp / "run")
    assert result.exit_code == 0, result.stderr
    return tmp / "run"


def reference_reply(run: Path, messages: list[dict], *, adapter: bool = True, template: str | None = None,
                    max_new_tokens: int = 6) -> str:
    """Greedy generation with plain transformers and peft, on the conversation rendered by
    transformers' apply_chat_template."""
    base_dir = json.loads((run / "adapter/hkft_adapter.json").read_text())["base_model"]
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    tokenizer.chat_template = template or tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter:
        model = PeftModel.from_pretrained(model, run / "adapter")
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def json_lines(stdout: str) -> list[dict]:
    """Every line of stdout is one JSON object: nothing else may be printed there."""
    return [json.loads(line) for line in stdout.splitlines()]


# --- scriptable: one JSON line per reply ------------------------------------------------------------

def test_each_input_line_gets_one_json_line_with_the_reply_the_adapter_gives(cli, chat_run):
    """Prompts and `messages` conversations, one per line (blank lines skipped) -> exactly one JSON
    line each on stdout, the finetuned reply, and the conversation with it ready to train on."""
    conversation_line = json.dumps({"messages": [{"role": "user", "content": "b?"}, {"role": "assistant", "content": "no"},
                                                 {"role": "user", "content": "c?"}]})
    result = piped(cli, chat_run, f"a?\n\n{conversation_line}\nd?\n".encode())
    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    earlier_turns = json.loads(conversation_line)["messages"]
    replies = ["yes", reference_reply(chat_run, earlier_turns), "soon"]
    assert [record["reply"] for record in records] == replies
    assert records[1]["messages"] == [*earlier_turns, {"role": "assistant", "content": replies[1]}]
    for record in records:  # a reply's record is a training row as it stands
        assert conversation(record, ChatLayout("messages", "messages"), "row") == record["messages"]


def test_compare_base_replies_with_the_adapter_switched_off(cli, chat_run):
    result = cli("chat", chat_run, "--compare-base", "--prompt", "a?", "--prompt", "c?")
    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    assert [record["reply"] for record in records] == ["yes", "maybe"]
    for record, prompt in zip(records, ("a?", "c?")):
        expected = reference_reply(chat_run, [{"role": "user", "content": prompt}], adapter=False)
        assert record["base_reply"] == expected != record["reply"]


def test_the_system_message_starts_the_conversation(cli, chat_run):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "b?"}]
    result = cli("chat", chat_run, "--system", "Be brief.", "--prompt", "b?")
    assert result.exit_code == 0, result.stderr
    (record,) = json_lines(result.stdout)
    assert record["messages"][:2] == messages
    assert record["reply"] == reference_reply(chat_run, messages)


def test_set_overrides_the_generation_settings(cli, endless_preset, tmp_path):
    """A model that never ends its turn replies with exactly max_new_tokens tokens (one per byte):
    the 7 of --set, not the 3 of the preset."""
    preset = yaml.safe_load(endless_preset.read_text())
    preset["eval"]["generation"]["max_new_tokens"] = 3
    (tmp_path / "three.yaml").write_text(yaml.safe_dump(preset))
    result = cli("chat", "--base", tmp_path / "three.yaml", "--prompt", "hi", "--set", "eval.generation.max_new_tokens=7")
    assert result.exit_code == 0, result.stderr
    (record,) = json_lines(result.stdout)
    model = AutoModelForCausalLM.from_pretrained(yaml.safe_load(endless_preset.read_text())["model"]["name"])
    tokenizer = chat_tokenizer(CHATML_PLAIN)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=7, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    assert len(new_tokens) == 7
    assert record["reply"] == tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def test_base_preset_uses_the_presets_chat_template(cli, tmp_path):
    """--base PRESET: no adapter, and data.chat_template replaces the tokenizer's."""
    model_dir = save_tiny_chat_model(tmp_path / "model", CHATML)
    preset = tmp_path / "base.yaml"
    preset.write_text(yaml.safe_dump({"model": {"name": str(model_dir), "task": "causal-lm"},
                                      "data": {"train": "unused.jsonl", "chat_template": CHATML_PLAIN},
                                      "eval": {"generation": {"max_new_tokens": 8}}}))
    result = cli("chat", "--base", preset, "--prompt", "hello")
    assert result.exit_code == 0, result.stderr
    (record,) = json_lines(result.stdout)
    messages = [{"role": "user", "content": "hello"}]
    tokenizer = chat_tokenizer(CHATML_PLAIN)
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    def greedy(template):
        inputs = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    assert record["reply"] == greedy(CHATML_PLAIN) != greedy(CHATML)


def test_merged_model_folder_replies_like_its_run(cli, chat_run, tmp_path):
    merged = tmp_path / "merged"
    assert cli("merge-adapter", chat_run, "--output", merged).exit_code == 0
    result = cli("chat", merged, "--prompt", "a?", "--prompt", "d?")
    assert result.exit_code == 0, result.stderr
    assert [record["reply"] for record in json_lines(result.stdout)] == ["yes", "soon"]
    assert_one_line_error(cli("chat", merged, "--compare-base", "--prompt", "a?"), "--compare-base", "no adapter")


@pytest.mark.parametrize("stdin, message", [
    (b'a?\n{"messages": [{"role": "user", "content": "x"}\n', "standard input line 2 is not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
     "standard input line 1: the conversation ends with the assistant's message"),
    (b'{"prompt": "x"}\n', 'standard input line 1: a JSON line needs a "messages" conversation'),
    (b'{"messages": [{"role": "robot", "content": "x"}]}\n', "standard input line 1: message 1 has role 'robot'"),
    (b"a?\n\xff\xfe\n", "standard input line 2 is not UTF-8 text"),
])
def test_a_bad_input_line_is_one_error_naming_the_line(cli, chat_run, stdin, message):
    result = piped(cli, chat_run, stdin)
    assert_one_line_error(result, message)
    assert all(record["reply"] for record in json_lines(result.stdout))  # lines before it were answered whole


def test_save_appends_one_line_after_a_line_break_the_file_lacked(tmp_path):
    from hkft.errors import HkftError
    from hkft.inference.conversation import save_conversation

    path = tmp_path / "chats.jsonl"
    path.write_text('{"messages": []}')  # no final line break
    messages = [{"role": "user", "content": "é?"}, {"role": "assistant", "content": "yes"}]
    save_conversation(path, messages)
    save_conversation(path, messages)
    assert path.read_text(encoding="utf-8").splitlines() == ['{"messages": []}', *[json.dumps({"messages": messages}, ensure_ascii=False)] * 2]
    with pytest.raises(HkftError, match="does not exist"):
        save_conversation(tmp_path / "missing" / "chats.jsonl", messages)
    with pytest.raises(HkftError, match="is a folder"):
        save_conversation(tmp_path, messages)


# --- one-line errors ---------------------------------------------------------------------------------

def test_chat_on_a_classifier_points_to_predict(cli):
    assert_one_line_error(cli("chat", "--base", "quickstart", "--prompt", "hi"), "is a classification model", "hkft predict")


def test_predict_on_a_chat_run_points_to_chat(cli, chat_run):
    assert_one_line_error(cli("predict", chat_run, "some text"), "is a causal-lm model", f"hkft chat {chat_run}")


def test_missing_damaged_and_busy_runs_are_one_line_errors(cli, chat_run, tmp_path):
    assert_one_line_error(cli("chat", tmp_path / "nowhere", "--prompt", "x"), "does not exist", "hkft train")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("chat", tmp_path / "empty", "--prompt", "x"), "neither a run directory")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "hkft_config.yaml").write_text((chat_run / "hkft_config.yaml").read_text())
    assert_one_line_error(cli("chat", unfinished, "--prompt", "x"), "holds no trained adapter", "--resume")

    damaged = tmp_path / "damaged"
    shutil.copytree(chat_run, damaged)
    weights = damaged / "adapter/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_one_line_error(cli("chat", damaged, "--prompt", "x"), "adapter weights are damaged")

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from hkft.run.directory import training_run_dir\n"
         "with training_run_dir(Path(sys.argv[1])):\n print('held', flush=True); sys.stdin.read()", str(chat_run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert_one_line_error(cli("chat", chat_run, "--prompt", "x"), "in use by another hkft process", "wait", code=3)
    finally:
        holder.communicate("", timeout=60)


@pytest.mark.parametrize("args, message", [
    ((), "nothing to talk to"),
    (("RUN", "--base", "quickstart-chat"), "--base quickstart-chat given"),
    (("--base", "quickstart-chat", "--compare-base"), "--compare-base"),
    (("RUN", "--set", "eval.generation.max_new_token=5"), "did you mean eval.generation.max_new_tokens"),
])
def test_contradicting_or_missing_arguments_are_one_line_errors(cli, chat_run, args, message):
    args = [str(chat_run) if arg == "RUN" else arg for arg in args]
    assert_one_line_error(cli("chat", *args, "--prompt", "x"), message)


# --- a real terminal ------------------------------------------------------------------------------

def spawn_chat(*args: str, cwd: Path) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "hkft", "chat", *args], cwd=str(cwd), encoding="utf-8", timeout=120,
                          dimensions=(24, 200))
    child.expect(PROMPT)
    return child


def test_a_terminal_conversation_streams_saves_resets_and_leaves_on_ctrl_d(chat_run, tmp_path):
    child = spawn_chat(str(chat_run), "--compare-base", cwd=tmp_path)
    assert "LoRA adapter on" in child.before and "Ctrl-C stops a reply" in child.before
    child.sendline("a?")
    child.expect(PROMPT)
    assert "base model> " in child.before and "\r\nfinetuned> yes\r\n" in child.before
    child.sendline("b?")
    child.expect(PROMPT)
    child.sendline("/save chats.jsonl")
    child.expect(PROMPT)
    assert "saved 4 messages to chats.jsonl" in child.before
    child.sendline("/reset")
    child.expect(PROMPT)
    child.sendline("c?")
    child.expect(PROMPT)
    child.sendline("/save chats.jsonl")
    child.expect(PROMPT)
    child.sendline("/nonsense")
    child.expect(PROMPT)
    assert "unknown command /nonsense" in child.before
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = [json.loads(line) for line in (tmp_path / "chats.jsonl").read_text().splitlines()]
    assert saved == [
        {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "yes"},
                      {"role": "user", "content": "b?"}, {"role": "assistant", "content": reference_reply(
                          chat_run, [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "yes"},
                                     {"role": "user", "content": "b?"}])}]},
        {"messages": [{"role": "user", "content": "c?"}, {"role": "assistant", "content": "maybe"}]},
    ]


@pytest.fixture
def endless_preset(tmp_path) -> Path:
    """A tiny chat model that never emits an end-of-turn token (its generation config suppresses the
    special tokens), with room for a million positions: a reply goes on until something stops it."""
    model_dir = save_tiny_chat_model(tmp_path / "endless", CHATML_PLAIN)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.max_position_embeddings = 1_000_000
    model.generation_config.suppress_tokens = chat_tokenizer().convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    model.save_pretrained(model_dir)
    preset = tmp_path / "endless.yaml"
    preset.write_text(yaml.safe_dump({"model": {"name": str(model_dir), "task": "causal-lm"}, "data": {"train": "unused.jsonl"},
                                      "eval": {"generation": {"max_new_tokens": 1_000_000}}}))
    return preset


def test_ctrl_c_stops_the_reply_not_the_conversation(endless_preset, tmp_path):
    """Ctrl-C while tokens stream -> the reply stops at once (it would run for hours), the partial
    reply stays in the conversation, and the next turn and /save work; Ctrl-C at the prompt drops
    the line; /exit leaves with status 0."""
    child = spawn_chat("--base", str(endless_preset), cwd=tmp_path)
    child.sendline("hello")
    child.expect("assistant> ")
    child.expect(r"[^\r\n]{40}")  # tokens arrive while the reply is still being generated
    child.sendintr()
    started = time.monotonic()
    child.expect(r"\(stopped\)")
    assert time.monotonic() - started < 10
    child.expect(PROMPT)
    child.sendline("/save chats.jsonl")
    child.expect(PROMPT)
    child.send("half a line")
    child.sendintr()
    child.expect(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    (saved,) = [json.loads(line) for line in (tmp_path / "chats.jsonl").read_text().splitlines()]
    user, reply = saved["messages"]
    assert user == {"role": "user", "content": "hello"}
    assert reply["role"] == "assistant" and 40 <= len(reply["content"]) < 100_000


def piped(cli, run: Path, stdin: bytes, *args: str):
    """`hkft chat RUN` with ``stdin`` as its standard input (not a terminal)."""
    from hkft.cli import app

    return cli.runner.invoke(app, ["chat", str(run), *args], input=stdin, catch_exceptions=False)
