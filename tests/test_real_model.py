"""The real model end to end: SmolLM2-135M-Instruct from its GGUF file (`make smollm2`, which `make test` runs first),
converted once per machine, trained with every shipped variant of recipes/smollm2/, and scored against the untrained
base on the held-out contacts task. What random-weight models can't show: a real tokenizer and chat template (its
default system prompt included), real answers, and a quality gain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.embedded import smollm2
from finetune.model import gguf as gguf_import
from tests.conftest import REPO, subprocess_env, train_and_summarise

pytestmark = pytest.mark.slow
RECIPES = REPO / "recipes" / "smollm2"
LIMIT = "20"  # held-out contacts scored per model: the base scores 0 of them, a tuned run most


@pytest.fixture(scope="session")
def model_file() -> Path:
    """The shipped GGUF and its plain copy in the cache (converted here on a new machine, ~40 s)."""
    from finetune.errors import UsageError

    try:
        directory = smollm2.ensure_assets()
    except UsageError as error:
        pytest.fail(f"{error} (make test installs it)", pytrace=False)
    path = directory / smollm2.GGUF_NAME
    gguf_import.plain_model(str(path))
    return path


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def train(tmp_path_factory, variant: str, steps: int, batch: int):
    out = tmp_path_factory.mktemp(f"smollm2-{variant}") / "run"
    return train_and_summarise(RECIPES / f"{variant}.yaml", output_dir=out, max_steps=steps, logging_steps=1,
                               per_device_train_batch_size=batch, eval_strategy="no", save_strategy="no")


@pytest.fixture(scope="session")
def tuned(model_file, tmp_path_factory):
    """recipes/smollm2/lora.yaml, shortened to 40 steps of 4 examples (the recipe trains 80 of 8)."""
    return train(tmp_path_factory, "lora", steps=40, batch=4)


def test_the_gguf_converts_to_the_model_and_template_it_holds(model_file):
    from transformers import AutoTokenizer

    plain = Path(gguf_import.plain_model(str(model_file)))
    config = json.loads((plain / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == \
        ("llama", 30, 576, 49152)
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    tokenizer = AutoTokenizer.from_pretrained(plain)
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.chat_template
    assert gguf_import.info(str(model_file)) == {"gguf_file": str(model_file.resolve()),
                                                 "gguf_architecture": "llama", "gguf_quantization": "Q4_1"}


def test_labels_on_the_real_template_are_the_answer_and_its_end_of_turn(model_file):
    from finetune.data.load import marked_targets, tokenize_example
    from finetune.model.load import load_tokenizer
    from finetune.recipe.keys import ModelArguments

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(model_file)))
    row = json.loads((model_file.parent / "contacts.jsonl").read_text().splitlines()[0])
    answer = row["messages"][1]["content"]
    example = tokenize_example(row, "messages", tokenizer, max_length=512, train_on_prompt=False)
    marked = marked_targets(example["input_ids"], example["labels"], tokenizer)
    assert marked.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # not trained
    assert marked.count("[[") == 1 and marked.endswith(f"<|im_start|>assistant\n[[{answer}<|im_end|>\n]]")


def test_the_tuned_model_beats_the_base_by_a_wide_margin(model_file, tuned, tmp_path):
    trainer, summary = tuned
    history = losses(trainer)
    assert sum(history[-5:]) / 5 < history[0] / 4, history
    from finetune.model.load import dtype_choice

    assert summary["model/gguf_quantization"] == "Q4_1"
    assert summary["model/compute_dtype"] == dtype_choice("auto")[0]  # the recipe's dtype: auto, on this CPU
    run = Path(trainer.args.output_dir)
    scores = {}
    for name, target, extra in [("base", str(model_file), ["--out", str(tmp_path / "base")]),
                                ("tuned", str(run), [])]:
        result = subprocess.run([sys.executable, "-m", "finetune.commands.evaluate", target, "--limit", LIMIT, *extra],
                                cwd=REPO, capture_output=True, text=True, timeout=600,
                                env=subprocess_env(WANDB_MODE="disabled"))
        assert result.returncode == 0, result.stderr[-3000:]
        out = Path(extra[1]) if extra else run
        scores[name] = json.loads((out / "eval.json").read_text())["lm_eval/smollm2_contacts/exact_match"]
    assert scores["base"] <= 0.1 and scores["tuned"] >= scores["base"] + 0.5, scores


def test_chat_answers_in_the_taught_shape(tuned):
    trainer, _ = tuned
    prompt = f"{smollm2.INSTRUCTION}\nWilma Stone is 33 and lives in Zagreb."
    result = subprocess.run([sys.executable, "-m", "finetune.commands.chat", trainer.args.output_dir, "--prompt",
                             prompt],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=subprocess_env(WANDB_MODE="disabled"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip()) == {"name": "Wilma Stone", "age": 33, "city": "Zagreb"}


@pytest.mark.parametrize("variant", ["qlora", "int8", "full"])
def test_every_variant_trains_with_a_falling_loss(model_file, tmp_path_factory, variant):
    trainer, summary = train(tmp_path_factory, variant, steps=6, batch=2)
    history = losses(trainer)
    assert len(history) == 6 and sum(history[-3:]) / 3 < history[0] / 2, history
    if variant == "full":
        assert summary["model/trainable_params"] == summary["model/total_params"]
    else:
        assert summary["model/weight_bits"] == {"qlora": 4, "int8": 8}[variant]


def test_merge_of_a_gguf_run_gives_a_plain_model_with_its_logits(tuned, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.commands.merge import merge
    from finetune.training.rundir import load_for_inference

    trainer, _ = tuned
    merged_dir = merge(Path(trainer.args.output_dir), tmp_path / "merged")
    _, tokenizer, adapted = load_for_inference(Path(trainer.args.output_dir))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert AutoTokenizer.from_pretrained(merged_dir).chat_template == tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": f"{smollm2.INSTRUCTION}\nAda Kim is 41."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        difference = (merged(**ids).logits - adapted(**ids).logits).abs().max().item()
    assert difference < 1e-3, difference


@pytest.mark.parametrize("file_type", ["f16", "q8_0"])
def test_the_tuned_run_as_gguf_reads_back_and_gives_the_tuned_answer(tuned, tmp_path, file_type):
    """finetune export, read by transformers' GGUF loader: the run's tokenizer (same ids for every text, the same
    chat template), logits within what the type costs (f16: 0.1 on logits of ~40; q8_0: measured 1.8, stated as
    below 3), and the tuned answer itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.commands.export import export
    from finetune.commands.merge import merged_model

    trainer, _ = tuned
    run = Path(trainer.args.output_dir)
    path = export(run, tmp_path / f"contacts.{file_type}.gguf", file_type)
    merged, tokenizer = merged_model(run)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    read = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = ["Wilma Stone is 33 and lives in Zagreb.", "  1234567 digits, ünïcode 运行 🚀", "<|im_start|>user\nhi"]
    assert [read(t)["input_ids"] for t in texts] == [tokenizer(t)["input_ids"] for t in texts]
    assert read.chat_template == tokenizer.chat_template
    prompt = [{"role": "user", "content": f"{smollm2.INSTRUCTION}\nWilma Stone is 33 and lives in Zagreb."}]
    ids = read.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        difference = (model(**ids).logits - merged.float()(**ids).logits).abs().max().item()
        answer = model.generate(**ids, max_new_tokens=40, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert difference < {"f16": 0.1, "q8_0": 3.0}[file_type], difference
    modelfile = path.with_name(path.name + ".Modelfile").read_text()  # Ollama: ChatML, its stop, the default system
    assert f"FROM ./{path.name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile
    assert json.loads(read.decode(answer, skip_special_tokens=True)) == {"name": "Wilma Stone", "age": 33,
                                                                        "city": "Zagreb"}


def test_llama_cpp_itself_gives_the_tuned_answer_from_the_gguf(tuned, tmp_path):
    """llama.cpp (llama-cpp-python), where the machine has it: the q8_0 export, its own chat template applied by
    llama.cpp, answers as the tuned run does. Not in requirements.txt: `pip install llama-cpp-python` compiles
    llama.cpp, 6 min 38 s on this 2-core machine."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                                       "llama-cpp-python: it compiles llama.cpp, ~7 min on 2 cores)")
    from finetune.commands.export import export

    trainer, _ = tuned
    path = export(Path(trainer.args.output_dir), tmp_path / "contacts.q8_0.gguf", "q8_0")
    model = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, seed=0)
    prompt = f"{smollm2.INSTRUCTION}\nWilma Stone is 33 and lives in Zagreb."
    reply = model.create_chat_completion(messages=[{"role": "user", "content": prompt}], temperature=0.0,
                                         max_tokens=40)
    assert json.loads(reply["choices"][0]["message"]["content"]) == {"name": "Wilma Stone", "age": 33,
                                                                     "city": "Zagreb"}
