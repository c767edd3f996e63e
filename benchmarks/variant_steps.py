"""Step time of every variant on the real model, and the compute dtype's cost: what `dtype: auto` saves.

    make bench-variants                                  # SmolLM2-135M (make smollm2), 20 steps, 2 repeats
    python benchmarks/variant_steps.py --steps 10 --repeats 1 --variants lora-fp32 qlora-fp32

Each variant trains recipes/smollm2/lora.yaml's settings (batch 8, the contacts task) in its own process, with no
evaluation or checkpoint, and reports the toolkit's own training clock (summary.json's train/train_seconds) per
step; variants run interleaved (A B C ... A B C ...), so that a busy machine shows as spread between repeats.

The target: on a CPU without native bf16, a QLoRA step at most 1.5x an fp32 LoRA step. There `dtype: auto` computes
the 4-bit layers in fp32 (qlora-fp32 here); qlora-bf16 is what a bf16 recipe costs (emulated there: ~10x before
`auto`, native on CPUs with AVX512-BF16 or AMX). The fp32 path runs the same code on every CPU, so its ratio is
measured on any of them; the bf16 rows depend on the CPU, which the output names.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure this checkout's toolkit

VARIANTS = {  # name: (recipe under recipes/smollm2, overrides)
    "lora-fp32": ("lora", {"dtype": "float32"}),
    "lora-bf16": ("lora", {"dtype": "bfloat16"}),
    "qlora-fp32": ("qlora", {"dtype": "float32"}),
    "qlora-bf16": ("qlora", {"dtype": "bfloat16"}),
    "qlora-auto": ("qlora", {}),
    "int8-auto": ("int8", {}),
    "full-fp32": ("full", {"dtype": "float32"}),
}
TARGET = 1.5  # qlora-fp32 / lora-fp32, the CPU without native bf16's QLoRA (dtype auto there)


def run_variant(name: str, steps: int, workdir: Path) -> dict:
    """Train one variant in this process; returns its seconds per step and final loss."""
    from finetune.model.load import hardware_defaults
    from finetune.recipe.load import load_recipe
    from finetune.run import train

    recipe, overrides = VARIANTS[name]
    out = workdir / name
    keys = {"max_steps": steps, "eval_strategy": "no", "save_strategy": "no", "report_to": "none",
            "disable_tqdm": True, "logging_steps": steps, "output_dir": out, "overwrite_output_dir": True,
            **overrides}
    argv = [str(ROOT / "recipes" / "smollm2" / f"{recipe}.yaml")] + \
        [item for key, value in keys.items() for item in (f"--{key}", str(value))]
    train(load_recipe(argv, hardware=hardware_defaults))
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds_per_step": summary["train/train_seconds"] / steps, "loss": summary["train/mean_loss"],
            "compute_dtype": summary["model/compute_dtype"], "peak_ram_gb": summary["train/peak_ram_gb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench-variants")
    parser.add_argument("--variant", choices=list(VARIANTS), help="run one variant here (used internally)")
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        parser.error(f"--steps and --repeats must be at least 1, got {args.steps} and {args.repeats}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args.steps, args.workdir)))
        return
    from finetune.embedded import smollm2
    from finetune.model.load import cpu_flags, dtype_choice

    smollm2.ensure_assets()
    results: dict[str, list[dict]] = {name: [] for name in args.variants}
    for repeat in range(1, args.repeats + 1):
        for name in args.variants:
            print(f"repeat {repeat}/{args.repeats}: {name} ({args.steps} steps)...", flush=True)
            output = subprocess.run([sys.executable, __file__, "--variant", name, "--steps", str(args.steps),
                                     "--workdir", str(args.workdir)], capture_output=True, text=True)
            line = next((x for x in output.stdout.splitlines() if x.startswith("RESULT ")), None)
            if output.returncode != 0 or line is None:
                sys.exit(f"{name} failed:\n{output.stderr[-3000:]}")
            results[name].append(json.loads(line[len("RESULT "):]))
            print(f"  {results[name][-1]['seconds_per_step']:.3f} s/step", flush=True)
    native = sorted(set(cpu_flags()) & {"avx512_bf16", "amx_bf16", "bf16"})
    print(f"\nCPU: {'native bf16 (' + ', '.join(native) + ')' if native else 'no native bf16'}; dtype auto here: "
          f"{dtype_choice('auto')[0]}")
    print(f"{'variant':12}{'compute':>10}{'s/step min':>12}{'s/step median':>15}{'x lora-fp32':>13}"
          f"{'mean loss':>11}{'peak RAM GB':>13}")
    base = statistics.median(r["seconds_per_step"] for r in results["lora-fp32"]) if "lora-fp32" in results else None
    for name, runs in results.items():
        times = [r["seconds_per_step"] for r in runs]
        median = statistics.median(times)
        ratio = f"{median / base:>13.2f}" if base else f"{'-':>13}"
        print(f"{name:12}{runs[0]['compute_dtype']:>10}{min(times):>12.3f}{median:>15.3f}{ratio}"
              f"{statistics.median(r['loss'] for r in runs):>11.4f}"
              f"{statistics.median(r['peak_ram_gb'] for r in runs):>13.2f}")
    if base and "qlora-fp32" in results:
        ratio = statistics.median(r["seconds_per_step"] for r in results["qlora-fp32"]) / base
        print(f"\nQLoRA as dtype auto runs it on a CPU without native bf16 (fp32 compute): {ratio:.2f}x the fp32 LoRA "
              f"step (target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
