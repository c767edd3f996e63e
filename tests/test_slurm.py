"""launch/slurm.sbatch, unmodified, on a real Slurm: two emulated nodes on this machine (tests/slurm_cluster.py).

Each job trains the fp32 LoRA recipe on a tiny model, so runs are exactly reproducible: a job stopped and
requeued must end with the weights of one never stopped. A requeued job waits for its BeginTime (about two
minutes on a real scheduler); the tests release it at once with `scontrol update StartTime=now`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import errors
from finetune.embedded.tiny import write_jsonl
from finetune.run import main
from finetune.training import rundir
from tests import slurm_cluster
from tests.conftest import REPO, recipe_argv
from tests.wandb_file import load_run, offline_runs

pytestmark = pytest.mark.slow  # several minutes: `make test` runs them, `make test-fast` leaves them out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.missing()
    if reason:
        pytest.skip(reason)
    cluster = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    cluster.jobs = []
    yield cluster
    cluster.stop()
    for job in cluster.jobs:  # the logs its jobs wrote into the repository's logs/
        (REPO / "logs" / f"finetune-{job}.out").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    return write_jsonl([{"text": f"line {i}: " + "abcdefgh"[: 1 + i % 8] * 3} for i in range(40)],
                       tmp_path_factory.mktemp("data") / "text.jsonl")


# Steps of the runs that are stopped and resumed: enough that a signal sent after the third step always lands
# before the last one (a tiny step takes about 20 ms), and the same for the run never stopped.
RESUMED_STEPS = 200


def recipe(model_dir: Path, data: Path, out: Path, steps: int, **keys) -> list[str]:
    return recipe_argv("lora_bf16", **{
        "model_name_or_path": model_dir, "dataset": data, "output_dir": out, "max_steps": steps, "dtype": "float32",
        "lora_dropout": 0.0, "learning_rate": 1e-2, "per_device_train_batch_size": 4, "logging_steps": 1,
        "save_steps": 1000, "eval_size": 0, "eval_strategy": "no", "seed": 0, "disable_tqdm": "true", **keys})


def submit(cluster, tmp_path: Path, argv: list[str], *options: str, **env: str) -> str:
    """sbatch launch/slurm.sbatch from the repository, as the README says, on CPU nodes."""
    result = cluster.run("sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", *options,
                         str(REPO / "launch/slurm.sbatch"), *argv, cwd=REPO,
                         env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_DISABLED": "false",
                              "HF_HUB_OFFLINE": "1", **env})
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    cluster.jobs.append(job)
    assert not log_of(job)
    return job


def log_of(job: str) -> str:
    path = REPO / "logs" / f"finetune-{job}.out"
    return path.read_text() if path.is_file() else ""


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def wait_for(cluster, job: str, states: tuple[str, ...], timeout: float = 300) -> dict[str, str]:
    """The job's fields once it is in one of `states`; fails as soon as it ends in another."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job)
        if info.get("JobState") in states:
            return info
        if info.get("JobState") in FINAL_STATES:
            pytest.fail(f"job {job} ended {info['JobState']}, not in {states}:\n{log_of(job)[-3000:]}")
        time.sleep(1)
    pytest.fail(f"job {job} not in {states} after {timeout:.0f} s: {cluster.job(job)}\n{log_of(job)[-3000:]}")


def wait_for_training(job: str, steps: int = 3, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_of(job).count("'loss'") >= steps:
            return
        time.sleep(0.1)
    pytest.fail(f"job {job} did not train {steps} steps in {timeout:.0f} s:\n{log_of(job)[-3000:]}")


def resumes_to_the_weights_of(cluster, job: str, out: Path, reference: dict) -> str:
    """Release the requeued job, let it finish; its weights must equal `reference`. Returns its log."""
    wait_for(cluster, job, ("PENDING",))
    # slurmd refuses a job whose credential was made in the same second as the revocation of its last run's
    # ("Job credential revoked": whole seconds compared): release it in a later second.
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = wait_for(cluster, job, ("COMPLETED", "FAILED", "CANCELLED"))
    log = log_of(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    actual = load_file(str(out / "adapter_model.safetensors"))
    for name, tensor in reference.items():
        assert torch.allclose(actual[name], tensor, rtol=0, atol=1e-5), name
    return log


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, llama_dir, text_data):
    out = tmp_path_factory.mktemp("straight") / "out"
    assert main(recipe(llama_dir, text_data, out, RESUMED_STEPS) + ["--report_to", "none"]) == errors.OK
    return load_file(str(out / "adapter_model.safetensors"))


def test_logs_directory_ships_with_the_repository():
    """Slurm opens --output=logs/... before the script runs: a fresh clone must hold logs/."""
    tracked = subprocess.run(["git", "ls-files", "logs"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert tracked == ["logs/.gitignore"]


def test_a_job_trains_on_a_cpu_node(cluster, llama_dir, text_data, tmp_path):
    out = tmp_path / "out"
    job = submit(cluster, tmp_path, recipe(llama_dir, text_data, out, 4))
    info = wait_for(cluster, job, ("COMPLETED", "FAILED", "CANCELLED"))
    log = log_of(job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "1 node(s) x 1 process(es), 0 GPU(s) a node, launch/accelerate/single_gpu.yaml" in log
    assert "trained 4 steps on 1 process" in log
    summary = json.loads((out / rundir.SUMMARY).read_text())
    assert summary["run/distributed_type"] == "NO" and summary["run/accelerate_config"].endswith("single_gpu.yaml")


def test_the_gpu_default_launches_a_process_per_gpu():
    """The script's GPU path, dry (no GPU here): 8 GPUs a node, 2 nodes -> 16 processes of multi_gpu.yaml."""
    env = {**os.environ, "FINETUNE_SLURM_DRY_RUN": "1", "SLURM_GPUS_ON_NODE": "8", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "7"}
    result = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), "recipes/lora_bf16.yaml"], cwd=REPO,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "2 node(s) x 8 process(es), 8 GPU(s) a node, launch/accelerate/multi_gpu.yaml" in result.stdout
    assert "--config_file launch/accelerate/multi_gpu.yaml --num_machines 2 --num_processes 16" in result.stdout
    assert "--machine_rank $SLURM_NODEID -- recipes/lora_bf16.yaml" in result.stdout


def test_two_nodes_train_one_run(cluster, llama_dir, text_data, tmp_path):
    out = tmp_path / "out"
    job = submit(cluster, tmp_path, recipe(llama_dir, text_data, out, 4), "--nodes", "2")
    info = wait_for(cluster, job, ("COMPLETED", "FAILED", "CANCELLED"))
    log = log_of(job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "2 node(s) x 1 process(es)" in log and "launch/accelerate/cpu_ddp.yaml" in log
    summary = json.loads((out / rundir.SUMMARY).read_text())
    assert (summary["run/world_size"], summary["run/num_machines"], summary["run/distributed_type"]) == (2, 2, "DDP")
    assert len(offline_runs(tmp_path)) == 1


def test_the_time_limit_warning_checkpoints_requeues_and_resumes(cluster, llama_dir, text_data, uninterrupted,
                                                                  tmp_path):
    """What --signal=B:USR1@300 does before the time limit, sent by hand."""
    out = tmp_path / "out"
    job = submit(cluster, tmp_path, recipe(llama_dir, text_data, out, RESUMED_STEPS))
    wait_for_training(job)
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    log = resumes_to_the_weights_of(cluster, job, out, uninterrupted)
    assert "USR1 (the time limit is near): every training process checkpoints and stops" in log
    assert "SIGUSR1 received: saving a checkpoint at the end of this step" in log
    assert f"checkpoint saved (exit 75); requeueing job {job}, which resumes from it" in log
    assert f"job {job} (restart 1)" in log and "resuming from " in log
    runs = [load_run(path) for path in offline_runs(tmp_path)]
    assert len(runs) == 2 and {run.run.run_id for run in runs} == {f"slurm-{job}"}  # one W&B run, two segments
    assert sorted(run.exit_code for run in runs) == [0, errors.PREEMPTED]


def test_a_preemption_requeue_checkpoints_and_resumes(cluster, llama_dir, text_data, uninterrupted, tmp_path):
    """`scontrol requeue` of a running job: Slurm sends TERM, the run checkpoints, Slurm requeues it."""
    out = tmp_path / "out"
    job = submit(cluster, tmp_path, recipe(llama_dir, text_data, out, RESUMED_STEPS))
    wait_for_training(job)
    cluster.run("scontrol", "requeue", job)
    log = resumes_to_the_weights_of(cluster, job, out, uninterrupted)
    assert "TERM (scancel or preemption): every training process checkpoints and stops" in log
    assert "SIGTERM received: saving a checkpoint" in log and "resuming from " in log


def test_scancel_checkpoints_and_ends_the_job(cluster, llama_dir, text_data, tmp_path):
    out = tmp_path / "out"
    job = submit(cluster, tmp_path, recipe(llama_dir, text_data, out, 400))
    wait_for_training(job)
    cluster.run("scancel", job)
    info = wait_for(cluster, job, ("CANCELLED", "COMPLETED", "FAILED"))
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0"
    deadline = time.monotonic() + 60  # the job's last lines and its checkpoint's seal
    while not ("SIGTERM received: saving a checkpoint" in log_of(job) and rundir.checkpoints(out)
               and rundir.checkpoint_problem(rundir.checkpoints(out)[0][1]) is None):
        assert time.monotonic() < deadline, log_of(job)[-3000:]
        time.sleep(0.2)
    (step, checkpoint), *_ = rundir.checkpoints(out)
    assert 3 <= step < 400 and rundir.checkpoint_problem(checkpoint) is None


def test_a_job_that_fails_for_another_reason_is_not_requeued(cluster, llama_dir, text_data, tmp_path):
    job = submit(cluster, tmp_path, recipe(llama_dir, text_data, tmp_path / "out", 4) + ["--lora_rank", "8"])
    info = wait_for(cluster, job, ("FAILED", "COMPLETED", "CANCELLED"))
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0")
    assert "error: unknown key `lora_rank`" in log_of(job)


def test_a_sweep_array_runs_a_trial_a_task_and_a_requeued_task_resumes_its_trial(cluster, tmp_path):
    """launch/sweep.sbatch: two array tasks on one offline sweep claim a trial each under the sweep's lock; the time
    limit warning to one checkpoints its trial and requeues the task, which resumes the trial."""
    from finetune.training import sweep as state_file
    from tests.test_sweep import TINY, sweep_file

    path = sweep_file(tmp_path / "s.yaml", method="grid", run_cap=None, early_terminate=None,
                      parameters={"learning_rate": {"values": [1e-3, 3e-3]}},
                      command=["${env}", "${interpreter}", "${program}", TINY, "--max_steps=150", "--eval_steps=200",
                               "--save_steps=10", "--logging_steps=10", "--eval_size=50", "--disable_tqdm=true",
                               "${args}"])
    out = tmp_path / "sweep"
    result = cluster.run("sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--array=0-1",
                         str(REPO / "launch/sweep.sbatch"), str(path), "--out", str(out), cwd=REPO,
                         env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    tasks = [f"{job}_0", f"{job}_1"]
    logs = [REPO / "logs" / f"finetune-sweep-{task}.out" for task in tasks]
    try:
        deadline = time.monotonic() + 300
        while not any((out / "trial-001").glob("checkpoint-*")):
            assert time.monotonic() < deadline, [log.read_text()[-2000:] for log in logs if log.is_file()]
            time.sleep(0.5)
        holder = next(task for task, log in zip(tasks, logs, strict=True)
                      if log.is_file() and "== trial-001" in log.read_text())
        cluster.run("scancel", "--batch", "--signal=USR1", holder)
        wait_for(cluster, holder, ("PENDING",))
        time.sleep(2)  # see resumes_to_the_weights_of
        cluster.run("scontrol", "update", f"JobId={holder}", "StartTime=now")
        infos = [wait_for(cluster, task, ("COMPLETED", "FAILED", "CANCELLED")) for task in tasks]
        text = {task: log.read_text() for task, log in zip(tasks, logs, strict=True)}
        assert [info["JobState"] for info in infos] == ["COMPLETED", "COMPLETED"], text
        assert f"requeueing task {holder}, which resumes the trial" in text[holder]
        assert "== trial-001 of 2 (resuming)" in text[holder]
        trials = state_file.read(out)["trials"]
        assert sorted(t["params"]["learning_rate"] for t in trials) == [1e-3, 3e-3]
        assert [t["state"] for t in trials] == [state_file.FINISHED] * 2
        segments = json.loads((out / "trial-001" / rundir.MARKER).read_text())["segments"]
        assert len(segments) == 2 and all(json.loads((out / t["name"] / rundir.SUMMARY).read_text())
                                          ["final/total_steps"] == 150 for t in trials)
    finally:
        for log in logs:
            log.unlink(missing_ok=True)
