"""Training speed and memory: the toolkit against the peers a user would reach for, side by side.

    make bench-train                                   # CPU size, 16-bit LoRA (fp32 weights on the CPU), 2 repeats
    make bench-train SIZE=vocab                        # Llama 3's 128k vocabulary on a small body: peak memory
    make bench-train SIZE=gpu VARIANT=qlora            # Llama-3.2-1B shape, QLoRA
    make bench-train SIZE=smollm2                      # the real model (make smollm2), its tokenizer and data
    python benchmarks/train_speed.py --size smoke --steps 2 --repeats 1   # seconds: checks that every arm runs

Every arm trains the same randomly initialised Llama (built from a config), on the same variable-length data
(lengths spread like instruction sets), in the same order, with the same examples per optimizer step (TRL's packing
aside, see below), steps, seed, schedule and LoRA settings. The arms:
- baseline: `Trainer` + `get_peft_model` (after `prepare_model_for_kbit_training` for QLoRA) +
  `DataCollatorForSeq2Seq` dynamic padding, as in the usual guides;
- trl-padded, trl-padding-free, trl-packing: TRL's `SFTTrainer` (requirements.txt) with its defaults,
  `padding_free=True`, and `packing=True` (best-fit packing into rows of `max_length`: a step then holds more
  examples, so its loss is not comparable, its tokens/s is);
- toolkit: `finetune.run.train` on the matching recipe, as shipped.
Each arm runs in its own process, so that its peak memory is its own; `--repeats N` runs the arms interleaved
(A B C ... A B C ...), so that a busy machine shows as spread between repeats rather than as a difference between
arms. Reported: seconds per step (min and median over repeats), non-padding tokens per second (at the median), peak
memory (host RSS; allocated and reserved VRAM on CUDA), MFU on CUDA, the final loss, and the toolkit's ratios to the
best peer and to the baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure this checkout's toolkit, not whichever one is installed

LOSS_TOLERANCE = 0.005  # relative gap allowed between final losses: fp32 arms agree to 1e-6, bf16 QLoRA to ~5e-4

SIZES = {  # hidden, layers, heads (query, key/value), intermediate, vocabulary, examples per step, lengths (tokens)
    "cpu": dict(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1376, vocab=128, batch=8,
                lengths=(32, 512), steps=30),
    # Llama 3's 128,256-token vocabulary on a small body: the logits dominate memory, as on every Llama-3 fine-tune.
    "vocab": dict(hidden=256, layers=2, heads=4, kv_heads=4, intermediate=688, vocab=128256, batch=8,
                  lengths=(32, 512), steps=4),
    # Llama-3.2-1B's shape: 16 layers, 2048 wide, 32/8 heads, 8192 MLP, 128k vocabulary, tied embeddings.
    "gpu": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, batch=16,
                lengths=(64, 2048), steps=30),
    # The real model (make smollm2): SmolLM2-135M-Instruct, its tokenizer, its task's conversations as text.
    "smollm2": dict(batch=8, lengths=(60, 512), steps=20),
    # Seconds, not a measurement: the test suite checks with it that every arm runs and reports.
    "smoke": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=128, batch=4,
                  lengths=(8, 64), steps=2),
}
VARIANTS = ("lora", "qlora")  # 16-bit LoRA (fp32 on the CPU size), QLoRA nf4 with bf16 compute


def build_inputs(size: str, workdir: Path) -> tuple[Path, Path]:
    """A random-weight Llama of the size's shape and a variable-length text dataset, deterministic; for the
    smollm2 size, the real model and its task."""
    from finetune.embedded.tiny import build_model_config, build_tokenizer, write_jsonl

    if size == "smollm2":
        return real_inputs(workdir)

    shape = {key: value for key, value in SIZES[size].items() if key != "steps"}
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


def real_inputs(workdir: Path) -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct (its GGUF's plain copy) and its training conversations written out with its chat
    template (the default system prompt included) as plain text: every arm trains on every token of the same rows."""
    from finetune.embedded import smollm2
    from finetune.embedded.tiny import write_jsonl
    from finetune.model import gguf as gguf_import

    assets = smollm2.ensure_assets()
    model_dir = Path(gguf_import.plain_model(str(assets / smollm2.GGUF_NAME)))
    data = workdir / "data-smollm2.jsonl"
    if not data.is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        lines = (assets / "contacts.jsonl").read_text().splitlines()
        write_jsonl([{"text": tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False).rstrip()}
                     for line in lines], data)
    return model_dir, data


ARMS = ("baseline", "trl-padded", "trl-padding-free", "trl-packing", "toolkit")
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
# TRL refuses padding_free without packing under a max_length (it would not truncate): the texts already fit it.
TRL_ARMS = {"trl-padded": {}, "trl-padding-free": {"padding_free": True, "max_length": None},
            "trl-packing": {"packing": True}}


def trl_missing() -> bool:
    return importlib.util.find_spec("trl") is None


def recipe_settings(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """`--toolkit_set` items (KEY=VALUE) as recipe keys; a malformed item is a usage error."""
    bad = [item for item in items if "=" not in item or item.startswith("=")]
    if bad:
        parser.error(f"--toolkit_set takes KEY=VALUE items (recipe keys of the toolkit arm), got {' '.join(bad)}")
    return dict(item.split("=", 1) for item in items)


def counting(trainer_class):
    """`trainer_class` counting each micro-batch's non-padding tokens (summed on the device, read once at the end):
    the attention mask's ones in a padded batch, every token of a flattened one."""

    class Counting(trainer_class):
        tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            self.tokens = self.tokens + (mask.sum() if mask is not None else inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    return Counting


def peer_model(model_dir: Path, variant: str, dtype: str):
    """The base model as the guides load it (4-bit through bitsandbytes and peft's k-bit preparation for QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM

    if variant == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=quantization)
        return prepare_model_for_kbit_training(model)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))


def run_arm(arm: str, size: str, variant: str, steps: int, workdir: Path, toolkit_set: dict | None = None) -> dict:
    """Train one arm in this process and return its measurements (`toolkit_set`: recipe keys for the toolkit arm)."""
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
    if arm == "toolkit":
        from finetune.model.load import hardware_defaults
        from finetune.recipe.load import load_recipe
        from finetune.run import train

        keys = {"model_name_or_path": model_dir, "dataset": data, "dtype": dtype, "lora_r": LORA["r"],
                "lora_alpha": LORA["lora_alpha"], "lora_dropout": LORA["lora_dropout"],
                "max_length": shape["lengths"][1], "eval_size": 0,
                "eval_strategy": "no", "output_dir": workdir / "toolkit-out", "overwrite_output_dir": True,
                "train_on_prompt": True, **common, **(toolkit_set or {})}
        recipe_path = ROOT / "recipes" / ("qlora_int4.yaml" if variant == "qlora" else "lora_bf16.yaml")
        recipe = load_recipe(hardware=hardware_defaults, argv=[str(recipe_path)] +
                             [item for key, value in keys.items() for item in (f"--{key}", str(value))])
        trainer = train(recipe)
        summary = json.loads((workdir / "toolkit-out" / "summary.json").read_text())
        tokens = summary["train/input_tokens"]
    else:
        from datasets import load_dataset
        from peft import LoraConfig
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dataset = load_dataset("json", data_files=str(data))["train"].shuffle(seed=0)
        torch.manual_seed(0)
        model = peer_model(model_dir, variant, dtype)
        checkpointing = variant == "qlora"  # as the toolkit's QLoRA recipe and peft's k-bit preparation do
        if arm == "baseline":
            from peft import get_peft_model
            from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

            def tokenize(row):  # causal LM: the labels are the input ids
                encoded = tokenizer(row["text"] + tokenizer.eos_token, truncation=True,
                                    max_length=shape["lengths"][1])
                return {**encoded, "labels": list(encoded["input_ids"])}

            model = get_peft_model(model, LoraConfig(**LORA))
            trainer = counting(Trainer)(model=model, args=TrainingArguments(output_dir=str(workdir / "peer-out"),
                                                                            **common),
                                        train_dataset=dataset.map(tokenize, remove_columns=["text"]),
                                        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
        else:
            if trl_missing():
                sys.exit("trl is not installed: make install (it is in requirements.txt)")
            from trl import SFTConfig, SFTTrainer

            # Without the KV cache transformers keeps flattened examples apart (TRL's padding-free and packing rows).
            model.config.use_cache = False
            args = SFTConfig(output_dir=str(workdir / "peer-out"), dataset_text_field="text",
                             gradient_checkpointing=checkpointing,
                             **{"max_length": shape["lengths"][1], **TRL_ARMS[arm]}, **common)
            trainer = counting(SFTTrainer)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                           peft_config=LoraConfig(**LORA))
        trainer.train()
        tokens = int(trainer.tokens)  # the one read of the device-side count
    loss = [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]
    # Every arm: the Trainer's own wall time for train(), setup and all, so that nothing is left out of any.
    seconds = next(e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e)
    result = {"arm": arm, "variant": variant, "seconds_per_step": seconds / steps,
              "tokens_per_second": tokens / seconds, "final_loss": loss,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "steps": trainer.state.global_step}
    if torch.cuda.is_available():
        result["peak_vram_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_vram_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        if arm == "toolkit":  # its metrics callback resets torch's peak counter at each log step: take its maximum
            result["peak_vram_allocated_gb"] = max(result["peak_vram_allocated_gb"],
                                                   summary["train/peak_vram_gb"] * 1e9 / 2**30)
            result["peak_vram_reserved_gb"] = max(result["peak_vram_reserved_gb"],
                                                  summary["train/peak_vram_reserved_gb"] * 1e9 / 2**30)
        utilisation = model_flops_utilisation(trainer.model, tokens, steps * shape["batch"], seconds,
                                              torch.cuda.get_device_name())
        if utilisation is not None:
            result["mfu"] = utilisation
    return result


def model_flops_utilisation(model, tokens: int, samples: int, seconds: float, device_name: str) -> float | None:
    """MFU of an arm by the toolkit's own formula (finetune.training.metrics), from its non-padding tokens: FLOPs
    spent on padding count as lost, as they are. None for a GPU missing from the peak table."""
    from finetune.model.load import count_parameters
    from finetune.training import flops

    _, total = count_parameters(model)
    total_flops = flops.training_flops(model, total, tokens, samples, lora=True)
    return flops.mfu(total_flops, seconds, device_name, world_size=1)


ROWS = (  # (result key, label, how repeats combine)
    ("seconds_per_step", "seconds/step, min", min), ("seconds_per_step", "seconds/step, median", statistics.median),
    ("tokens_per_second", "tokens/s, median", statistics.median),
    ("peak_rss_gb", "peak RSS (GB)", statistics.median),
    ("peak_vram_allocated_gb", "peak VRAM alloc (GB)", statistics.median),
    ("peak_vram_reserved_gb", "peak VRAM reserv (GB)", statistics.median),
    ("mfu", "MFU", statistics.median), ("final_loss", "final loss", statistics.median))
LOWER_IS_BETTER = {"seconds_per_step", "peak_rss_gb", "peak_vram_allocated_gb", "peak_vram_reserved_gb"}


def side_by_side(results: dict[str, list[dict]]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The table's lines, and per label the combined value of every arm. The ratio columns are the toolkit's value
    over the best peer's (the fastest, the smallest) and over the baseline's."""
    arms = list(results)
    peers = [arm for arm in arms if arm != "toolkit"]
    table, lines = {}, [f"{'':22}" + "".join(f"{arm:>17}" for arm in arms) + f"{'toolkit/best peer':>19}"
                        f"{'toolkit/baseline':>18}"]
    for key, label, combine in ROWS:
        if not all(key in run for runs in results.values() for run in runs):
            continue
        values = {arm: combine([run[key] for run in runs]) for arm, runs in results.items()}
        table[label] = values
        digits = 6 if key == "final_loss" else 4
        line = f"{label:22}" + "".join(f"{values[arm]:>17.{digits}f}" for arm in arms)
        if "toolkit" in values and peers and key != "final_loss":
            best = (min if key in LOWER_IS_BETTER else max)(values[arm] for arm in peers)
            line += f"{values['toolkit'] / best:>19.3f}"
            line += f"{values['toolkit'] / values['baseline']:>18.3f}" if "baseline" in values else ""
        lines.append(line)
    return lines, table


def verdicts(table: dict[str, dict[str, float]], size: str) -> list[str]:
    """The issue's targets, each as met or NOT met (skipped where an arm it needs did not run)."""
    out = []
    speed, loss = table["tokens/s, median"], table["final loss"]
    trl = [arm for arm in speed if arm.startswith("trl-")]
    if "toolkit" in speed and "baseline" in speed:
        gpu = size == "gpu"
        over_base = speed["toolkit"] / speed["baseline"]
        out.append(f"speed: {over_base:.2f}x the baseline (target >= 2x: {'met' if over_base >= 2 else 'NOT met'})")
        if trl:
            best = max(trl, key=speed.get)
            over_trl, aim = speed["toolkit"] / speed[best], 1.3 if gpu else 1.5
            out.append(f"speed: {over_trl:.2f}x the best TRL arm, {best} (target >= {aim}x: "
                       f"{'met' if over_trl >= aim else 'NOT met'})")
        gap = abs(loss["toolkit"] - loss["baseline"]) / loss["baseline"]
        out.append(f"final loss {100 * gap:.2f}% from the baseline's (tolerance {100 * LOSS_TOLERANCE:.1f}%: "
                   f"{'met' if gap <= LOSS_TOLERANCE else 'NOT met'})")
    memory = table.get("peak VRAM alloc (GB)") or table["peak RSS (GB)"]
    if "toolkit" in memory and "baseline" in memory:
        ratio = memory["toolkit"] / memory["baseline"]
        below = all(memory["toolkit"] < memory[arm] for arm in trl)
        out.append(f"peak memory: {ratio:.2f}x the baseline (target on SIZE=vocab <= 0.5x: "
                   f"{'met' if ratio <= 0.5 else 'NOT met'}); below every TRL arm: {'yes' if below else 'NO'}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="cpu")
    parser.add_argument("--variant", choices=VARIANTS, default="lora")
    parser.add_argument("--steps", type=int, help="optimizer steps per arm (default: the size's)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every arm, interleaved")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench-train")
    parser.add_argument("--toolkit_set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="recipe keys for the toolkit arm, e.g. padding_free=false chunked_loss=false: what a "
                             "default buys (the other arms are unchanged; no target verdicts then)")
    parser.add_argument("--arm", choices=ARMS, help="run one arm here (used internally)")
    args = parser.parse_args()
    steps = args.steps or SIZES[args.size]["steps"]
    if steps < 1 or args.repeats < 1:
        parser.error(f"--steps and --repeats must be at least 1, got {steps} and {args.repeats}")
    toolkit_set = recipe_settings(parser, args.toolkit_set)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args.arm, args.size, args.variant, steps, args.workdir, toolkit_set)))
        return
    arms = [arm for arm in args.arms if not (arm.startswith("trl-") and trl_missing())]
    if len(arms) < len(args.arms):
        print("skipping the TRL arms: trl is not installed (make install: it is in requirements.txt)")
    build_inputs(args.size, args.workdir)
    results = {arm: [] for arm in arms}
    for repeat in range(1, args.repeats + 1):
        for arm in arms:
            settings = f", {' '.join(args.toolkit_set)}" if arm == "toolkit" and toolkit_set else ""
            print(f"repeat {repeat}/{args.repeats}: {arm} ({args.variant}, {args.size} size, {steps} steps"
                  f"{settings})...", flush=True)
            output = subprocess.run([sys.executable, __file__, "--arm", arm, "--size", args.size, "--variant",
                                     args.variant, "--steps", str(steps), "--workdir", str(args.workdir),
                                     *(["--toolkit_set", *args.toolkit_set] if args.toolkit_set else [])],
                                    capture_output=True, text=True)
            line = next((x for x in output.stdout.splitlines() if x.startswith("RESULT ")), None)
            if output.returncode != 0 or line is None:
                sys.exit(f"{arm} arm failed:\n{output.stderr[-3000:]}")
            results[arm].append(json.loads(line[len("RESULT "):]))
            print(f"  {results[arm][-1]['seconds_per_step']:.4f} s/step", flush=True)
    lines, table = side_by_side(results)
    print("\n" + "\n".join(lines) + "\n")
    if toolkit_set:  # the targets are for the toolkit as shipped
        print("toolkit arm with " + " ".join(args.toolkit_set) + ": no target verdicts (the targets are for the "
              "defaults)")
        return
    print("\n".join(verdicts(table, args.size)))


if __name__ == "__main__":
    main()
