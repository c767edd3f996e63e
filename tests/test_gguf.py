"""GGUF in (finetune.model.gguf) and the compute dtype `auto` picks: what is refused, and before what.

The real model's GGUF (SmolLM2) converted, trained and scored end to end is tests/test_real_model.py; here, small
GGUF files written with the gguf package's own writer, and the dtype choice for every kind of machine."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from finetune.model import gguf as gguf_import
from finetune.model.load import auto_dtype
from tests.conftest import REPO, subprocess_env


def write_gguf(path, architecture: str, tensor_type: str = "F32", tokenizer: bool = True):
    """A GGUF file with the header fields transformers reads first (a two-token tokenizer unless `tokenizer` is
    False) and one 64x64 tensor of `tensor_type`."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("test model")
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["a", "b"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor("token_embd.weight", np.zeros((64, 64), dtype=np.float32))
    else:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.zeros((64, 64 // block * size), dtype=np.uint8)
        writer.add_tensor("token_embd.weight", raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run_recipe(tmp_path, model: str, launcher: str = "run.py") -> subprocess.CompletedProcess:
    """The embedded recipe with `model` as its base, through finetune/run.py or launch/train.sh."""
    args = ["recipes/tiny.yaml", "--model_name_or_path", str(model), "--output_dir", str(tmp_path / "out")]
    command = [sys.executable, "finetune/run.py", *args] if launcher == "run.py" else ["launch/train.sh", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=subprocess_env(WANDB_MODE="offline"))


@pytest.mark.parametrize("launcher", ["run.py", "train.sh"])
@pytest.mark.parametrize(("architecture", "tensor_type", "expected"), [
    ("bert", "F32", "holds a `bert` model, which transformers can't load from GGUF as a causal LM"),
    ("t5", "F32", "holds a `t5` model"),  # transformers reads T5 GGUF files, but not as a causal LM
    ("llama", "Q8_1", "stores tensors as Q8_1, which the gguf package can't dequantize"),
], ids=["bert", "t5-not-causal", "llama-q8_1"])
def test_unreadable_gguf_is_refused_in_one_line_before_anything_is_written(tmp_path, launcher, architecture,
                                                                             tensor_type, expected):
    model = write_gguf(tmp_path / f"{architecture}.gguf", architecture, tensor_type)
    result = run_recipe(tmp_path, model, launcher)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [None, b"not a gguf file at all"], ids=["missing", "not-gguf"])
def test_missing_or_foreign_gguf_file_is_refused(tmp_path, content):
    model = tmp_path / "model.gguf"
    if content is not None:
        model.write_bytes(content)
    result = run_recipe(tmp_path, model)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    expected = "no such file" if content is None else "is not a readable GGUF file"
    assert expected in result.stderr and "model_name_or_path" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_the_header_is_read_with_its_quantization_type(tmp_path):
    info = gguf_import.read_info(write_gguf(tmp_path / "m.gguf", "llama", "Q8_0"))
    assert (info.architecture, info.quantization, info.tensor_types) == ("llama", "ALL_F32", ("Q8_0",))


def test_the_cache_key_follows_the_file(tmp_path):
    model = write_gguf(tmp_path / "m.gguf", "llama")
    first = gguf_import.converted_dir(model)
    assert first == gguf_import.converted_dir(model) and first.name.startswith("m-")
    write_gguf(model, "llama", "Q8_0")  # replaced in place: another size, so another conversion
    assert gguf_import.converted_dir(model) != first


def test_a_plain_model_name_is_loaded_as_it_is():
    assert gguf_import.plain_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert gguf_import.info("assets/tiny/model") == {}


# The compute dtype of `dtype: auto` -----------------------------------------------------------------------------

@pytest.mark.parametrize(("cuda", "cuda_bf16", "flags", "expected"), [
    (False, False, {"avx2", "avx512f"}, "float32"),  # an Intel Xeon without AVX512-BF16: bf16 would be emulated
    (False, False, {"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),  # an AMD EPYC (Zen 4) or a Cooper Lake Xeon
    (False, False, {"amx_bf16", "amx_tile"}, "bfloat16"),  # Sapphire Rapids
    (False, False, {"fp", "asimd", "bf16"}, "bfloat16"),  # an Arm CPU with the BF16 extension
    (False, False, set(), "float32"),  # no /proc/cpuinfo
    (True, True, set(), "bfloat16"),
    (True, False, {"avx512_bf16"}, "float16"),  # an older GPU: the GPU decides, not the CPU
], ids=["cpu-no-bf16", "cpu-avx512bf16", "cpu-amx", "arm-bf16", "no-cpuinfo", "gpu-bf16", "gpu-no-bf16"])
def test_auto_picks_bf16_only_where_it_is_native(cuda, cuda_bf16, flags, expected):
    dtype, why = auto_dtype(cuda, cuda_bf16, frozenset(flags))
    assert dtype == expected and why


def test_the_choice_is_logged_and_emulated_bf16_warned(monkeypatch, caplog):
    from finetune.model import load as model
    from finetune.recipe.keys import ModelArguments

    args = ModelArguments(model_name_or_path="x/y", dtype="bfloat16")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(model, "cpu_flags", lambda: frozenset({"avx2"}))
    with caplog.at_level("INFO", logger="finetune.model.load"):
        assert model.report_dtype(args) == "bfloat16"
        assert model.report_dtype(ModelArguments(model_name_or_path="x/y", dtype="auto")) == "float32"
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "emulated" in caplog.records[0].getMessage() and "no native bf16" in caplog.records[1].getMessage()
    caplog.clear()
    monkeypatch.setattr(model, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    with caplog.at_level("INFO", logger="finetune.model.load"):
        assert model.report_dtype(args) == "bfloat16"
        assert model.report_dtype(ModelArguments(model_name_or_path="x/y", dtype="auto")) == "bfloat16"
    assert [r.levelname for r in caplog.records] == ["INFO", "INFO"]


def test_a_conversion_that_fails_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """What the header checks can't see (a tokenizer transformers can't build, an unwritable cache) ends as a
    UsageError naming the file, and no half-written directory is left in the cache."""
    from finetune.errors import UsageError

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    model = write_gguf(tmp_path / "m.gguf", "llama")
    monkeypatch.setattr(gguf_import, "problem", lambda path: None)
    with pytest.raises(UsageError, match="transformers could not read m.gguf"):
        gguf_import.plain_model(str(model))
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
    (tmp_path / "file").write_text("")  # a cache under a file: can't be created, for root too
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(UsageError, match="set FINETUNE_CACHE to a writable directory"):
        gguf_import.plain_model(str(model))


def test_a_gguf_without_a_tokenizer_is_refused(tmp_path):
    assert "holds no tokenizer" in gguf_import.problem(write_gguf(tmp_path / "m.gguf", "llama", tokenizer=False))
