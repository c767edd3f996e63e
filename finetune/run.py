"""Train a model from a YAML recipe.

    accelerate launch finetune/run.py recipes/qlora_int4.yaml
    accelerate launch finetune/run.py recipes/lora_bf16.yaml --max_steps 100 --learning_rate 1e-4
    make train RECIPE=recipes/qlora_int4.yaml ARGS="--max_steps 100"

Steps: resolve recipe -> resolve tracking -> load data -> load model -> build Trainer -> train -> evaluate -> save.
Bad input stops at the first step with every problem listed, exit code 2, and nothing written.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch finetune/run.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import DataCollatorForSeq2Seq, DefaultFlowCallback, set_seed  # noqa: E402

from finetune import logs, resilience, tiny, tracking  # noqa: E402
from finetune.data import IGNORE_INDEX, load_splits  # noqa: E402
from finetune.metrics import MetricsCallback, format_report, write_summary  # noqa: E402
from finetune.model import describe, load_model, load_tokenizer  # noqa: E402
from finetune.packing import FlatteningCollator, flattens  # noqa: E402
from finetune.recipe import Recipe, RecipeError, is_embedded_asset, load_recipe, write_resolved_recipe  # noqa: E402
from finetune.trainer import CountingCollator, FinetuneTrainer  # noqa: E402

logger = logging.getLogger("finetune")


def main(argv: list[str] | None = None) -> int:
    """Run a recipe from the command line; returns the exit code.

    0: trained; 2: bad input (nothing written); 75: preempted, checkpoint saved, run again to resume;
    3: stopped on a non-finite loss, the last good checkpoint kept.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        trainer = train(load_recipe(argv))
    except RecipeError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except resilience.TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return resilience.DIVERGED_EXIT_CODE
    finally:
        resilience.leave_process_group(wait=False)  # after an error; train() has left in step otherwise
    return resilience.PREEMPTED_EXIT_CODE if trainer.preemption.stopped_at is not None else 0


def train(recipe: Recipe):
    """Train, evaluate and save as the recipe says; returns the Trainer.

    Raises RecipeError for bad input (before anything heavy loads) and TrainingDiverged when the loss stops
    being finite. A preempted run returns early with `trainer.preemption.stopped_at` set.
    """
    training_args = recipe.training
    logs.setup(training_args.process_index == 0)
    output_dir = Path(training_args.output_dir)

    # 1. Where to start (a checkpoint to resume, or fresh) and tracking, resolved before anything heavy loads.
    resume_from = resilience.plan_resume(recipe)
    plan = tracking.resolve(recipe, resuming=resume_from is not None)
    training_args.report_to = plan.report_to
    if plan.uses_wandb:
        training_args.run_name = plan.init["name"]
    tracking.prepare(plan)

    # 2. Load data; the embedded default builds its tiny model and data on first use.
    if is_embedded_asset(Path(recipe.model.model_name_or_path)) or is_embedded_asset(Path(recipe.data.dataset)):
        with training_args.main_process_first(desc="building the embedded tiny model and data"):
            tiny.ensure_assets()
    tokenizer = load_tokenizer(recipe.model)
    train_dataset, eval_dataset = load_splits(recipe.data, tokenizer, training_args.seed,
                                              training_args.main_process_first)
    logger.info("examples: %d train, %d eval", len(train_dataset), len(eval_dataset) if eval_dataset else 0)

    # 3. Load the model, quantized and/or wrapped with LoRA as the recipe says; seeded first, so that the
    #    adapter initialisation is the same on every run of the recipe.
    set_seed(training_args.seed)
    model = load_model(recipe.model, padding_free=recipe.data.padding_free)
    logger.info("model: %s, %s", recipe.model.model_name_or_path, describe(model))

    # 4. Build the Trainer. The metrics callback goes first so that every logger sees its numbers.
    #    Training batches are padding-free (where the architecture is known to keep flattened examples apart)
    #    unless the recipe says otherwise; eval batches are padded.
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    flatten = recipe.data.padding_free and flattens(model.config)
    trainer = FinetuneTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=CountingCollator(FlatteningCollator() if flatten else padded),
        processing_class=tokenizer,
    )
    trainer.eval_collator = CountingCollator(padded)
    trainer.metrics = MetricsCallback()
    trainer.preemption = resilience.PreemptionCallback()
    trainer.guard = resilience.NonFiniteGuard(recipe.run.on_nonfinite_loss)
    # Order matters: after the flow callback (which decides when to save), the preemption callback (which may
    # ask for a save), then metrics (which sees both, and writes its numbers into logs before any logger reads).
    callbacks = trainer.callback_handler.callbacks
    after_flow = next(i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)) + 1
    callbacks[after_flow:after_flow] = [trainer.preemption, trainer.metrics]
    trainer.add_callback(trainer.guard)
    if resume_from is not None:
        trainer.metrics.restore(resume_from)
    run = None
    if trainer.is_world_process_zero():
        if recipe.run.overwrite_output_dir and resume_from is None:
            resilience.clear_output_dir(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_recipe(recipe, output_dir / "recipe.yaml")
        run = tracking.start(plan, recipe)  # one run, on the main process; the Trainer's callback logs into it
        if run is not None and plan.log_model == "checkpoint":
            trainer.add_callback(tracking.checkpoint_callback(run, plan, recipe))
        if resume_from is not None:
            logger.info("resuming from %s (step %s)", resume_from, resume_from.name.rsplit("-", 1)[-1])

    # 5. Train; SIGTERM/SIGUSR1 end it at a step boundary with a checkpoint.
    trainer.preemption.install()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        trainer.preemption.uninstall()
    if trainer.guard.problem or trainer.preemption.stopped_at is not None:
        resilience.leave_process_group(trainer)  # all ranks stopped at the same step; the rest is main-only
    if trainer.guard.problem:
        if run is not None:
            run.finish(exit_code=resilience.DIVERGED_EXIT_CODE)
        good = next((p for _, p in resilience.checkpoints(output_dir) if not resilience.checkpoint_problem(p)), None)
        raise resilience.TrainingDiverged(
            f"training stopped: {trainer.guard.problem}. Last good checkpoint: {good or 'none'}. Lower "
            "learning_rate, raise warmup_steps, or set on_nonfinite_loss: skip; then rerun to resume")
    if trainer.preemption.stopped_at is not None:
        if trainer.is_world_process_zero():
            logger.warning("stopped by %s at step %d, checkpoint saved in %s; run the same command again to resume",
                           trainer.preemption.received, trainer.preemption.stopped_at, output_dir)
        if run is not None:
            run.mark_preempting()
            run.finish(exit_code=resilience.PREEMPTED_EXIT_CODE)
        return trainer

    # 6. Evaluate, unless the Trainer's schedule just did at the last step.
    eval_metrics = {}
    if eval_dataset is not None and not trainer.metrics.evaluated_at(trainer.state.global_step):
        eval_metrics = trainer.evaluate()

    # 7. Save the adapter (or the full model) and the tokenizer, in safetensors.
    trainer.save_model(str(output_dir))
    # The last collective work is done: every rank leaves the process group together, so the main process's
    # W&B upload can take as long as it needs while the others exit without tearing a live connection.
    resilience.leave_process_group(trainer)

    # 8. Summarise: the same numbers in summary.json, the W&B summary and on the console.
    if trainer.is_world_process_zero():
        weights = sorted(output_dir.glob("adapter_model*.safetensors" if recipe.model.use_lora else
                                         "model*.safetensors"))
        summary = trainer.metrics.summary(trainer, recipe.model, weights)
        if trainer.guard.skipped_batches:
            summary["train/skipped_batches"] = trainer.guard.skipped_batches
        write_summary(summary, output_dir / "summary.json")
        if run is not None:
            run.summary.update(summary)
            if plan.log_model != "false":
                tracking.log_model_artifact(run, output_dir, recipe, {**eval_metrics, **summary}, ["final"])
            run.finish()
        report(trainer, output_dir, weights, summary)
    return trainer


def report(trainer, output_dir: Path, weights: list[Path], summary: dict) -> None:
    """Tell the user what the run did, its headline numbers, and where everything went."""
    world = trainer.args.world_size
    evals = [(entry["step"], entry["eval_loss"]) for entry in trainer.state.log_history if "eval_loss" in entry]
    lines = [f"trained {trainer.state.global_step} steps on {world} process{'es' if world > 1 else ''}"]
    if len(evals) > 1 and evals[0][0] < evals[-1][0]:
        (first_step, first), (last_step, last) = evals[0], evals[-1]
        lines.append(f"eval loss: {first:.4f} (step {first_step}) -> {last:.4f} (step {last_step}); "
                     f"perplexity {math.exp(first):.2f} -> {math.exp(last):.2f}")
    for line in lines:
        logger.info(line)
    print(format_report(summary), file=sys.stderr)
    where = [("adapter" if "adapter" in weights[0].name else "model", weights[0]),
             ("recipe", output_dir / "recipe.yaml"), ("summary", output_dir / "summary.json")]
    checkpoints = sorted(output_dir.glob("checkpoint-*"))
    if checkpoints:
        where.append(("checkpoints", ", ".join(str(c) for c in checkpoints)))
    for label, path in where:
        logger.info("%s: %s", label, path)


if __name__ == "__main__":
    sys.exit(main())
