"""`hkft merge-adapter --format gguf`: refusals, the pinned converter's fetch, its registry, its failures.

The round trip through llama.cpp itself (transformers' GGUF loader, a llama.cpp build) is in
test_export_llama_cpp.py (slow). The tests here that run llama.cpp's converter need its source
distribution in hkft's cache (`.ci/run` fetches it); without it they are skipped, naming the command.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import memorise_texts, save_tiny_model, word_tokenizer
from conftest import assert_one_line_error
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from test_merge import llama_adapter, minilm_adapter  # noqa: F401 (a fixture)
from tiny_models import FAMILIES, HEADS, family_config, family_heads
from transformers import AutoModelForCausalLM, OPTConfig

from hkft.errors import ModelError
from hkft.models import export
from hkft.models.merge import merge_adapter

README = Path(__file__).resolve().parents[1] / "README.md"
FETCHED_SDIST = export.llama_cpp_dir() / export.SDIST  # where the user's cache has it, before a test moves HF_HOME
FETCHED = FETCHED_SDIST.is_file() or export.find_converter() is not None
needs_converter = pytest.mark.skipif(not FETCHED, reason=f"llama.cpp's converter is not fetched: {export.fetch_command()}")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """hkft's cache (HF_HOME/hkft) without the converter."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return tmp_path / "hf_home" / "hkft" / "llama.cpp"


@pytest.fixture
def llama_run(tmp_path):
    torch.manual_seed(0)
    model_dir = save_tiny_model("llama", tmp_path / "llama", memorise_texts())
    llama_adapter(model_dir, tmp_path / "run" / "adapter")
    return tmp_path / "run"


def test_missing_converter_is_one_line_naming_the_fetch_command(cli, llama_run, tmp_path, empty_cache):
    result = cli("merge-adapter", llama_run, "--output", tmp_path / "out", "--format", "gguf")
    command = f"pip download --no-deps --no-binary :all: llama-cpp-python=={export.LLAMA_CPP_PYTHON} -d {empty_cache}"
    assert_one_line_error(result, "GGUF export needs llama.cpp's converter", f"fetch it once with `{command}`")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_the_pinned_source_distribution_is_refused(llama_run, tmp_path, empty_cache):
    empty_cache.mkdir(parents=True)
    (empty_cache / export.SDIST).write_bytes(b"not the archive pip verified")
    with pytest.raises(ModelError, match=r"is not llama-cpp-python 0\.3\.36's source distribution \(its sha256 differs\)"):
        merge_adapter(llama_run, tmp_path / "out", gguf_type="f16")
    assert not (tmp_path / "out").exists() and not export.find_converter()


@pytest.mark.parametrize("args,fragment", [
    (["--format", "onnx"], "--format 'onnx' is not supported (choose hf (a transformers folder) or gguf (llama.cpp))"),
    (["--format", "gguf", "--gguf-type", "q4_0"], "--gguf-type 'q4_0' is not supported (choose one of f16, bf16, q8_0)"),
    (["--gguf-type", "q8_0"], "--gguf-type applies to --format gguf"),
])
def test_bad_format_options_are_one_line(cli, llama_run, tmp_path, args, fragment):
    assert_one_line_error(cli("merge-adapter", llama_run, "--output", tmp_path / "out", *args), fragment)
    assert not (tmp_path / "out").exists()


def test_a_classifier_cannot_export_even_without_the_converter(cli, minilm_adapter, tmp_path, empty_cache):  # noqa: F811
    result = cli("merge-adapter", minilm_adapter, "--output", tmp_path / "out", "--format", "gguf")
    assert_one_line_error(result, "GGUF export is for causal language models, and this is a classification model",
                          "merge with --format hf (the default)")


@pytest.mark.skipif(not FETCHED_SDIST.is_file(), reason=f"needs {export.fetch_command()}")
def test_the_converter_alone_is_extracted_once_from_the_fetched_source(empty_cache):
    empty_cache.mkdir(parents=True)
    shutil.copy(FETCHED_SDIST, empty_cache / export.SDIST)
    converter = export.gguf_converter()
    folder = empty_cache / f"converter-{export.LLAMA_CPP_PYTHON}"
    assert converter.script == folder / "convert_hf_to_gguf.py"
    assert sorted(path.name for path in folder.iterdir()) == [
        "LICENSE", "conversion", "convert_hf_to_gguf.py", "gguf-py", "supported_architectures.json"]
    assert not list(folder.rglob("*.cpp")) and "LlamaForCausalLM" in converter.architectures
    stamp = (folder / "supported_architectures.json").stat().st_mtime_ns
    assert export.gguf_converter() == converter
    assert (folder / "supported_architectures.json").stat().st_mtime_ns == stamp  # read, not extracted again


@needs_converter
def test_the_registry_is_what_the_converter_prints():
    """hkft's list of exportable architectures is the converter's own `--print-supported-models`."""
    converter = export.gguf_converter()
    printed = subprocess.run([sys.executable, str(converter.script), "--print-supported-models"],
                             capture_output=True, text=True, check=True).stderr
    text_models = printed.split("TEXT models:")[1].split("MMPROJ models:")[0]
    assert converter.architectures == set(re.findall(r"^\s+- (\S+)$", text_models, re.M))
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= converter.architectures


@needs_converter
def test_an_architecture_outside_the_converters_registry_is_refused_before_merging(tmp_path):
    config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "opt")
    word_tokenizer(memorise_texts()).save_pretrained(tmp_path / "opt")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "opt"),
                           PeftLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ModelError, match="llama.cpp's converter from llama-cpp-python 0.3.36 does not convert OPTForCausalLM"):
        merge_adapter(tmp_path / "adapter", tmp_path / "out", gguf_type="f16")
    assert not (tmp_path / "out").exists()


@needs_converter
def test_a_failed_conversion_reports_the_converters_own_last_line(llama_run, tmp_path):
    """A word-level tokenizer is not one llama.cpp knows: the converter's own last stderr line is the error."""
    merge_adapter(llama_run, tmp_path / "hf")
    direct = subprocess.run([sys.executable, str(export.gguf_converter().script), str(tmp_path / "hf"), "--outfile",
                             str(tmp_path / "direct.gguf"), "--outtype", "f16"], capture_output=True, text=True)
    assert direct.returncode != 0
    last = direct.stderr.strip().splitlines()[-1].strip()
    with pytest.raises(ModelError) as raised:
        merge_adapter(llama_run, tmp_path / "out", gguf_type="f16")
    assert str(raised.value) == f"llama.cpp's converter from llama-cpp-python 0.3.36 failed: {last[:300]} (nothing was written)"
    assert not (tmp_path / "out").exists()
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging folder left behind


def inspect_fact(cli, *args) -> str:
    result = cli("inspect", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["gguf_export"]


@needs_converter
def test_inspect_says_whether_the_model_exports(cli, tmp_path):
    family_config("LLaMA").save_pretrained(tmp_path / "llama")
    assert inspect_fact(cli, tmp_path / "llama", "--task", "causal-lm") == (
        "yes, as LlamaForCausalLM (llama.cpp's converter from llama-cpp-python 0.3.36)")
    assert inspect_fact(cli, tmp_path / "llama", "--task", "classification") == (
        "no: GGUF export is for causal language models, and this is a classification model")
    family_config("OPT").save_pretrained(tmp_path / "opt")
    assert inspect_fact(cli, tmp_path / "opt", "--task", "causal-lm") == (
        "no: llama.cpp's converter from llama-cpp-python 0.3.36 does not convert OPTForCausalLM")


def test_inspect_without_the_converter_names_the_fetch_command(cli, tmp_path, empty_cache):
    family_config("LLaMA").save_pretrained(tmp_path / "llama")
    assert inspect_fact(cli, tmp_path / "llama", "--task", "causal-lm") == (
        f"not known until llama.cpp's converter is fetched: `{export.fetch_command()}`")


def export_table() -> str:
    """The README's table of the families hkft trains as causal LMs, by the converter's registry."""
    converter = export.gguf_converter()
    rows = ["| family | causal LM class | GGUF export |", "|---|---|---|"]
    for family in FAMILIES:
        if "causal-lm" in family_heads(family):
            name = HEADS["causal-lm"]._model_mapping[type(family_config(family))].__name__
            rows.append(f"| {family} | `{name}` | {'yes' if name in converter.architectures else '-'} |")
    return "\n".join(rows)


@needs_converter
def test_readme_table_of_exporting_families_is_the_converters_registry():
    match = re.search(r"<!-- gguf-export-table -->\n(.*?)\n<!-- /gguf-export-table -->", README.read_text(), re.S)
    assert match, "README needs the GGUF export table between <!-- gguf-export-table --> markers"
    assert match.group(1) == export_table(), "regenerate: python -c 'import test_export as t; print(t.export_table())' in tests/"
