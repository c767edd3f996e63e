"""The everyday workflow around a run: talking to the model, uploading runs, fetching hub models ahead of time,
and logs a stranger can read."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from finetune import errors
from finetune.commands import chat as generate
from finetune.training.rundir import load_for_inference
from tests.conftest import REPO, recipe_argv, subprocess_env, train_and_summarise


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, llama_dir, data_files):
    out = tmp_path_factory.mktemp("chat") / "out"
    train_and_summarise("lora_bf16", model_name_or_path=llama_dir, dataset=data_files["messages"], output_dir=out,
                        max_steps=2, dtype="float32", eval_size=4)
    return out


def finetune(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, env=subprocess_env(**env), timeout=300)


def test_chat_answers_one_prompt_with_the_trained_model(chat_run):
    result = finetune("chat", str(chat_run), "--prompt", "Reverse the word. abc", "--max_new_tokens", "6")
    assert result.returncode == 0, result.stderr[-2000:]
    _, tokenizer, model = load_for_inference(chat_run)
    messages = [{"role": "user", "content": "Reverse the word. abc"}]
    ids = torch.tensor([generate.prompt_ids(tokenizer, messages)])
    assert tokenizer.decode(ids[0]).endswith("<|assistant|>\n")  # the chat template, with the answer opened
    greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert result.stdout == expected + "\n"  # the answer alone: scripts read stdout


def test_chat_keeps_the_conversation_and_resets_it(chat_run, monkeypatch):
    seen = []
    monkeypatch.setattr(generate, "answer", lambda tokenizer, model, messages, *a, **k: seen.append(
        [m["content"] for m in messages]) or "reply")
    typed = iter(["first", "second", "/reset", "third", "/exit", "never"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(typed))
    generate.interactive(None, None, "be brief", 8, 0.0)
    assert seen == [["be brief", "first"], ["be brief", "first", "reply", "second"], ["be brief", "third"]]


def test_chat_on_a_merged_model_and_on_a_directory_that_is_neither(chat_run, tmp_path):
    merged = tmp_path / "merged"
    assert finetune("merge", str(chat_run), "--out", str(merged)).returncode == 0
    via_merged = finetune("chat", str(merged), "--prompt", "Reverse the word. abc", "--max_new_tokens", "6")
    via_adapter = finetune("chat", str(chat_run), "--prompt", "Reverse the word. abc", "--max_new_tokens", "6")
    assert via_merged.returncode == 0 and via_merged.stdout == via_adapter.stdout
    bad = finetune("chat", str(tmp_path))
    assert bad.returncode == errors.USAGE and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith(f"error: {tmp_path}: neither a training run (no recipe.yaml) nor a model directory")


def test_sync_fails_in_one_line_without_a_login_or_a_network(tmp_path):
    run = tmp_path / "wandb" / "offline-run-20261126_000000-abc"
    run.mkdir(parents=True)
    started = time.monotonic()
    no_login = finetune("sync", WANDB_DIR=str(tmp_path))
    assert no_login.returncode == errors.USAGE and no_login.stderr.count("\n") == 1
    assert "no W&B credentials" in no_login.stderr and "wandb login" in no_login.stderr
    no_network = finetune("sync", WANDB_DIR=str(tmp_path), WANDB_API_KEY="x" * 40,
                          WANDB_BASE_URL="http://127.0.0.1:9")
    assert no_network.returncode == errors.USAGE and no_network.stderr.count("\n") == 1
    assert "can't be reached from here" in no_network.stderr and "1 offline run(s) stay in" in no_network.stderr
    assert time.monotonic() - started < 60
    nothing = finetune("sync", WANDB_DIR=str(tmp_path / "empty"))
    assert nothing.returncode == errors.USAGE and "no offline runs under" in nothing.stderr


def test_compare_of_a_wandb_project_fails_in_one_line_offline():
    result = finetune("compare", "--wandb_project", "team/sweep", WANDB_API_KEY="x" * 40,
                      WANDB_BASE_URL="http://127.0.0.1:9")
    assert result.returncode == errors.USAGE and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: --wandb_project team/sweep: W&B's server 127.0.0.1 can't be reached")


def test_a_hub_model_that_is_not_cached_fails_at_once_offline(tmp_path):
    """HF_HUB_OFFLINE (as on compute nodes): a model missing from the cache is named with the fix, in seconds,
    through the launcher as through the runner."""
    started = time.monotonic()
    for command in (["launch/train.sh"], [sys.executable, "-m", "finetune", "train"]):
        result = subprocess.run([*command, "recipes/lora_bf16.yaml", "--output_dir", str(tmp_path / "out")],
                                cwd=REPO, capture_output=True, text=True, timeout=120,
                                env=subprocess_env(HF_HOME=str(tmp_path / "hf")))
        assert result.returncode == errors.USAGE, result.stderr[-2000:]
        assert result.stderr.splitlines() == [
            "error: model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct is not in the HF cache and HF_HUB_OFFLINE is "
            "set; fetch it on a machine with internet: make download RECIPE=recipes/lora_bf16.yaml (same HF_HOME), "
            "then train here",
            "error: dataset: yahma/alpaca-cleaned is not in the HF cache and HF_HUB_OFFLINE is set; fetch it on a "
            "machine with internet: make download RECIPE=recipes/lora_bf16.yaml (same HF_HOME), then train here"]
    assert time.monotonic() - started < 60 and not (tmp_path / "out").exists()
    local = finetune("download", "recipes/tiny.yaml")
    assert local.returncode == 0 and "nothing to download" in local.stderr


def test_a_run_logs_its_own_lines_and_verbose_shows_everything(llama_dir, data_files, tmp_path):
    argv = recipe_argv("qlora_int4", model_name_or_path=llama_dir, dataset=data_files["messages"], max_steps=1,
                       eval_size=4, disable_tqdm="true")
    quiet = finetune("train", *argv, "--output_dir", str(tmp_path / "quiet"), WANDB_MODE="offline",
                     WANDB_DIR=str(tmp_path))
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    noise = [line for line in (quiet.stdout + quiet.stderr).splitlines()
             if line.startswith(("wandb:", "[INFO]")) or "Warning" in line or "MatMul8bitLt" in line]
    assert noise == []
    assert f"wrote {tmp_path / 'quiet'}: adapter_model.safetensors, recipe.yaml, summary.json" in quiet.stderr
    assert "logs offline (WANDB_MODE=offline); upload it later with: wandb sync" in quiet.stderr
    loud = finetune("train", *argv, "--output_dir", str(tmp_path / "loud"), "--verbose", WANDB_MODE="offline",
                    WANDB_DIR=str(tmp_path))
    assert loud.returncode == 0 and "wandb: " in loud.stderr + loud.stdout
