"""finetune export: a trained run as a GGUF file, read back by a reader that is not ours (transformers' GGUF
loader): the same tokens for every text, and logits within what the weight type costs. Small llama and qwen2 models
with a byte-level BPE tokenizer trained here; the real model's export is in tests/test_real_model.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune.commands import export
from finetune.embedded.tiny import CHAT_TEMPLATE, build_model_config
from finetune.training import rundir
from tests.conftest import REPO, subprocess_env, train_and_summarise

TEXTS = ["Hello world", "  leading spaces, 12345 digits and 3.14", "ünïcode 运行 🚀 ok", "tab\tand\nnew lines\n\n",
         "<|im_start|>user\nhi<|im_end|>", "<|tool|>{}", "don't stop; it's fine!"]


def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2's split, 400 tokens) trained on a few sentences, with ChatML specials and
    one special token that is none of BOS, EOS and padding (a GGUF reader learns it is special only from its type)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [" ".join(TEXTS), "the quick brown fox jumps over the lazy dog " * 3,
              "reverse the word abc and answer in json please"] * 20
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|tool|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def trained_run(tmp_path_factory, data_files, architecture: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    base = tmp_path_factory.mktemp(f"bpe-{architecture}")
    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    config = build_model_config(architecture, hidden_size=64, layers=2, vocab_size=len(tokenizer))
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path_factory.mktemp(f"run-{architecture}") / "run"
    train_and_summarise("lora_bf16", model_name_or_path=base, dataset=data_files["text"], output_dir=out,
                        dtype="float32", max_steps=3, eval_strategy="no", eval_size=0, save_strategy="no",
                        learning_rate=0.05, lora_r=8)  # a large step: the merged adapter must show in the logits
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def run(request, tmp_path_factory, data_files) -> Path:
    return trained_run(tmp_path_factory, data_files, request.param)


def read_back(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def test_f16_and_q8_0_read_back_with_their_tokens_and_logits(run, tmp_path):
    """f16: off the merged model by no more than the merged model with its weights rounded to f16 is. q8_0: equal
    to the merged model with each weight passed through q8_0 (the gguf package's own quantize and dequantize), so
    the file holds exactly what the type keeps."""
    import gguf
    import torch

    from finetune.commands.merge import merged_model

    merged, tokenizer = merged_model(run)
    merged = merged.float().eval()
    ids = tokenizer(" ".join(TEXTS), return_tensors="pt")["input_ids"]
    exact = logits(merged, ids)

    f16_path = export.export(run, tmp_path / "model.f16.gguf", "f16")
    model, read_tokenizer = read_back(f16_path)
    assert [read_tokenizer(t)["input_ids"] for t in TEXTS] == [tokenizer(t)["input_ids"] for t in TEXTS]
    assert read_tokenizer.chat_template == tokenizer.chat_template
    assert (read_tokenizer.bos_token, read_tokenizer.eos_token) == (tokenizer.bos_token, tokenizer.eos_token)
    rounded = merged_model(run)[0].float().eval()
    with torch.no_grad():
        for param in rounded.parameters():
            if param.ndim == 2:
                param.copy_(param.half().float())
    f16_cost = (logits(rounded, ids) - exact).abs().max().item()
    assert (logits(model, ids) - exact).abs().max().item() <= 2 * f16_cost + 1e-5

    q8_path = export.export(run, tmp_path / "model.q8_0.gguf", "q8_0")
    model, _ = read_back(q8_path)
    q8 = gguf.GGMLQuantizationType.Q8_0
    simulated = merged_model(run)[0].float().eval()
    with torch.no_grad():
        for param in simulated.parameters():
            if param.ndim == 2 and param.shape[-1] % 32 == 0:
                values = param.detach().numpy()
                param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(values, q8), q8)
                                             .reshape(values.shape)))
    assert (logits(model, ids) - logits(simulated, ids)).abs().max().item() < 1e-4
    assert (logits(model, ids) - exact).abs().max().item() > 0  # q8_0 is lossy: the comparison above is not vacuous
    assert q8_path.stat().st_size < 0.75 * f16_path.stat().st_size
    assert not q8_path.with_name(q8_path.name + ".Modelfile").exists()  # not a ChatML template: Ollama reads the file's
    header = gguf.GGUFReader(q8_path)
    assert {t.tensor_type.name for t in header.tensors} == {"Q8_0", "F32"}
    assert str(header.fields["general.architecture"].contents()) == merged.config.model_type


def test_the_merged_adapter_is_in_the_file(run, tmp_path):
    """The exported weights are the merged ones, not the base's: the base's logits differ from the file's."""
    import torch
    from transformers import AutoModelForCausalLM

    base = rundir.trained_recipe(run).model.model_name_or_path
    path = export.export(run, tmp_path / "m.gguf", "f32")
    model, tokenizer = read_back(path)
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    from finetune.commands.merge import merged_model

    merged = merged_model(run)[0].float().eval()
    assert (logits(model, ids) - logits(merged, ids)).abs().max().item() < 1e-4  # f32: the same numbers
    assert (logits(model, ids) - logits(original, ids)).abs().max().item() > 1e-3


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, data_files) -> Path:
    return trained_run(tmp_path_factory, data_files, "llama")


def test_what_cannot_be_exported_is_refused_in_one_line_and_nothing_is_written(llama_run, llama_dir, data_files,
                                                                                tmp_path, capsys):
    run = llama_run
    char_run = tmp_path / "char-run"
    train_and_summarise("lora_bf16", model_name_or_path=llama_dir, dataset=data_files["text"], output_dir=char_run,
                        dtype="float32", max_steps=1, eval_strategy="no", eval_size=0, save_strategy="no")
    (tmp_path / "taken.gguf").write_text("mine")
    (tmp_path / "other.gguf.Modelfile").write_text("mine")
    base = rundir.trained_recipe(run).model.model_name_or_path
    cases = [
        ([str(run), "--gguf", str(run / "x.gguf")], "inside the run's own directory"),
        ([str(run), "--gguf", str(Path(base) / "x.gguf")], "--gguf"),
        ([str(run), "--gguf", str(tmp_path / "other.gguf")], "other.gguf.Modelfile already exists"),
        ([str(char_run), "--gguf", str(tmp_path / "a.gguf")], "its WordLevel tokenizer has no GGUF form"),
        ([str(run), "--gguf", str(tmp_path / "a.gguf"), "--type", "q4_k"], "--type: 'q4_k' is not one of"),
        ([str(run), "--gguf", str(tmp_path / "a.bin")], "should end in .gguf"),
        ([str(run), "--gguf", str(tmp_path / "taken.gguf")], "already exists"),
        ([str(tmp_path), "--gguf", str(tmp_path / "a.gguf")], "not a finished run"),
        ([str(run), "--gguf", "/proc/a.gguf"], "--gguf: /proc is not writable"),
    ]
    before_run, before_base = sorted(p.name for p in run.iterdir()), sorted(p.name for p in Path(base).iterdir())
    cases += [(["merge", str(run), "--type", "q8_0"], "--type: it sets the weight type of a GGUF file"),
              (["merge", str(run), "--gguf", str(tmp_path / "a.gguf"), "--out", str(tmp_path / "m")],
               "--out and --gguf: give one"),
              (["merge", str(run), "--out", "/proc/m"], "--out: /proc is not writable")]  # root passes access()
    from finetune import cli

    capsys.readouterr()  # the training's output
    for argv, expected in cases:  # in this process (each refusal comes before anything loads), through the CLI
        command = argv if argv[0] == "merge" else ["export", *argv]
        assert cli.main(command) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, (argv, err)
    result = subprocess.run([sys.executable, "-m", "finetune", "export", *cases[0][0]], cwd=REPO, text=True,
                            capture_output=True, env=subprocess_env(), timeout=120)  # and as a command, once
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["char-run", "other.gguf.Modelfile", "taken.gguf"]
    assert sorted(p.name for p in run.iterdir()) == before_run and sorted(p.name for p in Path(base).iterdir()) == \
        before_base
    assert (tmp_path / "taken.gguf").read_text() == "mine"
