"""Bad data and bad settings: one clear line naming the file and row (or the key), exit code 2, no traceback,
nothing written and no W&B run, through the runner and through the documented launch lines."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from finetune import errors
from finetune.embedded.tiny import write_jsonl
from finetune.run import main
from tests.conftest import REPO, accelerate_launch, recipe_argv, subprocess_env

CHAT = {"messages": [{"role": "user", "content": "Reverse the word. abc"}, {"role": "assistant", "content": "cba"}]}


def write_lines(path: Path, lines: list[str] | bytes) -> Path:
    path.write_bytes(lines if isinstance(lines, bytes) else "".join(f"{line}\n" for line in lines).encode())
    return path


def chat_rows(count: int, odd_one: dict | None = None) -> list[str]:
    rows = [json.dumps(CHAT)] * count
    return rows + ([json.dumps(odd_one)] if odd_one is not None else [])


DATA_CASES = {  # name: (file contents, the line the user sees after "error: dataset FILE")
    "malformed line": (chat_rows(24) + ['{"messages": [oops]}'] + chat_rows(3),
                       ": line 25: not valid JSON (Expecting value, column 15)"),
    "empty file": ([], ": the file is empty (or only whitespace); give a file with examples"),
    "whitespace only": (["  ", "", "\t"], ": the file is empty (or only whitespace); give a file with examples"),
    "not UTF-8": ((json.dumps(CHAT) + "\n").encode() * 3 + '{"text": "caf\xe9"}\n'.encode("latin-1"),
                  f": line 4: not UTF-8 text (byte {3 * (len(json.dumps(CHAT)) + 1) + 13} of the file); save it as "
                  "UTF-8"),
    "content is a number": (chat_rows(3, {"messages": [{"role": "user", "content": 5},
                                                       {"role": "assistant", "content": "x"}]}),
                            ", row 4: message 1 (user): `content` must be text, got int 5"),
    "a number among answers that look like numbers": (
        [json.dumps({"messages": [{"role": "user", "content": f"{row} + 0 ="},
                                  {"role": "assistant", "content": 42 if row == 25 else str(row)}]})
         for row in range(1, 41)],
        ", row 25: message 2 (assistant): `content` must be text, got int 42"),
    "turn without content": (chat_rows(3, {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}),
                             ", row 4: message 1 (user) has no `content`"),
    "messages null": (chat_rows(3, {"messages": None}),
                      ", row 4: `messages` is missing, null or empty (the row has nothing; one format per file)"),
    "an alpaca row among chat rows": (chat_rows(3, {"instruction": "a", "output": "b"}),
                                      ", row 4: `messages` is missing, null or empty (the row has instruction, "
                                      "output; one format per file)"),
    "unknown role": (chat_rows(3, {"messages": [{"role": "wizard", "content": "a"},
                                                {"role": "assistant", "content": "x"}]}),
                     ", row 4: message 1: role 'wizard' is not one this chat template renders (assistant, system, "
                     "user)"),
    "every answer as role model": ([json.dumps({"messages": [{"role": "user", "content": "a"},
                                                             {"role": "model", "content": "x"}]})] * 4,
                                   ", row 1: message 2: role 'model' is not one this chat template renders "
                                   "(assistant, system, user) (did you mean `assistant`?)"),
    "no assistant turn in any row": ([json.dumps({"messages": [{"role": "system", "content": "be brief"}]})] * 4,
                                     ": no example has an answer to learn from (3 of 3 have no assistant turn or an "
                                     "empty answer); each needs the reply to train on"),
}


def tiny_args(tmp_path: Path, **keys) -> list[str]:
    return recipe_argv("tiny", **{"output_dir": tmp_path / "out", "eval_size": 1, "disable_tqdm": "true", **keys})


def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists() and not (tmp_path / "wandb").exists()


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B on, offline, into tmp_path: a run that was created would show up there."""
    monkeypatch.setenv("WANDB_DISABLED", "false")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_is_one_line_naming_the_file_and_row(case, tmp_path, capsys, offline_wandb, monkeypatch):
    monkeypatch.chdir(REPO)  # the embedded recipe's model path is relative to the repository
    contents, expected = DATA_CASES[case]
    data = write_lines(tmp_path / "data.jsonl", contents)
    assert main(tiny_args(tmp_path, dataset=data)) == errors.USAGE
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [f"error: dataset {data}{expected}"]
    assert "Traceback" not in err
    assert_nothing_written(tmp_path)


PROMPT_COMPLETION = [json.dumps({"prompt": f"Q{i}: capital of France? A: ", "completion": "Paris"}) for i in range(120)]
DIRECTORY_CASES = {  # name: (line 6 of the directory's second file, what the user sees after "error: dataset FILE")
    "malformed line": ('{"prompt": "Q: ", "completion": [oops]}', ": line 6: not valid JSON (Expecting value, "
                       "column 34)"),
    "no answer": (json.dumps({"prompt": "Q: "}), ", row 6: `completion` is missing or null (the row has prompt)"),
    "answer is a number": (json.dumps({"prompt": "Q: ", "completion": 5}),
                           ", row 6: `completion` must be text, got int 5"),
}


@pytest.mark.parametrize("case", DIRECTORY_CASES)
def test_bad_data_in_a_directory_names_the_file_and_its_row(case, tmp_path, capsys, offline_wandb, monkeypatch):
    """A directory's files are read as one split: the line names the file and the row within it, not the row of
    the split."""
    monkeypatch.chdir(REPO)
    line, expected = DIRECTORY_CASES[case]
    directory = tmp_path / "data"
    directory.mkdir()
    write_lines(directory / "a.jsonl", PROMPT_COMPLETION)
    second = write_lines(directory / "b.jsonl", PROMPT_COMPLETION[:5] + [line] + PROMPT_COMPLETION[:3])
    assert main(tiny_args(tmp_path, dataset=directory)) == errors.USAGE
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [f"error: dataset {second}{expected}"]
    assert "Traceback" not in err
    assert_nothing_written(tmp_path)


SETTING_CASES = {  # name: (keys, the line the user sees)
    "batch size 0": ({"per_device_train_batch_size": 0}, "per_device_train_batch_size: must be at least 1, got 0"),
    "negative learning rate": ({"learning_rate": -0.001}, "learning_rate: must be more than 0, got -0.001"),
    "negative warmup": ({"warmup_steps": -1}, "warmup_steps: must be at least 0, got -1.0"),
    "eval every 0 steps": ({"eval_steps": 0}, "eval_steps: must be more than 0, got 0.0"),
    "save every 0 steps": ({"save_steps": 0}, "save_steps: must be more than 0, got 0.0"),
    "target module typo": ({"lora_target_modules": "q_proj nonexistent_proj"},
                           "lora_target_modules: no linear layer of this model is named `nonexistent_proj`; its "
                           "linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    "output_dir empty": ({"output_dir": ""}, "output_dir: empty; give a directory to write the run to"),
    "an eval before the first step with nothing held out": (
        {"eval_size": 0, "eval_strategy": "no"},
        "eval_on_start is set but the eval split is empty (eval_fraction/eval_size 0); set eval_on_start: false or "
        "hold out some examples"),
    "shell variable in a path": ({"output_dir": "${SCRATCH}/run"},
                                 "output_dir: ${SCRATCH}/run holds a shell variable, which recipes don't expand; write "
                                 "the path out, or pass it on the command line, where the shell expands it "
                                 "(--output_dir \"${SCRATCH}/run\")"),
}


@pytest.mark.parametrize("case", SETTING_CASES)
def test_bad_settings_are_one_line_naming_the_key(case, tmp_path, capsys, offline_wandb, monkeypatch):
    monkeypatch.chdir(REPO)
    keys, expected = SETTING_CASES[case]
    argv = tiny_args(tmp_path, **{k: v for k, v in keys.items() if k != "lora_target_modules"})
    if "lora_target_modules" in keys:
        argv += ["--lora_target_modules", *keys["lora_target_modules"].split()]
    assert main(argv) == errors.USAGE
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [f"error: {expected}"]
    assert "Traceback" not in err
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("key", ["output_dir", "learning_rate", "dataset", "report_to"])
def test_a_key_given_no_value_says_so(key, tmp_path, capsys, monkeypatch):
    """`--output_dir $OUT` with OUT unset: not a run into ./true, nor "expected a float, got 'true'"."""
    monkeypatch.chdir(tmp_path)
    assert main([str(REPO / "recipes/tiny.yaml"), f"--{key}", "--max_steps", "1"]) == errors.USAGE
    assert capsys.readouterr().err == (f"error: --{key}: no value given; write `--{key} VALUE` (a shell variable "
                                       "that is empty or unset gives none)\n")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.chdir(REPO)  # the recipe's relative paths
    assert main([str(REPO / "recipes/tiny.yaml"), "--eval_on_start", "--print_config"]) == errors.OK  # a boolean
    assert "eval_on_start: true" in capsys.readouterr().out


def test_output_dir_that_is_a_file_or_not_writable(tmp_path, capsys, monkeypatch):
    import os

    monkeypatch.chdir(REPO)
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    assert main(tiny_args(tmp_path, output_dir=a_file)) == errors.USAGE
    assert f"error: output_dir: {a_file} is a file; give a directory" in capsys.readouterr().err
    assert a_file.read_text() == "mine"
    # Root may write anywhere (CI runs as root), so the check itself is exercised with os.access answering no.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    assert main(tiny_args(tmp_path, output_dir=locked / "run")) == errors.USAGE
    assert f"error: output_dir: {locked} is not writable; choose a directory you can write to" in \
        capsys.readouterr().err


def test_a_key_written_twice_in_a_recipe_is_refused_with_both_lines(tmp_path, capsys):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text(f"extends: {REPO / 'recipes/tiny.yaml'}\nlearning_rate: 1.0e-3\nmax_steps: 5\n"
                      "learning_rate: 3.0e-3\n")
    assert main([str(recipe)]) == errors.USAGE
    assert capsys.readouterr().err == (f"error: recipe {recipe}: `learning_rate` is set twice (lines 2 and 4); keep "
                                       "one\n")


# --help, --print_config and the dry run.

@pytest.mark.parametrize("argv", [["--help"], ["recipes/tiny.yaml", "--help"]])
def test_help_lists_every_key_by_group_fast(argv, capsys):
    assert main(argv) == errors.OK
    text = capsys.readouterr().out
    for title in ("Model:", "Quantization (bitsandbytes):", "LoRA (peft):", "Data:", "Tracking", "Run", "Trainer"):
        assert f"\n{title}" in text
    assert "  --lora_r (default 16)\n      Adapter rank." in text
    assert "  --learning_rate (default 5e-05)" in text and "  --report_to (default 'wandb')" in text


def test_print_config_prints_the_resolved_recipe_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.chdir(REPO)
    assert main(tiny_args(tmp_path, max_steps=7) + ["--print_config"]) == errors.OK
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["max_steps"] == 7 and printed["lora_r"] == 16 and printed["output_dir"] == str(tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_dry_run_shows_the_data_as_training_sees_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    data = write_jsonl([{"prompt": f"Q{i}: capital? A: ", "completion": "Paris"} for i in range(6)],
                       tmp_path / "pc.jsonl")
    assert main(tiny_args(tmp_path, dataset=data) + ["--dry_run"]) == errors.OK
    out = capsys.readouterr().out
    assert "format: prompt_completion" in out and "examples: 5 train, 1 eval" in out
    assert "tokens per example: min " in out and "target tokens per example: mean 6.0" in out  # "Paris" + EOS
    assert out.count("--- example ") == 2 and "A: [[Paris</s>]]" in out
    assert_nothing_written(tmp_path)


# Through the documented launch lines.

@pytest.mark.slow
def test_through_the_launchers_the_same_line_and_no_traceback(tmp_path):
    data = write_lines(tmp_path / "data.jsonl", chat_rows(3, {"messages": [{"role": "user", "content": 5},
                                                                          {"role": "assistant", "content": "x"}]}))
    argv = tiny_args(tmp_path, dataset=data)
    expected = f"error: dataset {data}, row 4: message 1 (user): `content` must be text, got int 5"
    wrapper = subprocess.run([str(REPO / "launch/train.sh"), *argv], capture_output=True, text=True, cwd=REPO,
                             env=subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path)), timeout=300)
    assert wrapper.returncode == errors.USAGE and expected in wrapper.stderr.splitlines()
    bare = subprocess.run(accelerate_launch(*argv, script=True, quiet=True), capture_output=True, text=True,
                          cwd=REPO, env=subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path)), timeout=300)
    assert bare.returncode == 1 and expected in bare.stderr.splitlines()  # accelerate turns every failure into 1
    for result in (wrapper, bare):
        assert "Traceback" not in result.stderr
    assert_nothing_written(tmp_path)
