"""Tiny checkpoints and data files on disk, loaded by hkft exactly like hub models and user data."""

from __future__ import annotations

import json
from pathlib import Path

from tiny_models import tiny_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]

MEMORISE = [
    {"prompt": f"name[{name}] food[{food}]\n", "completion": f"{name} serves {food} food."}
    for name, food in [("Alimentum", "Chinese"), ("Aromi", "Italian"), ("Bibimbap", "Korean"), ("Cotto", "French"),
                       ("Giraffe", "English"), ("Loch", "Indian"), ("Wildwood", "Japanese"), ("Zizzi", "Spanish")]
]
REVIEWS = [
    {"text": f"the {thing} is {word}", "label": label}
    for thing in ("phone", "lamp", "chair", "kettle", "tent", "drill")
    for word, label in (("great", "pos"), ("fine", "pos"), ("awful", "neg"), ("broken", "neg"))
]


def word_tokenizer(texts: list[str], with_pad: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of ``texts`` (LLaMA-like when ``with_pad`` is False)."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = sorted({token for text in texts for token, _ in pre.pre_tokenize_str(text)})
    vocab = {token: index for index, token in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if with_pad:
        tokenizer.pad_token = "<pad>"
    return tokenizer


def save_tiny_model(arch: str, directory: Path, texts: list[str], *, with_pad: bool = True, **config_overrides) -> Path:
    """A random tiny model of ``arch`` with a tokenizer that covers ``texts``, saved like a hub checkpoint."""
    from transformers import AutoModelForCausalLM

    tokenizer = word_tokenizer(texts, with_pad=with_pad)
    config = tiny_config(arch)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id if with_pad else None
    # Random weights at the usual 0.02 scale give a frozen LM head that cannot express a peaked
    # distribution after the final norm; a larger scale stands in for pretrained weights.
    config.initializer_range = 0.3
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def memorise_texts() -> list[str]:
    return [row["prompt"] + row["completion"] for row in MEMORISE]


def review_texts() -> list[str]:
    return [row["text"] for row in REVIEWS]
