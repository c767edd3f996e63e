"""RMSNorm in fp32 training with its backward written out: the same numbers as transformers', a third of the passes.

transformers' RMSNorm (Llama's, copied as is into Qwen2, Qwen3, Mistral and others) is five elementwise operations,
and autograd's backward for them is about a dozen full-size passes: `pow`'s backward alone recomputes `x ** 1` and
multiplies twice, and the broadcast `x * rstd` is reduced back. Written out, the backward is
`rstd * (g * w - x * rstd**2 * mean(g * w * x))`: four passes. The forward is the same operations in the same order
(bit-equal output); the gradient differs by fp32 rounding (about 1e-6 of its size). One norm's forward and backward
takes 0.53-0.73x transformers' time (`make bench-lora`); a forward and backward of `make bench-train`'s CPU model,
about 2% less (benchmarks/RESULTS.md).

It applies to fp32 inputs and weights (fp32 training; a 16-bit model's norm computes in fp32 and rounds before the
weight, which this keeps to transformers' code), with autograd recording, outside forward-mode AD and `torch.func`
transforms; every other call runs transformers' forward. Its backward is not itself differentiable: a second
derivative through the norm (`create_graph=True`) is refused with torch's error for that.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

_REFERENCE = LlamaRMSNorm.forward.__code__
_OWN_ATTRIBUTES = {"__module__", "__qualname__", "__doc__", "__init__", "forward", "extra_repr", "__firstlineno__",
                   "__static_attributes__", "kernel_layer_name"}  # what a copy of Llama's norm class defines


def _llamas_norm(cls) -> bool:
    """Whether `cls` is a copy of Llama's RMSNorm: an `nn.Module` defining nothing but Llama's forward (the same
    bytecode), its constructor and repr; a class that overrides anything else is left alone."""
    code = getattr(cls.forward, "__code__", None)
    return (cls.__bases__ == (torch.nn.Module,) and not set(vars(cls)) - _OWN_ATTRIBUTES and code is not None
            and (code.co_code, code.co_consts, code.co_names) == (
                _REFERENCE.co_code, _REFERENCE.co_consts, _REFERENCE.co_names))


def speed_up(model) -> int:
    """Make each RMSNorm of `model` whose forward is Llama's own code (any architecture's copy of it) this module's
    `RMSNorm`; returns how many. A norm with other code (Gemma's `1 + weight`, a hub kernel) is left as it is."""
    norms = [module for module in model.modules()
             if _llamas_norm(type(module)) and isinstance(getattr(module, "weight", None), torch.Tensor)
             and module.weight.dim() == 1 and hasattr(module, "variance_epsilon")]
    for norm in norms:
        norm.__class__ = RMSNorm
    return len(norms)


class RMSNorm(LlamaRMSNorm):
    """transformers' RMSNorm with a written-out backward where the call is fp32 training."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if (hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32 and torch.is_grad_enabled()
                and (hidden_states.requires_grad or self.weight.requires_grad)
                and hidden_states.shape[-1:] == self.weight.shape and not transformed(hidden_states)):
            return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
        return super().forward(hidden_states)


def transformed(tensor) -> bool:
    """Whether `tensor` is under forward-mode AD or a `torch.func` transform (grad, vmap), which the toolkit's
    autograd Functions (here and in `finetune.kernels.lora_layers`) do not implement. Both read torch's private state,
    defensively."""
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0 or bool(wrapped and wrapped(tensor))


class RMSNormFunction(torch.autograd.Function):
    """`weight * x * rsqrt(mean(x**2, -1) + eps)`, as transformers computes it, with its gradients written out."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, rstd, weight)
        return (x * rstd).mul_(weight)  # weight * (x * rstd), as transformers: the same products

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_normed = grad * weight
            # d/dx of x * rstd, applied to grad_normed: rstd * grad_normed - x * rstd**3 * mean(grad_normed * x)
            correction = (grad_normed * x).sum(-1, keepdim=True).mul_(rstd.pow(3).div_(x.shape[-1]))
            grad_x = grad_normed.mul_(rstd).sub_(x * correction)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * (x * rstd)).reshape(-1, x.shape[-1]).sum(0)
        return grad_x, grad_weight, None
