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


# Every family of the coverage matrix (tests/test_families.py, README "Model families"): the name a
# user knows, the transformers model type, and the config of a tiny random model of it (2 layers,
# hidden 32, 4 heads; 2 key/value heads where the family has grouped queries).
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
            max_position_embeddings=64, pad_token_id=0)
GROUPED = dict(TINY, num_key_value_heads=2)
TOKENS = dict(bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.05)
FAMILIES: dict[str, tuple[str, dict]] = {
    "BERT": ("bert", TINY),
    "RoBERTa": ("roberta", dict(TINY, pad_token_id=1, max_position_embeddings=70)),
    "XLM-R": ("xlm-roberta", dict(TINY, pad_token_id=1, max_position_embeddings=70)),
    "ELECTRA": ("electra", dict(TINY, embedding_size=16)),
    "DistilBERT": ("distilbert", dict(vocab_size=128, dim=32, hidden_dim=64, n_layers=2, n_heads=4, pad_token_id=0)),
    "ModernBERT": ("modernbert", dict(TINY, **TOKENS, cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=2,
                                      local_attention=8)),
    "DeBERTa-v2/v3": ("deberta-v2", dict(TINY, relative_attention=True, position_buckets=8, max_relative_positions=16,
                                         pos_att_type=["p2c", "c2p"])),
    "ALBERT": ("albert", dict(TINY, embedding_size=16)),
    "MPNet": ("mpnet", dict(TINY, pad_token_id=1)),
    "GPT-2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, pad_token_id=0, **TOKENS)),
    "OPT": ("opt", dict(TINY, ffn_dim=64, word_embed_proj_dim=32, **TOKENS)),
    "GPT-J": ("gptj", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, rotary_dim=4, pad_token_id=0,
                           **TOKENS)),
    "GPT-NeoX/Pythia": ("gpt_neox", dict(TINY, rotary_pct=0.5, **TOKENS)),
    "Falcon": ("falcon", dict(TINY, num_kv_heads=1, multi_query=True, new_decoder_architecture=False, **TOKENS)),
    "Bloom": ("bloom", dict(TINY, n_layer=2, n_head=4, **TOKENS)),
    "LLaMA": ("llama", GROUPED),
    "Mistral": ("mistral", GROUPED),
    "Qwen2": ("qwen2", GROUPED),
    "Qwen3": ("qwen3", dict(GROUPED, head_dim=8)),
    "Gemma": ("gemma", dict(GROUPED, head_dim=8)),
    "Gemma 2": ("gemma2", dict(GROUPED, head_dim=8, attn_logit_softcapping=1.0, initializer_range=0.5)),
    "Gemma 3": ("gemma3_text", dict(GROUPED, head_dim=8)),
    "Phi": ("phi", dict(TINY, **TOKENS)),
    "Phi-3": ("phi3", dict(GROUPED, **TOKENS)),
    "OLMo 2": ("olmo2", dict(GROUPED, **TOKENS)),
    "StableLM": ("stablelm", dict(GROUPED, **TOKENS)),
    "Granite": ("granite", dict(GROUPED, **TOKENS)),
    "Cohere": ("cohere", dict(GROUPED, **TOKENS)),
    "SmolLM3": ("smollm3", dict(GROUPED, **TOKENS)),
    "Mixtral": ("mixtral", dict(GROUPED, num_local_experts=4, **MOE)),
    "Qwen2-MoE": ("qwen2_moe", dict(GROUPED, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                    **MOE)),
    "Qwen3-MoE": ("qwen3_moe", dict(GROUPED, num_experts=4, moe_intermediate_size=32, head_dim=8, **MOE)),
}
# Encoders are sequence classifiers only: their causal-LM classes are decoders built from an
# encoder's weights, which hkft does not train.
ENCODER_FAMILIES = ("BERT", "RoBERTa", "XLM-R", "ELECTRA", "DistilBERT", "ModernBERT", "DeBERTa-v2/v3", "ALBERT", "MPNet")
HEADS = {"causal-lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification}


def family_config(family: str):
    from transformers import CONFIG_MAPPING

    model_type, values = FAMILIES[family]
    return CONFIG_MAPPING[model_type](**values)


def family_heads(family: str) -> list[str]:
    """The tasks transformers has a head for, of those hkft trains on this family."""
    config_class = type(family_config(family))
    tasks = ["classification"] if family in ENCODER_FAMILIES else list(HEADS)
    return [task for task in tasks if config_class in HEADS[task]._model_mapping]


def family_model(family: str, task: str, seed: int = 0, attn: str | None = None, num_labels: int = 3):
    """A tiny random model of ``family`` with the ``task`` head, its attention transformers' default
    for the family (SDPA where it has one) unless ``attn`` says otherwise."""
    torch.manual_seed(seed)
    config = family_config(family)
    if task != "causal-lm":
        config.num_labels = num_labels
    return HEADS[task].from_config(config, attn_implementation=attn)
