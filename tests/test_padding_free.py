"""Padding-free batches: the flattened loss and gradients equal the padded ones and the per-example ground truth."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, LlamaConfig, MistralConfig, Qwen2Config

from finetune.data import padding_free as packing
from finetune.data.load import IGNORE_INDEX, load_splits
from finetune.model.load import load_tokenizer
from finetune.run import train
from tests.conftest import load, lora_model, recipe_argv

TOLERANCE = 1e-5  # fp32: the same sums in another order


def recipe_args(name: str, model_dir, dataset, output_dir, **overrides) -> list[str]:
    return recipe_argv(name, **{"model_name_or_path": model_dir, "dataset": dataset, "output_dir": output_dir,
                                "max_steps": 3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                                "learning_rate": 1e-2, "report_to": "none", "disable_tqdm": "true", **overrides})


def lora_tensors(model) -> dict:
    return {name: p.detach().float().cpu() for name, p in model.named_parameters() if "lora_" in name}


def _examples(recipe, count=6):
    """Real training features (answer-only labels: -100 inside each example too), lengths spread out."""
    tokenizer = load_tokenizer(recipe.model)
    train_split, *_ = load_splits(recipe.data, tokenizer, 0, recipe.training.main_process_first)
    features = [{key: train_split[i][key] for key in ("input_ids", "labels")} for i in range(count)]
    assert len({len(f["input_ids"]) for f in features}) > 1, "needs examples of different lengths"
    assert all(IGNORE_INDEX in f["labels"] for f in features), "needs masked prompt tokens"
    return tokenizer, features


def _loss_and_grads(model, batch, scale=1.0):
    model.zero_grad()
    loss = model(**batch).loss
    (loss * scale).backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", [None, "sdpa", "eager"])
def test_flattened_batch_equals_padded_batch_and_per_example_truth(attention, architecture, request, data_files,
                                                                    tmp_path):
    model_dir = request.getfixturevalue(f"{architecture}_dir")
    overrides = {"dtype": "float32", "lora_dropout": 0.0}
    if attention:
        overrides["attn_implementation"] = attention
    recipe = load(recipe_args("lora_bf16", model_dir, data_files["alpaca"], tmp_path, **overrides))
    tokenizer, features = _examples(recipe)

    model = lora_model(recipe, padding_free=True)
    expected = packing.VARLEN_ATTENTION if attention in (None, "sdpa") else attention
    assert model.config._attn_implementation == expected
    flat = packing.FlatteningCollator()(features)
    assert flat["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features))
    flat_loss, flat_grads = _loss_and_grads(model, flat)

    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(features)
    assert padded["input_ids"].numel() > flat["input_ids"].numel(), "the padded batch must carry padding"
    padded_loss, padded_grads = _loss_and_grads(model, dict(padded))

    # Ground truth: each example alone, its summed token loss, over the batch's target-token count.
    targets = [sum(label != IGNORE_INDEX for label in f["labels"][1:]) for f in features]
    truth_loss, truth_grads = 0.0, None
    for feature, count in zip(features, targets, strict=True):
        single = {key: torch.tensor([value]) for key, value in feature.items()}
        loss, grads = _loss_and_grads(model, single, scale=count / sum(targets))
        truth_loss += loss.item() * count / sum(targets)
        truth_grads = grads if truth_grads is None else {k: truth_grads[k] + grads[k] for k in grads}

    assert flat_loss.item() == pytest.approx(truth_loss, rel=TOLERANCE)
    assert padded_loss.item() == pytest.approx(truth_loss, rel=TOLERANCE)
    assert truth_grads and any(g.abs().sum() > 0 for name, g in truth_grads.items() if "lora_A" in name)
    for name, truth in truth_grads.items():
        torch.testing.assert_close(flat_grads[name], truth, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(padded_grads[name], truth, rtol=1e-4, atol=1e-6, msg=name)


def _flash_capable() -> bool:
    return torch.cuda.is_available() and torch.version.hip is None and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.skipif(not _flash_capable(), reason="needs an NVIDIA GPU of compute capability 8.0 or later")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_varlen_kernel_equals_attention_per_example(dtype):
    """On a GPU the flattened row goes through torch's flash varlen kernel in one call; its output and gradients
    equal per-example causal attention computed in fp32 (to 16-bit rounding), grouped-query heads and a scale other
    than the default included."""
    import types

    torch.manual_seed(0)
    lengths, heads, kv_heads, head_dim, scale = [5, 130, 1, 64, 300, 17], 8, 2, 64, 0.3
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    tensors = [torch.randn(1, count, sum(lengths), head_dim, device="cuda", dtype=dtype, requires_grad=True)
               for count in (heads, kv_heads, kv_heads)]
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=heads // kv_heads, training=True)
    assert packing.flash_varlen_function(tensors[0], 0.0) is not None, "this GPU should take the flash path"
    out, _ = packing.sdpa_varlen_attention(module, *tensors, None, scaling=scale, cu_seq_lens_q=cu,
                                           max_length_q=max(lengths))
    reference = [t.detach().float().requires_grad_() for t in tensors]
    assert packing.flash_varlen_function(reference[0], 0.0) is None  # fp32: the per-example loop
    expected, _ = packing.sdpa_varlen_attention(module, *reference, None, scaling=scale, cu_seq_lens_q=cu,
                                                max_length_q=max(lengths))
    assert out.shape == expected.shape == (1, sum(lengths), heads, head_dim)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    upstream = torch.randn_like(expected)
    out.backward(upstream.to(dtype))
    expected.backward(upstream)
    for got, want in zip(tensors, reference, strict=True):
        torch.testing.assert_close(got.grad.float(), want.grad, atol=5e-2, rtol=5e-2)


def _torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None): ...


def _torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)): ...


def _torch_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None): ...


@pytest.mark.parametrize("signature, expected", [
    (_torch_2_10, None),  # no scale: the per-example loop
    (_torch_2_11, {"window_size": (-1, 0)}),
    (_torch_2_13, {"window_size": (-1, 0), "enable_gqa": True}),
], ids=["torch-2.10", "torch-2.11", "torch-2.13"])
def test_varlen_kernel_is_asked_for_causal_attention_in_each_torch_version(signature, expected, monkeypatch):
    """torch's varlen function changed its keywords between releases: causal attention (and grouped-query heads)
    are asked for as the installed version takes them, and a version without a scale is not used."""
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", signature)
    packing._varlen_attn.cache_clear()
    try:
        found = packing._varlen_attn()
    finally:
        packing._varlen_attn.cache_clear()
    assert (found if found is None else found.keywords) == expected
    if expected is not None:
        assert found.func is signature


def test_varlen_kernel_is_not_used_on_a_cpu():
    for dtype in (torch.float32, torch.bfloat16):
        assert packing.flash_varlen_function(torch.zeros(1, 2, 3, 8, dtype=dtype), 0.0) is None


def test_cache_left_on_lets_flattened_examples_attend_to_each_other(llama_dir, data_files, tmp_path):
    """The trap `load_model` avoids: with use_cache on, transformers builds no per-example mask (eager, sdpa)."""
    recipe = load(recipe_args("lora_bf16", llama_dir, data_files["alpaca"], tmp_path, dtype="float32",
                                     attn_implementation="eager"))
    _, features = _examples(recipe)
    flat = packing.FlatteningCollator()(features)
    model = lora_model(recipe, padding_free=True).eval()
    with torch.no_grad():
        kept_apart = model(**flat).loss.item()
        model.config.use_cache = True
        leaked = model(**flat, use_cache=True).loss.item()
    assert abs(leaked - kept_apart) > 1e-3


@pytest.mark.parametrize("config, requested, expected", [
    (LlamaConfig(), None, packing.VARLEN_ATTENTION),
    (Qwen2Config(), "sdpa", packing.VARLEN_ATTENTION),
    (LlamaConfig(), "eager", "eager"),
    (LlamaConfig(), "flash_attention_2", "flash_attention_2"),
    (MistralConfig(sliding_window=4096), None, None),  # windowed: transformers' packed mask keeps it exact
    (Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=0), None, None),
    (MistralConfig(sliding_window=None), None, packing.VARLEN_ATTENTION),
])
def test_training_attention_slices_only_plain_causal_models(config, requested, expected):
    assert packing.training_attention(config, requested) == expected


def test_unverified_architectures_train_on_padded_batches():
    from transformers import BloomConfig, GPT2Config

    assert packing.flattens(LlamaConfig()) and packing.flattens(Qwen2Config())
    assert not packing.flattens(BloomConfig())  # ALiBi positions come from the attention mask, not position ids
    assert not packing.flattens(GPT2Config())


def test_gemma2_softcapping_is_not_sliced():
    from transformers import Gemma2Config

    assert packing.training_attention(Gemma2Config(), None) is None


def test_padding_free_training_matches_padded_training(llama_dir, data_files, tmp_path):
    """Same examples, steps and seed: the two batch layouts train the same adapters; eval batches stay padded."""
    runs = {}
    for padding_free in (True, False):
        out = tmp_path / str(padding_free)
        trainer = train(load(recipe_args(
            "lora_bf16", llama_dir, data_files["alpaca"], out, dtype="float32", lora_dropout=0.0, max_steps=4,
            learning_rate=1e-3, eval_size=8, eval_strategy="no", logging_steps=1, padding_free=padding_free)))
        train_batch = next(iter(trainer.get_train_dataloader()))
        eval_batch = next(iter(trainer.get_eval_dataloader()))
        assert ("position_ids" in train_batch) == padding_free
        assert train_batch["input_ids"].shape[0] == (1 if padding_free else 4)
        assert "attention_mask" in eval_batch and "position_ids" not in eval_batch
        logs = trainer.state.log_history
        runs[padding_free] = {"adapters": lora_tensors(trainer.model),
                              "losses": [e["loss"] for e in logs if "loss" in e],
                              "eval_loss": next(e["eval_loss"] for e in logs if "eval_loss" in e),
                              "tokens": trainer.metrics.totals.input_tokens}
    flat, padded = runs[True], runs[False]
    assert len(padded["losses"]) == 4
    assert flat["tokens"] == padded["tokens"]
    assert flat["losses"] == pytest.approx(padded["losses"], rel=1e-4)
    assert flat["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-4)
    for name, tensor in padded["adapters"].items():
        torch.testing.assert_close(flat["adapters"][name], tensor, rtol=1e-3, atol=1e-5, msg=name)


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=128, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=32)


@pytest.mark.parametrize("window", [None, 8], ids=["no-window", "window-8"])
@pytest.mark.parametrize("model_type", sorted(packing.FLATTENING_MODEL_TYPES))
def test_every_flattening_architecture_keeps_examples_apart(model_type, window):
    """Each architecture run on flattened batches: loss equal to the per-example truth (a window of 8 tokens is
    shorter than most examples here, so windowed attention is exercised too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if window is not None:
        extra = {"sliding_window": window, "use_sliding_window": True}
    elif model_type in packing.VARLEN_MODEL_TYPES:  # the window, where there is one, is optional: off
        extra = {"sliding_window": None, "use_sliding_window": False}
    else:  # the architecture's default
        extra = {}
    config = AutoConfig.for_model(model_type, **SMALL, **extra)
    attention = packing.training_attention(config, None)
    if window is None and model_type in packing.VARLEN_MODEL_TYPES:
        assert attention == packing.VARLEN_ATTENTION
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()
    model.config.use_cache = False
    generator = torch.Generator().manual_seed(1)
    examples = [torch.randint(5, 120, (length,), generator=generator).tolist() for length in (7, 13, 1, 3, 20)]
    flat = packing.FlatteningCollator()([{"input_ids": e, "labels": e} for e in examples])
    with torch.no_grad():
        flat_loss = model(**flat).loss.item()
        total = sum(model(input_ids=torch.tensor([e]), labels=torch.tensor([e])).loss.item() * (len(e) - 1)
                    for e in examples if len(e) > 1)
    assert flat_loss == pytest.approx(total / sum(len(e) - 1 for e in examples), rel=TOLERANCE)
