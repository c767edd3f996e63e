"""Run safety: a user's work is never destroyed, mixed or silently mis-resumed, through every documented launcher.

Each test is one of the cases found by trying to break it: the base model as output_dir, another tool's files,
two runs into one directory, signals and exit codes through `accelerate launch`, `launch/train.sh` and `make
train`, changed settings on resume, a truncated checkpoint, Ctrl-C, rerunning a saved recipe, a failed run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import errors
from finetune.embedded.tiny import write_jsonl
from finetune.errors import UsageError
from finetune.run import main
from finetune.training import rundir
from tests.conftest import REPO, accelerate_launch, recipe_argv, subprocess_env
from tests.wandb_file import load_run, offline_runs


def tree_digest(root: Path) -> dict[str, str]:
    """Every file's checksum, but the lock's (it says who holds the directory now)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != rundir.LOCK}


@pytest.fixture
def text_data(tmp_path) -> Path:
    return write_jsonl([{"text": f"line {i}: " + "abcdefgh"[: 1 + i % 8] * 3} for i in range(40)],
                       tmp_path / "text.jsonl")


def args(model_dir: Path, dataset: Path, out: Path, steps: int = 4, **overrides) -> list[str]:
    """fp32 LoRA, fixed seed, no dropout: reproducible to 1e-5; a checkpoint every 4 steps."""
    return recipe_argv("lora_bf16", **{
        "model_name_or_path": model_dir, "dataset": dataset, "output_dir": out, "max_steps": steps,
        "dtype": "float32", "lora_dropout": 0.0, "learning_rate": 1e-2, "per_device_train_batch_size": 4,
        "logging_steps": 1, "save_steps": 4, "save_total_limit": 10, "eval_size": 0, "eval_strategy": "no",
        "seed": 0, "disable_tqdm": "true", "report_to": "none", **overrides})


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# 1. The base model's own directory, and 2. another tool's files.

def test_output_dir_in_the_base_model_or_dataset_directory_is_refused(llama_dir, text_data, tmp_path, capsys):
    before = tree_digest(llama_dir)
    for out in (llama_dir, llama_dir / "finetuned"):
        assert main(args(llama_dir, text_data, out, use_lora="false")) == errors.USAGE
        (line,) = error_lines(capsys.readouterr().err)
        assert f"output_dir: {out} is" in line and "model_name_or_path directory" in line
    assert main(args(llama_dir, text_data, text_data.parent)) == errors.USAGE
    assert "the directory of the dataset file" in capsys.readouterr().err
    assert tree_digest(llama_dir) == before and not (llama_dir / "finetuned").exists()


def test_a_directory_of_someone_elses_files_is_refused_untouched(llama_dir, text_data, tmp_path, capsys):
    out = tmp_path / "theirs"
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoint-7" / "weights.bin").write_bytes(b"theirs")
    (out / "README.md").write_text("another tool's run")
    (out / "tokenizer.json").write_text("{}")
    before = tree_digest(out)
    assert main(args(llama_dir, text_data, out)) == errors.USAGE
    (line,) = error_lines(capsys.readouterr().err)
    assert line == (f"error: output_dir: {out} holds files no finetune run wrote (README.md, checkpoint-7, "
                    "tokenizer.json); choose another output_dir, or pass --overwrite_output_dir true to write beside "
                    "them")
    assert tree_digest(out) == before and sorted(p.name for p in out.iterdir()) == [
        "README.md", "checkpoint-7", "tokenizer.json"]
    # With the flag, a run still never writes over them: its model card and tokenizer have these names.
    assert main(args(llama_dir, text_data, out, overwrite_output_dir="true")) == errors.USAGE
    (line,) = error_lines(capsys.readouterr().err)
    assert line == (f"error: output_dir: {out} holds README.md, checkpoint-7, tokenizer.json, which no finetune run "
                    "wrote and a run would overwrite (it saves its model, tokenizer and model card there); move them "
                    "away, or choose another output_dir")
    assert tree_digest(out) == before


def test_overwrite_output_dir_writes_beside_other_files_never_over_them(llama_dir, text_data, tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("the user's notes")
    (out / "README.md").write_text("the user's readme")
    assert main(args(llama_dir, text_data, out, steps=2, overwrite_output_dir="true")) == errors.USAGE
    (line,) = error_lines(capsys.readouterr().err)
    assert "holds README.md, which no finetune run wrote and a run would overwrite" in line and "move it away" in line
    (out / "README.md").rename(tmp_path / "README.md")
    assert main(args(llama_dir, text_data, out, steps=2, overwrite_output_dir="true")) == errors.OK
    assert (out / "notes.txt").read_text() == "the user's notes" and (out / rundir.SUMMARY).is_file()


def test_an_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(llama_dir, text_data, tmp_path,
                                                                           monkeypatch, capsys, caplog):
    from finetune.tracking import wandb_run as tracking
    from finetune.training import resilience

    out = tmp_path / "out"
    assert main(args(llama_dir, text_data, out, steps=4)) == errors.OK
    (out / rundir.BENCH).write_text("{}")
    (out / rundir.WANDB_RUN).write_text('{"id": "old"}')
    before = tree_digest(out)
    # The new run fails after the old one was set aside, before its first checkpoint (here: W&B refuses to start).
    with monkeypatch.context() as patch:
        patch.setattr(tracking, "start", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("wandb.init failed")))
        with pytest.raises(RuntimeError, match="wandb.init failed"):
            main(args(llama_dir, text_data, out, steps=2, overwrite_output_dir="true"))
    assert tree_digest(out) == before and not (out / rundir.PREVIOUS).exists()
    # Killed at that moment (no exit path ran): the next command puts the old run back first, then refuses as usual.
    attempt = resilience.Attempt(out, main=True).__enter__()
    attempt.replace_previous()
    rundir.prepare(out, "# Resolved from a recipe\n", resilience.segment(None, {}))
    attempt.claim.release()
    assert not (out / rundir.SUMMARY).exists() and (out / rundir.PREVIOUS / rundir.SUMMARY).is_file()
    assert main(args(llama_dir, text_data, out, steps=2)) == errors.USAGE
    assert "put back the run that an interrupted --overwrite_output_dir was replacing" in caplog.text
    assert "already holds a finished run" in capsys.readouterr().err and tree_digest(out) == before
    # A new run that gets as far as a checkpoint replaces the old one for good.
    assert main(args(llama_dir, text_data, out, steps=2, save_steps=1, overwrite_output_dir="true")) == errors.OK
    assert [p.name for _, p in rundir.checkpoints(out)] == ["checkpoint-2", "checkpoint-1"]
    assert not (out / rundir.PREVIOUS).exists() and not (out / rundir.BENCH).exists()
    assert json.loads((out / rundir.SUMMARY).read_text())["final/total_steps"] == 2


def refused_without_torch(argv: list[str], cwd: Path) -> str:
    """Run finetune.run's main in a fresh interpreter; assert it refused (exit 2) without importing torch. Returns
    its one error line."""
    probe = ("import sys; from finetune.run import main; code = main(sys.argv[1:]); "
             "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=cwd,
                            timeout=120, env=subprocess_env(WANDB_DISABLED="true"))
    assert result.returncode == errors.USAGE and result.stdout.strip() == "no torch", result.stderr[-2000:]
    (line,) = error_lines(result.stderr)
    return line


def test_a_run_that_would_be_refused_is_refused_before_torch_loads(llama_dir, text_data, tmp_path):
    """The output directory's refusals need no model: in use, the base model's directory, a finished run, a resume
    with a changed fixed setting. Each is one line before torch is imported (about 0.3 s, not 20-40 s)."""
    out = tmp_path / "out"
    assert main(args(llama_dir, text_data, out, steps=4, save_steps=2)) == errors.OK
    assert "already holds a finished run" in refused_without_torch(args(llama_dir, text_data, out), tmp_path)
    (out / rundir.SUMMARY).unlink()  # unfinished, with checkpoints: a rerun resumes
    line = refused_without_torch(args(llama_dir, text_data, out, learning_rate=0.5), tmp_path)
    assert "these settings differ from it: learning_rate (0.01 -> 0.5)" in line
    assert "model_name_or_path directory" in refused_without_torch(
        args(llama_dir, text_data, llama_dir / "sub"), tmp_path)
    checkpoint = ["--resume_from_checkpoint", str(out / "checkpoint-2")]
    assert "one continues a run, the other starts over; give one of them" in refused_without_torch(
        args(llama_dir, text_data, out, overwrite_output_dir="true") + checkpoint, tmp_path)
    (out / rundir.SUMMARY).write_text("{}")
    assert "already holds a finished run (summary.json), which resuming into it would replace" in \
        refused_without_torch(args(llama_dir, text_data, out, steps=8) + checkpoint, tmp_path)
    (out / rundir.SUMMARY).unlink()
    claim = rundir.Claim(out)
    claim.acquire()
    try:
        line = refused_without_torch(args(llama_dir, text_data, out), tmp_path)
    finally:
        claim.release()
    assert f"output_dir: {out} is in use by a running training (pid {os.getpid()} on " in line
    assert main(args(llama_dir, text_data, out, steps=4, save_steps=2)) == errors.OK  # the checks let a resume by


def test_the_launcher_refuses_the_same_before_any_process_starts(llama_dir, text_data, tmp_path, monkeypatch,
                                                                 capsys):
    from finetune.commands import launch

    started = []
    monkeypatch.setattr(launch, "run", lambda command: started.append(command) or 0)
    out = tmp_path / "out"
    assert main(args(llama_dir, text_data, out, steps=2)) == errors.OK
    capsys.readouterr()
    assert launch.main(args(llama_dir, text_data, out)) == errors.USAGE
    assert "already holds a finished run" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_DISABLED", "false")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "team/proj")
    assert launch.main(args(llama_dir, text_data, tmp_path / "new", report_to="wandb")) == errors.USAGE
    assert "WANDB_PROJECT: 'team/proj' contains '/'" in capsys.readouterr().err
    assert started == []


def test_follow_up_commands_see_the_finished_run_not_a_half_replaced_one(llama_dir, text_data, tmp_path, caplog):
    """What chat, bench, eval and merge read (rundir.trained_recipe): a run an interrupted overwrite set aside is
    put back first; a run still training is refused, naming its holder."""
    from finetune.training import resilience

    out = tmp_path / "out"
    assert main(args(llama_dir, text_data, out, steps=2)) == errors.OK
    before = tree_digest(out)
    attempt = resilience.Attempt(out, main=True).__enter__()  # an overwrite, killed before its first checkpoint
    attempt.replace_previous()
    rundir.prepare(out, "# Resolved from a recipe\n", resilience.segment(None, {}))
    attempt.claim.release()
    assert rundir.trained_recipe(out).training.max_steps == 2
    assert "put back the run that an interrupted --overwrite_output_dir was replacing" in caplog.text
    assert tree_digest(out) == before
    claim = rundir.Claim(out)
    claim.acquire()
    try:
        with pytest.raises(UsageError, match=f"{out} is in use by a running training \\(pid {os.getpid()} on "):
            rundir.trained_recipe(out)
    finally:
        claim.release()


# 3. Two runs into one directory.

@pytest.mark.slow
def test_a_second_run_into_a_directory_in_use_is_refused_naming_the_holder(llama_dir, text_data, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "finetune.run", *args(llama_dir, text_data, out, steps=400,
                                                                         save_steps=1000)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             env=subprocess_env(WANDB_DISABLED="true"))
    try:
        for line in first.stdout:  # training has begun: the lock is held
            if "'loss'" in line:
                break
        second = subprocess.run([sys.executable, "-m", "finetune.run", *args(llama_dir, text_data, out)],
                                capture_output=True, text=True, cwd=tmp_path, timeout=300,
                                env=subprocess_env(WANDB_DISABLED="true"))
        assert second.returncode == errors.USAGE and "Traceback" not in second.stderr
        (line,) = error_lines(second.stderr)
        assert f"output_dir: {out} is in use by a running training (pid {first.pid} on " in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert first.returncode == errors.PREEMPTED


def test_a_lock_left_by_a_dead_process_does_not_block(llama_dir, text_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / rundir.MARKER).write_text("{}")
    (out / rundir.LOCK).write_text("pid 999999 on somewhere, started long ago")  # held by nobody now
    assert main(args(llama_dir, text_data, out, steps=2)) == errors.OK


# 4, 5 and 8: signals and exit codes through the launchers.

def launched(command: list[str], tmp_path: Path, send: signal.Signals | None = None, after_logs: int = 3,
             **env: str) -> subprocess.CompletedProcess:
    """Run a launch command; with `send`, signal the launcher (its process only, as `kill PID` or a container
    runtime does) once the run has logged `after_logs` training steps."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env=subprocess_env(WANDB_DISABLED="true", **env))
    logged = 0
    if send is not None:
        for line in process.stdout:
            logged += "'loss'" in line
            if logged == after_logs:
                process.send_signal(send)
                break
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def final_adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, llama_dir):
    """The reference: 12 steps, never interrupted."""
    root = tmp_path_factory.mktemp("straight")
    data = write_jsonl([{"text": f"line {i}: " + "abcdefgh"[: 1 + i % 8] * 3} for i in range(40)],
                       root / "text.jsonl")
    out = root / "out"
    assert main(args(llama_dir, data, out, steps=12)) == errors.OK
    return data, final_adapter(out)


LAUNCHERS = {
    "launch/train.sh": lambda argv: [str(REPO / "launch/train.sh"), *argv],
    "accelerate launch": lambda argv: accelerate_launch(*argv, script=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_signal_to_the_launcher_checkpoints_and_the_rerun_resumes_to_the_same_weights(
        launcher, stop, uninterrupted, llama_dir, tmp_path):
    data, expected = uninterrupted
    out = tmp_path / "out"
    command = LAUNCHERS[launcher](args(llama_dir, data, out, steps=12))
    if launcher == "accelerate launch" and stop == signal.SIGINT:
        pytest.skip("a terminal sends Ctrl-C to accelerate's whole process group; to accelerate alone it is "
                    "accelerate's KeyboardInterrupt")
    first = launched(command, tmp_path, send=stop)
    stopped = rundir.checkpoints(out)
    assert stopped and 3 <= stopped[0][0] < 12, first.stderr[-2000:]
    assert rundir.checkpoint_problem(stopped[0][1]) is None
    assert f"{stop.name} received: saving a checkpoint" in first.stderr
    if launcher == "launch/train.sh":
        assert first.returncode == errors.PREEMPTED and "Traceback" not in first.stderr
    again = launched(command, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {stopped[0][1]}" in again.stderr
    actual = final_adapter(out)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(actual[name], expected[name], rtol=0, atol=1e-5), name


def test_a_second_ctrl_c_to_the_launcher_stops_everything_at_once_with_130(capfd):
    """The launcher's own handling, on a stand-in for accelerate and its training process: the first Ctrl-C goes
    to the training process, the second kills everything at once, says so, and the exit code is 130."""
    import threading

    from finetune.commands import launch

    def two_ctrl_c():
        for _ in range(2):
            time.sleep(1)  # a person's two key presses; the launcher's handler runs between them
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=two_ctrl_c, daemon=True).start()
    started = time.monotonic()
    code = launch.run(["bash", "-c", "sleep 60 & wait"])
    assert code == 128 + signal.SIGINT and time.monotonic() - started < 30
    assert "stopped at once (a second Ctrl-C), without saving" in capfd.readouterr().err


def training_processes(out: Path) -> list:
    """The live processes (accelerate's and the training processes) of a run into `out`."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if str(out) in " ".join(process.info["cmdline"] or []) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            pass
    return found


def training_through_train_sh(llama_dir, text_data, out: Path, tmp_path: Path, save_steps: int,
                              **popen) -> subprocess.Popen:
    """launch/train.sh on a long run into `out`, returned once it has logged three training steps."""
    process = subprocess.Popen([str(REPO / "launch/train.sh"), *args(llama_dir, text_data, out, steps=400,
                                                                     save_steps=save_steps)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               env=subprocess_env(WANDB_DISABLED="true"), **popen)
    logged = 0
    for line in process.stdout:
        logged += "'loss'" in line
        if logged == 3:
            break
    return process


@pytest.mark.slow
def test_a_training_process_killed_by_sigkill_exits_137_saying_so(llama_dir, text_data, tmp_path):
    """What the out-of-memory killer does: SIGKILL to the training process, which can save nothing."""
    out = tmp_path / "out"
    process = training_through_train_sh(llama_dir, text_data, out, tmp_path, save_steps=2)
    (trainer,) = [p for p in training_processes(out) if "finetune.commands.launch" not in " ".join(p.cmdline())]
    trainer.kill()
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGKILL and "Traceback" not in stderr
    (line,) = error_lines(stderr)
    assert line == ("error: the training process was killed by SIGKILL (the out-of-memory killer sends it; see "
                    "dmesg), without saving; run the same command again to resume from the last checkpoint")


@pytest.mark.slow
def test_kill_9_of_the_launchers_process_group_leaves_nothing_running(llama_dir, text_data, tmp_path):
    out = tmp_path / "out"
    process = training_through_train_sh(llama_dir, text_data, out, tmp_path, save_steps=1000,
                                        start_new_session=True)
    assert len(training_processes(out)) == 3  # the launcher, accelerate's, the training process
    os.killpg(process.pid, signal.SIGKILL)  # what a terminal's or a job runner's hard stop does
    process.communicate(timeout=60)
    deadline = time.monotonic() + 120
    while training_processes(out) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert training_processes(out) == []
    # The training process had SIGTERM when its launcher went: it saved a checkpoint and stopped, unfinished.
    assert rundir.checkpoints(out) and not rundir.is_finished(out)


@pytest.mark.slow
def test_two_processes_stop_together_through_the_launcher(llama_dir, text_data, tmp_path):
    out = tmp_path / "out"
    command = [str(REPO / "launch/train.sh"), *args(llama_dir, text_data, out, steps=40, use_cpu="true")]
    result = launched(command, tmp_path, send=signal.SIGTERM,
                      ACCELERATE_CONFIG=str(REPO / "launch/accelerate/cpu_ddp.yaml"))
    assert result.returncode == errors.PREEMPTED, result.stderr[-3000:]
    assert result.stderr.count("SIGTERM received: saving a checkpoint") == 2  # each rank, once
    assert result.stderr.count("stopped by SIGTERM at step") == 1 and "Traceback" not in result.stderr
    (step, checkpoint), *_ = rundir.checkpoints(out)
    assert rundir.checkpoint_problem(checkpoint) is None
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}


@pytest.mark.slow
def test_exit_codes_come_out_of_the_launcher_exactly(llama_dir, text_data, tmp_path):
    """2 before anything starts (a bad key) and after (a bad row), 3 (a diverged loss), 0; no traceback."""
    train_sh = str(REPO / "launch/train.sh")
    bad_key = launched([train_sh, *args(llama_dir, text_data, tmp_path / "a", lora_rank=8)], tmp_path)
    assert bad_key.returncode == errors.USAGE and "did you mean `lora_r`" in bad_key.stderr
    bad_rows = write_jsonl([{"text": "fine"}, {"messages": [{"role": "user", "content": "x"}]}],
                           tmp_path / "mixed.jsonl")
    bad_data = launched([train_sh, *args(llama_dir, bad_rows, tmp_path / "b")], tmp_path)
    assert bad_data.returncode == errors.USAGE, bad_data.stderr[-2000:]
    diverged = launched([train_sh, *args(llama_dir, text_data, tmp_path / "c", steps=8, learning_rate=1e30)],
                        tmp_path)
    assert diverged.returncode == errors.DIVERGED, diverged.stderr[-2000:]
    assert "training stopped: " in diverged.stderr
    for result in (bad_key, bad_data, diverged):
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_make_train_passes_signals_and_shows_the_exit_code(llama_dir, text_data, tmp_path):
    """make passes the signal on, waits for the checkpoint, says the training's code in its last line, then ends
    by the signal itself (make can only exit 0, 2 or by a signal: `launch/train.sh` gives the exact code)."""
    out = tmp_path / "out"
    argv = " ".join(args(llama_dir, text_data, out, steps=40)[1:])
    command = ["make", "-s", "train", f"RECIPE={REPO / 'recipes/lora_bf16.yaml'}", f"ARGS={argv}"]
    result = launched(command, tmp_path, send=signal.SIGTERM)
    assert result.returncode == -signal.SIGTERM and "Error 75" in result.stderr, result.stderr[-2000:]
    assert "SIGTERM received: saving a checkpoint" in result.stderr and rundir.checkpoints(out)


# 6. Changed settings on resume.

def test_resume_refuses_settings_it_cannot_change_and_applies_the_others(llama_dir, text_data, tmp_path, capsys):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "finetune.run", *args(llama_dir, text_data, out, steps=40)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               env=subprocess_env(WANDB_DISABLED="true"))
    logged = 0
    for line in process.stdout:
        logged += "'loss'" in line
        if logged == 3:
            process.send_signal(signal.SIGTERM)
            break
    process.communicate(timeout=300)
    recipe_before = (out / rundir.RECIPE).read_text()
    for key, value in (("learning_rate", 0.5), ("lora_r", 8)):
        assert main(args(llama_dir, text_data, out, steps=40, **{key: value})) == errors.USAGE
        (line,) = error_lines(capsys.readouterr().err)
        assert f"these settings differ from it: {key} (" in line and "--overwrite_output_dir true" in line
    assert (out / rundir.RECIPE).read_text() == recipe_before  # nothing written before the decision
    resumed_at = rundir.checkpoints(out)[0][0]
    assert main(args(llama_dir, text_data, out, steps=resumed_at + 6, save_steps=3)) == errors.OK
    saved = sorted(step for step, _ in rundir.checkpoints(out))
    assert [s for s in saved if s > resumed_at] == [s for s in range(resumed_at + 1, resumed_at + 7) if s % 3 == 0
                                                    or s == resumed_at + 6]
    history = (out / rundir.RECIPE).read_text()
    assert "# segment 2: started" in history and f"at step {resumed_at}; changed: " in history
    assert "save_steps 4 -> 3" in history and "max_steps 40 -> " in history


def test_resume_refuses_a_dataset_replaced_in_place(llama_dir, text_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(llama_dir, text_data, out, steps=4, save_steps=2)) == errors.OK
    (out / rundir.SUMMARY).unlink()  # as if it had stopped after its checkpoints
    original = text_data.read_bytes()
    write_jsonl([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)], text_data)  # same path, new rows
    for how in ([], ["--resume_from_checkpoint", str(out / "checkpoint-4")]):
        assert main(args(llama_dir, text_data, out, steps=6) + how) == errors.USAGE
        (line,) = error_lines(capsys.readouterr().err)
        assert f"these settings differ from it: dataset (the content of {text_data} changed since the run last " \
               "trained on it)" in line and "--overwrite_output_dir true" in line
    text_data.write_bytes(original)
    assert main(args(llama_dir, text_data, out, steps=6)) == errors.OK
    assert json.loads((out / rundir.SUMMARY).read_text())["final/total_steps"] == 6


# 7. A truncated optimizer state with a valid trainer_state.json.

@pytest.mark.parametrize("how", ["rerun", "resume_from_checkpoint"])
def test_a_run_stopped_after_its_last_checkpoint_resumes_to_the_same_end_not_a_step_past_it(how, llama_dir,
                                                                                            text_data, tmp_path):
    """Its results lost (a crash while writing them), the checkpoint of its last step left: no step more."""
    out = tmp_path / "out"
    assert main(args(llama_dir, text_data, out, steps=4)) == errors.OK
    finished = final_adapter(out)
    (out / rundir.SUMMARY).unlink()
    (out / "adapter_model.safetensors").unlink()
    extra = ["--resume_from_checkpoint", str(out / "checkpoint-4")] if how != "rerun" else []
    assert main(args(llama_dir, text_data, out, steps=4) + extra) == errors.OK
    assert json.loads((out / rundir.SUMMARY).read_text())["final/total_steps"] == 4
    assert [path.name for _, path in rundir.checkpoints(out)] == ["checkpoint-4"]
    for name, tensor in finished.items():
        assert torch.equal(final_adapter(out)[name], tensor), name


def test_a_checkpoint_whose_optimizer_state_was_cut_short_is_skipped(llama_dir, text_data, tmp_path, caplog):
    out = tmp_path / "out"
    assert main(args(llama_dir, text_data, out, steps=8)) == errors.OK
    (out / rundir.SUMMARY).unlink()  # as if the job had died after its last checkpoint
    optimizer = out / "checkpoint-8" / "optimizer.pt"
    size = optimizer.stat().st_size
    optimizer.write_bytes(optimizer.read_bytes()[: size // 2])
    caplog.set_level("INFO")
    assert main(args(llama_dir, text_data, out, steps=10)) == errors.OK
    assert f"skipping {out / 'checkpoint-8'}: optimizer.pt is {size // 2} bytes, {size} were written" in caplog.text
    assert f"resuming from {out / 'checkpoint-4'} (step 4)" in caplog.text


def test_an_unsealed_checkpoint_is_checked_by_loading_its_state(llama_dir, text_data, tmp_path):
    out = tmp_path / "out"
    assert main(args(llama_dir, text_data, out, steps=4)) == errors.OK
    checkpoint = out / "checkpoint-4"
    assert rundir.checkpoint_problem(checkpoint) is None
    (checkpoint / rundir.MANIFEST).unlink()  # a checkpoint from before manifests: loaded to be checked
    assert rundir.checkpoint_problem(checkpoint) is None
    optimizer = checkpoint / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    assert rundir.checkpoint_problem(checkpoint).startswith("optimizer.pt does not load")


# 8. Ctrl-C: covered above through the launchers; the embedded recipe saves, and a second Ctrl-C stops at once.

def test_the_embedded_recipe_saves_checkpoints():
    from tests.conftest import load

    recipe = load([str(REPO / "recipes/tiny.yaml")])
    assert str(recipe.training.save_strategy.value) == "steps" and 0 < recipe.training.save_steps < 600


def test_a_second_ctrl_c_stops_at_once(monkeypatch):
    from finetune.training.resilience import PreemptionCallback

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    callback = PreemptionCallback()
    callback._handle(signal.SIGINT, None)
    assert callback.received == "SIGINT" and exits == []
    callback._handle(signal.SIGINT, None)
    assert exits == [130]


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_rerun_resumes(llama_dir, text_data, small_disk, capsys):
    out = small_disk / "out"
    code = main(args(llama_dir, text_data, out, steps=4, save_steps=2))
    err = capsys.readouterr().err
    assert code == errors.DISK_FULL and "Traceback" not in err
    (line,) = error_lines(err)
    assert line == (f"error: no space left on device while writing checkpoint-2 into {out} (removed, unfinished); "
                    "free some space and run the same command again")
    assert not out.exists()  # a run that wrote no checkpoint leaves nothing behind (and frees what it held)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    assert main(args(llama_dir, text_data, out, steps=4, save_steps=2)) == errors.OK
    assert json.loads((out / rundir.SUMMARY).read_text())["final/total_steps"] == 4


def test_after_an_overwrite_the_resume_hint_says_to_drop_the_flag(llama_dir, text_data, tmp_path, monkeypatch,
                                                                  caplog):
    """The same command would start over again and lose the checkpoint: the hint says so."""
    from finetune.commands import launch
    from finetune.training.resilience import PreemptionCallback

    original = PreemptionCallback.on_step_end

    def stop_at_step_2(self, args, state, control, **kwargs):
        if state.global_step == 2 and self.received is None:
            self.received = "SIGTERM"  # as if it had arrived during step 2
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(PreemptionCallback, "on_step_end", stop_at_step_2)
    out = tmp_path / "out"
    assert main(args(llama_dir, text_data, out, steps=6, overwrite_output_dir="true")) == errors.PREEMPTED
    assert (f"stopped by SIGTERM at step 2, checkpoint saved in {out}; run the command again without "
            "--overwrite_output_dir to resume (with it, the run starts over") in caplog.text
    assert main(args(llama_dir, text_data, out, steps=6)) == errors.OK  # as the hint says: resumed, not restarted
    assert [segment["from_step"] for segment in rundir.segments(out)] == [0, 2]
    assert json.loads((out / rundir.SUMMARY).read_text())["final/total_steps"] == 6
    said = {("--overwrite_output_dir", "true"): True, ("--overwrite_output_dir",): True,
            ("--overwrite_output_dir=true",): True, ("--overwrite_output_dir", "false"): False, (): False,
            ("--overwrite_output_dir", "--max_steps", "5"): True}
    for tokens, expected in said.items():
        assert launch.overwrites(["accelerate", "launch", "-m", "finetune.run", "r.yaml", *tokens]) is expected


# 9. Rerunning a saved recipe.

def test_rerunning_a_finished_runs_recipe_refuses_like_any_rerun(llama_dir, text_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(llama_dir, text_data, out, steps=2, overwrite_output_dir="true")) == errors.OK
    (out / rundir.BENCH).write_text("{}")
    before = tree_digest(out)
    assert main([str(out / rundir.RECIPE)]) == errors.USAGE
    assert "already holds a finished run" in capsys.readouterr().err
    assert tree_digest(out) == before
    assert main([str(out / rundir.RECIPE), "--overwrite_output_dir", "true"]) == errors.OK
    assert not (out / rundir.BENCH).exists()  # the old benchmark went with the old run


# 10. A failed run.

def test_a_failed_run_leaves_nothing_that_makes_the_next_attempt_wrong(llama_dir, text_data, tmp_path,
                                                                       monkeypatch):
    from finetune.training.trainer import FinetuneTrainer

    out = tmp_path / "out"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DISABLED", "false")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setattr(FinetuneTrainer, "train", lambda self, **kwargs: (_ for _ in ()).throw(
        RuntimeError("out of memory (a stand-in)")))
    with pytest.raises(RuntimeError, match="a stand-in"):
        main(args(llama_dir, text_data, out, steps=2, report_to="wandb"))
    assert not out.exists()  # the attempt made the directory, and took it back
    (failed,) = offline_runs(tmp_path)
    assert load_run(failed).exit_code == 1  # W&B shows the run as failed
    monkeypatch.undo()
    assert main(args(llama_dir, text_data, out, steps=2)) == errors.OK
    assert json.loads((out / rundir.SUMMARY).read_text())["final/total_steps"] == 2

