"""Inference benchmark of a trained run: latency, generation speed, memory, size and answer quality.

    python -m finetune.commands.bench outputs/qlora_int4                # writes outputs/qlora_int4/bench.json
    python -m finetune.commands.bench outputs/qlora_int4 --samples 64 --max_new_tokens 64
    make bench RUN=outputs/qlora_int4

The model is loaded the way it was trained (base with the same quantization plus the adapter; or a full model).
Prompts come from the run's own eval split, rebuilt from its recipe: each prompt is an example cut where its first
answer starts, and the reference answer is that answer. Greedy generation after warm-up; each sample timed alone
(batch 1, the latency a user waits for). The same numbers go to `bench.json` and, when tracking is on, to a W&B
run with job_type `inference` in the training run's group, named after it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from finetune import errors
from finetune.data.eval_tasks import MAX_NEW_TOKENS
from finetune.data.load import IGNORE_INDEX
from finetune.errors import UsageError
from finetune.training import rundir


def prompts_and_references(dataset, tokenizer, count: int) -> list[tuple[list[int], str | None]]:
    """(prompt ids, reference answer or None) for up to `count` tokenized examples.

    The prompt is everything before the first trained token; the reference is that first contiguous run of
    trained tokens, decoded without special tokens. Examples trained on every token (plain text) have no
    reference: their first half is the prompt. Preference rows (finetune.data.preference) have their prompt, and
    their chosen (or desirable) answer as the reference.
    """
    pairs = []
    for row in dataset.select(range(min(count, len(dataset)))):
        if "prompt_ids" in row:
            answer = row.get("chosen_ids", row.get("completion_ids"))
            good = row.get("label", True)
            pairs.append((row["prompt_ids"], tokenizer.decode(answer, skip_special_tokens=True).strip()
                          if good else None))
            continue
        ids, labels = row["input_ids"], row["labels"]
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX and i > 0]
        if not trained or trained[0] <= 1:
            pairs.append((ids[: max(1, len(ids) // 2)], None))
            continue
        start = end = trained[0]
        while end < len(labels) and labels[end] != IGNORE_INDEX:
            end += 1
        pairs.append((ids[:start], tokenizer.decode(ids[start:end], skip_special_tokens=True).strip()))
    return pairs


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def size_on_disk_gb(paths: list[Path]) -> float:
    from finetune.training.metrics import GB

    return sum(p.stat().st_size for path in paths for p in ([path] if path.is_file() else path.rglob("*"))
               if p.is_file()) / GB


def base_weight_files(name_or_path: str) -> list[Path]:
    """The base model's weight files: a local directory's, or the hub cache's copy."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return rundir.weight_files(path)
    try:
        from huggingface_hub import snapshot_download

        return rundir.weight_files(Path(snapshot_download(name_or_path, local_files_only=True)))
    except Exception:  # not in the cache: the size can't be measured offline
        return []


def generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """Greedy generation after one prompt (batch 1): (new token ids, seconds)."""
    import torch

    device = next(model.parameters()).device
    inputs = torch.tensor([prompt_ids], device=device)
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize()  # the time must include the GPU work: a sync per sample, by design
    return output[0, len(prompt_ids):].tolist(), time.perf_counter() - started


def answer(new_ids: list[int], tokenizer) -> tuple[list[int], str]:
    """A generation's tokens up to and including EOS, and its text as scored: special tokens dropped, stripped.
    (finetune.data.eval_tasks.write_task scores the harness's generations the same way.)"""
    if tokenizer.eos_token_id in new_ids:
        new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id) + 1]
    return new_ids, tokenizer.decode(new_ids, skip_special_tokens=True).strip()


SAMPLES = "samples"  # bench.json's list of {prompt, reference, answer}: what the model said, not only how fast


def run_benchmark(output_dir: Path, samples: int, max_new_tokens: int, warmup: int,
                  shown_samples: int = 16) -> dict[str, Any]:
    """Generate on the run's eval prompts and measure. Returns the `inference/*` metrics, and under SAMPLES the
    first `shown_samples` prompts with their reference and the model's answer."""
    from contextlib import nullcontext

    import torch

    from finetune.data.load import load_splits
    from finetune.training.metrics import GB, host_peak_rss_gb
    from finetune.training.rundir import load_for_inference

    recipe, tokenizer, model = load_for_inference(output_dir)
    evaluation = rundir.saved_eval_split(output_dir)
    if evaluation is None and not (output_dir / rundir.EVAL_SPLIT).is_dir():  # a run of an earlier version
        evaluation = load_splits(recipe.data, tokenizer, recipe.training.seed, lambda **_: nullcontext()).eval
    if evaluation is None:
        raise UsageError(f"{output_dir}: the run has no eval split to take prompts from")
    pairs = prompts_and_references(evaluation, tokenizer, samples)
    cuda = next(model.parameters()).device.type == "cuda"

    for prompt_ids, _ in pairs[:warmup]:
        generate(model, tokenizer, prompt_ids, max_new_tokens)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    latencies, generated_tokens, matches, judged, shown = [], 0, 0, 0, []
    from tqdm.auto import tqdm

    for prompt_ids, reference in tqdm(pairs, desc="generating", unit="sample", leave=False):
        new_ids, seconds = generate(model, tokenizer, prompt_ids, max_new_tokens)
        latencies.append(seconds)
        new_ids, text = answer(new_ids, tokenizer)
        generated_tokens += len(new_ids)
        if reference is not None:
            judged += 1
            matches += text == reference
        shown.append({"prompt": tokenizer.decode(prompt_ids, skip_special_tokens=False), "reference": reference,
                      "answer": text})

    files = rundir.weight_files(output_dir) + (base_weight_files(recipe.model.model_name_or_path)
                                        if recipe.model.use_lora else [])
    result: dict[str, Any] = {
        "inference/samples": len(pairs),
        "inference/latency_ms_p50": percentile(latencies, 50) * 1e3,
        "inference/latency_ms_p95": percentile(latencies, 95) * 1e3,
        "inference/latency_ms_mean": statistics.fmean(latencies) * 1e3,
        "inference/tokens_per_second": generated_tokens / sum(latencies),
        "inference/peak_ram_gb": host_peak_rss_gb(),
        "inference/weights_on_disk_gb": size_on_disk_gb(files),
        "inference/memory_footprint_gb": model.get_memory_footprint() / GB,
    }
    if cuda:
        result["inference/peak_vram_gb"] = torch.cuda.max_memory_allocated() / GB
    if judged:
        result["inference/exact_match"] = matches / judged
        result["inference/exact_match_samples"] = judged
    result[SAMPLES] = shown[:shown_samples]
    return result


def format_bench(result: dict[str, Any]) -> str:
    """The headline numbers, and the first answers against their references, for the console."""
    lines = [f"latency p50 {result['inference/latency_ms_p50']:,.0f} ms, p95 {result['inference/latency_ms_p95']:,.0f} "
             f"ms; {result['inference/tokens_per_second']:,.1f} tokens/s; peak RAM "
             f"{result['inference/peak_ram_gb']:.2f} GB"]
    if "inference/exact_match" in result:
        lines.append(f"exact match {result['inference/exact_match']:.1%} of {result['inference/exact_match_samples']}")
    lines += [f"  {row['reference']!r} -> {row['answer']!r}" for row in result[SAMPLES][:3] if row["reference"]]
    return "\n".join(lines)


def log_to_wandb(output_dir: Path, result: dict[str, Any]) -> None:
    """An `inference` run in the training run's group, named after it (when tracking is on)."""
    from finetune.tracking import wandb_run as tracking

    run = tracking.start_follow_up(output_dir, "inference")
    if run is not None:
        import wandb

        shown = result.get(SAMPLES, [])
        table = wandb.Table(columns=["prompt", "reference", "answer"],
                            data=[[row["prompt"], row["reference"], row["answer"]] for row in shown])
        run.log({"inference/answers": table})
        run.summary.update({key: value for key, value in result.items() if key != SAMPLES})
        run.finish()


def main(argv: list[str] | None = None) -> int:
    from finetune import logs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="a finished training run's output_dir")
    parser.add_argument("--samples", type=int, default=32, help="eval examples to generate on")
    parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--warmup", type=int, default=2, help="untimed generations first")
    parser.add_argument("--show", type=int, default=16, help="generated answers kept in bench.json and W&B")
    args = parser.parse_args(argv)
    logs.setup()
    try:
        for option, least in (("samples", 1), ("max_new_tokens", 1), ("warmup", 0), ("show", 0)):
            if getattr(args, option) < least:
                raise UsageError(f"--{option}: must be at least {least}, got {getattr(args, option)}")
        if rundir.unwritable(args.output_dir):
            raise UsageError(f"{rundir.unwritable(args.output_dir)} is not writable; bench.json goes into the run's "
                             "directory")
        result = run_benchmark(args.output_dir, args.samples, args.max_new_tokens, args.warmup, args.show)
        rundir.write_json(args.output_dir / rundir.BENCH, result)
        log_to_wandb(args.output_dir, result)
    except UsageError as error:
        return errors.report(error)
    print(json.dumps({key: value for key, value in result.items() if key != SAMPLES}, sort_keys=True))
    print(format_bench(result), file=sys.stderr)
    print(f"bench: {args.output_dir / rundir.BENCH} (with {len(result[SAMPLES])} generated answers)",
          file=sys.stderr)
    return errors.OK


if __name__ == "__main__":
    sys.exit(main())
