"""The toolkit's RMSNorm (finetune/norms.py): transformers' output bit for bit, its gradients to fp32 rounding, and
transformers' own forward wherever the written-out backward does not apply."""

from __future__ import annotations

import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from finetune import norms
from finetune.norms import RMSNorm, RMSNormFunction
from finetune.tiny import build_model_config
from tests.conftest import load, lora_model
from tests.test_train import recipe_args


@pytest.fixture
def function_calls(monkeypatch) -> list:
    calls, apply = [], RMSNormFunction.apply
    monkeypatch.setattr(RMSNormFunction, "apply", lambda *args: calls.append(args) or apply(*args))
    return calls


def pair(width: int = 48, dtype=torch.float32, trained_weight: bool = False):
    """transformers' RMSNorm and a copy made the toolkit's, with a non-trivial weight."""
    torch.manual_seed(0)
    reference = Qwen2RMSNorm(width, eps=1e-5).to(dtype)
    torch.nn.init.normal_(reference.weight, mean=1.0, std=0.5)
    reference.weight.requires_grad_(trained_weight)
    ours = Qwen2RMSNorm(width, eps=1e-5).to(dtype)
    ours.load_state_dict(reference.state_dict())
    ours.weight.requires_grad_(trained_weight)
    assert norms.speed_up(torch.nn.Sequential(ours)) == 1 and type(ours) is RMSNorm
    return reference, ours


def output_and_grads(norm, x, grad):
    x = x.detach().clone().requires_grad_(True)
    y = norm(x)
    y.backward(grad)
    return y.detach(), x.grad, norm.weight.grad


@pytest.mark.parametrize("trained_weight", [False, True], ids=["frozen-weight", "trained-weight"])
@pytest.mark.parametrize("shape", [(3, 17, 48), (5, 48)])
def test_equal_to_transformers(shape, trained_weight, function_calls):
    reference, ours = pair(trained_weight=trained_weight)
    x, grad = torch.randn(shape) * 3, torch.randn(shape)
    y_ref, gx_ref, gw_ref = output_and_grads(reference, x, grad)
    y, gx, gw = output_and_grads(ours, x, grad)
    assert len(function_calls) == 1
    assert torch.equal(y, y_ref)  # the same operations in the same order
    assert (gx - gx_ref).abs().max() <= 1e-6 * gx_ref.abs().max()
    if trained_weight:
        assert (gw - gw_ref).abs().max() <= 1e-6 * gw_ref.abs().max()
    else:
        assert gw is None and gw_ref is None


@pytest.mark.parametrize("case", ["bf16", "no-grad", "forward-ad"])
def test_transformers_forward_where_it_does_not_apply(case, function_calls):
    reference, ours = pair(dtype=torch.bfloat16 if case == "bf16" else torch.float32)
    x = torch.randn(2, 7, 48, dtype=reference.weight.dtype, requires_grad=case != "no-grad")
    if case == "forward-ad":
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            dual = fwAD.make_dual(x.detach(), torch.ones_like(x))
            out, tangent = fwAD.unpack_dual(ours(dual))
            ref, ref_tangent = fwAD.unpack_dual(reference(dual))
        assert torch.equal(tangent, ref_tangent)
    else:
        out, ref = ours(x), reference(x)
    assert not function_calls
    assert torch.equal(out, ref)


def test_only_norms_with_llamas_code_are_swapped():
    """Llama's and Qwen2's norms (the same code) are swapped, Gemma's (`1 + weight`) is not; the module still pickles
    and prints its shape."""
    modules = torch.nn.ModuleList([LlamaRMSNorm(8), Qwen2RMSNorm(8), GemmaRMSNorm(8)])
    assert norms.speed_up(modules) == 2
    assert [type(module) for module in modules] == [RMSNorm, RMSNorm, GemmaRMSNorm]
    assert norms.speed_up(modules) == 0  # once
    assert type(pickle.loads(pickle.dumps(modules))[0]) is RMSNorm
    assert repr(modules[0]) == "RMSNorm((8,), eps=1e-06)"


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_whole_model_loss_and_gradients(architecture):
    """A full fine-tune of a tiny model: every norm (weights trained) swapped, the loss equal and every gradient
    to 1e-5 of its size."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_model_config(architecture, hidden_size=64, layers=2)).train()
    swapped = [module for module in model.modules() if "RMSNorm" in type(module).__name__]
    classes = {module: type(module) for module in swapped}
    ids = torch.randint(0, model.config.vocab_size, (2, 30))

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = loss_and_grads()
    assert norms.speed_up(model) == len(swapped) == 2 * 2 + 1
    loss, grads = loss_and_grads()
    assert loss == ref_loss
    for name, grad in ref_grads.items():
        assert (grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    for module, kind in classes.items():
        module.__class__ = kind


def test_the_training_model_has_them(llama_dir, data_files, tmp_path):
    recipe = load(recipe_args("lora_bf16", llama_dir, data_files["alpaca"], tmp_path, dtype="float32"))
    model = lora_model(recipe, padding_free=False)
    assert sum(type(module) is RMSNorm for module in model.modules()) == 2 * 2 + 1
