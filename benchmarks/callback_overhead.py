"""Cost of the metrics callback: the same training with and without it, interleaved, in one process.

    make bench-callback                       # or: python benchmarks/callback_overhead.py --steps 200 --rounds 5

Both arms train the embedded tiny recipe (LoRA on a 0.8M-parameter Llama, CPU) from the same weights, data and
seed, with W&B off. The baseline is a plain `Trainer` with `DataCollatorForSeq2Seq`; the toolkit arm adds the
counting collator, `MeteredTrainer` and `MetricsCallback`. Arms alternate (A B A B ...) so that drift in machine
speed hits both; the result is the ratio of median seconds per step. Target: <= 1.01.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import DataCollatorForSeq2Seq, Trainer  # noqa: E402

from finetune import tiny  # noqa: E402
from finetune.data import IGNORE_INDEX, load_splits  # noqa: E402
from finetune.metrics import CountingCollator, MeteredTrainer, MetricsCallback  # noqa: E402
from finetune.model import load_model, load_tokenizer  # noqa: E402
from finetune.recipe import load_recipe  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml"


def seconds_per_step(metered: bool, steps: int, output_dir: str) -> float:
    recipe = load_recipe([str(RECIPE), "--max_steps", str(steps), "--eval_strategy", "no", "--eval_on_start",
                          "false", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "10",
                          "--output_dir", output_dir])
    tokenizer = load_tokenizer(recipe.model)
    train_dataset, _ = load_splits(recipe.data, tokenizer, recipe.training.seed, recipe.training.main_process_first)
    model = load_model(recipe.model, recipe.training)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    if metered:
        trainer = MeteredTrainer(model=model, args=recipe.training, train_dataset=train_dataset,
                                 data_collator=CountingCollator(collator), processing_class=tokenizer)
        trainer.metrics = MetricsCallback()
        trainer.callback_handler.callbacks.insert(0, trainer.metrics)
    else:
        trainer = Trainer(model=model, args=recipe.training, train_dataset=train_dataset, data_collator=collator,
                          processing_class=tokenizer)
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
    baseline, metered = [], []
    for round_index in range(args.rounds):
        baseline.append(seconds_per_step(False, args.steps, args.output_dir))
        metered.append(seconds_per_step(True, args.steps, args.output_dir))
        print(f"round {round_index + 1}: baseline {baseline[-1] * 1e3:.2f} ms/step, "
              f"with callback {metered[-1] * 1e3:.2f} ms/step", flush=True)
    ratio = statistics.median(metered) / statistics.median(baseline)
    print(f"\nmedian ms/step: baseline {statistics.median(baseline) * 1e3:.2f}, "
          f"with callback {statistics.median(metered) * 1e3:.2f}")
    print(f"callback overhead ratio: {ratio:.4f} ({(ratio - 1) * 100:+.2f}%), target <= 1.01: "
          f"{'met' if ratio <= 1.01 else 'NOT met'}")


if __name__ == "__main__":
    main()
