"""Causal LM: next-token prediction on plain text, prompt/completion pairs or chat conversations,
scored by the loss on supervised tokens and, after training, by generated replies (BLEU, ROUGE-L)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerBase,
    Trainer,
)

from hkft.config.schema import DataConfig, GenerationConfig, HkftConfig
from hkft.data import chat
from hkft.data.chat import IGNORE_INDEX
from hkft.data.preparation import PreparedData, causal_encoder, generation_set
from hkft.dropout.compensation import kl_consistency, supervised_rows
from hkft.errors import DataError
from hkft.tasks.base import Columns, Task
from hkft.tasks.evaluation import (
    EvalOutcome,
    Steps,
    chat_outcome,
    generate_with_progress,
    is_metric,
)
from hkft.tasks.metrics import generation_metrics, perplexity


def _is_prompted(raw: dict[str, Dataset], data: DataConfig) -> bool:
    return all({data.prompt_column, data.completion_column} <= set(dataset.column_names) for dataset in raw.values())


def _chat_layout(raw: dict[str, Dataset], data: DataConfig) -> chat.ChatLayout | None:
    layouts = {split: chat.chat_format(data, dataset) for split, dataset in raw.items()}
    if len(set(layouts.values())) > 1:
        found = ", ".join(f"{split}: {layout or 'not chat'}" for split, layout in layouts.items())
        raise DataError(f"the data splits have different layouts ({found})", "give every split the same columns, or set data.format")
    return next(iter(layouts.values()), None)


class CausalLM(Task):
    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"
    main_metric = "loss"
    eval_metrics = ("loss",)
    metric_sources = {"loss": "token-level cross-entropy on completion (chat: assistant) tokens", "perplexity": "exp(loss)",
                      "bleu": "sacrebleu.corpus_bleu", "rouge_l": "ROUGE-L F-measure",
                      "exact_match": "reply == reference up to whitespace (chat, short references)"}
    language_model = True
    min_tokens = 2
    min_tokens_note = "a causal LM needs two tokens to predict one"

    def auto_model_class(self) -> type:
        return AutoModelForCausalLM

    def columns(self, raw: dict[str, Dataset], data: DataConfig) -> Columns:
        layout = _chat_layout(raw, data)
        if layout is not None:
            return Columns(texts=[], needed=chat.required_columns(layout), as_text=chat.text_columns(layout), layout=layout)
        prompted = data.format == "prompt-completion" or (data.format == "auto" and _is_prompted(raw, data))
        texts = [data.prompt_column, data.completion_column] if prompted else data.text_columns[:1]
        return Columns(texts=texts, needed=texts, as_text=texts, prompted=prompted)

    def encode(self, raw: dict[str, Dataset], cfg: HkftConfig, tokenizer: PreTrainedTokenizerBase,
               label_names: list[str] | None, columns: Columns) -> PreparedData:
        data = cfg.data
        if columns.layout is not None:
            return self._encode_chat(raw, data, tokenizer, columns.layout, cfg.model.name)
        encode = causal_encoder(data, tokenizer, columns.prompted)
        tokenised = {
            split: dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenising {split}")
            for split, dataset in raw.items()
        }
        scored = [split for split in ("validation", "test") if split in raw]
        prompts = {split: generation_set(raw[split], data.template, data.completion_column) for split in scored} if columns.prompted else {}
        return PreparedData.of(tokenised, prompts, None)

    @staticmethod
    def _encode_chat(raw: dict[str, Dataset], data: DataConfig, tokenizer: PreTrainedTokenizerBase, layout: chat.ChatLayout,
                     model_name: str) -> PreparedData:
        """Conversations: rendered with the chat template, labels on the assistant's tokens (hkft.data.chat)."""
        chat.use_chat_template(tokenizer, data, model_name)
        tokenised, notices = {}, []
        for split, dataset in raw.items():
            encoded = dataset.map(chat.chat_encoder(tokenizer, data, layout, split), batched=True, with_indices=True,
                                  remove_columns=dataset.column_names, desc=f"tokenising {split}")
            tokenised[split], notice = chat.count_truncation(encoded, split, data.max_length)
            notices += [notice] if notice else []
        generation = {split: chat.chat_generation_set(tokenizer, raw[split], layout, split)
                      for split in ("validation", "test") if split in raw}
        return PreparedData.of(tokenised, generation, None, notices)

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Callable:
        """Labels are padded with IGNORE_INDEX so that padding carries no loss."""
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)

    def consistency_loss(self, logits: torch.Tensor, target_logits: torch.Tensor, *, labels: torch.Tensor | None = None,
                         symmetric: bool = True, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
        """KL between the two passes' next-token distributions on the supervised tokens only."""
        if labels is None:
            raise ValueError("causal-lm consistency needs the labels to find supervised tokens")
        return kl_consistency(logits, target_logits, supervised_rows(labels), symmetric=symmetric, num_items=num_items)

    def evaluate(self, trainer: Trainer, dataset: Dataset, *, label_names: list[str] | None = None,
                 raw: Dataset | None = None, generation: GenerationConfig | None = None, tokenizer=None,
                 steps: Steps | None = None) -> EvalOutcome:
        """The loss and perplexity; with ``raw`` (prompts and references) and ``generation``, replies
        generated for each prompt and scored against its references."""
        output = trainer.predict(dataset, metric_key_prefix="eval")
        metrics = {key.removeprefix("eval_"): float(value) for key, value in output.metrics.items() if is_metric(key)}
        metrics["perplexity"] = perplexity(metrics["loss"])
        predictions: list[dict[str, Any]] = []
        if raw is not None and generation is not None and "conversation" in raw.column_names:
            return chat_outcome(trainer, raw, generation, tokenizer, metrics, steps)
        if raw is not None and generation is not None:
            texts = generate_with_progress(trainer, tokenizer, raw, generation, steps)
            prompts, references = raw["prompt_text"][: len(texts)], raw["reference"][: len(texts)]
            metrics.update(generation_metrics(texts, references))
            predictions = [{"prompt": p, "prediction": t, "reference": r} for p, t, r in zip(prompts, texts, references)]
        return EvalOutcome(metrics, predictions)


TASK = CausalLM()
