"""Padding-free batches: the examples of a micro-batch laid end to end in one row, each still attending only to itself.

A padded batch of 8 examples between 32 and 512 tokens long is mostly padding (about 2.2x the real tokens on
instruction-like data); every linear layer computes on it anyway. Flattening (transformers'
`DataCollatorWithFlattening`) removes it: one row, position ids restarting at 0 for each example, and the first
label of each example set to -100 so that no token is trained to predict the next example.

The flattened row must not let one example attend to another. How that is kept exact depends on the attention:
- flash_attention_2/3 use the sequence boundaries (`cu_seq_lens_*`) that the collator passes;
- eager, sdpa and flex_attention get a block-diagonal mask that transformers builds from the position ids
  (the model's `use_cache` must be off, or it skips that step: `load_model` turns it off for training);
- `sdpa_varlen`, the toolkit's default for the plain-causal architectures in `VARLEN_MODEL_TYPES`, attends within
  each example only, so that attention costs sum(L_i^2) instead of (sum L_i)^2 and no mask is built: on an NVIDIA
  GPU in 16-bit by torch's flash varlen kernel (one call per layer, the boundaries read on the device; see
  `flash_varlen_function` for what it needs), elsewhere by causal SDPA on each example's slice.
Eval batches stay padded (the Trainer weighs eval losses by rows, and one flattened row would hide that).
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

VARLEN_ATTENTION = "sdpa_varlen"
# Architectures whose attention is plain causal softmax attention over the whole sequence (no sliding windows,
# logit soft-capping or attention sinks), and whose layers pass the collator's boundaries on to the attention
# function, so that slicing per example is exact. (stablelm, for one, does not pass them on.)
VARLEN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo", "olmo2", "granite",
                                "smollm3", "starcoder2"})
# Architectures whose flattened batches are kept exact by transformers' own masks (rotary positions from the
# position ids, masks from `masking_utils`): the ones above plus windowed, soft-capped and mixture-of-experts models.
# tests/test_padding_free.py checks each against per-example ground truth. Other models train on padded batches.
FLATTENING_MODEL_TYPES = VARLEN_MODEL_TYPES | {"gemma2", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe", "phi",
                                               "stablelm"}

_lengths_cache: tuple[object, list[int]] | None = None  # (cu_seq_lens tensor, its lengths), reused by every layer


def sequence_lengths(cu_seq_lens) -> list[int]:
    """The examples' lengths from the cumulative sequence lengths, on the host; computed once per forward pass, not
    once per layer.

    On a GPU, reading the tensor is a device sync: this keeps it to one per forward (zero on CPU).
    """
    global _lengths_cache
    if _lengths_cache is None or _lengths_cache[0] is not cu_seq_lens:
        bounds = cu_seq_lens.tolist()
        _lengths_cache = (cu_seq_lens, [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)])
    return _lengths_cache[1]


@functools.cache
def _varlen_attn():
    """torch's variable-length flash attention, causal, with grouped-query heads where this torch asks for them to be
    declared; None for a torch without it, or whose version of it takes no scale (2.10's: models such as Granite
    scale attention their own way)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if not {"scale", "window_size"} <= parameters.keys():
        return None
    options = {"window_size": (-1, 0)}  # (-1, 0): every earlier token, none later
    if "enable_gqa" in parameters:  # newer versions refuse fewer key heads unless told; 2.11 takes them as they are
        options["enable_gqa"] = True
    return functools.partial(varlen_attn, **options)


def flash_varlen_function(query, dropout: float):
    """torch's flash varlen attention (causal) where it can run `query`, else None. It needs an NVIDIA GPU (not ROCm)
    of compute capability 8.0 or later, 16-bit inputs, a head size flash takes (a multiple of 8, at most 256; at
    most 192 on GPUs other than sm80/sm90, whose backward is the only one above that), no attention dropout (it has
    none) and torch 2.11 or later."""
    import torch

    if not (query.is_cuda and torch.version.hip is None and query.dtype in (torch.bfloat16, torch.float16)
            and not dropout and query.shape[-1] % 8 == 0):
        return None
    capability = torch.cuda.get_device_capability(query.device)
    if capability < (8, 0) or query.shape[-1] > (256 if capability in ((8, 0), (9, 0)) else 192):
        return None
    return _varlen_attn()


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention within each example of a flattened row (bounds from `cu_seq_lens_q`): torch's flash varlen
    kernel over the whole row in one call where `flash_varlen_function` allows it (an NVIDIA GPU, 16-bit), else
    SDPA on each example's slice.

    query/key/value are (1, heads, tokens, head_dim), as transformers passes them; the output is
    (1, tokens, heads, head_dim). Without `cu_seq_lens_q` (padded eval batches) this is transformers' SDPA.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.pop("cu_seq_lens_q", None)
    if cu_seq_lens is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    flash = flash_varlen_function(query, dropout)
    if flash is not None:
        longest = kwargs.get("max_length_q") or max(sequence_lengths(cu_seq_lens))  # the collator's: no sync
        cu_seq_lens = cu_seq_lens.to(query.device, torch.int32)
        q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))  # (tokens, heads, head_dim)
        return flash(q, k, v, cu_seq_lens, cu_seq_lens, longest, longest, scale=scaling).unsqueeze(0), None
    lengths = sequence_lengths(cu_seq_lens)
    # split, not indexing: the backward of a split is one concatenation, that of each slice a full-size zero tensor.
    pieces = (tensor.split(lengths, dim=2) for tensor in (query, key, value))
    slices = [sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling)[0]
              for q, k, v in zip(*pieces, strict=True)]
    return torch.cat(slices, dim=1), None


def sdpa_varlen_mask(*args, attention_mask=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, **kwargs):
    """The mask for `sdpa_varlen`: none for a flattened row (the attention slices it), SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not q_offset and not kv_offset:
        return None  # a training row: causal within each example, which the attention function does itself
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, **kwargs)


def register() -> None:
    """Make `attn_implementation="sdpa_varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, sdpa_varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_varlen_mask)


def flattens(config) -> bool:
    """Whether flattened batches of this model's architecture are known to keep examples apart exactly."""
    return getattr(config, "model_type", None) in FLATTENING_MODEL_TYPES


def training_attention(config, requested: str | None) -> str | None:
    """The attention implementation to train with on flattened batches, given the recipe's choice (None = default).

    SDPA (asked for or the default) becomes `sdpa_varlen` where the architecture allows it; every other choice is
    kept, since transformers keeps flattened examples apart under each of them.
    """
    if requested not in (None, "sdpa"):
        return requested
    if getattr(config, "model_type", None) not in VARLEN_MODEL_TYPES:
        return requested
    layer_types = getattr(config, "layer_types", None) or []
    windowed = any(kind != "full_attention" for kind in layer_types) or (
        getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
        and not layer_types)
    if windowed:
        return requested
    register()
    return VARLEN_ATTENTION


@dataclass
class Plan:
    """Decided once per run, before the model loads: whether training batches are flattened, and the attention
    implementation to load the model with (None: the recipe's, or transformers' default)."""

    flatten: bool
    attention: str | None


def plan(model_args, data_args) -> Plan:
    """The padding-free plan for a recipe: reads the model's config.json (not its weights)."""
    requested = model_args.attn_implementation
    if not data_args.padding_free:
        return Plan(False, requested)
    from transformers import AutoConfig

    from finetune.model.load import source

    config = AutoConfig.from_pretrained(source(model_args), trust_remote_code=model_args.trust_remote_code)
    if not flattens(config):
        logger.info("padding-free batches are not verified for model type %r: training on padded batches",
                    config.model_type)
        return Plan(False, requested)
    attention = training_attention(config, requested)
    logger.info("padding-free batches, attention: %s", attention or "transformers' default")
    return Plan(True, attention)


class FlatteningCollator:
    """`DataCollatorWithFlattening` with the sequence boundaries every attention implementation can use."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        from finetune.data.load import IGNORE_INDEX

        self.collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                                   return_flash_attn_kwargs=True)

    def __call__(self, features):
        features = [{key: example[key] for key in ("input_ids", "labels")} for example in features]
        return self.collator(features, return_tensors="pt")
