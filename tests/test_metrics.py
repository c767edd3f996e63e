"""Metrics: each number checked against independent evidence (files on disk, the data itself, W&B's own record)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from finetune.embedded.tiny import write_jsonl
from finetune.training import flops, metrics
from tests.conftest import REPO, accelerate_launch, run_to_end, subprocess_env, train_and_summarise
from tests.wandb_file import load_run, offline_runs

CUDA_KEYS = {"train/peak_vram_gb", "train/peak_vram_reserved_gb", "train/mfu"}


def _shapes(model_dir: Path) -> dict[str, int]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        return {key: math.prod(handle.get_slice(key).get_shape()) for key in handle.keys()}


def elements(path: Path) -> int:
    with safe_open(str(path), "pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())


# Pure functions.

def test_perplexity_and_rate():
    assert metrics.perplexity(0.0) == 1.0
    assert metrics.perplexity(2.0) == pytest.approx(7.389056, rel=1e-6)
    assert metrics.perplexity(1e6) == float("inf")
    assert metrics.rate(100, 4.0) == 25.0 and metrics.rate(5, 0.0) == 0.0


def test_batch_counts_skip_padding_masked_prompt_and_the_first_position():
    features = [
        {"input_ids": [1, 5, 6, 7, 2], "labels": [-100, -100, 6, 7, 2]},
        {"input_ids": [1, 9, 2], "labels": [1, 9, 2]},  # train_on_prompt: label 0 predicts nothing
    ]
    assert metrics.batch_counts(features) == (2, 8, 5)


def test_flops_per_token_lora_and_full():
    # 1M matmul params, 2 layers of width 64, context 100: attention 12 * 2 * 64 * 100 = 153,600.
    assert flops.flops_per_token(1_000_000, 2, 64, 100, lora=True) == 4_000_000 + 153_600
    assert flops.flops_per_token(1_000_000, 2, 64, 100, lora=False) == 6_000_000 + 153_600


def test_peak_flops_table_and_mfu():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops("Some Future GPU") is None and flops.peak_flops(None) is None
    assert flops.mfu(989e12 * 0.5 * 2 * 10, 10, "NVIDIA H100 80GB HBM3", world_size=2) == pytest.approx(0.5)
    assert flops.mfu(1e15, 10, "unknown", 1) is None


def test_weight_bits():
    assert metrics.weight_bits("int4", torch.bfloat16) == 4
    assert metrics.weight_bits("int8", torch.bfloat16) == 8
    assert metrics.weight_bits("none", torch.bfloat16) == 16
    assert metrics.weight_bits("none", torch.float32) == 32


def test_report_table_lists_present_keys_only():
    table = metrics.format_report({"train/input_tokens_per_second": 1234.5, "run/world_size": 2})
    assert "input tokens/s, all ranks" in table and "1,234" in table and "processes" in table
    assert "VRAM" not in table


# Real runs, in process (no W&B).

def run_recipe(name: str, model_dir: Path, dataset: Path, out: Path, *extra: str):
    """A shipped recipe on a tiny model, in bf16 on every CPU unless `extra` sets --dtype (the k-bit recipes'
    `dtype: auto` follows the CPU)."""
    keys = {"--dtype": "bfloat16", **dict(zip(extra[::2], extra[1::2], strict=True))}
    return train_and_summarise(REPO / "recipes" / name, model_name_or_path=model_dir, dataset=dataset, output_dir=out,
                               **{key.removeprefix("--"): value for key, value in keys.items()})


@pytest.mark.parametrize("recipe", ["qlora_int4.yaml", "lora_bf16.yaml", "lora_int8.yaml"])
def test_parameter_counts_match_the_files_on_disk(recipe, llama_dir, data_files, tmp_path):
    _, summary = run_recipe(recipe, llama_dir, data_files["alpaca"], tmp_path / "out", "--max_steps", "2")
    adapter = elements(tmp_path / "out" / "adapter_model.safetensors")
    base = elements(llama_dir / "model.safetensors")
    assert summary["model/trainable_params"] == adapter
    assert summary["model/total_params"] == base + adapter  # 4-bit layers at their true size, not halved
    assert summary["model/trainable_percent"] == pytest.approx(100 * adapter / (base + adapter))
    assert summary["model/weight_bits"] == {"qlora_int4.yaml": 4, "lora_int8.yaml": 8, "lora_bf16.yaml": 16}[recipe]
    size = (tmp_path / "out" / "adapter_model.safetensors").stat().st_size / 1e6
    assert summary["model/saved_weights_mb"] == pytest.approx(size)
    assert summary["model/memory_footprint_gb"] > 0
    # The base as held in memory: 4-bit and 8-bit layers at their packed size, the rest (embeddings, norms) 16-bit.
    linear = sum(v for k, v in _shapes(llama_dir).items() if "proj" in k)
    rest = base - linear
    bits = {"qlora_int4.yaml": 4, "lora_int8.yaml": 8, "lora_bf16.yaml": 16}[recipe]
    assert summary["model/base_weights_gb"] == pytest.approx((linear * bits / 8 + rest * 2) / 1e9)


def test_full_fine_tuning_counts_every_parameter(llama_dir, data_files, tmp_path):
    _, summary = run_recipe("full_bf16.yaml", llama_dir, data_files["text"], tmp_path / "out", "--max_steps", "1",
                            "--dtype", "float32")
    assert summary["model/trainable_params"] == summary["model/total_params"] == \
        elements(llama_dir / "model.safetensors")
    assert summary["model/weight_bits"] == 32
    # What was saved is the whole model, and that is what the size says.
    assert summary["model/saved_weights_mb"] == pytest.approx((tmp_path / "out" / "model.safetensors").stat().st_size
                                                              / 1e6)
    assert summary["model/base_weights_gb"] == pytest.approx(summary["model/total_params"] * 4 / 1e9)


def test_total_tokens_match_the_data_under_gradient_accumulation(llama_dir, tmp_path):
    """One epoch over 40 text rows, 4 per micro-batch, 2 micro-batches per step: every row trained once."""
    texts = [f"row {i}: " + "abcdefghij"[: 1 + i % 10] * (1 + i % 3) for i in range(40)]
    dataset = write_jsonl([{"text": text} for text in texts], tmp_path / "text.jsonl")
    trainer, summary = run_recipe(
        "lora_bf16.yaml", llama_dir, dataset, tmp_path / "out", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--eval_size", "0",
        "--eval_strategy", "no", "--logging_steps", "2", "--dtype", "float32")
    # One token per character: the model sees BOS + text + EOS and is trained on text + EOS.
    assert summary["train/target_tokens"] == sum(len(text) + 1 for text in texts)
    assert summary["train/input_tokens"] == sum(len(text) + 2 for text in texts)
    assert summary["train/samples"] == 40
    assert summary["final/total_steps"] == trainer.state.global_step == 5
    assert summary["train/input_tokens_per_second"] == pytest.approx(
        summary["train/input_tokens"] / summary["train/train_seconds"])
    assert summary["train/train_seconds"] <= trainer.state.log_history[-1]["train_runtime"]
    # The mean over every step equals the Trainer's own train_loss (one train() call, no resume).
    assert summary["train/mean_loss"] == pytest.approx(trainer.state.log_history[-1]["train_loss"], rel=1e-6)
    assert not CUDA_KEYS & set(summary)  # absent on CPU, not zero
    # The process's own peak resident memory bounds it (in GB of 10^9 bytes) from above.
    assert 0.1 < summary["train/peak_ram_gb"] <= metrics.host_peak_rss_gb()
    assert summary["run/world_size"] == 1
    # LoRA FLOPs: 4 per matmul parameter (the tied embedding is the output head's) plus attention, per token.
    matmul = elements(llama_dir / "model.safetensors") + elements(tmp_path / "out" / "adapter_model.safetensors")
    tokens, context = summary["train/input_tokens"], summary["train/input_tokens"] / 40
    assert summary["train/total_flops"] == pytest.approx(tokens * (4 * matmul + 12 * 2 * 64 * context))
    assert "eval/loss" not in summary


# Real runs through the command line, read back from W&B's own offline run file.

def launch(tmp_path: Path, args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    env = subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    return run_to_end(accelerate_launch(*args, processes=processes), cwd=tmp_path, env=env, timeout=300)


@pytest.mark.slow
def test_summary_json_equals_the_wandb_summary(llama_dir, data_files, tmp_path):
    """The issue's launch line: QLoRA, evaluation every 3 steps."""
    out = tmp_path / "out"
    result = launch(tmp_path, [str(REPO / "recipes/qlora_int4.yaml"), "--model_name_or_path", str(llama_dir),
                               "--dataset", str(data_files["messages"]), "--max_steps", "6", "--eval_strategy",
                               "steps", "--eval_steps", "3", "--logging_steps", "2", "--output_dir", str(out),
                               "--eval_size", "8", "--disable_tqdm", "true"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    run = load_run(offline_runs(tmp_path)[0])
    assert {key: run.summary.get(key) for key in summary} == summary
    assert summary["eval/perplexity"] == pytest.approx(math.exp(summary["eval/loss"]))
    evals = [row for row in run.history if "eval/loss" in row]
    assert [row["train/global_step"] for row in evals] == [3, 6]  # the last step's evaluation is the final one
    for row in evals:
        assert row["eval/perplexity"] == pytest.approx(math.exp(row["eval/loss"]))
    assert summary["eval/best_perplexity"] == pytest.approx(min(row["eval/perplexity"] for row in evals))
    train_rows = [row for row in run.history if "train/loss" in row]
    assert [row["train/global_step"] for row in train_rows] == [2, 4, 6]
    for row in train_rows:
        assert row["train/perplexity"] == pytest.approx(math.exp(row["train/loss"]))
        assert row["train/input_tokens_per_second"] > 0 and row["train/samples_per_second"] > 0
        assert "train/peak_vram_gb" not in row
    assert not CUDA_KEYS & set(summary)
    # The console table shows the same numbers, each with its label.
    table = {label: value for key, label, fmt in metrics.REPORT_ROWS if key in summary
             for value in [fmt.format(summary[key])]}
    for label, value in table.items():
        assert re.search(rf"^{re.escape(label)} +{re.escape(value)}$", result.stderr, re.MULTILINE), label


@pytest.mark.slow
def test_two_process_totals_are_the_sum_over_both_ranks(llama_dir, tmp_path):
    texts = [f"sample {i} " + "xyz" * (i % 5) for i in range(48)]
    dataset = write_jsonl([{"text": text} for text in texts], tmp_path / "text.jsonl")
    out = tmp_path / "out"
    result = launch(tmp_path, [str(REPO / "recipes/qlora_int4.yaml"), "--model_name_or_path", str(llama_dir),
                               "--dataset", str(dataset), "--num_train_epochs", "1", "--output_dir", str(out),
                               "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                               "--eval_size", "0", "--eval_strategy", "no",
                               "--use_cpu", "true", "--logging_steps", "1", "--disable_tqdm", "true"], processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # 48 rows over 2 ranks x 4 per micro-batch x 2 micro-batches: 3 steps, every row exactly once.
    assert summary["run/world_size"] == 2 and summary["final/total_steps"] == 3
    assert summary["train/samples"] == 48
    assert summary["train/target_tokens"] == sum(len(text) + 1 for text in texts)
    assert summary["train/input_tokens"] == sum(len(text) + 2 for text in texts)
    (run_dir,) = offline_runs(tmp_path)
    assert load_run(run_dir).summary["train/target_tokens"] == summary["train/target_tokens"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vram_figures_match_torch(llama_dir, data_files, tmp_path, monkeypatch):
    """The summary's peak is the run's true peak: the callback resets torch's peak counter as it goes, so the
    reference is the highest value torch reported before any reset and at the end."""
    torch.cuda.reset_peak_memory_stats()
    peaks, reset = [], torch.cuda.reset_peak_memory_stats
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda *a, **k: (peaks.append(torch.cuda.max_memory_allocated()), reset(*a, **k)))
    _, summary = run_recipe("qlora_int4.yaml", llama_dir, data_files["alpaca"], tmp_path / "out", "--max_steps", "3")
    observed = max(peaks + [torch.cuda.max_memory_allocated()]) / metrics.GB
    assert 0 < summary["train/peak_vram_gb"] <= observed + 1e-9
    assert summary["train/peak_vram_reserved_gb"] >= summary["train/peak_vram_gb"]


# Training time: evaluations and checkpoints left out, wherever they fall; nothing dropped.

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_training_clock_stops_for_evaluations_and_saves_and_continues(monkeypatch):
    """Events as the Trainer sends them; every step takes 1 s, every evaluation 10 s, every save 100 s."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    clock = FakeClock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    monkeypatch.setattr(metrics, "reduce_across_ranks", lambda values, op="sum", group=None: list(values))
    callback = metrics.MetricsCallback()
    args = SimpleNamespace(eval_on_start=True, save_strategy="steps")
    state = SimpleNamespace(global_step=0)
    control = TrainerControl()
    callback.on_train_begin(args, state, control)
    clock.now += 10  # eval_on_start
    callback.on_evaluate(args, state, control)
    for step in range(1, 8):  # eval after steps 2 and 7 (the last), a checkpoint after 3 and 7, logs after 4
        control = TrainerControl()
        callback.on_step_begin(args, state, control)
        callback.add((2, 10, 5))
        clock.now += 1
        state.global_step = step
        control.should_evaluate, control.should_save = step in (2, 7), step in (3, 7)
        control.should_log, control.should_training_stop = step == 4, step == 7
        callback.on_step_end(args, state, control)
        if control.should_log:
            logs = {"loss": 1.0}
            callback.add_to_log(logs)
            assert logs["input_tokens_per_second"] == 40 / 4  # 4 steps of 10 tokens in 4 s of training
        if control.should_evaluate:
            clock.now += 10
            callback.on_evaluate(args, state, control)
        if control.should_save:
            clock.now += 100
            callback.on_save(args, state, control)
    clock.now += 10  # the final evaluation, after training
    callback.on_train_end(args, state, control)
    assert callback.train_seconds == 7
    assert callback.totals.input_tokens == 70 and callback.totals.samples == 14
    assert callback.evaluated_at(7) and not callback.evaluated_at(6)


@pytest.fixture
def step_timer():
    """An independent stopwatch: the sum of the Trainer's step durations, on_step_begin to on_step_end."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        seconds = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self.started

    return StepTimer()


@pytest.mark.parametrize("shape", [
    ["--max_steps", "6", "--logging_steps", "50", "--eval_strategy", "steps", "--eval_steps", "50"],  # no log step
    ["--max_steps", "8", "--logging_steps", "3", "--eval_strategy", "steps", "--eval_steps", "2",
     "--save_strategy", "steps", "--save_steps", "3", "--eval_on_start", "true"],  # evals and saves between logs
    ["--max_steps", "6", "--logging_steps", "1", "--eval_strategy", "no"],
], ids=["shorter-than-a-log-interval", "evals-and-saves-between-logs", "log-every-step"])
def test_throughput_is_over_training_time_in_every_run_shape(shape, step_timer, monkeypatch, llama_dir, data_files,
                                                              tmp_path):
    from finetune.training.trainer import FinetuneTrainer

    original = FinetuneTrainer.__init__

    def with_timer(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.callback_handler.callbacks.insert(0, step_timer)

    monkeypatch.setattr(FinetuneTrainer, "__init__", with_timer)
    trainer, summary = run_recipe("lora_bf16.yaml", llama_dir, data_files["messages"], tmp_path / "out", "--dtype",
                                  "float32", "--eval_size", "8", *shape)
    seconds = summary["train/train_seconds"]
    assert summary["train/input_tokens_per_second"] * seconds == pytest.approx(summary["train/input_tokens"])
    assert summary["train/samples_per_second"] * seconds == pytest.approx(summary["train/samples"])
    # Every training step is in it (nothing dropped) ...
    assert seconds >= step_timer.seconds * (1 - 1e-3)
    # ... and no evaluation is (the Trainer's runtime holds training, its evaluations and its saves).
    history = trainer.state.log_history
    eval_seconds = sum(e["eval_runtime"] for e in history[:-1] if "eval_runtime" in e)  # the last is after training
    runtime = next(e["train_runtime"] for e in history if "train_runtime" in e)
    assert seconds <= runtime - eval_seconds
    # One evaluation at the last step, not two.
    assert [e["step"] for e in history if "eval_loss" in e].count(trainer.state.global_step) == 1


def test_totals_do_not_depend_on_how_a_step_is_split(llama_dir, data_files, tmp_path):
    """16 examples per step as 16 x 1 or as 4 x 4 gradient accumulation: the same examples, the same totals."""
    summaries = [run_recipe("lora_bf16.yaml", llama_dir, data_files["messages"], tmp_path / name, "--dtype",
                            "float32", "--max_steps", "2", "--eval_size", "0", "--eval_strategy", "no",
                            "--lora_dropout", "0", "--per_device_train_batch_size", batch,
                            "--gradient_accumulation_steps", accumulation)[1]
                 for name, batch, accumulation in (("whole", "16", "1"), ("split", "4", "4"))]
    for key in ("train/input_tokens", "train/target_tokens", "train/samples"):
        assert summaries[0][key] == summaries[1][key], key
    assert summaries[0]["train/samples"] == 32
    assert summaries[0]["train/mean_loss"] == pytest.approx(summaries[1]["train/mean_loss"], rel=1e-5)


def test_peak_host_memory_is_the_runs_own_not_its_parents():
    """Started from a large process (a notebook, a test runner), a run reports its own peak: Linux keeps
    ru_maxrss across fork and exec, so it would report the parent's size."""
    import subprocess
    import sys

    large = bytearray(1_000_000_000)
    large[::4096] = b"\1" * len(large[::4096])  # touched: resident
    child = subprocess.run([sys.executable, "-c", "from finetune.training.metrics import host_peak_rss_gb; "
                            "print(host_peak_rss_gb())"], capture_output=True, text=True, check=True)
    assert float(child.stdout) < 0.8, child.stdout  # the child imports torch: ~0.4 GB
    del large
