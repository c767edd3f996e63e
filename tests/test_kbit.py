"""Quantized bases on the CPU: an evaluation never changes training, on CPUs with and without AVX512-BF16.

bitsandbytes 0.50 takes a packed 4-bit path on CPUs with AVX512-BF16 (no backward, bf16 results) once a layer has
run in eval mode. These tests run both ways on every machine: `cpu_reports_avx512bf16` makes bitsandbytes believe
the CPU has the feature (or not), so the packed path is exercised on CPUs without it too; there its kernel is not
even the right one, which only makes a regression louder.
"""

from __future__ import annotations

import logging

import pytest
import torch

from finetune.model.load import PACKED_CPU_SWITCH, load_model
from finetune.run import train
from tests.conftest import load, recipe_argv


def kbit_args(quantization: str, model_dir, dataset, out, **overrides) -> list[str]:
    return recipe_argv("lora_bf16", **{
        "model_name_or_path": model_dir, "dataset": dataset, "output_dir": out, "quantization": quantization,
        "dtype": "float32", "lora_dropout": 0.0, "max_steps": 4, "logging_steps": 1, "learning_rate": 1e-2,
        "per_device_train_batch_size": 4, "eval_size": 8, "save_strategy": "no", "report_to": "none",
        "disable_tqdm": "true", "seed": 0, **overrides})


def training_curve(trainer) -> list[tuple[float, float]]:
    return [(entry["loss"], entry["grad_norm"]) for entry in trainer.state.log_history if "loss" in entry]


def test_linear4bit_still_has_the_packed_path_switch():
    """The fix turns this attribute off; if bitsandbytes renames it, the packed path would silently come back."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32)
    assert hasattr(layer, PACKED_CPU_SWITCH), f"bitsandbytes {bnb.__version__} renamed {PACKED_CPU_SWITCH}"


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_an_eval_after_every_step_does_not_change_training(quantization, cpu_reports_avx512bf16, llama_dir,
                                                           data_files, tmp_path):
    """Same losses and gradient norms (relative 1e-4, fp32 compute) with an evaluation after every step as without."""
    quiet = train(load(kbit_args(quantization, llama_dir, data_files["messages"], tmp_path / "no",
                                        eval_strategy="no")))
    evaluated = train(load(kbit_args(quantization, llama_dir, data_files["messages"], tmp_path / "ev",
                                            eval_strategy="steps", eval_steps=1)))
    assert sum("eval_loss" in entry for entry in evaluated.state.log_history) >= 4  # one per step, and the final
    expected, actual = training_curve(quiet), training_curve(evaluated)
    assert len(expected) == len(actual) == 4
    for (loss, norm), (loss_ev, norm_ev) in zip(expected, actual, strict=True):
        assert loss_ev == pytest.approx(loss, rel=1e-4) and norm_ev == pytest.approx(norm, rel=1e-4), (expected,
                                                                                                       actual)


def lora_gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batch).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_after_an_eval_gradients_reach_the_lora_weights_through_every_4bit_layer(cpu_reports_avx512bf16,
                                                                                 llama_dir, data_files, tmp_path):
    import bitsandbytes as bnb

    recipe = load(kbit_args("int4", llama_dir, data_files["messages"], tmp_path))
    batch = {"input_ids": torch.tensor([[1, 40, 41, 42, 43, 44, 45, 2]])}
    batch["labels"] = batch["input_ids"].clone()

    def nudged_model():  # lora_B starts at zero, which would hide any gradient to lora_A
        torch.manual_seed(0)
        model = load_model(recipe.model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1)
        return model

    reference = lora_gradients(nudged_model().train(), batch)
    model = nudged_model()
    model.eval()
    with torch.no_grad():
        model(**batch)  # what the Trainer's evaluation does
    model.train()
    after_eval = lora_gradients(model, batch)

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m, PACKED_CPU_SWITCH) for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    lora_a = [name for name in reference if "lora_A" in name]
    assert len(lora_a) == len(layers)  # one adapter per 4-bit layer, each with a gradient
    for name, expected in reference.items():
        assert expected.abs().sum() > 0, name
        assert torch.allclose(after_eval[name], expected, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("dtype, packed_allowed", [("bfloat16", True), ("float32", False)])
def test_only_bf16_inference_may_take_the_packed_kernel(dtype, packed_allowed, monkeypatch, llama_dir, data_files,
                                                         tmp_path):
    """Its result is bf16 whatever the compute dtype: fine for bf16 inference, never for training or fp32."""
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    recipe = load(kbit_args("int4", llama_dir, data_files["messages"], tmp_path, dtype=dtype))
    for for_training, allowed in ((True, False), (False, packed_allowed)):
        model = load_model(recipe.model, for_training=for_training)
        switches = {getattr(m, PACKED_CPU_SWITCH) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert switches == {allowed}, (for_training, switches)


def test_expected_bitsandbytes_noise_is_filtered_and_nothing_else(caplog):
    from finetune import logs

    logs.quiet_third_party()
    caplog.set_level(logging.WARNING)
    logging.getLogger("bitsandbytes.autograd._functions").warning(
        "MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "no module")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("something else went wrong")
    assert [record.getMessage() for record in caplog.records] == ["something else went wrong"]



def test_expected_warnings_are_filtered_and_nothing_else():
    import warnings

    from finetune import logs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs.quiet_third_party()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
