"""Sequence packing (data.packing): rows of several examples, each of which sees and predicts only its
own tokens. The packed loss is the unpacked loss; no logit moves when another example of its row
changes; dropout spans and NEFTune's lengths are drawn per example; KL and resume work on packed rows."""

import json
import random
from itertools import combinations
from pathlib import Path

import pytest
import torch
import yaml
from chat_models import chat_tokenizer
from checkpoints import (
    MEMORISE,
    memorise_texts,
    save_tiny_model,
    word_tokenizer,
    write_jsonl,
)
from conftest import assert_one_line_error
from test_chat import MULTI_TURN, expected_tokens
from test_resume import DRIVER, assert_same_run, drive
from tiny_models import tiny_model
from transformers import masking_utils

from hkft.config import load_config
from hkft.config.schema import HkftConfig, LoraConfig
from hkft.data.chat import IGNORE_INDEX
from hkft.data.packing import (
    PackedCollator,
    best_fit_decreasing,
    check_packed_attention,
    pack_training_data,
)
from hkft.dropout import build_plan, instrument
from hkft.dropout.architecture import ffn_output_module, transformer_layers
from hkft.dropout.patterns import MaskSampler, embedding_noise, packed_extent, span
from hkft.errors import ConfigError
from hkft.models.lora import build_lora_model
from hkft.recipes.trainer import HkftTrainer
from hkft.tasks.base import prepare_data
from hkft.tasks.registry import task_for

CPU = torch.device("cpu")
MAX_LENGTH = 40
TEXTS = [{"text": text} for text in memorise_texts()]


def examples_of(row: dict) -> list[tuple[int, list[int], list[int]]]:
    """(offset, input_ids, labels) of each example in a packed row, split where the position ids restart at 0."""
    starts = [index for index, position in enumerate(row["position_ids"]) if position == 0] + [len(row["input_ids"])]
    return [(begin, list(row["input_ids"][begin:end]), list(row["labels"][begin:end])) for begin, end in zip(starts, starts[1:])]


def memorise_data(tmp_path: Path, rows: list[dict]):
    """The tokenised splits of ``rows`` (three copies of each, so rows hold several) and their packed training split."""
    tokenizer = word_tokenizer(memorise_texts())
    path = write_jsonl(tmp_path / "d.jsonl", rows * 3)
    cfg = HkftConfig.model_validate({"model": {"name": "unused", "task": "causal-lm"},
                                     "data": {"train": str(path), "validation": str(path), "max_length": MAX_LENGTH, "packing": True}})
    data = prepare_data(cfg, tokenizer)
    return tokenizer, data, pack_training_data(data, MAX_LENGTH)


def test_rows_hold_every_example_once_and_no_two_rows_would_fit_in_one():
    generator = random.Random(0)
    lengths = [generator.randint(1, 20) for _ in range(300)] + [0]
    rows = best_fit_decreasing(lengths, 32)
    assert sorted(index for row in rows for index in row) == list(range(300))  # the empty example is left out
    loads = [sum(lengths[index] for index in row) for row in rows]
    assert max(loads) <= 32
    assert all(first + second > 32 for first, second in combinations(loads, 2))
    assert rows == best_fit_decreasing(lengths, 32)


@pytest.mark.parametrize("rows", [MEMORISE, TEXTS], ids=["prompt-completion", "text"])
def test_packed_rows_keep_each_examples_supervision_and_predict_nothing_across_a_boundary(tmp_path, rows):
    _, data, packed = memorise_data(tmp_path, rows)
    unpacked = {tuple(row["input_ids"]): row["labels"] for row in data.train}
    found = []
    for row in packed.train:
        assert len(row["input_ids"]) <= MAX_LENGTH and len(examples_of(row)) > 1
        for _, ids, labels in examples_of(row):
            assert labels == [IGNORE_INDEX, *unpacked[tuple(ids)][1:]]  # a first token is never a target, packed or not
            found.append(ids)
    assert sorted(found) == sorted(list(row["input_ids"]) for row in data.train)
    assert packed.validation is data.validation  # evaluation keeps one example per row
    assert "data.packing: 24 training examples in" in packed.notices[-1]


def test_chat_rows_keep_their_assistant_labels_when_packed(tmp_path):
    tokenizer = chat_tokenizer()
    conversations = [MULTI_TURN, MULTI_TURN[1:3], MULTI_TURN[1:5], MULTI_TURN[3:5]]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages} for messages in conversations])
    cfg = HkftConfig.model_validate({"model": {"name": "unused", "task": "causal-lm"},
                                     "data": {"train": str(path), "validation": str(path), "max_length": 300}})
    packed = pack_training_data(prepare_data(cfg, tokenizer), 300)
    expected = {}
    for messages in conversations:
        ids, labels = expected_tokens(tokenizer, messages, {i for i, m in enumerate(messages) if m["role"] == "assistant"})
        expected[tuple(ids)] = labels
    packed_examples = [example for row in packed.train for example in examples_of(row)]
    assert len(packed_examples) == len(conversations) > len(packed.train)
    for _, ids, labels in packed_examples:
        assert labels == [IGNORE_INDEX, *expected[tuple(ids)][1:]]


def lora_trainer(training_args, method: str = "none", rate: float = 0.0, arch: str = "llama", **plan):
    model = build_lora_model(tiny_model(arch), LoraConfig(), "causal-lm", quantized=False, gradient_checkpointing=False)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: with B = 0 the adapter would not change the logits
            torch.nn.init.normal_(parameter, std=0.1)
    controller = instrument(model, build_plan(method, rate, 1.0, **plan), seed=0, packed=True)
    args = training_args()
    return HkftTrainer(model=model, args=args, dropout=controller, task=task_for("causal-lm")), model, controller


def loss_and_gradients(trainer, model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def naive_concatenation(packed_rows: list[dict], unpacked: dict, pad: int) -> dict:
    """The same rows concatenated as plain sequences: positions run on, every example's labels kept as they are."""
    width = max(len(row["input_ids"]) for row in packed_rows)
    ids, labels, mask = [], [], []
    for row in packed_rows:
        length = len(row["input_ids"])
        ids.append(list(row["input_ids"]) + [pad] * (width - length))
        labels.append([t for _, example, _ in examples_of(row) for t in unpacked[tuple(example)]] + [IGNORE_INDEX] * (width - length))
        mask.append([1] * length + [0] * (width - length))
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("rows", [MEMORISE, TEXTS], ids=["prompt-completion", "text"])
def test_packed_loss_and_gradients_equal_the_unpacked_ones_with_dropout_off(tmp_path, arch, rows, training_args):
    tokenizer, data, packed = memorise_data(tmp_path, rows)
    trainer, model, _ = lora_trainer(training_args, arch=arch)
    plain = task_for("causal-lm").collator(tokenizer)
    unpacked_loss, unpacked_grads = loss_and_gradients(trainer, model, plain(list(data.train)))
    packed_batch = PackedCollator(tokenizer.pad_token_id, plain)(list(packed.train))
    assert "attention_mask" not in packed_batch and packed_batch["input_ids"].shape[0] < len(data.train)
    packed_loss, packed_grads = loss_and_gradients(trainer, model, packed_batch)
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-5)
    for name, grad in unpacked_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6)
    unpacked = {tuple(row["input_ids"]): row["labels"] for row in data.train}
    naive_loss, _ = loss_and_gradients(trainer, model, naive_concatenation(list(packed.train), unpacked, tokenizer.pad_token_id))
    assert abs(naive_loss - unpacked_loss) > 1e-3  # what the restarted positions and the boundary labels prevent


PACKED_ROW = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]])
PACKED_POSITIONS = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7]])  # A: 6 tokens, B: 8


@pytest.mark.parametrize(("method", "overrides"), [
    ("dropkey", {}),
    ("dropattention", {}),
    ("hiddenkey-", {"attention_logits": ("span", None), "hidden": ("span", None)}),
    ("hiddenkey-", {"attention_logits": ("element", None)}),
    ("neftune", {}),
])
def test_no_example_sees_another_of_its_row_while_dropout_is_on(method, overrides, training_args):
    trainer, model, controller = lora_trainer(training_args, method, 0.4, position_overrides=overrides, layers="all")
    model.train()
    changed = PACKED_ROW.clone()
    changed[0, :6] = torch.tensor([30, 31, 32, 33, 34, 35])  # example A rewritten

    def logits(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        controller.sampler.load_state_dict(state)  # the same masks in both passes
        return model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]

    state = controller.sampler.state_dict()
    before, after = logits(PACKED_ROW, PACKED_POSITIONS), logits(changed, PACKED_POSITIONS)
    assert torch.isfinite(before).all()
    torch.testing.assert_close(after[6:], before[6:], rtol=1e-5, atol=1e-6)  # B unchanged
    assert not torch.allclose(after[:6], before[:6])
    running_on = torch.arange(14).unsqueeze(0)  # naive concatenation: B would see A
    assert not torch.allclose(logits(changed, running_on)[6:], logits(PACKED_ROW, running_on)[6:])


def segments_of(positions: list[int]) -> list[tuple[int, int]]:
    starts = [index for index, position in enumerate(positions) if position == 0] + [len(positions)]
    return [(begin, end - begin) for begin, end in zip(starts, starts[1:])]


POSITIONS = torch.tensor([list(range(10)) + list(range(4)) + list(range(6)), list(range(12)) + list(range(8))])


def test_packed_examples_are_found_from_restarting_position_ids():
    first, count = packed_extent(POSITIONS)
    assert first.tolist() == [[0, 10, 14], [0, 12, 20]] and count.tolist() == [[10, 4, 6], [12, 8, 0]]


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_each_packed_example_loses_one_span_of_its_own_length_inside_itself(rate):
    extent, sampler = packed_extent(POSITIONS), MaskSampler(0)
    for _ in range(30):
        dropped = span(sampler, (2, 3), 20, rate, CPU, extent)
        for row, positions in enumerate(POSITIONS.tolist()):
            for first, length in segments_of(positions):
                inside = dropped[row, :, first:first + length].int()
                assert (inside.sum(-1) == round(rate * length)).all()
                assert ((inside.diff(dim=-1) != 0).sum(-1) <= 2).all()  # one contiguous run
        assert dropped.sum().item() == 3 * sum(round(rate * n) for p in POSITIONS.tolist() for _, n in segments_of(p))


def test_neftune_scales_each_packed_example_by_its_own_length():
    alpha, dim = 5.0, 8
    noise = embedding_noise(MaskSampler(0), torch.zeros(2, 20, dim), alpha, packed_extent(POSITIONS))
    uniform = MaskSampler(0).uniform((2, 20, dim), CPU) * 2 - 1
    scale = torch.tensor([[alpha / (length * dim) ** 0.5 for _, length in segments_of(row) for _ in range(length)]
                          for row in POSITIONS.tolist()])
    torch.testing.assert_close(noise, uniform * scale[..., None])


def test_hiddencut_spans_in_a_packed_forward_stay_inside_each_example_and_column_dropkey_keeps_rows_finite(training_args):
    """In the model: the controller finds the examples from the batch's position ids once per forward;
    a first token, which sees only itself, keeps a finite row when its key is dropped."""
    trainer, model, controller = lora_trainer(training_args, "hiddenkey-", 0.9, position_overrides={"hidden": ("span", 0.5)}, layers="all")
    zeroed = []
    for layer in transformer_layers(model):  # registered after hkft's hook: sees the dropped output
        ffn_output_module(layer).register_forward_hook(lambda m, a, out: zeroed.append((out[0] == 0).all(-1)))
    model.train()
    loss = model(input_ids=PACKED_ROW, position_ids=PACKED_POSITIONS, labels=PACKED_ROW, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert len(zeroed) == 4
    for tokens in zeroed:
        assert tokens[:6].sum() == 3 and tokens[6:].sum() == 4  # round(0.5 * 6), round(0.5 * 8): one span each


def dropped_tokens_per_layer(packed: bool, **inputs) -> list[torch.Tensor]:
    """Which tokens each layer's FFN output loses to a 0.5 hidden span, with data.packing as given."""
    model = tiny_model("llama")
    plan = build_plan("none", 0.5, 0.0, layers="all", position_overrides={"hidden": ("span", None)})
    instrument(model, plan, seed=0, **({"packed": True} if packed else {}))
    zeroed = []
    for layer in transformer_layers(model):
        ffn_output_module(layer).register_forward_hook(lambda m, a, out: zeroed.append((out[0] == 0).all(-1)))
    model.train()
    model(input_ids=PACKED_ROW, use_cache=False, **inputs)
    return zeroed


def test_packing_is_the_runs_setting_not_read_from_a_missing_mask():
    """data.packing is handed to the controller: a run that does not pack draws one span over a row
    without a mask, whatever its position ids; a packed run reads its examples from the position
    ids even where a batch also carries a mask."""
    unpacked = dropped_tokens_per_layer(False, position_ids=PACKED_POSITIONS)
    assert len(unpacked) == 4
    for tokens in unpacked:  # one run of round(0.5 * 14) tokens over the whole row
        assert tokens.sum() == 7 and (tokens.int().diff() != 0).sum() <= 2
    packed = dropped_tokens_per_layer(True, position_ids=PACKED_POSITIONS, attention_mask=torch.ones_like(PACKED_ROW))
    for tokens in packed:  # round(0.5 * 6) inside A, round(0.5 * 8) inside B
        assert tokens[:6].sum() == 3 and tokens[6:].sum() == 4


def test_kl_compensation_on_packed_rows_runs_over_each_examples_own_supervised_tokens(tmp_path, training_args):
    tokenizer, data, packed = memorise_data(tmp_path, TEXTS)
    trainer, model, controller = lora_trainer(training_args, "hiddenkey", 0.3)
    batch = PackedCollator(tokenizer.pad_token_id, task_for("causal-lm").collator(tokenizer))(list(packed.train))
    state = controller.sampler.state_dict()
    model.train()
    trainer.compute_loss(model, batch)
    task_loss, kl_loss = trainer._logged_terms["task_loss"][-1], trainer._logged_terms["kl_loss"][-1]

    controller.sampler.load_state_dict(state)  # the two passes again, with the masks the trainer drew
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        first, second = model(**inputs).logits, model(**inputs).logits
    unpacked = {tuple(row["input_ids"]): row["labels"] for row in data.train}
    cross_entropy, kl, count = 0.0, 0.0, 0
    for row_index, row in enumerate(packed.train):
        for offset, ids, _ in examples_of(row):
            labels = unpacked[tuple(ids)]
            for t in range(len(ids) - 1):
                if labels[t + 1] == IGNORE_INDEX:
                    continue
                log_p = torch.log_softmax(first[row_index, offset + t], -1)
                log_q = torch.log_softmax(second[row_index, offset + t], -1)
                cross_entropy -= log_p[labels[t + 1]].item()
                kl += 0.5 * ((log_p.exp() * (log_p - log_q)).sum() + (log_q.exp() * (log_q - log_p)).sum()).item()
                count += 1
    assert count == sum(len(row["labels"]) - 1 for row in data.train)  # text: every next token of every example
    assert task_loss == pytest.approx(cross_entropy / count, rel=1e-4)
    assert kl_loss == pytest.approx(kl / count, rel=1e-4) and kl_loss > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_packing_check_passes_a_family_that_keeps_examples_apart_and_refuses_one_that_does_not(monkeypatch, arch):
    model = tiny_model(arch)
    check_packed_attention(model)
    # A family whose mask code ignores packed position ids: transformers' detection switched off.
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ConfigError, match=r"data\.packing: .* attends across the examples packed into a row"):
        check_packed_attention(model)


def test_packing_key_is_validated(tmp_path, cli):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "x", "task": "causal-lm"}, "data": {"train": "t.jsonl"}}))
    assert load_config(path).data.packing is False
    assert load_config(path, ["data.packing=true"]).data.packing is True
    with pytest.raises(ConfigError, match=r"did you mean data\.packing\?"):
        load_config(path, ["data.paking=true"])
    with pytest.raises(ConfigError, match=r"data\.packing"):
        load_config(path, ["data.packing=often"])
    assert_one_line_error(cli("train", path, "--set", "model.task=classification", "--set", "data.packing=true"),
                          "data.packing is for causal-lm")


def packing_preset(root: Path, rows: list[dict], **train) -> Path:
    model = save_tiny_model("llama", root / "model", memorise_texts())
    data = write_jsonl(root / "d.jsonl", rows)
    preset = {
        "model": {"name": str(model), "task": "causal-lm"},
        "dropout": {"method": "hiddenkey", "rate": 0.2, "layers": "all",
                    "positions": {"attention_logits": {"pattern": "span"}, "hidden": {"pattern": "span"}}},
        "data": {"train": str(data), "validation": str(data), "max_length": 32, "packing": True},
        "train": {"epochs": 3, "batch_size": 2, "lr": 1e-2, "eval_strategy": "steps", "eval_steps": 2,
                  "save_total_limit": 3, "logging_steps": 1, **train},
        "eval": {"generate": False, "split": "validation"},
    }
    (root / "p.yaml").write_text(yaml.safe_dump(preset))
    return root / "p.yaml"


def test_a_packed_run_trains_from_the_command_line_and_says_how_it_packed(tmp_path, cli):
    preset = packing_preset(tmp_path, MEMORISE, epochs=1)
    result = cli("train", preset, "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert "8 training examples in 4 rows of up to 32 tokens" in " ".join(result.stdout.split())
    summary = json.loads((tmp_path / "run/metrics.json").read_text())
    assert summary["train"]["step"] == 2 and summary["eval"]["loss"] > 0


@pytest.mark.slow
def test_a_packed_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    packing_preset(tmp_path, MEMORISE)
    (tmp_path / "driver.py").write_text(DRIVER)
    straight = drive(tmp_path, "straight", 0, "none")
    assert straight.returncode == 0, straight.stderr
    killed = drive(tmp_path, "killed", 3, "SIGKILL")  # epoch 2 of 3, one step after checkpoint-2
    assert killed.returncode != 0
    resumed = drive(tmp_path, "killed", 0, "none", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "killed", tmp_path / "straight")
