"""Launch configs, auto-resume, preemption and the non-finite guard: real runs on CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from finetune.embedded.tiny import write_jsonl
from finetune.errors import UsageError
from finetune.run import train
from finetune.training import ranks, resilience, rundir
from tests.conftest import (
    REPO,
    accelerate_launch,
    load,
    preempt_at_logged_step,
    recipe_argv,
    run_to_end,
    subprocess_env,
)
from tests.wandb_file import load_run, offline_runs

ACCELERATE_CONFIGS = sorted((REPO / "launch/accelerate").glob("*.yaml"))
LORA = str(REPO / "recipes/lora_bf16.yaml")


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.stem for p in ACCELERATE_CONFIGS])
def test_accelerate_config_loads_with_accelerates_loader(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    assert f"accelerate launch --config_file launch/accelerate/{path.name}" in path.read_text()
    # accelerate copies nested keys onto its launch options without checking them: check them here.
    options = {action.dest for action in launch_command_parser()._actions}
    for key in (config.fsdp_config or {}):
        assert key in options, f"{path.name}: fsdp_config key {key} is not an accelerate launch option"
    for key in (config.deepspeed_config or {}):
        assert key in options, f"{path.name}: deepspeed_config key {key} is not an accelerate launch option"


# Runs through the command line.

def training_args(model_dir: Path, dataset: Path, out: Path, steps: int, **overrides) -> list[str]:
    """fp32 LoRA, no dropout, fixed seed: runs that are exactly reproducible; a checkpoint every 4 steps."""
    return recipe_argv("lora_bf16", **{
        "model_name_or_path": model_dir, "dataset": dataset, "output_dir": out, "max_steps": steps,
        "dtype": "float32", "lora_dropout": 0.0, "learning_rate": 1e-2, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "logging_steps": 1, "save_steps": 4, "save_total_limit": 10,
        "eval_size": 0, "eval_strategy": "no", "seed": 0, "disable_tqdm": "true", **overrides})


def run_py(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "finetune/run.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=subprocess_env(**{"WANDB_DISABLED": "true", **env}), timeout=600)


@pytest.fixture
def text_data(tmp_path) -> Path:
    return write_jsonl([{"text": f"line {i}: " + "abcdefgh"[: 1 + i % 8] * 3} for i in range(40)],
                       tmp_path / "text.jsonl")


@pytest.mark.slow
def test_sigterm_then_rerun_matches_an_uninterrupted_run(llama_dir, text_data, tmp_path):
    """Kill with SIGTERM mid-run, rerun the same command: same adapter and loss as a run never interrupted.

    fp32, fixed seed, no dropout. Tolerance: 1e-5 absolute on every adapter weight and on the final loss (CPU
    kernels are deterministic here; the margin allows for reordered reductions).
    """
    straight = tmp_path / "straight"
    result = run_py(training_args(llama_dir, text_data, straight, 12), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    resumed = tmp_path / "resumed"
    args = training_args(llama_dir, text_data, resumed, 12)
    stderr = preempt_at_logged_step(args, 3, tmp_path)
    assert "SIGTERM received" in stderr and "run the same command again to resume" in stderr
    stopped = rundir.checkpoints(resumed)[0]
    assert 3 <= stopped[0] < 12 and rundir.checkpoint_problem(stopped[1]) is None
    assert not (resumed / "summary.json").exists()

    again = run_py(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {stopped[1]}" in again.stderr
    expected, actual = (load_file(str(d / "adapter_model.safetensors")) for d in (straight, resumed))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], rtol=0, atol=1e-5), name
    summaries = [json.loads((d / "summary.json").read_text()) for d in (straight, resumed)]
    assert summaries[1]["final/total_steps"] == 12
    # The metrics totals were carried through the checkpoint: the whole training, not just the resumed part.
    for key in ("train/target_tokens", "train/input_tokens", "train/samples"):
        assert summaries[1][key] == summaries[0][key], key
    # The mean loss covers every step of both segments, not only the resumed one.
    assert summaries[1]["train/mean_loss"] == pytest.approx(summaries[0]["train/mean_loss"], abs=1e-5)


def test_corrupt_newest_checkpoint_is_skipped(llama_dir, text_data, tmp_path):
    out = tmp_path / "out"
    first = run_py(training_args(llama_dir, text_data, out, 8), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (out / "summary.json").unlink()  # as if the job had died after its last checkpoint
    newest = out / "checkpoint-8" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a save cut short
    again = run_py(training_args(llama_dir, text_data, out, 10), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"skipping {out / 'checkpoint-8'}: adapter_model.safetensors is unreadable" in again.stderr
    assert f"resuming from {out / 'checkpoint-4'} (step 4)" in again.stderr
    assert json.loads((out / "summary.json").read_text())["final/total_steps"] == 10


def test_finished_run_is_not_overwritten(llama_dir, text_data, tmp_path):
    out = tmp_path / "out"
    assert run_py(training_args(llama_dir, text_data, out, 2), tmp_path).returncode == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    again = run_py(training_args(llama_dir, text_data, out, 2), tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "already holds a finished run (summary.json)" in again.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == before
    fresh = run_py(training_args(llama_dir, text_data, out, 3, overwrite_output_dir="true", save_steps=100),
                   tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resuming" not in fresh.stderr
    assert [p.name for _, p in rundir.checkpoints(out)] == ["checkpoint-3"]  # old checkpoints gone


def test_auto_resume_off_refuses_existing_checkpoints(llama_dir, text_data, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / rundir.MARKER).write_text("{}")  # a run of ours
    with pytest.raises(UsageError, match="has checkpoints .* auto_resume is off"):
        resilience.plan_resume(load(training_args(llama_dir, text_data, out, 2, auto_resume="false")))
    # An incomplete checkpoint alone: nothing to resume from, start fresh.
    assert resilience.plan_resume(load(training_args(llama_dir, text_data, out, 2))) == (None, {})


# The non-finite guard, in process: the loss turns NaN from the 4th optimizer step on.

@pytest.fixture
def nan_from_step_4(monkeypatch):
    original = transformers.Trainer.compute_loss

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if model.training and self.state.global_step >= 3:
            return (result[0] * math.nan, result[1]) if return_outputs else result * math.nan
        return result

    monkeypatch.setattr(transformers.Trainer, "compute_loss", poisoned)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(nan_from_step_4, llama_dir, text_data, tmp_path):
    out = tmp_path / "out"
    # Saves every step, logs every 5: the save after the bad step 4 comes before any log could show the NaN.
    recipe = load(training_args(llama_dir, text_data, out, 10, save_steps=1, logging_steps=5,
                                       report_to="none"))
    with pytest.raises(resilience.TrainingDiverged, match="non-finite weights at step 4") as error:
        train(recipe)
    assert f"Last good checkpoint: {out / 'checkpoint-3'}" in str(error.value)
    assert [p.name for _, p in rundir.checkpoints(out)] == ["checkpoint-3", "checkpoint-2", "checkpoint-1"]
    for _, path in rundir.checkpoints(out):
        assert all(torch.isfinite(t).all() for t in load_file(str(path / "adapter_model.safetensors")).values())
    assert not (out / "summary.json").exists()


def test_nan_in_the_logged_loss_stops_the_run(nan_from_step_4, llama_dir, text_data, tmp_path):
    recipe = load(training_args(llama_dir, text_data, tmp_path / "out", 10, save_steps=100,
                                       report_to="none"))
    with pytest.raises(resilience.TrainingDiverged, match="loss is nan at step 4"):
        train(recipe)


def test_skip_mode_drops_non_finite_batches(nan_from_step_4, llama_dir, text_data, tmp_path):
    out = tmp_path / "out"
    recipe = load(training_args(llama_dir, text_data, out, 6, on_nonfinite_loss="skip", report_to="none",
                                       gradient_accumulation_steps=2))
    train(recipe)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train/skipped_batches"] == 3 * 2  # steps 4, 5, 6, two micro-batches each
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter_model.safetensors")).values())


@pytest.mark.slow
def test_cpu_ddp_config_trains_qlora_on_two_processes_with_one_run(llama_dir, data_files, tmp_path):
    args = recipe_argv("qlora_int4", model_name_or_path=llama_dir, dataset=data_files["alpaca"], max_steps=3,
                       output_dir=tmp_path / "out", per_device_train_batch_size=2, disable_tqdm="true")
    result = run_to_end(accelerate_launch(*args, config=REPO / "launch/accelerate/cpu_ddp.yaml", script=True),
                        cwd=tmp_path, timeout=300, env=subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["run/world_size"] == 2
    (run_dir,) = offline_runs(tmp_path)
    assert load_run(run_dir).summary["run/world_size"] == 2


def test_leaving_the_process_group_frees_the_ddp_wrapper_first(monkeypatch):
    """The DDP reducer must not hold the last reference to the process group: destroyed from there, a gloo group
    joins its threads with the GIL held, and a run that has finished can hang at exit."""
    import gc
    import weakref
    from types import SimpleNamespace

    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 4)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        wrapped(torch.ones(2, 4)).sum().backward()  # a collective has run: the reducer holds the group
        alive = weakref.ref(wrapped)

        def free_memory():  # accelerate's: drop the references it keeps to what it prepared, then collect
            accelerator._models.clear()
            gc.collect()

        accelerator = SimpleNamespace(_models=[wrapped], free_memory=free_memory)
        trainer = SimpleNamespace(model=model, model_wrapped=wrapped, accelerator=accelerator)
        del wrapped
        seen = []
        destroy = dist.destroy_process_group
        monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: (seen.append(alive()), destroy(*a, **k)))

        ranks.leave_process_group(trainer)

        assert seen == [None], "the DDP wrapper was still alive when the process group was destroyed"
        assert trainer.model_wrapped is model
        assert not dist.is_initialized()
        ranks.leave_process_group(trainer)  # a no-op once left
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
