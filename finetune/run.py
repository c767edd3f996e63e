"""Train a model from a YAML recipe.

    accelerate launch finetune/run.py recipes/qlora_int4.yaml
    accelerate launch -m finetune.run recipes/lora_bf16.yaml --max_steps 100 --learning_rate 1e-4
    finetune train recipes/tiny.yaml
    make train RECIPE=recipes/qlora_int4.yaml ARGS="--max_steps 100"

Steps: recipe -> resume and tracking plans -> data -> model -> Trainer -> train -> evaluate -> save -> summarise.
Bad input stops at the first step with every problem listed, exit code 2, and nothing written.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from finetune import errors, logs
from finetune.errors import UsageError
from finetune.model import hub
from finetune.recipe.keys import Recipe
from finetune.recipe.load import help_text, read_checked, recipe_yaml
from finetune.tracking import wandb_run as tracking
from finetune.training import ranks, rundir

logger = logging.getLogger("finetune")
FLAGS = ("--print_config", "--dry_run")  # what to do instead of training (see --help)


def main(argv: list[str] | None = None) -> int:
    """Run a recipe from the command line; returns the exit code (finetune.errors: 0, 2, 3, 75, or 128 + a signal)."""
    argv = logs.take_verbose(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        try:
            print(help_text())
        except BrokenPipeError:  # `--help | head`
            sys.stdout = None
        return errors.OK
    flags = [token for token in argv if token in FLAGS]
    argv = [token for token in argv if token not in FLAGS]
    try:
        check(argv, flags)
    except UsageError as error:
        return ranks.report_exit(errors.report(error))

    if not logs.verbose():
        logs.quiet_third_party()  # before transformers loads: some of its noise is printed at import
    from finetune.model.load import hardware_defaults
    from finetune.recipe.load import load_recipe
    from finetune.training import resilience

    resilience.stop_before_training()
    code = errors.OK
    try:
        ranks.follow_launcher()  # a launcher already gone: SIGTERM now, an Interrupted below
        recipe = load_recipe(argv, hardware=hardware_defaults)
        if flags:
            return ranks.report_exit(inspect(recipe, flags))
        trainer = train(recipe)
        code = errors.PREEMPTED if trainer.preemption.stopped_at is not None else errors.OK
    except UsageError as error:
        code = errors.report(error)
    except resilience.TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        code = errors.DIVERGED
    except resilience.Interrupted as error:
        print(f"error: {error}", file=sys.stderr)
        code = error.code
    except resilience.DiskFull as error:
        print(f"error: {error}", file=sys.stderr)
        code = errors.DISK_FULL
    finally:
        ranks.leave_process_group(wait=False)  # after an error; train() has left in step otherwise
    return ranks.report_exit(code)


def check(argv: list[str], flags: list[str] = ()) -> None:
    """Everything that refuses a run before torch loads (here, and in launch/train.sh before any process starts).
    Raises UsageError listing the problems."""
    path, _, values, groups = read_checked(argv)  # keys, values, combinations, local files
    if "--print_config" not in flags:
        hub.check(path, groups)  # a hub model or dataset this machine can't fetch: now, not after retries
    if not flags:
        tracking.check(values)  # WANDB_* and wandb_* values W&B would refuse
        rundir.check_output_dir(values)  # in use, occupied, or resumed with changed fixed settings
        rundir.check_init_from(values)  # the run it starts from is there and finished


def inspect(recipe: Recipe, flags: list[str]) -> int:
    """--print_config: the resolved recipe; --dry_run: the data as training would see it. Nothing is written to the
    output directory (the embedded assets and a GGUF base's plain copy are made on first use)."""
    from finetune.data.load import load_splits, preview
    from finetune.model.load import load_tokenizer, prepare

    logs.setup()
    if "--print_config" in flags:
        print(recipe_yaml(recipe), end="")
    if "--dry_run" in flags:
        prepare(recipe)
        tokenizer = load_tokenizer(recipe.model)
        print(preview(load_splits(recipe.data, tokenizer, recipe.training.seed, recipe.training.main_process_first,
                                  recipe.objective.objective, recipe.objective.max_prompt_length), tokenizer))
    return errors.OK


def train(recipe: Recipe):
    """Train, evaluate and save as the recipe says; returns the Trainer. Raises UsageError for bad input (before
    anything heavy loads), TrainingDiverged for a non-finite loss; a preempted run has `preemption.stopped_at`."""
    from transformers import set_seed

    from finetune.data import load as data
    from finetune.data import padding_free
    from finetune.model.load import load_model, load_tokenizer, prepare
    from finetune.tracking import wandb_run as tracking
    from finetune.training import metrics, preference, resilience, sweep, trial
    from finetune.training.trainer import build_trainer

    args, output_dir, objective = recipe.training, Path(recipe.training.output_dir), recipe.objective
    # As given (tracking sets the Trainer's report_to and run_name below), local paths absolute: the run's
    # follow-up commands (chat, eval, bench, merge) then work from any directory.
    recipe_text = recipe_yaml(recipe, absolute=True)
    logs.setup(args.process_index == 0)
    ranks.check_launch(args)
    with resilience.Attempt(output_dir, main=args.process_index == 0) as attempt:
        # 1. Where to start (a checkpoint to resume, or fresh) and where to report, before anything heavy loads.
        resume_from, changed = resilience.plan_resume(recipe)
        plan = tracking.resolve(recipe, resuming=resume_from is not None)
        tracking.prepare(plan, args)

        # 2. Data; the embedded models and data are written on first use, a GGUF base converted once.
        prepare(recipe)
        tokenizer = load_tokenizer(recipe.model)
        train_set, eval_set, _ = data.load_splits(recipe.data, tokenizer, args.seed, args.main_process_first,
                                                  objective.objective, objective.max_prompt_length)

        # 3. The model, quantized and/or wrapped with LoRA (a new adapter, or init_from's trained on); seeded first,
        #    so that the adapter initialisation is the same on every run of the recipe. Padding-free batches decide
        #    its attention; preference batches are padded (TRL's losses score each answer in its own row).
        batches = padding_free.plan(recipe.model, recipe.data) if not objective.preference else \
            padding_free.Plan(False, recipe.model.attn_implementation)
        set_seed(args.seed)
        adapter = rundir.trained_adapter(objective.init_from) if recipe.model.use_lora else None
        model = load_model(recipe.model, attention=batches.attention, adapter=adapter,
                           loss_head=not objective.preference)

        # 4. The run directory (recipe, history) and the W&B run: one of each per job, on the main process.
        if args.process_index == 0:
            if recipe.run.overwrite_output_dir and not resume_from:
                attempt.replace_previous()  # kept aside until this run has a checkpoint or has finished
            segment = resilience.segment(resume_from, changed, recipe.data.dataset)
            with resilience.disk_full_said(output_dir, rundir.RECIPE):
                rundir.prepare(output_dir, recipe_text, segment)
            attempt.run = tracking.start(plan, {**tracking.run_config(recipe), **sweep.trial_config()}, output_dir)

        # 5. Train; SIGTERM, SIGINT and SIGUSR1 end it at a step boundary with a checkpoint.
        trainer = build_trainer(recipe, model, tokenizer, train_set, eval_set, batches.flatten,
                                callbacks=tracking.callbacks(attempt.run, plan, recipe) + trial.callbacks())
        tracking.survive_service_loss(trainer.callback_handler.callbacks)
        # Held-out preference accuracy of the model training starts from (a resumed run's checkpoint loads later).
        pairs = preference.has_pairs(eval_set)
        scored = pairs and not preference.sharded(trainer)
        if pairs and not scored:
            logger.info("held-out preference accuracy: not measured in a sharded run (FSDP, DeepSpeed ZeRO-3); "
                        "`finetune eval %s` scores it once training is over", output_dir)
        start_accuracy = preference.held_out_accuracy(trainer, eval_set, tokenizer.pad_token_id) if scored else None
        trainer.fit(resume_from)
        if trainer.stopped_early:
            return resilience.end_early(trainer, attempt.run, output_dir)  # raises TrainingDiverged if non-finite

        # 6. Evaluate, unless the Trainer's schedule just did at the last step.
        if eval_set is not None and not trainer.metrics.evaluated_at(trainer.state.global_step):
            trainer.evaluate()

        # 7. Save the adapter (or the full model), the tokenizer and the eval split; then every rank leaves the
        #    process group together, so that the main process's W&B upload can take as long as it needs.
        with resilience.disk_full_said(output_dir, "the model", overwrite=recipe.run.overwrite_output_dir):
            trainer.save_model(str(output_dir))
            if args.process_index == 0:
                rundir.save_eval_split(output_dir, eval_set)  # what `finetune bench` prompts with, data or not
        end_accuracy = preference.held_out_accuracy(trainer, eval_set, tokenizer.pad_token_id) if scored else None
        ranks.leave_process_group(trainer)

        # 8. Summarise: the same numbers in summary.json, the W&B summary and on the console.
        if args.process_index == 0:
            summary = trainer.summary()
            if start_accuracy is not None and end_accuracy is not None:
                summary.update({"eval/preference_accuracy_start": start_accuracy["accuracy"],
                                "eval/preference_accuracy": end_accuracy["accuracy"],
                                "eval/preference_pairs": end_accuracy["pairs"]})
            if objective.init_from:
                summary["run/init_from"] = str(Path(objective.init_from).expanduser().absolute())
            with resilience.disk_full_said(output_dir, rundir.SUMMARY, overwrite=recipe.run.overwrite_output_dir):
                rundir.write_json(output_dir / rundir.SUMMARY, summary)
            tracking.finish(attempt.run, plan, recipe, output_dir, summary)
            metrics.report(trainer, output_dir, summary)
    return trainer


if __name__ == "__main__":
    sys.exit(main())
