"""Training FLOPs and model FLOPs utilisation (MFU): the formula, and the GPUs' peak throughput.

Pure functions of a model's shape and token counts; the run summary (`finetune.training.metrics`) and the training-speed
benchmark both call `training_flops`, so they count the same way.
"""

from __future__ import annotations

# Dense bf16/fp16 tensor-core peak, FLOP/s per device, by a substring of torch.cuda.get_device_name().
# Matched in order: the more specific names first.
PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


def flops_per_token(matmul_params: int, layers: int, hidden_size: int, context: float, lora: bool) -> float:
    """Training FLOPs per token: (4 if LoRA else 6) x matmul params + 12 x layers x hidden x context (attention).

    The forward pass costs 2 FLOPs per weight, the backward 2 for activation gradients and, only where weights
    train, 2 for weight gradients: LoRA skips those for the frozen base (~4N), full fine-tuning doesn't (~6N).
    Attention scores and context add 4 x hidden x context per layer forward, 3x for forward and backward.
    """
    return (4 if lora else 6) * matmul_params + 12 * layers * hidden_size * context


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of one GPU from the table above, or None when unknown."""
    if not device_name:
        return None
    for name, flops in PEAK_FLOPS:
        if name in device_name:
            return flops
    return None


def mfu(total_flops: float, seconds: float, device_name: str | None, world_size: int) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices, or None when the peak is unknown."""
    peak = peak_flops(device_name)
    if peak is None or seconds <= 0:
        return None
    return total_flops / seconds / (peak * world_size)


def matmul_parameters(model, total_params: int) -> int:
    """Parameters that cost FLOPs per token: all but the input embedding lookup (a tied output head counts)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings().weight
    output = base.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    return total_params - embedding.numel() + (embedding.numel() if tied else 0)


def forward_flops_per_token(matmul_params: int, layers: int, hidden_size: int, context: float) -> float:
    """Forward-only FLOPs per token (a reference model's, or a pass without gradients): 2 x matmul params + attention's
    4 x layers x hidden x context."""
    return 2 * matmul_params + 4 * layers * hidden_size * context


def training_flops(model, total_params: int, input_tokens: float, samples: float, lora: bool,
                   extra_forwards: int = 0, sequences_per_sample: int = 1) -> float:
    """Training FLOPs over `input_tokens` tokens in `samples` examples of `sequences_per_sample` sequences each (a
    preference pair has two), whose mean length is the attention context; plus `extra_forwards` forward-only
    passes over as many tokens (a preference objective's reference model, `finetune.training.metrics`)."""
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    sequences = samples * sequences_per_sample
    context = input_tokens / sequences if sequences else 0.0
    shape = (matmul_parameters(model, total_params), text_config.num_hidden_layers, text_config.hidden_size, context)
    return input_tokens * (flops_per_token(*shape, lora) + extra_forwards * forward_flops_per_token(*shape))
