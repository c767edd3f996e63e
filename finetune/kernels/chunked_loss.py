"""Training loss without full-vocabulary logits: the LM head and the cross-entropy computed a chunk of tokens at a time.

A micro-batch's logits are tokens x vocabulary: with a 128k vocabulary they, their fp32 copy for the loss and their
gradient outweigh every other activation of a small or LoRA-trained model. In training, the causal LM's forward
here stops at the last hidden states, keeps the positions that have a label, and `ChunkedCrossEntropy` computes, one
chunk of those at a time, the logits, the loss and at once the gradients (for the hidden states, and for the head's
weight where it trains). Only the gradients are kept, so at most one chunk of logits is alive at any time and the
backward is a multiplication by the incoming gradient: no logits are recomputed. Positions without a label (the
prompt under answer-only loss, padding) cost nothing at all.

The loss is transformers' `ForCausalLMLoss`, operation for operation within each chunk: labels shifted by one (or
`shift_labels` as the collator gives them), the head's matmul in the model's (or autocast's) dtype, upcast to fp32,
cross-entropy summed and divided by `num_items_in_batch` where the Trainer passes it (gradient accumulation), else
the mean over labelled tokens. So the Trainer's normalisation is untouched.

Used for the architectures in `CHUNKED_MODEL_TYPES`, whose forward is exactly "decoder, `lm_head`, causal-LM loss".
It falls back to full logits, and logs why, for any other architecture (Gemma 2/3's logit soft-capping, Granite's
logit scaling, mixture-of-experts auxiliary losses: their forwards do more than that), and for an output head that is
not a plain `Linear` (a LoRA adapter or `modules_to_save` on `lm_head`). Evaluation keeps the standard forward, whose
logits the Trainer may return.
"""

from __future__ import annotations

import logging
import types

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # transformers' ignore index, the label the collators give tokens without a target

# fp32 logits of one chunk, in bytes: 261 tokens of a 128k vocabulary (each chunk's matmul is still wide enough to
# run at full speed); a 128-token vocabulary fits every micro-batch in one chunk.
LOGITS_CHUNK_BYTES = 128 * 2**20

# Architectures whose causal-LM forward is exactly `lm_head(decoder(...).last_hidden_state)` and transformers'
# `loss_function` (checked against transformers 5.23's modelling files; tests/test_chunked_loss.py compares each
# tested one with the standard forward).
CHUNKED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo", "olmo2", "smollm3",
                                 "starcoder2"})


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk for a head of `vocab_size` outputs (at least one)."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


def _chunked_cross_entropy_class():
    import torch
    import torch.nn.functional as F

    class ChunkedCrossEntropy(torch.autograd.Function):
        """Summed cross-entropy of `linear(hidden, weight, bias)` against `targets`, `chunk` rows at a time.

        hidden (N, H) holds only labelled rows; the result is an fp32 scalar. The gradients are computed in the
        forward, chunk by chunk, by autograd on the very operations the standard path runs (autocast included).
        """

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, chunk):
            wants = ctx.needs_input_grad[:3]
            leaf_weight = weight.detach().requires_grad_(wants[1])
            leaf_bias = bias.detach().requires_grad_(wants[2]) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if wants[0] else None
            # Summed over chunks in fp32, rounded once at the end: the standard path's one matmul does the same.
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants[1] else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants[2] else None
            for start in range(0, hidden.shape[0], chunk):
                rows = hidden[start:start + chunk].detach().requires_grad_(wants[0])
                with torch.enable_grad():
                    logits = F.linear(rows, leaf_weight, leaf_bias).float()
                    loss = F.cross_entropy(logits, targets[start:start + chunk], reduction="sum")
                    inputs = [t for t, want in zip((rows, leaf_weight, leaf_bias), wants, strict=True) if want]
                    grads = list(torch.autograd.grad(loss, inputs)) if inputs else []
                total += loss.detach()
                if wants[0]:
                    grad_hidden[start:start + chunk] = grads.pop(0)
                if wants[1]:
                    grad_weight += grads.pop(0)
                if wants[2]:
                    grad_bias += grads.pop(0)
            ctx.grads = (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                         None if grad_bias is None else grad_bias.to(bias.dtype))
            return total

        @staticmethod
        def backward(ctx, grad_total):
            grads = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.grads]
            ctx.grads = None
            return (*grads, None, None)

    return ChunkedCrossEntropy


_function = None


def causal_lm_loss(hidden, head, labels, num_items_in_batch=None, shift_labels=None):
    """transformers' `ForCausalLMLoss` of `head(hidden)` without its full logits.

    hidden: (batch, tokens, H) last hidden states; head: the `Linear` output head; labels: (batch, tokens), unshifted
    (ignored when `shift_labels` is given, as transformers does). Returns the fp32 loss: the sum over labelled tokens
    divided by `num_items_in_batch` when given, else their mean (NaN when none is labelled, as in transformers).
    """
    global _function
    import torch.nn.functional as F

    if _function is None:
        _function = _chunked_cross_entropy_class()
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    # On a GPU, a device sync: the number of labelled tokens sizes the rows kept (one per micro-batch).
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    total = _function.apply(rows, head.weight, head.bias, targets.index_select(0, keep),
                            chunk_tokens(head.weight.shape[0]))
    if num_items_in_batch is None:
        return total / keep.numel()
    if hasattr(num_items_in_batch, "to"):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def chunked_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """The causal LM's forward (bound to the model by `install`): in training with labels, the loss from
    `causal_lm_loss` and no logits; otherwise the model's own forward."""
    if labels is None or not self.training:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values,
                                  inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    loss = causal_lm_loss(outputs.last_hidden_state, self.lm_head, labels, num_items_in_batch, shift_labels)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _causal_lm(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def unsupported(model) -> str | None:
    """Why the chunked loss can't replace this model's (peft-wrapped or not) standard loss, or None if it can."""
    import torch

    causal = _causal_lm(model)
    model_type = getattr(causal.config, "model_type", None)
    if model_type not in CHUNKED_MODEL_TYPES:
        return (f"model type {model_type!r} is not one whose forward is known to be a plain LM head and "
                "transformers' causal-LM loss (finetune.kernels.chunked_loss.CHUNKED_MODEL_TYPES)")
    head = getattr(causal, "lm_head", None)
    if type(head) is not torch.nn.Linear:
        return (f"its output head (lm_head) is a {type(head).__name__}, not a plain Linear (a LoRA adapter or "
                "modules_to_save on lm_head)")
    return None


def install(model) -> bool:
    """Train `model` with the chunked loss where `unsupported` finds nothing against it; returns whether it does.
    The reason for a fallback is logged."""
    reason = unsupported(model)
    if reason is not None:
        logger.info("chunked loss off: %s; the loss is computed from full logits", reason)
        return False
    causal = _causal_lm(model)
    causal.forward = types.MethodType(chunked_forward, causal)
    return True
