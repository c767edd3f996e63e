"""The Trainer, with the few hooks the toolkit needs inside a training step.

- `CountingCollator` counts each batch's samples and tokens on the host and attaches them as plain ints;
  `FinetuneTrainer.training_step` hands them to the metrics callback before the forward pass.
- With `on_nonfinite_loss: skip`, a micro-batch whose loss is not finite contributes a zero gradient.
- A checkpoint is never written from non-finite weights (the guard stops training instead).
- Eval batches may use their own collator (`eval_collator`): padded, when training batches are flattened.

The hooks live in `ToolkitHooks`, a mixin: `FinetuneTrainer` puts them on transformers' Trainer, and
`preference_trainer` on TRL's DPOTrainer or KTOTrainer (`objective: dpo | kto`), which are Trainer subclasses, so a
preference run has the same metrics, guards, checkpoints and resume as a supervised one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import Trainer

from finetune.training.metrics import MetricsCallback, batch_counts
from finetune.training.resilience import NonFiniteGuard, PreemptionCallback, ResumedSettings, disk_full_said

logger = logging.getLogger("finetune")

COUNTS_KEY = "finetune_counts"  # batch key carrying (samples, input tokens, target tokens) as host ints


class CountingCollator:
    """Wraps a collator; adds the batch's (samples, input tokens, target tokens), counted on the host."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        from finetune.data import preference

        batch = self.collator(features)
        batch[COUNTS_KEY] = preference.counts(features) if "prompt_ids" in features[0] else batch_counts(features)
        return batch


def build_trainer(recipe, model, tokenizer, train_dataset, eval_dataset, flatten: bool,
                  callbacks: list) -> FinetuneTrainer:
    """The Trainer for a recipe: counting collators (padding-free training batches when `flatten`, padded eval
    batches), the toolkit's callbacks after the Trainer's own flow callback (which decides when to log, evaluate
    and save), then `callbacks`. Metrics write their numbers into each log before any logger reads it
    (`FinetuneTrainer.log`)."""
    from transformers import DataCollatorForSeq2Seq

    from finetune.data.load import IGNORE_INDEX
    from finetune.data.padding_free import FlatteningCollator

    preemption, metrics = PreemptionCallback(), MetricsCallback(recipe.objective.objective)
    guard = NonFiniteGuard(recipe.run.on_nonfinite_loss)
    # The preemption callback may ask for a save at a step's end; the metrics callback, after it, sees every
    # save and evaluation that follows and stops its clock for them.
    ours = [ResumedSettings(), preemption, metrics, guard, *callbacks]
    if recipe.objective.preference:
        trainer = preference_trainer(recipe, model, tokenizer, train_dataset, eval_dataset, ours)
    else:
        padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        trainer = FinetuneTrainer(model=model, args=recipe.training, train_dataset=train_dataset,
                                  eval_dataset=eval_dataset, processing_class=tokenizer,
                                  data_collator=CountingCollator(FlatteningCollator() if flatten else padded),
                                  callbacks=ours)
        trainer.eval_collator = CountingCollator(padded)
    trainer.metrics, trainer.preemption, trainer.guard, trainer.recipe = metrics, preemption, guard, recipe
    return trainer


def preference_arguments(recipe):
    """TRL's DPOConfig or KTOConfig for a recipe: the recipe's TrainingArguments, field for field, plus its
    objective's keys. `max_length` is the data's (the rows are already cut to it, `finetune.data.preference`)."""
    import dataclasses

    from transformers import TrainingArguments
    from trl import DPOConfig, KTOConfig

    objective = recipe.objective
    config = DPOConfig if objective.objective == "dpo" else KTOConfig
    values = {spec.name: getattr(recipe.training, spec.name) for spec in dataclasses.fields(TrainingArguments)
              if spec.init}
    values.update(beta=objective.beta, loss_type=objective.loss_type, max_length=recipe.data.max_length,
                  precompute_ref_log_probs=precomputed_reference(recipe))
    if objective.sft_weight:  # TRL's sum of losses: DPO's and the chosen answers' cross-entropy (RPO)
        values.update(loss_type=[objective.loss_type, "sft"], loss_weights=[1.0, objective.sft_weight])
    if objective.objective == "kto":
        values.update(desirable_weight=objective.desirable_weight, undesirable_weight=objective.undesirable_weight)
        if objective.loss_type == "kto":  # its KL term pairs each row with its neighbours in a fixed order (the
            values["train_sampling_strategy"] = "sequential"  # rows are shuffled once, by the seed, on loading)
    return config(**values)


def precomputed_reference(recipe) -> bool:
    """Whether the reference model's log-probabilities are computed once before training: the recipe's choice, by
    default for full fine-tuning only (else TRL would hold a second copy of the model as the reference)."""
    chosen = recipe.objective.precompute_ref_log_probs
    return (not recipe.model.use_lora) if chosen is None else chosen


def preference_trainer(recipe, model, tokenizer, train_dataset, eval_dataset, callbacks: list):
    """TRL's DPOTrainer or KTOTrainer with the toolkit's hooks, on rows tokenized by `finetune.data.preference`.

    The reference model is the one training starts from, never a second copy of it: with a new LoRA adapter, the
    model with its adapters switched off; with a LoRA run as `init_from`, a frozen copy of that run's adapter (TRL's
    "ref" adapter: the model the run starts from, its adapter included); for full fine-tuning, log-probabilities
    precomputed before the first step (`precomputed_reference`). Adapters keep the dtype the toolkit gave them
    (TRL turns a quantized model's adapters to bf16, which a CPU without native bf16 only emulates)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from finetune.training import rundir

    objective = recipe.objective.objective
    trained_on = rundir.trained_adapter(recipe.objective.init_from) is not None  # a LoRA run's adapter, as it was made
    dropout = getattr(getattr(model, "peft_config", {}).get("default"), "lora_dropout", 0.0)
    if dropout:
        logger.warning("lora_dropout: %g is not applied: TRL's %s trainer switches dropout off (dropout would make the "
                       "log-probabilities its loss compares noisy)%s", dropout, objective.upper(),
                       " (the init_from run's adapter has it)" if trained_on else "; set lora_dropout: 0 to say so")
    trainer_class = _preference_classes()[objective]
    collator = (DataCollatorForPreference if objective == "dpo" else DataCollatorForUnpairedPreference)(
        pad_token_id=tokenizer.pad_token_id, max_length=recipe.data.max_length)

    # TRL casts a quantized model's trainable weights (its adapters) to bf16: they are put back as the toolkit made
    # them, values and dtype. A quantized model is placed on its device when it loads, so they stay where they are.
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    adapter = {name: param.detach().clone() for name, param in model.named_parameters()
               if quantized and param.requires_grad}
    trainer = trainer_class(model=model, args=preference_arguments(recipe), train_dataset=train_dataset,
                            eval_dataset=eval_dataset, processing_class=tokenizer,
                            data_collator=CountingCollator(collator), callbacks=callbacks)
    for name, param in trainer.model.named_parameters():
        if name in adapter:
            param.data = adapter[name]
    peft_config = getattr(trainer.model, "peft_config", {})
    if "ref" in peft_config and not trained_on:
        trainer.model.delete_adapter("ref")  # a new adapter: the reference is the base, adapters off
    return trainer


_CLASSES: dict = {}


def _preference_classes() -> dict[str, type]:
    """FinetuneDPOTrainer and FinetuneKTOTrainer, built once TRL is imported (it costs seconds)."""
    if _CLASSES:
        return _CLASSES
    from trl import DPOTrainer, KTOTrainer

    class PreferenceHooks:
        """What the toolkit changes in both of TRL's trainers: the final save writes the trained adapter alone (the
        reference's frozen copy, "ref" from init_from, is dropped once training is over; checkpoints keep it and a
        resumed run makes it again from init_from); and no usage ping to the Hugging Face Hub, which TRL's trainers
        send when they start (an SFT run sends none)."""

        def save_model(self, output_dir=None, _internal_call=False):
            if not _internal_call and "ref" in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter("ref")
            super().save_model(output_dir, _internal_call)

        def _send_telemetry(self):
            pass

    class FinetuneDPOTrainer(PreferenceHooks, ToolkitHooks, DPOTrainer):
        """TRL's DPOTrainer with the toolkit's hooks; its rows come tokenized (finetune.data.preference)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def compute_ref_log_probs(self, model, inputs):  # precomputing: a batch that no training step counts
            inputs.pop(COUNTS_KEY, None)
            return super().compute_ref_log_probs(model, inputs)

    class FinetuneKTOTrainer(PreferenceHooks, ToolkitHooks, KTOTrainer):
        """TRL's KTOTrainer with the toolkit's hooks; its rows come tokenized (finetune.data.preference)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not self.calculate_KL:
                return dataset
            # TRL's KL estimate: each answer paired with another row's prompt, rotating the answers by one within
            # each batch of per_device_train_batch_size rows (as KTOTrainer._prepare_dataset does).
            def mismatched(rows):
                return {"KL_completion_ids": rows["completion_ids"][-1:] + rows["completion_ids"][:-1]}

            with args.main_process_first(desc="pairing answers with other prompts"):
                return dataset.map(mismatched, batched=True, batch_size=args.per_device_train_batch_size,
                                   desc=f"pairing answers with other prompts ({dataset_name}, for the KL term)")

    _CLASSES.update(dpo=FinetuneDPOTrainer, kto=FinetuneKTOTrainer)
    return _CLASSES


class ToolkitHooks:
    """Host-side counting, the skip mode for non-finite losses and a checkpoint guard, for any Trainer subclass
    (listed before it in the bases)."""

    metrics: MetricsCallback | None = None
    preemption: PreemptionCallback | None = None
    guard: NonFiniteGuard | None = None
    eval_collator = None  # None: eval batches are collated like training batches
    recipe = None  # the Recipe it trains (build_trainer)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.add_to_log(logs)
        super().log(logs, start_time)  # TRL's trainers add their metrics (rewards, log-probabilities) there

    def _run_epoch(self, *args, **kwargs):
        # Resumed from a checkpoint of the last step (the run stopped while writing its results): nothing is left
        # to train. The Trainer's epoch loop would take one more step before checking, past max_steps.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def fit(self, resume_from: Path | None) -> None:
        """Train, from a checkpoint when given (its metrics totals restored); SIGTERM/SIGUSR1 stop at a step
        boundary with a checkpoint (`preemption.stopped_at`)."""
        if resume_from is not None:
            self.metrics.restore(resume_from)
            if self.is_world_process_zero():
                logger.info("resuming from %s (step %s)", resume_from, resume_from.name.rsplit("-", 1)[-1])
        self.preemption.install()
        try:
            self.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:
            self.preemption.uninstall()

    @property
    def stopped_early(self) -> bool:
        """Preempted, or stopped on a non-finite loss (see finetune.training.resilience.end_early)."""
        return self.guard.problem is not None or self.preemption.stopped_at is not None

    def summary(self) -> dict:
        """The run summary (finetune.training.metrics), with the batches skip mode dropped, if any."""
        from finetune.training import rundir

        out = self.metrics.summary(self, self.recipe.model, rundir.saved_weights(Path(self.args.output_dir),
                                                                                 self.recipe.model.use_lora))
        if self.guard.skipped_batches:
            out["train/skipped_batches"] = self.guard.skipped_batches
        return out

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
        from finetune.training import rundir

        if self.guard is not None and not self.guard.weights_are_finite(self.model):
            self.guard.stop(self.control, f"non-finite weights at step {self.state.global_step}: this "
                                          "checkpoint was not written")
            return
        checkpoint = rundir.checkpoint_dir(Path(self.args.output_dir), self.state.global_step)
        with disk_full_said(checkpoint.parent, checkpoint.name, partial=self.is_world_process_zero(),
                            overwrite=self.recipe is not None and self.recipe.run.overwrite_output_dir):
            super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank has written its part (its RNG state, its shards)
        if self.is_world_process_zero():
            rundir.seal_checkpoint(rundir.checkpoint_dir(Path(self.args.output_dir), self.state.global_step))
            rundir.drop_previous_run(Path(self.args.output_dir))  # the run an overwrite replaced, now superseded


class FinetuneTrainer(ToolkitHooks, Trainer):
    """transformers.Trainer with the toolkit's hooks."""
