"""Training speed: the toolkit against the Trainer + PEFT baseline a user would write, side by side.

    make bench-train                                   # CPU size, 16-bit LoRA (fp32 weights on the CPU)
    make bench-train SIZE=gpu VARIANT=qlora            # Llama-3.2-1B shape, QLoRA
    python benchmarks/train_speed.py --size smoke --steps 2   # seconds: checks that every arm runs
    python benchmarks/train_speed.py --size cpu --variant lora --steps 30

Every arm trains the same randomly initialised Llama (built from a config), on the same variable-length data
(lengths spread like instruction sets), with the same examples per optimizer step, steps, seed, schedule and LoRA
settings. The baseline is `Trainer` + `get_peft_model` (after `prepare_model_for_kbit_training` for QLoRA) +
`DataCollatorForSeq2Seq` dynamic padding, as in the usual guides; the toolkit arms are `finetune.run.train` on
the matching recipe, once with `padding_free: false` and once with its defaults. Each arm runs in its own process,
so that peak memory is its own. Reported: seconds per step, non-padding tokens per second, peak host memory (and
peak VRAM and MFU on CUDA), the final loss (mean over the run), and the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LOSS_TOLERANCE = 0.005  # relative gap allowed between final losses: fp32 arms agree to 1e-6, bf16 QLoRA to ~5e-4

SIZES = {  # hidden, layers, heads (query, key/value), intermediate, vocabulary, examples per step, lengths (tokens)
    "cpu": dict(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1376, vocab=128, batch=8,
                lengths=(32, 512)),
    # Llama-3.2-1B's shape: 16 layers, 2048 wide, 32/8 heads, 8192 MLP, 128k vocabulary, tied embeddings.
    "gpu": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, batch=16,
                lengths=(64, 2048)),
    # Seconds, not a measurement: the test suite checks with it that every arm runs and reports.
    "smoke": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=128, batch=4,
                  lengths=(8, 64)),
}
VARIANTS = ("lora", "qlora")  # 16-bit LoRA (fp32 on the CPU size), QLoRA nf4 with bf16 compute


def build_inputs(size: str, workdir: Path) -> tuple[Path, Path]:
    """A random-weight Llama of the size's shape and a variable-length text dataset, deterministic."""
    from finetune.tiny import build_model_config, build_tokenizer, write_jsonl

    shape = SIZES[size]
    tag = hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:8]  # a new shape, new files
    model_dir, data = workdir / f"model-{size}-{tag}", workdir / f"data-{size}-{tag}.jsonl"
    if not (model_dir / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        config = build_model_config("llama", hidden_size=shape["hidden"], layers=shape["layers"],
                                    vocab_size=shape["vocab"], initializer_range=0.02)
        config.num_attention_heads, config.num_key_value_heads = shape["heads"], shape["kv_heads"]
        config.head_dim = shape["hidden"] // shape["heads"]
        config.intermediate_size = shape["intermediate"]
        config.max_position_embeddings = shape["lengths"][1] + 8
        AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
        build_tokenizer().save_pretrained(model_dir)
    if not data.is_file():
        rng = random.Random(0)
        low, high = shape["lengths"]
        letters = "abcdefghijklmnopqrstuvwxyz "
        # Log-uniform lengths: many short examples, a few long ones, as in instruction data.
        rows = [{"text": "".join(rng.choice(letters) for _ in range(int(low * (high / low) ** rng.random()) - 2))}
                for _ in range(4000)]
        write_jsonl(rows, data)
    return model_dir, data


def run_arm(arm: str, size: str, variant: str, steps: int, workdir: Path) -> dict:
    """Train one arm in this process and return its measurements."""
    import resource

    import torch

    model_dir, data = build_inputs(size, workdir)
    shape = SIZES[size]
    dtype = "float32" if size != "gpu" and variant == "lora" else "bfloat16"  # fp32 LoRA on the CPU sizes
    common = {"max_steps": steps, "per_device_train_batch_size": shape["batch"], "gradient_accumulation_steps": 1,
              "learning_rate": 1e-4, "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0,
              "logging_steps": steps, "save_strategy": "no", "report_to": "none", "seed": 0,
              "disable_tqdm": True, "dataloader_pin_memory": torch.cuda.is_available(),
              "bf16": torch.cuda.is_available() and dtype == "bfloat16"}
    if arm == "baseline":
        from datasets import load_dataset
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dataset = load_dataset("json", data_files=str(data))["train"].shuffle(seed=0)

        def tokenize(row):  # causal LM: the labels are the input ids
            encoded = tokenizer(row["text"] + tokenizer.eos_token, truncation=True, max_length=shape["lengths"][1])
            return {**encoded, "labels": list(encoded["input_ids"])}

        dataset = dataset.map(tokenize, remove_columns=["text"])
        torch.manual_seed(0)
        if variant == "qlora":  # as the QLoRA guides write it
            from peft import prepare_model_for_kbit_training
            from transformers import BitsAndBytesConfig

            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                         quantization_config=quantization)
            model = prepare_model_for_kbit_training(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        args = TrainingArguments(output_dir=str(workdir / "baseline-out"), **common)
        class Counting(Trainer):  # measurement only: non-padding tokens, summed on the device, read once
            tokens = 0

            def training_step(self, model, inputs, num_items_in_batch=None):
                self.tokens = self.tokens + inputs["attention_mask"].sum()
                return super().training_step(model, inputs, num_items_in_batch)

        trainer = Counting(model=model, args=args, train_dataset=dataset,
                           data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
        trainer.train()
        tokens = int(trainer.tokens)
        loss = [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]
    else:
        from finetune.model import hardware_defaults
        from finetune.recipe import load_recipe
        from finetune.run import train

        keys = {"model_name_or_path": model_dir, "dataset": data, "dtype": dtype, "lora_r": 16,
                "lora_alpha": 32, "lora_dropout": 0.0, "max_length": shape["lengths"][1], "eval_size": 0,
                "eval_strategy": "no", "output_dir": workdir / "toolkit-out", "overwrite_output_dir": True,
                "train_on_prompt": True, "padding_free": arm == "toolkit", **common}
        recipe_path = ROOT / "recipes" / ("qlora_int4.yaml" if variant == "qlora" else "lora_bf16.yaml")
        recipe = load_recipe(hardware=hardware_defaults, argv=[str(recipe_path)] +
                             [item for key, value in keys.items() for item in (f"--{key}", str(value))])
        trainer = train(recipe)
        summary = json.loads((workdir / "toolkit-out" / "summary.json").read_text())
        tokens = summary["train/input_tokens"]
        loss = [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]
    # Both arms: the Trainer's own wall time for train(), setup and all, so that nothing is left out of either.
    seconds = next(e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e)
    result = {"arm": arm, "variant": variant, "seconds_per_step": seconds / steps,
              "tokens_per_second": tokens / seconds, "final_loss": loss,
              "peak_ram_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "steps": trainer.state.global_step}
    if torch.cuda.is_available():
        result["peak_vram_gb"] = torch.cuda.max_memory_allocated() / 2**30
        utilisation = model_flops_utilisation(trainer.model, tokens, steps * shape["batch"], seconds,
                                              torch.cuda.get_device_name())
        if utilisation is not None:
            result["mfu"] = utilisation
    return result


def model_flops_utilisation(model, tokens: int, samples: int, seconds: float, device_name: str) -> float | None:
    """MFU of an arm by the toolkit's own formula (finetune.metrics), from its non-padding tokens: FLOPs spent on
    padding count as lost, as they are. None for a GPU missing from the peak table."""
    from finetune import flops, metrics

    _, total = metrics.count_parameters(model)
    total_flops = flops.training_flops(model, total, tokens, samples, lora=True)
    return flops.mfu(total_flops, seconds, device_name, world_size=1)


ARMS = ("baseline", "toolkit-padded", "toolkit")  # toolkit-padded: the toolkit with padding_free off


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="cpu")
    parser.add_argument("--variant", choices=VARIANTS, default="lora")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench-train")
    parser.add_argument("--arm", choices=ARMS, help="run one arm here (used internally)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args.arm, args.size, args.variant, args.steps, args.workdir)))
        return
    build_inputs(args.size, args.workdir)
    results = {}
    for arm in ARMS:
        print(f"running {arm} ({args.variant}, {args.size} size, {args.steps} steps)...", flush=True)
        output = subprocess.run([sys.executable, __file__, "--arm", arm, "--size", args.size, "--variant",
                                 args.variant, "--steps",
                                 str(args.steps), "--workdir", str(args.workdir)], capture_output=True, text=True)
        line = next((x for x in output.stdout.splitlines() if x.startswith("RESULT ")), None)
        if output.returncode != 0 or line is None:
            sys.exit(f"{arm} arm failed:\n{output.stderr[-3000:]}")
        results[arm] = json.loads(line[len("RESULT "):])
    base = results["baseline"]
    ratios = ("padded/base", "toolkit/base")
    print(f"\n{'':24}" + "".join(f"{name:>16}" for name in ARMS + ratios))
    for key, label in (("seconds_per_step", "seconds/step"), ("tokens_per_second", "tokens/s (no padding)"),
                       ("peak_ram_gb", "peak host RAM (GB)"), ("peak_vram_gb", "peak VRAM (GB)"),
                       ("mfu", "MFU"), ("final_loss", "final loss (mean)")):
        if key in base:
            print(f"{label:24}" + "".join(f"{results[arm][key]:>16.{6 if key == 'final_loss' else 4}f}" for arm in ARMS)
                  + "".join(f"{results[arm][key] / base[key]:>16.3f}" for arm in ARMS[1:]))
    ours = results["toolkit"]
    speedup = base["seconds_per_step"] / ours["seconds_per_step"]
    loss_gap = abs(ours["final_loss"] - base["final_loss"]) / base["final_loss"]
    print(f"\nspeed: {speedup:.2f}x the baseline (target >= 2x: {'met' if speedup >= 2 else 'NOT met'}); "
          f"final loss {100 * loss_gap:.2f}% from the baseline's (tolerance {100 * LOSS_TOLERANCE:.1f}%: "
          f"{'met' if loss_gap <= LOSS_TOLERANCE else 'NOT met'})")
    if "peak_vram_gb" in base:
        vram = ours["peak_vram_gb"] / base["peak_vram_gb"]
        print(f"peak VRAM: {vram:.2f}x the baseline (target <= 0.6x: {'met' if vram <= 0.6 else 'NOT met'})")
    if "mfu" in ours:
        print(f"MFU: {100 * ours['mfu']:.1f}% toolkit, {100 * base['mfu']:.1f}% baseline (aim >= 40% for 16-bit "
              "LoRA on an H100)")


if __name__ == "__main__":
    main()
