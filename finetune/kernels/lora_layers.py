"""How the toolkit runs peft's LoRA linear layers in training: the same numbers as peft, with less work.

peft computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: three matmuls forward (two of them
rank-wide) and five backward, and full-size elementwise passes for the scale and the add. Two changes, each only where
it keeps peft's numbers:

- Merged weight, in fp32 training on a CPU: the forward builds `W + scaling * B @ A` (a rank-wide matmul whose
  result is weight-sized) and makes one full matmul against it; the backward rebuilds it for the input's gradient
  and computes the gradients of A and B by peft's formulas. That saves the full-size elementwise passes and the
  rank-wide matmuls' overhead at the cost of a weight-sized temporary per call, which pays from enough tokens (see
  `_merged_weight_adapter`). The output differs from peft's by fp32 rounding only. Where a matmul rounds its inputs
  below fp32 (16-bit weights, autocast, TF32 or bf16 "fp32" matmuls), the merge would lose the adapter's small update
  to the rounding of W, so those keep peft's forward; so do GPUs, where it is not measured.
- Under autocast (mixed precision on a GPU), peft's cast of the 16-bit input to fp32, which autocast casts
  straight back, is left out.

Both are decided on each call, from the active adapter: only a plain LoRA adapter (no dropout, which would give the
adapter another input than the base; no DoRA or other variant; no LoRA bias) takes them; anything else runs peft's
own forward, bit for bit.
"""
import torch
from peft.tuners.lora.layer import Linear as PeftLinear

from finetune.kernels.norms import transformed


def speed_up(model) -> int:
    """Make each of a peft model's LoRA linear layers around an `nn.Linear` (not `fan_in_fan_out`) this module's
    `Linear`, which stays peft's (`isinstance`, saving, merging, unloading, its name in logs). Returns how many."""
    layers = [layer for layer in model.modules()
              if type(layer) is PeftLinear and type(layer.base_layer) is torch.nn.Linear and not layer.fan_in_fan_out]
    for layer in layers:
        layer.__class__ = Linear
    return len(layers)


def _full_precision_fp32_matmul() -> bool:
    """Whether CPU fp32 matmuls compute in fp32: not `torch.set_float32_matmul_precision("medium")` or oneDNN's
    bf16/TF32 setting, which round the inputs."""
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if mkldnn_matmul is not None and hasattr(mkldnn_matmul, "fp32_precision"):  # torch >= 2.9; follows the others
        return mkldnn_matmul.fp32_precision in ("none", "ieee")
    return torch.get_float32_matmul_precision() == "highest"


def _hooked(module) -> bool:
    """A hook expects its module called: offloading (accelerate), ZeRO-3 gathering, backward hooks, tracers."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks or hasattr(module, "_hf_hook"))


_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                 "_global_backward_hooks")


class Linear(PeftLinear):
    """peft's LoRA `Linear` with the two changes of this module, each taken only where it keeps peft's numbers.

    Named as peft's, so that the model prints and logs as peft's does."""

    def _plain_adapter(self):
        """The one active adapter if it is plain LoRA (no dropout, variant or LoRA bias), else None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        if (adapter not in self.lora_A or adapter in self.lora_variant or self.lora_bias.get(adapter)
                or not isinstance(self.lora_dropout[adapter], torch.nn.Identity)):
            return None
        return adapter

    def _cast_input_dtype(self, x, dtype):
        """peft's input cast, left out for a plain adapter where autocast casts `x` straight back to its dtype."""
        if (x is not None and x.dtype != dtype and dtype == torch.float32
                and torch.is_autocast_enabled(x.device.type)
                and torch.get_autocast_dtype(x.device.type) == x.dtype and self._plain_adapter() is not None):
            return x
        return super()._cast_input_dtype(x, dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = None if args or kwargs else self._merged_weight_adapter(x)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        return self.merged_weight_forward(x, adapter)

    def merged_weight_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The layer through the merged weight of `adapter`, whether or not this call would take it."""
        base = self.base_layer
        return MergedWeightMatmul.apply(x, base.weight, base.bias, self.lora_A[adapter].weight,
                                        self.lora_B[adapter].weight, self.scaling[adapter])

    def _merged_weight_adapter(self, x: torch.Tensor):
        """The active adapter if this call can take the merged weight, else None (peft's forward)."""
        if not torch.is_grad_enabled() or x.device.type != "cpu" or x.dim() < 2:
            return None
        adapter = self._plain_adapter()
        if adapter is None or not isinstance(self.scaling[adapter], (int, float)):
            return None
        base, lora_A, lora_B = self.base_layer, self.lora_A[adapter], self.lora_B[adapter]
        if (x.dtype != torch.float32 or any(w.dtype != torch.float32 for w in (base.weight, lora_A.weight,
                                                                               lora_B.weight))
                or torch.is_autocast_enabled("cpu") or not _full_precision_fp32_matmul()):
            return None
        # The base trains (its gradient is not computed here), or the adapter doesn't.
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad) or not (
                lora_A.weight.requires_grad or lora_B.weight.requires_grad):
            return None
        if any(_hooked(module) for module in (base, lora_A, lora_B)) or any(
                getattr(torch.nn.modules.module, hooks, None) for hooks in _GLOBAL_HOOKS):
            return None
        if transformed(x):  # forward-mode AD or torch.func: no jvp or vmap rule here
            return None
        # Building the merged weight (forward, and again backward) reads and writes a weight-sized matrix whatever
        # the number of tokens; what it saves grows with them. Merged time over peft's on a 2-core CPU at rank 16
        # (`make bench-lora`, benchmarks/RESULTS.md): width 512: 1.00 at 256 tokens, 0.83 at 1,024; width 2,048:
        # 1.27 at 256, 1.00 at 1,024, 0.79 at 4,096. So: from as many tokens as the layer's narrower side.
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
