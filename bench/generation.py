"""Generation speed: hkft's `generate` (what `hkft eval`, the final evaluation of `hkft train` and
`hkft chat` run) against plain transformers `model.generate` on the same prompts and settings.

The chat quickstart's base (SmolLM2-135M-Instruct, loaded through hkft's loader) carries a LoRA
adapter with random weights, as `hkft eval` carries a trained one; the prompts are the chat
quickstart's validation conversations rendered with the generation prompt. Greedy search, KV cache
on, left padding, the quickstart's `eval.generation` and `eval.batch_size` on both sides. Every
reply of hkft is checked token for token against plain `generate`'s.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model

from bench.measure import Measurement, run_interleaved
from hkft.config.schema import GenerationConfig
from hkft.data.chat import ChatLayout, Message, chat_generation_set, render
from hkft.data.files import load_source
from hkft.dropout.config import apply_dropout
from hkft.inference.conversation import CtrlC, Replier
from hkft.inference.targets import Target, load_base_target
from hkft.tasks.evaluation import generate

PRESET = "quickstart-chat"
PLAIN_BATCHED = "plain transformers generate, eval batch (baseline)"
PLAIN_ONE = "plain transformers generate, one prompt (baseline)"
HOOKED = "hkft generate, dropout hooks attached (final evaluation of hkft train)"


@dataclass
class GenerationWorkload:
    target: Target  # the model with its adapter, the tokenizer with the chat template, the preset
    conversations: list[list[Message]]  # each ends before the reply to generate
    settings: GenerationConfig
    batch_size: int

    @property
    def prompts(self) -> list[str]:
        return [render(self.target.tokenizer, messages, "bench", generation_prompt=True) for messages in self.conversations]


def quickstart_chat_workload() -> GenerationWorkload:
    """The chat quickstart's base with a random LoRA adapter (its preset's targets and layers)."""
    target = load_base_target(PRESET, [], "chat")
    cfg = target.cfg
    torch.manual_seed(0)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                      layers_to_transform=cfg.lora.layers_to_transform, task_type="CAUSAL_LM")
    model = get_peft_model(target.model, lora)
    for parameter in model.parameters():  # a "trained" adapter: LoRA B is zero at initialisation
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.02)
    raw = load_source(str(cfg.data.validation), "data.validation")
    rows = chat_generation_set(target.tokenizer, raw, ChatLayout("messages", "messages"), "validation")
    target = Target(model, target.tokenizer, cfg, None, target.description)
    return GenerationWorkload(target, rows["conversation"], cfg.eval.generation, cfg.eval.batch_size or cfg.train.batch_size)


def plain_generate(model, tokenizer, prompts: list[str], settings: GenerationConfig, batch_size: int) -> None:
    """What a transformers user writes: the prompts in their order, ``batch_size`` at a time, left-padded."""
    tokenizer.padding_side = "left"
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(model.device)
            model.generate(**batch, max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)


Replies = dict[tuple[int, ...], list[int]]  # a prompt's tokens -> its reply's tokens


@contextmanager
def recorded_replies(model, tokenizer) -> Iterator[Replies]:
    """``model.generate`` records each reply's tokens up to its end (the end-of-turn token and the
    padding after it dropped) under its prompt's tokens, whatever order or batch it came in."""
    replies: Replies = {}
    original, ends = model.generate, {tokenizer.eos_token_id, tokenizer.pad_token_id}

    def generate_and_record(**kwargs):
        output = original(**kwargs)
        prompt_length = kwargs["input_ids"].shape[1]
        for ids, mask, row in zip(kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist(), output.tolist(), strict=True):
            new = row[prompt_length:]
            end = next((index for index, token in enumerate(new) if token in ends), len(new))
            replies[tuple(token for token, real in zip(ids, mask) if real)] = new[:end]
        return output

    model.generate = generate_and_record
    try:
        yield replies
    finally:
        del model.generate


def generation_steps(workload: GenerationWorkload, chat_prompts: int) -> tuple[dict[str, Callable[[], None]], dict[str, Replies]]:
    """One measured step per configuration: every prompt replied to once. The eval rows run the
    workload's batch size over all prompts, the chat rows one prompt at a time over the first
    ``chat_prompts``. Returns the steps and, per configuration, the replies of its latest step."""
    target, settings, batch_size = workload.target, workload.settings, workload.batch_size
    model, tokenizer = target.model, target.tokenizer
    prompts = workload.prompts
    hooked = copy.deepcopy(model)  # the final evaluation of hkft train: the dropout hooks still attached
    apply_dropout(hooked, target.cfg.dropout, seed=0)
    replier = Replier(target, settings)
    replies: dict[str, Replies] = {}

    def chat() -> None:
        for messages in workload.conversations[:chat_prompts]:
            replier.reply(messages, "bench", stop=CtrlC())

    runs = {
        PLAIN_BATCHED: (model, lambda: plain_generate(model, tokenizer, prompts, settings, batch_size)),
        "hkft generate (hkft eval)": (model, lambda: generate(model, tokenizer, prompts, settings, batch_size, add_special_tokens=False)),
        HOOKED: (hooked, lambda: generate(hooked, tokenizer, prompts, settings, batch_size, add_special_tokens=False)),
        PLAIN_ONE: (model, lambda: plain_generate(model, tokenizer, prompts[:chat_prompts], settings, 1)),
        "hkft chat reply, one prompt": (model, chat),
    }

    def step(name: str, on: torch.nn.Module, run: Callable[[], None]) -> Callable[[], None]:
        def measured() -> None:
            on.eval()
            with recorded_replies(on, tokenizer) as record:
                run()
            replies[name] = record
        return measured

    return {name: step(name, on, run) for name, (on, run) in runs.items()}, replies


def generation_benchmark(workload: GenerationWorkload, warmup: int, repeats: int,
                         chat_prompts: int = 10) -> tuple[dict[str, dict[str, Measurement]], dict[str, bool]]:
    """Two interleaved groups, each against its baseline: the eval batch (all prompts) and one
    prompt at a time (chat). Tokens are the replies' tokens (end of turn excluded); whether each
    configuration's replies are token for token the plain baseline's of its group."""
    steps, replies = generation_steps(workload, min(chat_prompts, len(workload.conversations)))
    groups = {"eval": [name for name in steps if name == PLAIN_BATCHED or name.startswith("hkft generate")]}
    groups["chat"] = [name for name in steps if name not in groups["eval"]]
    measured, identical = {}, {}
    for group, names in groups.items():
        for name in names:  # one pass each to count the tokens
            steps[name]()
        tokens = {name: sum(len(reply) for reply in replies[name].values()) for name in names}
        measured[group] = run_interleaved({name: steps[name] for name in names}, tokens, warmup=max(warmup - 1, 0),
                                          repeats=repeats, device=workload.target.model.device, memory=dict.fromkeys(names, 0))
        identical.update({name: replies[name] == replies[names[0]] for name in names})
    return measured, identical
