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


@pytest.mark.slow
def test_train_speed_runs_every_arm_and_reports_side_by_side(tmp_path):
    train_speed = load_script("train_speed")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/train_speed.py"), "--size", "smoke", "--steps",
                             "2", "--repeats", "2", "--workdir", str(tmp_path)], capture_output=True, text=True,
                            timeout=900, env=subprocess_env(WANDB_DISABLED="true"))
    assert result.returncode == 0, result.stderr[-3000:]
    # Without trl the benchmark says so and runs the other arms (CI installs only the runtime requirements).
    arms = [arm for arm in train_speed.ARMS if not (arm.startswith("trl-") and train_speed.trl_missing())]
    assert ("skipping the TRL arms: trl is not installed" in result.stdout) == (len(arms) < len(train_speed.ARMS))
    assert len(re.findall(r"^repeat [12]/2: ", result.stdout, re.M)) == 2 * len(arms)
    assert re.findall(r"^repeat \d/2: (\S+)", result.stdout, re.M) == arms * 2  # interleaved: A B C A B C
    lines = result.stdout.splitlines()
    (header,) = [line for line in lines if line.split()[:1] == ["baseline"]]  # the arm names, right-aligned
    assert header.split() == [*arms, "toolkit/best", "peer", "toolkit/baseline"]
    rows = {match[1]: match[2].split() for line in lines if (match := re.match(r"^(\S.*?)\s{2,}(\S.*)$", line))}
    for label in ("seconds/step, min", "seconds/step, median", "tokens/s, median", "peak RSS (GB)"):
        assert len(rows[label]) == len(arms) + 2, rows  # every arm, then the two ratios
        assert all(float(value) > 0 for value in rows[label])
    assert float(rows["seconds/step, min"][0]) <= float(rows["seconds/step, median"][0])
    # Same data, order, schedule and seed in fp32: the losses agree, TRL's packing aside (more examples per step).
    losses = dict(zip(arms, map(float, rows["final loss"]), strict=True))
    comparable = [loss for arm, loss in losses.items() if arm != "trl-packing"]
    assert max(comparable) - min(comparable) <= 1e-4 * losses["baseline"], losses
    assert re.search(r"speed: [\d.]+x the baseline", result.stdout)
    assert bool(re.search(r"x the best TRL arm, trl-", result.stdout)) == ("trl-padded" in arms)
    assert re.search(r"tolerance 0\.5%: met", result.stdout)
    assert re.search(r"peak memory: [\d.]+x the baseline", result.stdout)


@pytest.mark.slow
def test_step_profile_times_every_step_and_passes_toolkit_keys(tmp_path):
    import json

    import yaml

    result = subprocess.run([sys.executable, str(REPO / "benchmarks/step_profile.py"), "toolkit", "--size", "smoke",
                             "--steps", "10", "--toolkit_set", "padding_free=false", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, env=subprocess_env(WANDB_DISABLED="true"))
    assert result.returncode == 0, result.stderr[-3000:]
    (times,) = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("STEP_TIMES ")]
    assert len(times) == 10
    (summary,) = [json.loads(line[len("SUMMARY "):]) for line in result.stdout.splitlines()
                  if line.startswith("SUMMARY ")]
    assert summary["set"] == {"padding_free": "false"} and summary["steps"] == 10
    assert yaml.safe_load((tmp_path / "toolkit-out" / "recipe.yaml").read_text())["padding_free"] is False
    assert re.search(r"^\s+Name\s+Self CPU %", result.stdout, re.M)  # the profiler's table


@pytest.mark.parametrize("script", ["train_speed", "step_profile"])
def test_a_malformed_toolkit_setting_is_a_usage_error(script, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"),
                             *(["toolkit"] if script == "step_profile" else []), "--toolkit_set", "padding_free",
                             "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--toolkit_set takes KEY=VALUE items (recipe keys of the toolkit arm), got padding_free" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_speed_verdicts_follow_the_targets():
    train_speed = load_script("train_speed")
    table = {"tokens/s, median": {"baseline": 100.0, "trl-padded": 150.0, "toolkit": 240.0},
             "final loss": {"baseline": 2.0, "trl-padded": 2.0, "toolkit": 2.004},
             "peak RSS (GB)": {"baseline": 3.0, "trl-padded": 1.0, "toolkit": 1.2}}
    lines = "\n".join(train_speed.verdicts(table, "cpu"))
    assert "2.40x the baseline (target >= 2x: met)" in lines
    assert "1.60x the best TRL arm, trl-padded (target >= 1.5x: met)" in lines
    assert "0.20% from the baseline's (tolerance 0.5%: met)" in lines
    assert "0.40x the baseline (target on SIZE=vocab <= 0.5x: met); below every TRL arm: NO" in lines
    assert "(target >= 1.3x: met)" in "\n".join(train_speed.verdicts(table, "gpu"))


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


@pytest.mark.slow
def test_callback_overhead_times_the_toolkit_code_it_adds(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/callback_overhead.py"), "--steps", "5",
                             "--rounds", "1", "--output_dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env=subprocess_env(WANDB_DISABLED="true"))
    assert result.returncode == 0, result.stderr[-3000:]
    attributed = re.search(r"callback overhead \(attributed\): ([\d.]+)% of training time", result.stdout)
    assert attributed and float(attributed.group(1)) > 0  # the added code ran, and was timed
    assert re.search(r"round 1: baseline [\d.]+ ms/step, with callback [\d.]+ ms/step", result.stdout)


@pytest.mark.slow
def test_lora_layers_bench_times_both_layers_and_says_which_one_the_toolkit_takes():
    """Each LoRA layer row says which path the toolkit takes; the whole model and the RMSNorm rows are printed."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/lora_layers.py"), "--rounds", "1", "--widths",
                             "64", "--tokens", "16", "64"], capture_output=True, text=True, timeout=600,
                            env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^\s+64\s+(\d+)\s+(\d+\.\d\d)\s+(merged|peft's)$", result.stdout, re.M)
    assert [(tokens, takes) for tokens, _, takes in rows] == [("16", "peft's"), ("64", "merged")]
    assert "28 of 28 LoRA layers took the merged weight in a forward" in result.stdout
    assert re.search(r"toolkit / peft: min \d\.\d\d, median \d\.\d\d", result.stdout)
    gap = float(re.search(r"largest gradient gap (\S+) of", result.stdout).group(1))
    assert 0 <= gap < 1e-5
    norm_rows = re.findall(r"^\s+(\d+)\s+(\d+\.\d\d)$", result.stdout.split("one RMSNorm, 512 wide")[1], re.M)
    assert [tokens for tokens, _ in norm_rows] == ["16", "64"] and all(float(ratio) > 0 for _, ratio in norm_rows)
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks/lora_layers.py"), "--rounds", "0"],
                         capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert bad.returncode == 2 and "--rounds must be at least 1" in bad.stderr
