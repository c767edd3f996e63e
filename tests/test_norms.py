"""The toolkit's RMSNorm (finetune/kernels/norms.py): transformers' output bit for bit, its gradients to fp32
rounding, and transformers' own forward wherever the written-out backward does not apply."""

from __future__ import annotations

import contextlib
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from finetune.embedded.tiny import build_model_config
from finetune.kernels import norms
from finetune.kernels.norms import RMSNorm, RMSNormFunction
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


SHAPES = {"2d": (5, 48), "3d": (3, 17, 48), "4d": (2, 9, 4, 48)}  # 4-D: Qwen3's per-head q/k norms


@pytest.mark.parametrize("trained_weight", [False, True], ids=["frozen-weight", "trained-weight"])
@pytest.mark.parametrize("shape", ["2d", "3d", "4d", "transposed"])
def test_equal_to_transformers(shape, trained_weight, function_calls):
    reference, ours = pair(trained_weight=trained_weight)
    if shape == "transposed":  # a non-contiguous view, as a (batch, heads, tokens, head_dim) transpose gives
        x, grad = (torch.randn(3, 11, 48).transpose(0, 1) * 3, torch.randn(11, 3, 48))
    else:
        x, grad = torch.randn(SHAPES[shape]) * 3, torch.randn(SHAPES[shape])
    y_ref, gx_ref, gw_ref = output_and_grads(reference, x, grad)
    y, gx, gw = output_and_grads(ours, x, grad)
    assert len(function_calls) == 1
    assert torch.equal(y, y_ref)  # the same operations in the same order
    assert (gx - gx_ref).abs().max() <= 1e-6 * gx_ref.abs().max()
    if trained_weight:
        assert (gw - gw_ref).abs().max() <= 1e-6 * gw_ref.abs().max()
    else:
        assert gw is None and gw_ref is None


@pytest.mark.parametrize("case", ["bf16", "bf16-weight", "no-grad", "broadcast", "forward-ad", "torch-func"])
def test_transformers_forward_where_it_does_not_apply(case, function_calls):
    """Each guard on its own: the other conditions hold (fp32, a trained weight, grad enabled), so taking the
    Function here would be the guard's failure. Where it is taken, forward AD and torch.func raise (no jvp)."""
    reference, ours = pair(trained_weight=True)
    if case == "bf16-weight":  # an fp32 input, a bf16 weight
        for norm in (reference, ours):
            norm.weight.data = norm.weight.data.bfloat16()
    x = torch.randn(2, 7, 1 if case == "broadcast" else 48,  # "bf16": a bf16 input, an fp32 weight
                    dtype=torch.bfloat16 if case == "bf16" else torch.float32, requires_grad=True)
    if case == "forward-ad":
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            dual = fwAD.make_dual(x.detach(), torch.ones_like(x))
            out, tangent = fwAD.unpack_dual(ours(dual))
            ref, ref_tangent = fwAD.unpack_dual(reference(dual))
        assert torch.equal(tangent, ref_tangent)
    elif case == "torch-func":
        out = torch.func.grad(lambda t: ours(t).sum())(x.detach())
        ref = torch.func.grad(lambda t: reference(t).sum())(x.detach())
    else:
        with torch.no_grad() if case == "no-grad" else contextlib.nullcontext():
            out, ref = ours(x), reference(x)
    assert not function_calls
    assert torch.equal(out, ref)


def test_a_second_derivative_is_refused_with_torchs_error():
    _, ours = pair()
    x = torch.randn(4, 48, requires_grad=True)
    (grad,) = torch.autograd.grad(ours(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_only_norms_with_llamas_code_are_swapped():
    """Llama's and Qwen2's norms (the same code) are swapped; Gemma's (`1 + weight`) and a class that adds a method
    of its own to Llama's forward are not; the module still pickles and prints its shape."""
    class Overriding(torch.nn.Module):  # Llama's forward, and a method of its own
        forward = LlamaRMSNorm.forward

        def __init__(self, width):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.ones(width)), 1e-6

        def reset_parameters(self):
            torch.nn.init.ones_(self.weight)

    modules = torch.nn.ModuleList([LlamaRMSNorm(8), Qwen2RMSNorm(8), GemmaRMSNorm(8), Overriding(8)])
    assert norms.speed_up(modules) == 2
    assert [type(module) for module in modules] == [RMSNorm, RMSNorm, GemmaRMSNorm, Overriding]
    assert norms.speed_up(modules) == 0  # once
    assert type(pickle.loads(pickle.dumps(modules[0]))) is RMSNorm
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
