"""Cost of the metrics callback: the same training with and without it, interleaved, in one process.

    make bench-callback                       # or: python benchmarks/callback_overhead.py --steps 200 --rounds 5

Both arms train the embedded tiny recipe (LoRA on a 0.8M-parameter Llama, CPU) from the same weights, data and
seed, with W&B and console logging off. The baseline is a plain `Trainer` with `DataCollatorForSeq2Seq`; the
toolkit arm adds the counting collator, `FinetuneTrainer` and `MetricsCallback`. Two measurements:

1. attributed cost (the figure the target applies to): in the toolkit arm, every piece of added code (host-side
   counting in the collator, the hand-over in `training_step`, every callback hook) is timed where it runs, and
   its total is divided by the run's wall time. All of it runs on the training thread, so this is the overhead.
2. end to end: arms alternate (A B A B ...), and the ratio of the fastest run of each arm is reported next to the
   ratio of medians. On a shared 2-core machine run-to-run noise is several percent, well above 1%, so this is a
   sanity check, not the verdict.

Target: attributed cost <= 1% of training time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer

from finetune.data.load import IGNORE_INDEX, load_splits
from finetune.embedded import tiny
from finetune.model.load import hardware_defaults, load_model, load_tokenizer
from finetune.recipe.load import load_recipe
from finetune.training import trainer as trainer_module
from finetune.training.metrics import MetricsCallback
from finetune.training.trainer import CountingCollator, FinetuneTrainer

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml"


class Stopwatch:
    """Accumulates the time spent inside wrapped functions."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
        return timed


def instrument(trainer: FinetuneTrainer, stopwatch: Stopwatch) -> None:
    """Time every piece of code the toolkit adds to a training step, where it runs."""
    trainer_module.batch_counts = stopwatch.wrap(trainer_module.batch_counts)  # the collator's host-side counting
    callback = trainer.metrics
    for hook in ("add", "add_loss", "add_to_log", "on_train_begin", "on_step_begin", "on_step_end", "on_epoch_end",
                 "on_evaluate", "on_save", "on_train_end"):
        setattr(callback, hook, stopwatch.wrap(getattr(callback, hook)))
    original_pop = dict.pop

    class TimedInputs(dict):
        def pop(self, *args):
            started = time.perf_counter()
            try:
                return original_pop(self, *args)
            finally:
                stopwatch.seconds += time.perf_counter() - started

    step = trainer.training_step
    trainer.training_step = lambda model, inputs, *rest: step(model, TimedInputs(inputs), *rest)


def seconds_per_step(metered: bool, steps: int, output_dir: str, stopwatch: Stopwatch | None = None) -> float:
    recipe = load_recipe([str(RECIPE), "--max_steps", str(steps), "--eval_strategy", "no", "--eval_on_start",
                          "false", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "10",
                          "--save_strategy", "no", "--output_dir", output_dir], hardware=hardware_defaults)
    tokenizer = load_tokenizer(recipe.model)
    train_dataset, *_ = load_splits(recipe.data, tokenizer, recipe.training.seed, recipe.training.main_process_first)
    model = load_model(recipe.model)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    if metered:
        metrics = MetricsCallback()
        trainer = FinetuneTrainer(model=model, args=recipe.training, train_dataset=train_dataset,
                                  data_collator=CountingCollator(collator), processing_class=tokenizer,
                                  callbacks=[metrics])
        trainer.metrics = metrics
        if stopwatch is not None:
            instrument(trainer, stopwatch)
    else:
        trainer = Trainer(model=model, args=recipe.training, train_dataset=train_dataset, data_collator=collator,
                          processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # console printing costs the same in both arms; leave it out
    started = time.perf_counter()
    trainer.train()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output_dir", default="outputs/bench-callback")
    args = parser.parse_args()
    tiny.ensure_assets()
    seconds_per_step(True, 20, args.output_dir)  # warm-up: imports, allocator, thread pools

    stopwatch, plain_batch_counts = Stopwatch(), trainer_module.batch_counts
    attributed_run = seconds_per_step(True, args.steps, args.output_dir, stopwatch) * args.steps
    trainer_module.batch_counts = plain_batch_counts
    attributed = stopwatch.seconds / attributed_run
    print(f"attributed: {stopwatch.seconds * 1e3:.1f} ms in toolkit code over a {attributed_run:.1f} s run of "
          f"{args.steps} steps ({stopwatch.seconds / args.steps * 1e6:.0f} us/step)", flush=True)

    baseline, metered = [], []
    for round_index in range(args.rounds):
        baseline.append(seconds_per_step(False, args.steps, args.output_dir))
        metered.append(seconds_per_step(True, args.steps, args.output_dir))
        print(f"round {round_index + 1}: baseline {baseline[-1] * 1e3:.2f} ms/step, "
              f"with callback {metered[-1] * 1e3:.2f} ms/step", flush=True)
    best_ratio = min(metered) / min(baseline)
    median_ratio = statistics.median(metered) / statistics.median(baseline)
    spread = (max(baseline) - min(baseline)) / min(baseline)
    print(f"\nend to end: fastest run ratio {best_ratio:.4f}, median ratio {median_ratio:.4f} "
          f"(baseline runs spread {spread:.1%}: noise, not overhead)")
    print(f"callback overhead (attributed): {attributed:.3%} of training time, target <= 1%: "
          f"{'met' if attributed <= 0.01 else 'NOT met'}")


if __name__ == "__main__":
    main()
