"""The Trainer, with the few hooks the toolkit needs inside a training step.

- `CountingCollator` counts each batch's samples and tokens on the host and attaches them as plain ints;
  `FinetuneTrainer.training_step` hands them to the metrics callback before the forward pass.
- With `on_nonfinite_loss: skip`, a micro-batch whose loss is not finite contributes a zero gradient.
- A checkpoint is never written from non-finite weights (the guard stops training instead).
- Eval batches may use their own collator (`eval_collator`): padded, when training batches are flattened.
"""

from __future__ import annotations

from transformers import Trainer

from finetune.metrics import MetricsCallback, batch_counts
from finetune.resilience import NonFiniteGuard

COUNTS_KEY = "finetune_counts"  # batch key carrying (samples, input tokens, target tokens) as host ints


class CountingCollator:
    """Wraps a collator; adds the batch's (samples, input tokens, target tokens), counted on the host."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        batch[COUNTS_KEY] = batch_counts(features)
        return batch


class FinetuneTrainer(Trainer):
    """transformers.Trainer plus host-side counting, the skip mode for non-finite losses and a checkpoint guard."""

    metrics: MetricsCallback | None = None
    guard: NonFiniteGuard | None = None
    eval_collator = None  # None: eval batches are collated like training batches

    def get_eval_dataloader(self, eval_dataset=None):
        return self._with_eval_collator(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._with_eval_collator(super().get_test_dataloader, test_dataset)

    def _with_eval_collator(self, build, dataset):
        if self.eval_collator is None:
            return build(dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return build(dataset)  # the DataLoader keeps the collator it was built with
        finally:
            self.data_collator = train_collator

    def training_step(self, model, inputs, num_items_in_batch=None):
        counts = inputs.pop(COUNTS_KEY, None)
        if counts is not None and self.metrics is not None:
            self.metrics.add(counts)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.metrics is not None:
            self.metrics.add_loss(loss)  # on the device: no sync
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop(COUNTS_KEY, None)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if self.guard is None or self.guard.mode != "skip" or not model.training:
            return result
        import torch

        loss = result[0] if return_outputs else result
        if bool(torch.isfinite(loss.detach()).all()):  # a device sync per micro-batch: the price of skip mode
            return result
        self.guard.skipped_batches += 1
        # A loss built from the trainable weights alone: finite, and its gradient is exactly zero.
        zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        return (zero, result[1]) if return_outputs else zero

    def _save_checkpoint(self, model, trial):
        if self.guard is not None and not self.guard.weights_are_finite(self.model):
            self.guard.stop(self.control, f"non-finite weights at step {self.state.global_step}: this "
                                          "checkpoint was not written")
            return
        super()._save_checkpoint(model, trial)
