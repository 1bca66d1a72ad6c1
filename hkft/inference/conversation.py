"""`hkft chat`: a conversation with a trained causal LM in the terminal, or one reply per input line
for scripts.

Each reply is generated the way `hkft eval` generates (hkft.tasks.evaluation.generate, the run's
eval.generation settings, greedy) after the conversation rendered with the chat template the run
trained with: its data.chat_template, else the tokenizer's (saved beside the adapter). In a
terminal the tokens are streamed as they come; Ctrl-C stops the reply being generated (a stopping
criterion reads the flag that the SIGINT handler sets) and the conversation goes on.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from hkft.config.schema import GenerationConfig
from hkft.data.chat import (
    ChatLayout,
    Message,
    checked_messages,
    render,
    use_chat_template,
)
from hkft.errors import ConfigError, DataError, HkftError
from hkft.inference.targets import Target, load_base_target, load_target, looks_like_run
from hkft.models.loading import position_limit
from hkft.run.files import environment_error
from hkft.tasks.evaluation import generate

COMMANDS = "/reset starts over, /save FILE appends the conversation to a JSONL file, /exit or Ctrl-D leaves"
STOPPED = "(stopped)"


class LineCancelled(Exception):
    """Ctrl-C while no reply is being generated: what was being typed is dropped."""


class CtrlC(StoppingCriteria):
    """The session's SIGINT handler. During a reply it sets a flag that stops generation at the next
    token (this stopping criterion); anywhere else it cancels the line being typed."""

    def __init__(self) -> None:
        self.generating = False
        self.requested = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.requested, dtype=torch.bool, device=input_ids.device)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.generating:
            raise LineCancelled
        self.requested = True

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = signal.signal(signal.SIGINT, self.handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextmanager
    def reply(self) -> Iterator[None]:
        self.generating, self.requested = True, False
        try:
            yield
        finally:
            self.generating = False


@dataclass
class Replier:
    """Replies of one model to conversations: the finetuned model, or its base with the adapter off."""

    target: Target
    settings: GenerationConfig

    @property
    def name(self) -> str:
        return self.target.cfg.model.name

    def reply(self, messages: list[Message], where: str, *, base: bool = False, stream: bool = False,
              stop: CtrlC | None = None) -> str:
        model, tokenizer = self.target.model, self.target.tokenizer
        prompt = render(tokenizer, messages, where, generation_prompt=True)
        settings = self.fitted(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), where)
        options = {}
        if stream and settings.num_beams == 1:  # transformers streams greedy and sampled search only
            options["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        if stop is not None:
            options["stopping_criteria"] = StoppingCriteriaList([stop])
        with model.disable_adapter() if base else nullcontext():
            (text,) = generate(model, tokenizer, [prompt], settings, 1, add_special_tokens=False, **options)
        if stream and "streamer" not in options:
            print(text, flush=True)
        return text

    def fitted(self, prompt_tokens: int, where: str) -> GenerationConfig:
        """The settings, with max_new_tokens cut to the positions the model has left (a model with
        learned positions fails past its last one)."""
        limit = position_limit(self.target.model.config)
        if limit is None:
            return self.settings
        if prompt_tokens >= limit:
            raise DataError(f"{where}: the conversation is {prompt_tokens} tokens long, and {self.name} has {limit} positions",
                            "start a shorter one (/reset in a terminal)")
        return self.settings.model_copy(update={"max_new_tokens": min(self.settings.max_new_tokens, limit - prompt_tokens)})


# --- loading ---------------------------------------------------------------------------------------

def load_replier(target: Path | None, base: str | None, overrides: list[str], *, compare_base: bool) -> tuple[Replier, str]:
    """The model to talk to and a line saying what it is and which chat template it uses."""
    if target is not None and base is not None:
        raise ConfigError(f"both {target} and --base {base} given", "talk to one: the run, or the base model of a preset")
    if target is None and base is None:
        raise ConfigError("nothing to talk to", "give a run directory (hkft chat runs/quickstart-chat), a merged model "
                          "folder, or --base PRESET for a preset's base model")
    if compare_base and (target is None or not looks_like_run(target)):
        raise ConfigError("--compare-base compares a LoRA adapter with its base model, and this model has no adapter",
                          "give the run directory the adapter was trained in")
    loaded = load_base_target(base, overrides, "chat") if base is not None else load_target(target, overrides, "chat")
    template = "data.chat_template" if loaded.cfg.data.chat_template else "the tokenizer's chat template"
    use_chat_template(loaded.tokenizer, loaded.cfg.data, loaded.cfg.model.name)
    return Replier(loaded, loaded.cfg.eval.generation), f"{loaded.description}, {template}"


def run_chat(target: Path | None, base: str | None, overrides: list[str], *, system: str | None, prompts: list[str],
             compare_base: bool) -> None:
    """In a terminal: the conversation. Otherwise (or with --prompt): one JSON line per reply on stdout."""
    replier, description = load_replier(target, base, overrides, compare_base=compare_base)
    if prompts:
        answer_lines((("--prompt", text) for text in prompts), replier, system, compare_base, sys.stdout)
    elif sys.stdin.isatty():
        Session(replier, system, compare_base).run(description)
    else:
        answer_lines(stdin_lines(), replier, system, compare_base, sys.stdout)


# --- scripts: one JSON line per reply --------------------------------------------------------------

def stdin_lines() -> Iterator[tuple[str, str]]:
    """(where, line) for each line of standard input that is not blank, read as it arrives."""
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        where = f"standard input line {number}"
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise DataError(f"{where} is not UTF-8 text", "send UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
        if line.strip():
            yield where, line


def parse_input_line(line: str, where: str, system: str | None) -> list[Message]:
    """A prompt, or (a line starting with ``{``) a JSON object with a ``messages`` conversation that
    ends with the user's turn. ``system`` starts a conversation that has no system message."""
    if not line.lstrip().startswith("{"):
        messages = [{"role": "user", "content": line}]
    else:
        try:
            row = json.loads(line)
        except ValueError as err:
            raise DataError(f"{where} is not valid JSON ({err})",
                            'write a prompt as plain text, or a conversation as {"messages": [{"role": "user", "content": "..."}]}') from None
        if not isinstance(row, dict) or "messages" not in row:
            raise DataError(f"{where}: a JSON line needs a \"messages\" conversation",
                            'e.g. {"messages": [{"role": "user", "content": "..."}]}')
        messages = checked_messages(row["messages"], ChatLayout("messages", "messages"), where)
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: the conversation ends with the {messages[-1]['role']}'s message, so there is nothing to reply to",
                            "end it with the user's turn")
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def answer_lines(lines: Iterator[tuple[str, str]], replier: Replier, system: str | None, compare_base: bool,
                 out: TextIO) -> None:
    """Each line is a conversation of its own; each reply is one JSON line, written as soon as it is
    generated: the reply, the base model's with --compare-base, and the conversation with the reply
    (a `messages` row, ready to become training data)."""
    for where, line in lines:
        messages = parse_input_line(line, where, system)
        record = {"reply": replier.reply(messages, where)}
        if compare_base:
            record["base_reply"] = replier.reply(messages, where, base=True)
        record["messages"] = [*messages, {"role": "assistant", "content": record["reply"]}]
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()


# --- the terminal ----------------------------------------------------------------------------------

def save_conversation(path: Path, messages: list[Message]) -> None:
    """Appends one ``{"messages": [...]}`` line with a single write (a reader never sees half of it),
    after a line break if the file does not end with one."""
    line = json.dumps({"messages": messages}, ensure_ascii=False) + "\n"
    try:
        with path.open("a+b") as stream:
            if stream.tell() > 0:
                stream.seek(-1, 2)
                if stream.read(1) != b"\n":
                    line = "\n" + line
            stream.write(line.encode("utf-8"))
    except IsADirectoryError:
        raise HkftError(f"/save {path}: is a folder", "give a file name, e.g. /save chats.jsonl") from None
    except FileNotFoundError:
        raise HkftError(f"/save {path}: the folder {path.parent} does not exist", "create it, or save elsewhere") from None
    except OSError as err:
        raise (environment_error(err, path) or HkftError(f"/save {path}: {err.strerror or err}")) from None


@dataclass
class Session:
    """The conversation in a terminal: the user's turns, the replies streamed as they come."""

    replier: Replier
    system: str | None
    compare_base: bool
    messages: list[Message] = field(default_factory=list)
    ctrl_c: CtrlC = field(default_factory=CtrlC)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def run(self, description: str) -> None:
        try:
            import readline  # noqa: F401  line editing and history for input(), where the platform has it
        except ImportError:
            pass
        print(f"hkft chat: {description}")
        print(f"{COMMANDS}; Ctrl-C stops a reply.")
        with self.ctrl_c.installed():
            while True:
                try:
                    line = input("you> ")
                except EOFError:  # Ctrl-D
                    print()
                    return
                except LineCancelled:
                    print()
                    continue
                try:
                    if not self.handle(line.strip()):
                        return
                except LineCancelled:
                    print(STOPPED)
                except HkftError as err:
                    print(f"error: {err}", file=sys.stderr, flush=True)

    def handle(self, line: str) -> bool:
        """One line typed by the user; False to leave."""
        command, _, argument = line.partition(" ")
        if not line:
            return True
        if command == "/exit":
            return False
        if command == "/reset":
            self.reset()
            print("(a new conversation)")
        elif command == "/save":
            self.save(argument.strip())
        elif command.startswith("/") and command.count("/") == 1 and command[1:].isalpha():
            print(f"unknown command {command}: {COMMANDS}")
        else:
            self.turn(line)
        return True

    def save(self, name: str) -> None:
        if not name:
            raise HkftError("/save needs a file name", "e.g. /save chats.jsonl")
        if not any(message["role"] == "assistant" for message in self.messages):
            raise HkftError("nothing to save yet: the conversation has no reply", "say something first")
        save_conversation(Path(name).expanduser(), self.messages)
        print(f"(saved {len(self.messages)} messages to {name})")

    def turn(self, text: str) -> None:
        """The reply (with --compare-base, the base model's first) joins the conversation, also when
        Ctrl-C stopped it: the model's next turn sees what the user saw."""
        messages = [*self.messages, {"role": "user", "content": text}]
        if self.compare_base:
            self.reply_as("base model", messages, base=True)
        reply = self.reply_as("finetuned" if self.compare_base else "assistant", messages, base=False)
        self.messages = [*messages, {"role": "assistant", "content": reply}]

    def reply_as(self, speaker: str, messages: list[Message], *, base: bool) -> str:
        print(f"{speaker}> ", end="", flush=True)
        with self.ctrl_c.reply():
            text = self.replier.reply(messages, "the conversation", base=base, stream=True, stop=self.ctrl_c)
        if self.ctrl_c.requested:
            print(STOPPED, flush=True)
        return text
