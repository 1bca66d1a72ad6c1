"""What evaluation shares across tasks: the outcome, batched generation with left padding, chat replies.

Logits never pile up in memory: classification keeps one predicted id per example (reduced per
batch), causal LM keeps the mean loss and generates in its own batched loop.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import Trainer

from hkft.config.schema import GenerationConfig
from hkft.tasks.metrics import (
    SHORT_REFERENCE_WORDS,
    exact_match,
    generation_metrics,
)

# Progress of a loop outside the Trainer: (description, batches) -> a context yielding "one batch done".
Steps = Callable[[str, int], AbstractContextManager[Callable[[], None]]]


@dataclass
class EvalOutcome:
    metrics: dict[str, float]
    predictions: list[dict[str, Any]]


def generate_with_progress(trainer: Trainer, tokenizer, raw: Dataset, generation: GenerationConfig,
                            steps: Steps | None, **options) -> list[str]:
    batch_size = trainer.args.per_device_eval_batch_size
    count = min(generation.max_examples or len(raw), len(raw))
    with steps("generating", -(-count // batch_size)) if steps else nullcontext(lambda: None) as advance:
        return generate(trainer.model, tokenizer, raw["prompt_text"], generation, batch_size, advance, **options)


def chat_outcome(trainer: Trainer, raw: Dataset, generation: GenerationConfig, tokenizer, metrics: dict[str, float],
                  steps: Steps | None) -> EvalOutcome:
    """Replies generated after each conversation's generation prompt, scored against its last
    assistant reply; exact match too when every reference is short."""
    # The template writes its own special tokens.
    texts = generate_with_progress(trainer, tokenizer, raw, generation, steps, add_special_tokens=False)
    references, conversations = raw["reference"][: len(texts)], raw["conversation"][: len(texts)]
    metrics.update(generation_metrics(texts, references))
    if all(len(reference.split()) <= SHORT_REFERENCE_WORDS for reference in references):
        metrics["exact_match"] = exact_match(texts, references)
    rows = [{"conversation": c, "prediction": t, "reference": r} for c, t, r in zip(conversations, texts, references)]
    return EvalOutcome(metrics, rows)


def is_metric(key: str) -> bool:
    return not key.endswith(("_runtime", "_samples_per_second", "_steps_per_second", "_preparation_time"))


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], settings: GenerationConfig, batch_size: int,
             advance: Callable[[], None] = lambda: None, *, add_special_tokens: bool = True, **options) -> list[str]:
    """Batched generation with left padding and the KV cache; returns only the newly generated text,
    in the order of ``prompts``. ``advance`` is called after each batch; ``options`` go to
    ``model.generate`` (a streamer, stopping criteria).

    The prompts are batched longest first, so that a batch pads its prompts to a length they nearly
    share: the prompt pass, most of the work for short replies, spends nothing on padding that a
    long prompt in a batch of short ones would add to all of them."""
    model.eval()
    device = next(model.parameters()).device
    count = min(settings.max_examples or len(prompts), len(prompts))
    if count == 0:
        return []
    lengths = [len(ids) for ids in tokenizer(prompts[:count], add_special_tokens=add_special_tokens)["input_ids"]]
    order = longest_first(lengths)
    outputs = [""] * count
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, count, batch_size):
            indices = order[start : start + batch_size]
            # Some decoder tokenizers (Falcon's) emit token_type_ids, which generate() rejects.
            batch = tokenizer([prompts[index] for index in indices], return_tensors="pt", padding=True,
                              return_token_type_ids=False, add_special_tokens=add_special_tokens).to(device)
            generated = model.generate(
                **batch,
                max_new_tokens=settings.max_new_tokens,
                num_beams=settings.num_beams,
                length_penalty=settings.length_penalty,
                no_repeat_ngram_size=settings.no_repeat_ngram_size,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                **options,
            )
            texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for index, text in zip(indices, texts, strict=True):
                outputs[index] = text.strip()
            advance()
    finally:
        tokenizer.padding_side = padding_side
    return outputs


def longest_first(lengths: list[int]) -> list[int]:
    """Positions of ``lengths`` from the longest to the shortest (ties in their order)."""
    return sorted(range(len(lengths)), key=lambda index: -lengths[index])
