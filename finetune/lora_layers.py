"""How the toolkit runs peft's LoRA linear layers in training: the same numbers as peft, with less work.

peft computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: three matmuls forward, five
backward, two of them skinny (rank-wide), and two full-size elementwise passes each way. Two changes, each only
where it keeps peft's numbers:

- In fp32 training on a CPU, the layer is one matmul against the merged weight `W + scaling * B @ A`, built for
  the step and not kept (it is rebuilt in the backward). The gradients of A and B are peft's formulas. The output
  differs from peft's by fp32 rounding only. Where a matmul rounds its inputs below fp32 (16-bit weights,
  autocast, TF32 or bf16 "fp32" matmuls), the merge would lose the adapter's small update to the rounding of W,
  so those keep peft's forward; so do GPUs, where it is not measured.
- Under autocast (mixed precision on a GPU), peft's cast of the 16-bit input to fp32, which autocast casts
  straight back, is left out.

Both apply only to plain LoRA layers on an `nn.Linear` without LoRA dropout (with dropout the adapter sees another
input than the base), DoRA or the other variants, and a LoRA bias; anything else runs peft's own forward.
"""
import torch
from peft.tuners.lora.layer import Linear as PeftLinear


def speed_up(model) -> int:
    """Give each plain LoRA linear layer of a peft model the two changes above. Returns how many layers took them.

    A layer takes them if it is peft's `Linear` around an `nn.Linear`, without LoRA dropout, variant (DoRA and the
    rest), LoRA bias or `fan_in_fan_out`. The layer stays peft's (`isinstance`, saving, merging, unloading).
    """
    layers = [layer for layer in model.modules() if type(layer) is PeftLinear and _plain(layer)]
    for layer in layers:
        layer._cast_input_dtype = _input_as_is_under_autocast  # a plain function: no cycle, picklable
        layer.__class__ = MergedWeightLinear
    return len(layers)


def _plain(layer) -> bool:
    return (type(layer.base_layer) is torch.nn.Linear and not layer.lora_variant and not layer.fan_in_fan_out
            and not any(layer.lora_bias.values())
            and all(isinstance(dropout, torch.nn.Identity) for dropout in layer.lora_dropout.values()))


def _input_as_is_under_autocast(x, dtype):
    """A LoRA layer's input cast (peft's `_cast_input_dtype`), left out where autocast casts `x` straight back."""
    if x is None or x.dtype == dtype:
        return x
    if dtype == torch.float32 and torch.is_autocast_enabled(x.device.type) and (
            torch.get_autocast_dtype(x.device.type) == x.dtype):
        return x
    return x.to(dtype)


def _full_precision_fp32_matmul() -> bool:
    """Whether CPU fp32 matmuls compute in fp32: not `torch.set_float32_matmul_precision("medium")` or oneDNN's
    bf16/TF32 setting, which round the inputs."""
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if mkldnn_matmul is not None and hasattr(mkldnn_matmul, "fp32_precision"):  # torch >= 2.9; follows the others
        return mkldnn_matmul.fp32_precision in ("none", "ieee")
    return torch.get_float32_matmul_precision() == "highest"


class MergedWeightLinear(PeftLinear):
    """peft's LoRA `Linear`, trained in fp32 by one matmul against `W + scaling * B @ A` (see the module's doc)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = None if args or kwargs else self._merged_weight_adapter(x)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        return MergedWeightMatmul.apply(x, base.weight, base.bias, self.lora_A[adapter].weight,
                                        self.lora_B[adapter].weight, self.scaling[adapter])

    def _merged_weight_adapter(self, x: torch.Tensor):
        """The one active adapter if this call can take the merged weight, else None (peft's forward)."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1 or not torch.is_grad_enabled():
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A:
            return None
        base, lora_A, lora_B = self.base_layer, self.lora_A[adapter], self.lora_B[adapter]
        weights = (base.weight, lora_A.weight, lora_B.weight)
        if (x.device.type != "cpu" or x.dtype != torch.float32 or any(w.dtype != torch.float32 for w in weights)
                or torch.is_autocast_enabled("cpu") or not _full_precision_fp32_matmul()):
            return None
        # The base trains (its gradient is not computed here), or the adapter doesn't.
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad) or not (
                lora_A.weight.requires_grad or lora_B.weight.requires_grad):
            return None
        # A hook on a submodule expects it to be called: offloading (accelerate), ZeRO-3 gathering (DeepSpeed).
        if any(module._forward_pre_hooks or module._forward_hooks or hasattr(module, "_hf_hook")
               for module in (base, lora_A, lora_B)):
            return None
        # Building the merged weight (forward, and again backward) reads and writes a weight-sized matrix whatever
        # the number of tokens; what it saves grows with them. Merged time over peft's on a 2-core CPU at rank 16
        # (`make bench-lora`): width 512: 1.06 at 256 tokens, 0.84 at 1,024; width 2,048: 1.05 at 1,024, 0.82 at
        # 4,096. So: from as many tokens as the layer's narrower side.
        if x.numel() // x.shape[-1] < min(base.in_features, base.out_features):
            return None
        return adapter


class MergedWeightMatmul(torch.autograd.Function):
    """`x @ (W + s * B @ A).T + bias` with the gradients of x, A and B (W and the bias are frozen).

    Saves x and the weights, not the merged weight (one weight-sized matrix per layer): the backward rebuilds it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return torch.nn.functional.linear(x, torch.addmm(weight, lora_B, lora_A, alpha=scaling), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        scaling = ctx.scaling
        grad_2d, x_2d = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_2d @ torch.addmm(weight, lora_B, lora_A, alpha=scaling)).view(x.shape)
        if ctx.needs_input_grad[3]:
            grad_A = (grad_2d @ lora_B).t() @ x_2d
            grad_A.mul_(scaling)
        if ctx.needs_input_grad[4]:
            grad_B = grad_2d.t() @ (x_2d @ lora_A.t())
            grad_B.mul_(scaling)
        return grad_x, None, None, grad_A, grad_B, None
