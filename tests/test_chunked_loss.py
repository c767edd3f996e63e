"""The chunked training loss: the same loss and gradients as transformers' full-logits loss, without the logits."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from finetune.data import padding_free as packing
from finetune.data.load import IGNORE_INDEX, load_splits
from finetune.embedded.tiny import build_model_config, build_tokenizer
from finetune.kernels import chunked_loss
from finetune.model.load import load_tokenizer
from finetune.run import train
from tests.conftest import load, lora_model, recipe_argv

TOLERANCE = 1e-5  # fp32, relative: the same sums, chunked


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Five tokens per chunk on the tiny models' 128-token vocabulary, so that every batch is split many times."""
    monkeypatch.setattr(chunked_loss, "LOGITS_CHUNK_BYTES", 5 * 4 * 128)


@pytest.fixture(scope="module")
def untied_llama_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("untied")
    config = build_model_config("llama", hidden_size=64, layers=2)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


def recipe_args(model_dir, dataset, output_dir, **overrides) -> list[str]:
    return recipe_argv("lora_bf16", **{"model_name_or_path": model_dir, "dataset": dataset, "output_dir": output_dir,
                                       "dtype": "float32", "lora_dropout": 0.0, "max_steps": 3,
                                       "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                                       "learning_rate": 1e-2, "report_to": "none", "disable_tqdm": "true",
                                       **overrides})


def _causal(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _batch(recipe, padding_free: bool):
    """Real training features (answer-only labels, lengths spread out), flattened or padded."""
    tokenizer = load_tokenizer(recipe.model)
    split, *_ = load_splits(recipe.data, tokenizer, 0, recipe.training.main_process_first)
    features = [{key: split[i][key] for key in ("input_ids", "labels")} for i in range(6)]
    if padding_free:
        return packing.FlatteningCollator()(features)
    return dict(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(features))


def _loss_and_grads(model, batch):
    model.zero_grad()
    output = model(**batch)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return output, grads


@pytest.mark.parametrize("architecture, use_lora", [("llama", True), ("qwen2", True), ("untied_llama", False),
                                                    ("llama", False)])
@pytest.mark.parametrize("padding_free", [True, False], ids=["flattened", "padded"])
@pytest.mark.parametrize("accumulated", [False, True], ids=["one-micro-batch", "grad-accumulation"])
def test_chunked_loss_and_gradients_equal_transformers(architecture, use_lora, padding_free, accumulated, request,
                                                       data_files, tmp_path):
    recipe = load(recipe_args(request.getfixturevalue(f"{architecture}_dir"), data_files["alpaca"], tmp_path,
                              use_lora=str(use_lora).lower()))
    model = lora_model(recipe, padding_free)
    causal = _causal(model)
    assert "forward" in vars(causal), "the chunked loss should be on by default for this model"
    batch = _batch(recipe, padding_free)
    if accumulated:  # the Trainer's count over every micro-batch of the step: the loss is a part of the step's
        batch["num_items_in_batch"] = torch.tensor(3 * int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))

    chunked, chunked_grads = _loss_and_grads(model, batch)
    del causal.forward  # back to the model class's own forward: full logits, transformers' loss
    standard, standard_grads = _loss_and_grads(model, batch)

    assert chunked.logits is None and standard.logits is not None
    assert chunked.loss.item() == pytest.approx(standard.loss.item(), rel=TOLERANCE)
    trained = [name for name, grad in standard_grads.items() if grad.abs().sum() > 0]
    assert trained and (not use_lora or any("lora_A" in name for name in trained))
    if not use_lora:  # the head trains: tied, through the embedding's weight; untied, its own
        head = "lm_head.weight" if architecture == "untied_llama" else "model.embed_tokens.weight"
        assert head in trained
    for name, grad in standard_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_no_full_vocabulary_logits_are_kept_for_backward(llama_dir, data_files, tmp_path):
    recipe = load(recipe_args(llama_dir, data_files["alpaca"], tmp_path))
    model = lora_model(recipe, padding_free=True)
    batch = _batch(recipe, padding_free=True)
    vocab = _causal(model).config.vocab_size
    head_storage = _causal(model).lm_head.weight.untyped_storage().data_ptr()

    def widest_saved_logits() -> int:
        """Rows of the largest tensor (the head's weight aside) with the vocabulary as its last dimension that autograd
        keeps for a backward pass."""
        widest = [0]

        def pack(tensor):
            if tensor.shape and tensor.shape[-1] == vocab and tensor.untyped_storage().data_ptr() != head_storage:
                widest[0] = max(widest[0], tensor.numel() // vocab)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(**batch).loss.backward()
        return widest[0]

    chunked_rows = widest_saved_logits()
    del _causal(model).forward
    tokens = batch["input_ids"].numel()
    assert widest_saved_logits() >= tokens  # the standard path keeps every position's logits
    assert 0 < chunked_rows <= chunked_loss.chunk_tokens(vocab) < tokens  # one chunk's, while its gradients form


def test_a_lora_head_falls_back_to_full_logits_and_says_why(llama_dir, data_files, tmp_path, caplog):
    recipe = load(recipe_args(llama_dir, data_files["alpaca"], tmp_path)
                  + ["--lora_target_modules", "q_proj", "v_proj", "lm_head"])
    with caplog.at_level("INFO", logger="finetune.kernels.chunked_loss"):
        model = lora_model(recipe, padding_free=True)
    assert "forward" not in vars(_causal(model))
    assert "chunked loss off: its output head (lm_head) is a Linear" in caplog.text
    assert "LoRA adapter" in caplog.text
    output = model(**_batch(recipe, padding_free=True))
    assert output.logits is not None and torch.isfinite(output.loss)


def test_an_unlisted_architecture_falls_back_with_its_reason():
    from transformers import GraniteConfig, GraniteForCausalLM

    granite = GraniteForCausalLM(GraniteConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, logits_scaling=4.0))
    reason = chunked_loss.unsupported(granite)
    assert reason is not None and "'granite'" in reason
    assert not chunked_loss.install(granite) and "forward" not in vars(granite)


def test_turned_off_by_the_recipe(llama_dir, data_files, tmp_path):
    recipe = load(recipe_args(llama_dir, data_files["alpaca"], tmp_path, chunked_loss="false"))
    assert recipe.model.chunked_loss is False
    assert "forward" not in vars(_causal(lora_model(recipe, padding_free=True)))


@pytest.mark.parametrize("padding_free", [True, False], ids=["flattened", "padded"])
def test_training_run_equals_the_run_with_it_off(padding_free, llama_dir, data_files, tmp_path):
    """Whole runs through the Trainer, gradient accumulation included: same logged losses, same adapter."""
    runs = {}
    for on in (True, False):
        runs[on] = train(load(recipe_args(llama_dir, data_files["alpaca"], tmp_path / str(on),
                                          chunked_loss=str(on).lower(), padding_free=str(padding_free).lower(),
                                          gradient_accumulation_steps=2, logging_steps=1, eval_size=0,
                                          eval_strategy="no")))
    assert "forward" in vars(_causal(runs[True].model)) and "forward" not in vars(_causal(runs[False].model))
    losses = {on: [e["loss"] for e in trainer.state.log_history if "loss" in e] for on, trainer in runs.items()}
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=TOLERANCE)
    assert len(set(losses[True])) > 1  # the adapters moved between steps
    weights = {on: {n: p.detach() for n, p in t.model.named_parameters() if "lora_" in n} for on, t in runs.items()}
    # Adam turns a near-zero gradient's rounding into up to a whole step (lr): allow 1% of one step.
    step = runs[True].args.learning_rate
    for name, tensor in weights[False].items():
        torch.testing.assert_close(weights[True][name], tensor, rtol=1e-4, atol=0.01 * step, msg=name)
