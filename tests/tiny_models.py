"""Tiny random models of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    RobertaConfig,
)

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=128)


def tiny_config(arch: str):
    if arch == "bert":
        return BertConfig(**SMALL, max_position_embeddings=64)
    if arch == "roberta":
        return RobertaConfig(**SMALL, max_position_embeddings=70, pad_token_id=1)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=128, n_positions=64)
    if arch == "llama":
        return LlamaConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "mistral":
        return MistralConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "mixtral":  # mixture of experts with its load-balancing loss on
        return MixtralConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4,
                             num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.05)
    if arch == "qwen2":
        return Qwen2Config(**SMALL, num_key_value_heads=2, max_position_embeddings=64)
    raise ValueError(arch)


ENCODERS = ("bert", "roberta")
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "mixtral")


def tiny_model(arch: str, task: str = "causal-lm", seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    config = tiny_config(arch)
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    else:
        config.num_labels = 3
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn)
    return model


def batch(arch: str, padded: bool, size: int = 3, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (size, length), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, length - 3 :] = 0
        mask[2, length // 2 :] = 0
        ids = ids.masked_fill(mask == 0, 1 if arch == "roberta" else 0)
    return {"input_ids": ids, "attention_mask": mask}
