"""End-to-end training on tiny models: every variant, both architectures, every data format, and the CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.run import main, train
from tests.conftest import accelerate_launch, load, recipe_argv, subprocess_env

VARIANTS = {
    "lora_bf16": {"dtype": torch.bfloat16, "quantized": False},
    "qlora_int4": {"dtype": torch.bfloat16, "quantized": True},
    "lora_int8": {"dtype": torch.bfloat16, "quantized": True},
}


def recipe_args(name: str, model_dir: Path, dataset: Path, output_dir: Path, **overrides) -> list[str]:
    """A shipped recipe on a tiny model and data file: three quick steps, computing in bf16 on every CPU (the k-bit
    recipes' `dtype: auto` would take fp32 on CPUs without native bf16; tests/test_gguf.py checks that choice)."""
    return recipe_argv(name, **{"model_name_or_path": model_dir, "dataset": dataset, "output_dir": output_dir,
                                "dtype": "bfloat16",
                                "max_steps": 3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                                "learning_rate": 1e-2, "report_to": "none", "disable_tqdm": "true", **overrides})


def base_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu() for name, p in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_variant_moves_adapters_not_base(variant, llama_dir, data_files, tmp_path):
    trainer = train(load(recipe_args(variant, llama_dir, data_files["alpaca"], tmp_path / "out")))
    model = trainer.model
    adapters = lora_tensors(model)
    lora_b = {name: t for name, t in adapters.items() if "lora_B" in name}
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b.values()), "peft starts lora_B at zero; it must move"
    assert not any(p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)

    # Base weights did not move: compare against the checkpoint (unquantized) or a fresh quantized load.
    if VARIANTS[variant]["quantized"]:
        from finetune.model.load import load_model

        recipe = load(recipe_args(variant, llama_dir, data_files["alpaca"], tmp_path / "unused"))
        fresh = dict(load_model(recipe.model).named_parameters())
        layers = [name for name, p in model.named_parameters() if "base_layer" in name]
        assert layers
        for name in layers:
            assert torch.equal(dict(model.named_parameters())[name].data.cpu(), fresh[name].data.cpu()), name
        quantized = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
        assert quantized, "quantization must give bitsandbytes layers"
    else:
        original = base_weights(llama_dir)
        for name, param in model.named_parameters():
            if "base_layer.weight" in name:
                key = name.split("base_model.model.", 1)[1].replace(".base_layer", "")
                assert param.dtype == VARIANTS[variant]["dtype"]
                assert torch.equal(param.detach().cpu(), original[key].to(param.dtype)), name

    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert len(saved) == len(adapters)
    for tensor in saved.values():
        assert torch.isfinite(tensor).all()
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert (tmp_path / "out" / "recipe.yaml").is_file()


@pytest.mark.parametrize("variant", ["qlora_int4", "lora_int8"])
def test_kbit_base_keeps_its_compute_dtype(variant, llama_dir, data_files, tmp_path):
    """No fp32 copies of the embeddings, LM head or norms (peft's prepare_model_for_kbit_training makes them)."""
    from peft import prepare_model_for_kbit_training

    from finetune.model.load import load_model, quantization_config

    recipe = load(recipe_args(variant, llama_dir, data_files["text"], tmp_path))
    model = load_model(recipe.model)
    float_params = {name: p for name, p in model.named_parameters() if p.is_floating_point() and "lora_" not in name}
    assert float_params and {p.dtype for p in float_params.values()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in float_params.values())
    assert all(p.dtype == torch.float32 and p.requires_grad for n, p in model.named_parameters() if "lora_" in n)

    from transformers import AutoModelForCausalLM

    peft_way = prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(
        llama_dir, dtype=torch.bfloat16, quantization_config=quantization_config(recipe.model)),
        use_gradient_checkpointing=False)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    peft_bytes = sum(p.numel() * p.element_size() for p in peft_way.parameters())
    assert weight_bytes < peft_bytes


def test_full_fine_tuning_moves_the_weights(llama_dir, data_files, tmp_path):
    trainer = train(load(recipe_args("full_bf16", llama_dir, data_files["text"], tmp_path / "out",
                                            dtype="float32", learning_rate=1e-3)))
    original = base_weights(llama_dir)
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any("lora_" in name for name in saved)
    moved = [key for key in original if key in saved and not torch.equal(saved[key], original[key])]
    assert len(moved) >= len(original) - 2  # everything trained (rotary buffers aside)
    assert all(p.requires_grad for p in trainer.model.parameters())


# Every pair of (variant, format), (variant, architecture) and (format, architecture) once: 9 runs, not 18.
PAIRWISE = [("lora_bf16", "text", "llama"), ("lora_bf16", "alpaca", "qwen2"), ("lora_bf16", "messages", "llama"),
            ("qlora_int4", "text", "qwen2"), ("qlora_int4", "alpaca", "llama"), ("qlora_int4", "messages", "qwen2"),
            ("lora_int8", "text", "llama"), ("lora_int8", "alpaca", "qwen2"), ("lora_int8", "messages", "qwen2")]


def test_the_pairwise_set_covers_every_pair():
    for first, second in ((0, 1), (0, 2), (1, 2)):
        values = [sorted({case[i] for case in PAIRWISE}) for i in (first, second)]
        assert {(case[first], case[second]) for case in PAIRWISE} == {(a, b) for a in values[0] for b in values[1]}


@pytest.mark.parametrize("variant, fmt, architecture", PAIRWISE)
def test_recipe_trains_on_local_model_and_data(variant, fmt, architecture, request, data_files, tmp_path, caplog):
    model_dir = request.getfixturevalue(f"{architecture}_dir")
    caplog.set_level("INFO")
    assert main(recipe_args(variant, model_dir, data_files[fmt], tmp_path / "out")) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert f"dataset format: {fmt} (detected from columns" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("variant, architecture, fmt, script", [
    ("qlora_int4", "qwen2", "messages", True), ("lora_int8", "llama", "alpaca", False),
    ("lora_bf16", "qwen2", "text", True),
])
def test_accelerate_launch_command_line(variant, architecture, fmt, script, request, data_files, tmp_path):
    """The documented launch lines, as a user types them: the script path and `-m finetune.run`."""
    model_dir = request.getfixturevalue(f"{architecture}_dir")
    out = tmp_path / "out"
    args = recipe_args(variant, model_dir, data_files[fmt], out)
    result = subprocess.run(accelerate_launch(*args, script=script), capture_output=True, text=True, cwd=tmp_path,
                            timeout=600, env=subprocess_env(WANDB_DISABLED="true"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert f"wrote {out}: adapter_model.safetensors, recipe.yaml, summary.json" in result.stderr


def test_embedded_default_learns(tmp_path):
    """The make-train recipe, shortened: the eval loss must fall well below where it started."""
    trainer = train(load(recipe_argv("tiny", max_steps=120, eval_steps=120, output_dir=tmp_path / "out",
                                     disable_tqdm="true")))
    eval_losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert eval_losses[0] > 5.0
    assert eval_losses[-1] < eval_losses[0] - 1.5, eval_losses
