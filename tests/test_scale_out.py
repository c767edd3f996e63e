"""Scale-out without a scheduler: two "machines" on localhost through accelerate's multi-node options, and the
sharded configs (FSDP, DeepSpeed) refused on a machine without CUDA GPUs instead of silently running as DDP.
The Slurm script itself is tested against a real scheduler in test_slurm.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from finetune import errors
from finetune.embedded.tiny import write_jsonl
from finetune.training import rundir
from tests.conftest import REPO, accelerate_launch, recipe_argv, run_to_end, subprocess_env
from tests.wandb_file import load_run, offline_runs

pytestmark = pytest.mark.slow

SHARDED = ["launch/accelerate/fsdp.yaml", "launch/accelerate/deepspeed_zero2.yaml",
           "launch/accelerate/deepspeed_zero3.yaml"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_machines_on_localhost_train_one_run(llama_dir, tmp_path):
    """One launcher per "machine" (accelerate's --num_machines/--machine_rank/--main_process_ip), as on two
    hosts: one run of world size 2, one W&B run, every row counted once."""
    texts = [f"sample {i} " + "xyz" * (i % 5) for i in range(32)]
    data = write_jsonl([{"text": text} for text in texts], tmp_path / "text.jsonl")
    out = tmp_path / "out"
    argv = recipe_argv("lora_bf16", model_name_or_path=llama_dir, dataset=data, output_dir=out, num_train_epochs=1,
                       dtype="float32", per_device_train_batch_size=4, gradient_accumulation_steps=1,
                       eval_size=0, eval_strategy="no", logging_steps=1, disable_tqdm="true")
    port = free_port()
    env = subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    machines = [subprocess.Popen(
        [sys.executable, "-m", "finetune.commands.launch", "--config_file", "launch/accelerate/cpu_ddp.yaml",
         "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip",
         "127.0.0.1", "--main_process_port", str(port), "--", *argv],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [machine.communicate(timeout=300)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    summary = json.loads((out / rundir.SUMMARY).read_text())
    assert (summary["run/distributed_type"], summary["run/world_size"], summary["run/num_machines"]) == ("DDP", 2, 2)
    assert summary["run/accelerate_config"] == "launch/accelerate/cpu_ddp.yaml"
    # 32 rows over 2 ranks x 4 a batch: 4 steps, every row once, counted on both machines.
    assert summary["final/total_steps"] == 4 and summary["train/samples"] == 32
    assert summary["train/target_tokens"] == sum(len(text) + 1 for text in texts)
    (run_dir,) = offline_runs(tmp_path)  # the second machine logs nothing of its own
    run = load_run(run_dir)
    assert run.summary["train/target_tokens"] == summary["train/target_tokens"]
    assert (run.config["distributed_type"], run.config["world_size"], run.config["num_machines"]) == ("DDP", 2, 2)


def test_a_single_process_run_records_how_it_ran(llama_dir, tmp_path):
    out = tmp_path / "out"
    data = write_jsonl([{"text": f"row {i}"} for i in range(8)], tmp_path / "text.jsonl")
    result = run_to_end([sys.executable, "-m", "finetune.commands.launch", *recipe_argv(
        "lora_bf16", model_name_or_path=llama_dir, dataset=data, output_dir=out, max_steps=1, dtype="float32",
        eval_size=0, eval_strategy="no", report_to="none")], cwd=REPO, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / rundir.SUMMARY).read_text())
    assert {key: summary[key] for key in summary if key.startswith("run/")} == {
        "run/distributed_type": "NO", "run/world_size": 1, "run/num_machines": 1, "run/accelerate_config": "none"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA GPUs")
@pytest.mark.parametrize("config", SHARDED)
def test_sharded_configs_are_refused_without_gpus_through_the_launcher(config, tmp_path):
    result = subprocess.run([sys.executable, "-m", "finetune.commands.launch", "--config_file", config, "--",
                             "recipes/tiny.yaml", "--output_dir", str(tmp_path / "out")],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == errors.USAGE, result.stderr
    (line,) = result.stderr.strip().splitlines()
    expected = "DeepSpeed is not installed" if "deepspeed" in config else "FSDP needs CUDA GPUs"
    assert line.startswith(f"error: accelerate config {config}: ") and expected in line
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA GPUs")
def test_fsdp_is_refused_without_gpus_under_a_bare_accelerate_launch(llama_dir, tmp_path):
    """accelerate itself would train plain DDP here (exit 0): the training processes refuse instead, the main one
    saying why. (torchrun's own failure report follows, as for any failure under a bare multi-process
    `accelerate launch`; the toolkit's launcher is quiet, test above.)"""
    out = tmp_path / "out"
    data = write_jsonl([{"text": f"row {i}"} for i in range(8)], tmp_path / "text.jsonl")
    result = run_to_end(accelerate_launch(*recipe_argv("lora_bf16", model_name_or_path=llama_dir, dataset=data,
                                                       output_dir=out, max_steps=1, report_to="none"),
                                          config=REPO / "launch/accelerate/fsdp.yaml", quiet=True),
                        cwd=REPO, env=subprocess_env(), timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("error: FSDP needs CUDA GPUs, and this machine has none") == 1
    assert "find_unused_parameters" not in result.stderr and not (out / rundir.SUMMARY).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU threads: for machines without CUDA GPUs")
def test_cpu_training_processes_share_the_cpus_instead_of_one_thread_each(tmp_path, monkeypatch):
    """accelerate gives each process of a CPU run one thread (OMP_NUM_THREADS=1) unless `--cpu` is given; the
    launcher behind `make train` and launch/train.sh shares the CPUs it may use among the machine's processes,
    unless OMP_NUM_THREADS says otherwise. Through the launcher itself, and by its rule for other shapes."""
    import os

    from accelerate.commands.launch import launch_command_parser

    from finetune.commands.launch import ACCELERATE, cpu_threads

    script = tmp_path / "threads.py"
    script.write_text("import os, torch\nprint(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())\n")
    env = {key: value for key, value in subprocess_env().items() if key != "OMP_NUM_THREADS"}
    one = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = run_to_end([sys.executable, "-m", "finetune.commands.launch", ACCELERATE, *one, str(script)],
                        cwd=tmp_path, env=env, timeout=120)
    cpus = len(os.sched_getaffinity(0))
    assert result.returncode == 0 and result.stdout.split() == [str(cpus), str(cpus)], result.stderr[-2000:]

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.chdir(tmp_path)  # no accelerate default config in play: HOME's may hold one
    parse = launch_command_parser().parse_args
    assert cpu_threads(parse([*one, "x.py"])) == 8
    assert cpu_threads(parse(["--config_file", str(REPO / "launch/accelerate/cpu_ddp.yaml"), "x.py"])) == 4
    assert cpu_threads(parse(["--num_processes", "4", "--num_machines", "2", "x.py"])) == 4  # 2 per machine
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads(parse([*one, "x.py"])) is None  # the user's choice stands

    # One that accelerate can't read (it raises ValueError): one line, exit 2, before anything starts.
    result = subprocess.run([sys.executable, "-m", "finetune.commands.launch", str(REPO / "recipes/tiny.yaml")],
                            capture_output=True, text=True, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "abc"},
                            timeout=120)
    assert result.returncode == errors.USAGE and result.stderr == (
        "error: OMP_NUM_THREADS: 'abc' is not a number of threads; set a positive integer, or unset it (each training "
        "process then gets its share of the CPUs)\n")
