"""The benchmark scripts under benchmarks/: they run, and report what they say they report. Checks of behaviour,
never of speed (speed is measured by `make bench-train`, not asserted in tests)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_speed_runs_every_arm_and_reports_side_by_side(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/train_speed.py"), "--size", "smoke", "--steps",
                             "2", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env=subprocess_env(WANDB_DISABLED="true"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line[:24].strip(): line[24:].split() for line in result.stdout.splitlines() if line[:24].strip()}
    for label in ("seconds/step", "tokens/s (no padding)", "peak host RAM (GB)", "final loss (mean)"):
        assert len(rows[label]) == 5, rows  # three arms, then the two ratios to the baseline
        assert all(float(value) > 0 for value in rows[label])
    # Same data, order, schedule and seed in fp32: the three arms' losses agree (what the tolerance is for).
    losses = [float(value) for value in rows["final loss (mean)"][:3]]
    assert max(losses) - min(losses) <= 1e-4 * losses[0]
    assert re.search(r"speed: [\d.]+x the baseline .*tolerance 0\.5%: met", result.stdout)


def test_train_speed_mfu_uses_the_toolkit_formula_on_non_padding_tokens(llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    train_speed = load_script("train_speed")
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    layers, hidden = base.config.num_hidden_layers, base.config.hidden_size
    embedding = base.get_input_embeddings().weight.numel()
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    total = sum(p.numel() for p in model.parameters())
    tied = base.config.tie_word_embeddings
    matmul = total - (0 if tied else embedding)  # the embedding lookup is free; a tied one is also the head
    tokens, samples, seconds = 12_000, 100, 2.0
    expected = tokens * (4 * matmul + 12 * layers * hidden * tokens / samples) / seconds / 989e12
    measured = train_speed.model_flops_utilisation(model, tokens, samples, seconds, "NVIDIA H100 80GB HBM3")
    assert measured == pytest.approx(expected, rel=1e-9)
    assert train_speed.model_flops_utilisation(model, tokens, samples, seconds, "Some Unlisted GPU") is None


def test_callback_overhead_times_the_toolkit_code_it_adds(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/callback_overhead.py"), "--steps", "5",
                             "--rounds", "1", "--output_dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env=subprocess_env(WANDB_DISABLED="true"))
    assert result.returncode == 0, result.stderr[-3000:]
    attributed = re.search(r"callback overhead \(attributed\): ([\d.]+)% of training time", result.stdout)
    assert attributed and float(attributed.group(1)) > 0  # the added code ran, and was timed
    assert re.search(r"round 1: baseline [\d.]+ ms/step, with callback [\d.]+ ms/step", result.stdout)
