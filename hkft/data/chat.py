"""Chat data: conversations rendered with the tokenizer's chat template, the loss on the assistant's turns.

Three layouts map onto one list of ``{role, content}`` messages (roles system, user, assistant):
``messages`` (OpenAI style), ``sharegpt`` (``conversations`` of ``{from, value}``, human/gpt roles)
and ``alpaca`` (``instruction``, optional ``input`` and ``system``, ``output``).

Where an assistant turn lies in the rendered text is found by rendering prefixes of the
conversation: the text of the messages before the turn with the generation prompt (what the model
sees when it is asked to reply) ends where the turn's supervision starts, and the text through the
turn ends where it stops (trailing whitespace between turns excluded; the end-of-turn token
included, so the model learns to stop). This works with any template, where transformers'
``return_assistant_tokens_mask`` needs one written with ``{% generation %}`` markers. Tokens are
then labelled by their character offsets in the whole rendered conversation, which is tokenised
once, exactly as ``apply_chat_template`` tokenises it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from hkft.config.schema import DataConfig
from hkft.errors import DataError, first_line, kind_of

IGNORE_INDEX = -100  # the label transformers' losses skip
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
DEFAULT_COLUMNS = {"messages": "messages", "sharegpt": "conversations"}
ALPACA_COLUMNS = ("instruction", "output")
ALPACA_TEXT_COLUMNS = (*ALPACA_COLUMNS, "input", "system")
# Truncation outcome of one conversation, kept as a column until it is counted.
FITS, TRUNCATED, DROPPED = 0, 1, 2

Message = dict[str, str]


# --- layouts -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatLayout:
    """How a dataset holds its conversations: ``format`` is messages, sharegpt or alpaca; ``column``
    the list of messages (None for alpaca's columns)."""

    format: str
    column: str | None = None

    def __str__(self) -> str:
        return self.format if self.column is None else f"{self.format} (column {self.column!r})"


def chat_format(data: DataConfig, dataset: Dataset) -> ChatLayout | None:
    """The chat layout of a causal-LM dataset, or None for prompt/completion and plain text.

    ``data.format: auto`` takes prompt/completion columns first (as before chat support), then a
    messages column (``data.messages_column``, else ``messages`` or ``conversations``) whose first
    message has from/value keys (sharegpt) or not (messages), then instruction/output columns
    (alpaca). Either key style may sit in either column."""
    columns = set(dataset.column_names)
    if data.format != "auto":
        if data.format == "alpaca":
            return ChatLayout("alpaca")
        return ChatLayout(data.format, _messages_column(data, data.format, columns)) if data.format in DEFAULT_COLUMNS else None
    if {data.prompt_column, data.completion_column} <= columns:
        return None
    candidates = [data.messages_column] if data.messages_column else list(DEFAULT_COLUMNS.values())
    column = next((name for name in candidates if name in columns), None)
    if column is not None:
        first = next((turns[0] for turns in dataset[column] if isinstance(turns, list) and turns), None)
        return ChatLayout("sharegpt" if isinstance(first, dict) and "from" in first else "messages", column)
    if set(ALPACA_COLUMNS) <= columns:
        return ChatLayout("alpaca")
    return None


def _messages_column(data: DataConfig, layout: str, columns: set[str]) -> str:
    """``data.messages_column``, else the layout's usual column, else the other one if the data has it."""
    if data.messages_column:
        return data.messages_column
    preferred = [DEFAULT_COLUMNS[layout], *(name for name in DEFAULT_COLUMNS.values() if name != DEFAULT_COLUMNS[layout])]
    return next((name for name in preferred if name in columns), DEFAULT_COLUMNS[layout])


def required_columns(layout: ChatLayout) -> list[str]:
    return list(ALPACA_COLUMNS) if layout.column is None else [layout.column]


def text_columns(layout: ChatLayout) -> list[str]:
    """The columns of flat text (alpaca's); a messages column holds lists."""
    return list(ALPACA_TEXT_COLUMNS) if layout.column is None else []


def conversation(row: dict, layout: ChatLayout, where: str) -> list[Message]:
    """One example as checked ``{role, content}`` messages; ``where`` names the row in errors."""
    if layout.column is None:
        return _from_alpaca(row, where)
    messages = checked_messages(row[layout.column], layout, where)
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: the conversation has no assistant message", "nothing to learn from it: add a reply or drop the row")
    return messages


def checked_messages(turns: object, layout: ChatLayout, where: str) -> list[Message]:
    """A messages or sharegpt list as checked ``{role, content}`` messages (a reply not required)."""
    column = layout.column
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: column {column!r} must hold a non-empty list of messages", f"got {_kind(turns)}")
    sharegpt = layout.format == "sharegpt"
    keys = ("from", "value") if sharegpt else ("role", "content")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or not all(key in turn and turn[key] is not None for key in keys):
            raise DataError(f"{where}: message {number} is not a {{{keys[0]}, {keys[1]}}} mapping", f"got {turn!r:.80}")
        known = SHAREGPT_ROLES if sharegpt else {name: name for name in ROLES}
        role, content = turn[keys[0]], turn[keys[1]]
        role = known.get(role) if isinstance(role, str) else None  # a list or a mapping is no role (nor hashable)
        if role is None:
            raise DataError(f"{where}: message {number} has {keys[0]} {turn[keys[0]]!r:.80}", f"use one of {', '.join(known)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {number}'s {keys[1]} is {_kind(content)}", "it must be a string")
        messages.append({"role": role, "content": content})
    return messages


def _from_alpaca(row: dict, where: str) -> list[Message]:
    for column in ALPACA_TEXT_COLUMNS:
        if row.get(column) is not None and not isinstance(row[column], str):
            raise DataError(f"{where}: column {column!r} is {_kind(row[column])}", "alpaca columns hold strings")
    if not row.get("instruction") or row.get("output") is None:
        raise DataError(f"{where}: alpaca rows need an instruction and an output", "fill them in or drop the row")
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return [*system, {"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def _kind(value: object) -> str:
    return "empty" if value is None or (isinstance(value, (str, list)) and not value) else kind_of(value)


# --- the template ----------------------------------------------------------------------------------

def use_chat_template(tokenizer: PreTrainedTokenizerBase, data: DataConfig, model_name: str) -> None:
    """``data.chat_template`` replaces the tokenizer's (and is saved with it); none at all is an error."""
    if data.chat_template:
        tokenizer.chat_template = data.chat_template
    if not tokenizer.chat_template:
        raise DataError(f"the tokenizer of {model_name} has no chat template, which chat data needs",
                        "set data.chat_template to a Jinja chat template, or use prompt/completion data")


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], where: str, *, generation_prompt: bool) -> str:
    """The template is the user's (or the model's) code: what it raises is its problem, in one line.
    Jinja's own errors (a syntax error, ``raise_exception``) refuse; anything else (``{{ m['content'] + 1 }}``
    on a string) is a template that cannot render."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as err:
        raise DataError(f"{where}: the chat template refuses this conversation ({first_line(err)})",
                        "fix the conversation, or set data.chat_template") from None
    except Exception as err:  # any error a Jinja expression can raise (TypeError, KeyError, ...)
        raise DataError(f"{where}: the chat template fails on this conversation ({type(err).__name__}: {first_line(err)})",
                        "fix data.chat_template (it replaces the tokenizer's template), or set it to a working one") from None


def _reply_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message], index: int, where: str) -> str:
    """What the model is shown before the reply at ``index``: the messages before it, with the
    generation prompt. A conversation that opens with the assistant has none: chat templates render
    no empty conversation (transformers refuses one), and many refuse a first assistant turn."""
    if index == 0:
        raise DataError(f"{where}: the conversation opens with an assistant message, a reply to nothing, "
                        "so no prompt comes before it to learn or generate it from",
                        "start the conversation with a system or user message")
    return render(tokenizer, messages[:index], where, generation_prompt=True)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[Message], train_on: str, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its supervised assistant turns."""
    text = render(tokenizer, messages, where, generation_prompt=False)
    turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    spans = []
    for index in turns:
        prompt = _reply_prompt(tokenizer, messages, index, where)
        through = render(tokenizer, messages[: index + 1], where, generation_prompt=False)
        if not (text.startswith(through) and through.startswith(prompt)):
            raise DataError(
                f"{where}: the chat template does not render this conversation's beginning as a prefix of the "
                f"whole (assistant message {index + 1}), so its reply cannot be located",
                "set data.chat_template to a template that renders turns in order",
            )
        spans.append((len(prompt), len(through.rstrip())))
    if all(start >= end for start, end in spans):  # labels would be all ignored: a row that trains nothing
        raise DataError(f"{where}: the chat template renders none of the replies this conversation trains on",
                        "set data.chat_template to a template that renders the assistant's messages")
    return text, spans


@dataclass(frozen=True)
class EncodedChat:
    input_ids: list[int]
    labels: list[int]
    outcome: int  # FITS, TRUNCATED or DROPPED


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[Message], train_on: str, max_length: int,
                where: str) -> EncodedChat:
    text, spans = assistant_spans(tokenizer, messages, train_on, where)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoded["offset_mapping"])
    ]
    supervised = sum(label != IGNORE_INDEX for label in labels)
    kept = sum(label != IGNORE_INDEX for label in labels[:max_length])
    outcome = FITS if kept == supervised else (DROPPED if kept == 0 else TRUNCATED)
    return EncodedChat(ids[:max_length], labels[:max_length], outcome)


def chat_encoder(tokenizer: PreTrainedTokenizerBase, data: DataConfig, layout: ChatLayout, split: str) -> Callable[[dict, list[int]], dict]:
    """For ``Dataset.map(batched=True, with_indices=True)``; adds an ``outcome`` column (see count_truncation)."""
    if not tokenizer.is_fast:
        raise DataError(f"chat data needs a fast tokenizer (character offsets); {type(tokenizer).__name__} is not one",
                        "use a model whose tokenizer has a tokenizer.json")

    def encode(batch: dict, indices: list[int]) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        encoded = [
            encode_chat(tokenizer, conversation(row, layout, f"{split} data row {index}"), data.train_on,
                        data.max_length, f"{split} data row {index}")
            for row, index in zip(rows, indices)
        ]
        features = {
            "input_ids": [item.input_ids for item in encoded],
            "attention_mask": [[1] * len(item.input_ids) for item in encoded],
            "labels": [item.labels for item in encoded],
            "outcome": [item.outcome for item in encoded],
        }
        if data.group_by_length:
            features["length"] = [len(item.input_ids) for item in encoded]
        return features

    return encode


def count_truncation(dataset: Dataset, split: str, max_length: int) -> tuple[Dataset, str | None]:
    """Drop the conversations truncation left without a supervised token; a notice counts what was cut."""
    outcomes = dataset["outcome"]
    truncated, dropped = outcomes.count(TRUNCATED), outcomes.count(DROPPED)
    if dropped:
        dataset = dataset.filter(lambda outcome: outcome != DROPPED, input_columns="outcome")
    dataset = dataset.remove_columns("outcome")
    if not truncated and not dropped:
        return dataset, None
    if len(dataset) == 0:
        raise DataError(f"{split} data: every conversation loses all its assistant tokens at data.max_length={max_length}",
                        "raise data.max_length")
    return dataset, (
        f"notice: {split} data: {truncated + dropped} of {len(outcomes)} conversations are longer than "
        f"data.max_length={max_length}: {truncated} lose the end of their assistant tokens, {dropped} lose all of "
        "them and are left out (raise data.max_length to keep them)"
    )


def chat_generation_set(tokenizer: PreTrainedTokenizerBase, raw: Dataset, layout: ChatLayout, split: str) -> Dataset:
    """Per example: the conversation before its last assistant reply, rendered with the generation
    prompt, and that reply as the reference."""
    prompts, references, conversations = [], [], []
    for index, row in enumerate(raw):
        where = f"{split} data row {index}"
        messages = conversation(row, layout, where)
        last = max(position for position, message in enumerate(messages) if message["role"] == "assistant")
        prompts.append(_reply_prompt(tokenizer, messages, last, where))
        references.append(messages[last]["content"])
        conversations.append(messages[:last])
    return Dataset.from_dict({"prompt_text": prompts, "reference": references, "conversation": conversations})
