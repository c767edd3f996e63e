"""Preference tuning (objective: dpo | kto): rows checked and split into prompt and answers, every variant trained,
the reference model is the model training starts from and never a second copy, resume, W&B, and the follow-up
commands on the result."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from finetune import errors
from finetune.data import preference
from finetune.data.load import normalise_turns
from finetune.embedded.tiny import make_preference_examples, write_jsonl
from finetune.errors import UsageError
from finetune.run import main
from finetune.training import rundir
from tests.conftest import (
    REPO,
    accelerate_launch,
    load,
    preempt_at_logged_step,
    recipe_argv,
    run_to_end,
    subprocess_env,
    train_and_summarise,
    write_recipe,
)
from tests.wandb_file import load_run, offline_runs

CHAT_PAIR = {"prompt": [{"role": "user", "content": "Reverse the word. abc"}],
             "chosen": [{"role": "assistant", "content": "cba"}], "rejected": [{"role": "assistant", "content": "b"}]}
TEXT_ROW = {"prompt": "Reverse the word. abc\nAnswer: ", "completion": "cba", "label": True}


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    pairs, _ = make_preference_examples(count=120, seed=3)
    return write_jsonl(pairs, tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


@pytest.fixture(scope="module")
def feedback_file(tmp_path_factory) -> Path:
    _, rows = make_preference_examples(count=120, seed=3)
    return write_jsonl(rows, tmp_path_factory.mktemp("feedback") / "feedback.jsonl")


def keys(model_dir: Path, dataset: Path, out: Path, **overrides) -> dict:
    """fp32 LoRA DPO on a tiny model, a few steps, reproducible."""
    return {"model_name_or_path": model_dir, "dataset": dataset, "output_dir": out, "objective": "dpo",
            "dtype": "float32", "lora_dropout": 0.0, "learning_rate": 1e-2, "max_steps": 4,
            "per_device_train_batch_size": 4, "per_device_eval_batch_size": 10, "gradient_accumulation_steps": 1,
            "logging_steps": 2, "eval_size": 20, "eval_strategy": "steps", "eval_steps": 4, "save_steps": 4,
            "max_length": 128, "seed": 0, **overrides}


# The split between prompt and answers ----------------------------------------------------------------------------

def test_text_answer_starts_after_the_prompt_and_ends_with_eos(tokenizer):
    prompt, answer, note = preference.split_answer("Reverse abc: ", "cba", tokenizer, normalise_turns)
    assert tokenizer.decode(prompt) == "<s>Reverse abc: " and tokenizer.decode(answer) == "cba</s>"
    assert note is None


def test_conversational_answer_is_the_assistant_turn_through_its_end(tokenizer):
    prompt, answer, _ = preference.split_answer(CHAT_PAIR["prompt"], CHAT_PAIR["chosen"], tokenizer, normalise_turns)
    # The template's assistant header is prompt (what generation starts from); its end-of-turn is answer.
    assert tokenizer.decode(prompt) == "<s><|user|>\nReverse the word. abc\n<|assistant|>\n"
    assert tokenizer.decode(answer) == "cba</s>\n"
    assert tokenizer.decode(prompt) == tokenizer.apply_chat_template(CHAT_PAIR["prompt"], tokenize=False,
                                                                     add_generation_prompt=True)


def test_an_earlier_assistant_turn_of_the_prompt_stays_prompt(tokenizer):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "Reverse the word. abc"}]
    prompt, answer, _ = preference.split_answer(history, CHAT_PAIR["chosen"], tokenizer, normalise_turns)
    assert "hello" in tokenizer.decode(prompt) and tokenizer.decode(answer) == "cba</s>\n"


def test_an_implicit_prompt_is_the_conversations_shared_first_turns(tokenizer):
    """Hub datasets often give `chosen` and `rejected` as whole conversations: the shared turns are the prompt."""
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, *CHAT_PAIR["prompt"]]
    implicit = {"chosen": history + CHAT_PAIR["chosen"], "rejected": history + CHAT_PAIR["rejected"]}
    explicit = {**CHAT_PAIR, "prompt": history}
    cut = {name: preference.tokenize_row(row, "preference", tokenizer, max_length=128, max_prompt_length=None,
                                         normalise=normalise_turns) for name, row in (("implicit", implicit),
                                                                                       ("explicit", explicit))}
    assert cut["implicit"] == cut["explicit"]
    # Answers that begin alike: the prompt still ends before the assistant's turn.
    same_start = {"chosen": [*CHAT_PAIR["prompt"], {"role": "assistant", "content": "cba"}],
                  "rejected": [*CHAT_PAIR["prompt"], {"role": "assistant", "content": "cba"},
                               {"role": "user", "content": "sure?"}, {"role": "assistant", "content": "no"}]}
    assert preference.shared_turns(same_start["chosen"], same_start["rejected"]) == 1


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_text_prompt_beside_whole_conversations_is_their_first_turn(objective, tmp_path, llama_dir, capsys,
                                                                      monkeypatch):
    """As HuggingFaceH4/ultrafeedback_binarized has them: `prompt` as text, `chosen` and `rejected` whole
    conversations that begin with it, and a `messages` column too. Read as the implicit-prompt pairs they are."""
    monkeypatch.chdir(REPO)
    whole = {"prompt": CHAT_PAIR["prompt"][0]["content"], "chosen": CHAT_PAIR["prompt"] + CHAT_PAIR["chosen"],
             "rejected": CHAT_PAIR["prompt"] + CHAT_PAIR["rejected"],
             "messages": CHAT_PAIR["prompt"] + CHAT_PAIR["chosen"]}
    data = write_jsonl([whole] * 40, tmp_path / "data.jsonl")
    argv = recipe_argv("tiny", **keys(llama_dir, data, tmp_path / "out", objective=objective))
    assert main([*argv, "--dry_run"]) == errors.OK
    out = capsys.readouterr().out
    assert ("format: preference" if objective == "dpo" else "format: unpaired_preference") in out
    if objective == "dpo":
        tokenizer = AutoTokenizer.from_pretrained(llama_dir)
        assert preference.tokenize_row(preference.explicit(whole), "preference", tokenizer, 128, None,
                                       normalise_turns) == \
            preference.tokenize_row(CHAT_PAIR, "preference", tokenizer, 128, None, normalise_turns)


def test_rows_are_cut_to_max_prompt_length_and_max_length(tokenizer):
    row = {"prompt": "x" * 40, "chosen": "a" * 30, "rejected": "b" * 5}
    cut = preference.tokenize_row(row, "preference", tokenizer, max_length=50, max_prompt_length=30,
                                  normalise=normalise_turns)
    assert len(cut["prompt_ids"]) == 30 and tokenizer.decode(cut["prompt_ids"]) == "x" * 30  # its end kept
    assert len(cut["chosen_ids"]) == 20 and tokenizer.decode(cut["rejected_ids"]) == "bbbbb</s>"
    assert cut["fits"] and "max_prompt_length=30" in cut["note"] and "max_length=50" in cut["note"]
    full = preference.tokenize_row(row, "preference", tokenizer, max_length=20, max_prompt_length=None,
                                   normalise=normalise_turns)
    assert not full["fits"]  # the prompt alone fills max_length: dropped, and said so


def test_kto_reads_each_pair_as_a_desirable_and_an_undesirable_answer(tmp_path, pair_file, llama_dir, capsys,
                                                                      monkeypatch):
    monkeypatch.chdir(REPO)
    argv = recipe_argv("tiny", **keys(llama_dir, pair_file, tmp_path / "out", objective="kto"))
    assert main([*argv, "--dry_run"]) == errors.OK
    out = capsys.readouterr().out
    assert "format: unpaired_preference" in out and "labels: 100 desirable, 100 undesirable" in out


# Bad rows and bad keys: one line, exit 2, nothing written ----------------------------------------------------------

ROW_CASES = {  # name: (the odd row, objective, what follows "error: dataset FILE, row 4: ")
    "rejected missing": ({"prompt": "p", "chosen": "c"}, "dpo", "`rejected` is missing or null (the row has chosen, "
                                                                "prompt)"),
    "chosen a number": ({**CHAT_PAIR, "chosen": 5}, "dpo", "`chosen` is int but `prompt` is a list of turns; give "
                                                           "every column as turns or every one as text"),
    "turns and text mixed": ({**CHAT_PAIR, "rejected": "b"}, "dpo", "`rejected` is str but `prompt` is a list of "
                                                                    "turns; give every column as turns or every one "
                                                                    "as text"),
    "answer without an assistant turn": ({**CHAT_PAIR, "chosen": [{"role": "user", "content": "cba"}]}, "dpo",
                                         "`chosen` has no assistant turn; it holds the answer to the prompt"),
    "prompt turn without content": ({**CHAT_PAIR, "prompt": [{"role": "user"}]}, "dpo",
                                    "`prompt` turn 1 (user) has no `content`"),
    "text prompt, answer a list": ({"prompt": "p", "chosen": ["c"], "rejected": "r"}, "dpo",
                                   "`chosen` must be text, as `prompt` is; got list ['c']"),
    "text pair without a prompt": ({"chosen": "Human: hi Assistant: yo", "rejected": "Human: hi Assistant: no"},
                                   "dpo", "no `prompt`: text pairs need one (the prompt is split off only from "
                                          "conversations, `chosen` and `rejected` as lists of turns that share their "
                                          "first turns)"),
    "label not a boolean": ({**TEXT_ROW, "label": "yes"}, "kto", "`label` must be true (desirable) or false "
                                                                 "(undesirable), got 'yes'"),
    "implicit prompt not shared": ({"chosen": [{"role": "user", "content": "a"}, CHAT_PAIR["chosen"][0]],
                                    "rejected": [{"role": "user", "content": "b"}, CHAT_PAIR["rejected"][0]]}, "dpo",
                                   "no `prompt`, and `chosen` and `rejected` don't start with the same turns (the "
                                   "prompt); give `prompt` as a list of turns, or conversations that share their "
                                   "first turns"),
    "turns after text rows": ({"prompt": CHAT_PAIR["prompt"][0]["content"],
                               "chosen": CHAT_PAIR["prompt"] + CHAT_PAIR["chosen"],
                               "rejected": CHAT_PAIR["prompt"] + CHAT_PAIR["rejected"]}, "dpo",
                              "its prompt and answers are turns, row 1's are text; give every row in one form"),
    "text prompt beside other turns": ({"prompt": "Reverse the word. abd",
                                        "chosen": CHAT_PAIR["prompt"] + CHAT_PAIR["chosen"],
                                        "rejected": CHAT_PAIR["prompt"] + CHAT_PAIR["rejected"]}, "dpo",
                                       "`prompt` 'Reverse the word. abd' is none of the turns `chosen` and `rejected` "
                                       "start with; give it as a list of turns before the answers, or leave it out"),
}


@pytest.mark.parametrize("case", ROW_CASES)
def test_a_bad_preference_row_is_one_line_naming_file_and_row(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    odd, objective, message = ROW_CASES[case]
    good = CHAT_PAIR if objective == "dpo" and isinstance(odd.get("prompt"), list) else \
        {"prompt": "p", "chosen": "c", "rejected": "r"} if objective == "dpo" else TEXT_ROW
    data = write_jsonl([good] * 3 + [odd] + [good] * 2, tmp_path / "data.jsonl")
    argv = recipe_argv("tiny", **{"dataset": data, "objective": objective, "output_dir": tmp_path / "out",
                                  "eval_size": 1})
    assert main(argv) == errors.USAGE
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == \
        [f"error: dataset {data}, row 4: {message}"]
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_kto_on_implicit_pairs_names_a_bad_row(tmp_path, capsys, monkeypatch):
    """KTO reshapes pairs into single answers before tokenizing: a bad pair is still named by its file and row."""
    monkeypatch.chdir(REPO)
    implicit = {"chosen": CHAT_PAIR["prompt"] + CHAT_PAIR["chosen"], "rejected": CHAT_PAIR["prompt"] +
                CHAT_PAIR["rejected"]}
    data = write_jsonl([implicit] * 3 + [{**implicit, "rejected": None}] + [implicit] * 2, tmp_path / "data.jsonl")
    argv = recipe_argv("tiny", dataset=data, objective="kto", output_dir=tmp_path / "out", eval_size=1)
    assert main(argv) == errors.USAGE
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == \
        [f"error: dataset {data}, row 4: `rejected` is missing or null (the row has chosen)"]
    assert "Traceback" not in err


def test_sft_data_with_a_label_column_is_still_sft_data(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    data = write_jsonl([{"prompt": f"Q{i}: ", "completion": "A", "label": "x"} for i in range(20)],
                       tmp_path / "data.jsonl")
    assert main([*recipe_argv("tiny", dataset=data, output_dir=tmp_path / "out", eval_size=2), "--dry_run"]) == \
        errors.OK
    assert "format: prompt_completion" in capsys.readouterr().out


def test_sweep_metrics_follow_the_objective():
    from finetune.commands.sweep import check_metric

    def problems(metric: str, objective: str) -> list[str]:
        found = []
        check_metric({"metric": {"name": metric}, "early_terminate": {"type": "hyperband", "min_iter": 2}},
                     {"objective": objective, "eval_strategy": "steps"}, found)
        return found

    assert problems("eval/rewards/accuracies", "dpo") == [] and problems("train/rewards/margins", "kto") == []
    assert problems("eval/rewards/accuracies", "sft") and problems("eval/perplexity", "dpo")
    assert problems("eval/preference_accuracy", "dpo") == [
        "metric: `eval/preference_accuracy` is in the summary only, and hyperband compares trials at log steps; use "
        "one logged during training (eval/loss, train/loss, ...)"]
    # KTO logs no accuracies (its rows are unpaired) and DPO no KL.
    assert problems("train/rewards/accuracies", "kto") and problems("train/kl", "dpo") and not problems("train/kl",
                                                                                                         "kto")
    assert problems("eval/preference_accuracy", "kto")[0].startswith("metric: the toolkit never logs")
    # The held-out preference accuracy is measured whether or not the run evaluates during training.
    found = []
    check_metric({"metric": {"name": "eval/preference_accuracy"}}, {"objective": "dpo", "eval_strategy": "no"}, found)
    assert found == []
    check_metric({"metric": {"name": "eval/preference_accuracy"}}, {"objective": "dpo", "eval_size": 0}, found)
    assert found == ["metric: `eval/preference_accuracy` is measured on held-out pairs and the recipe holds none out "
                     "(eval_size/eval_fraction 0); hold some out, or give an eval_split"]


def finished_run(directory: Path, **recipe) -> Path:
    """A directory that looks like a finished LoRA run (recipe, adapter, summary), for refusals."""
    directory.mkdir(parents=True)
    (directory / "recipe.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in recipe.items()))
    (directory / "adapter_config.json").write_text("{}")
    (directory / rundir.ADAPTER_WEIGHTS).write_bytes(b"")
    (directory / rundir.SUMMARY).write_text("{}")
    return directory


KEY_CASES = {  # name: (keys, the error line after "error: ")
    "beta zero": ({"objective": "dpo", "beta": 0}, "beta: must be more than 0, got 0.0"),
    "a loss of another objective": ({"objective": "dpo", "loss_type": "kto"},
                                    "loss_type: 'kto' is not a dpo loss; choose one of sigmoid, ipo, hinge, robust, "
                                    "bco_pair, sppo_hard, nca_pair, apo_zero, apo_down, sigmoid_norm"),
    "a misspelt loss": ({"objective": "dpo", "loss_type": "sigmod"},
                        "loss_type: 'sigmod' is not a dpo loss (did you mean `sigmoid` or `sigmoid_norm`?); choose one "
                        "of sigmoid, ipo, hinge, robust, bco_pair, sppo_hard, nca_pair, apo_zero, apo_down, "
                        "sigmoid_norm"),
    "a kto key for dpo": ({"objective": "dpo", "desirable_weight": 2},
                          "desirable_weight: only applies to objective: kto (this recipe has objective: dpo)"),
    "beta for sft": ({"beta": 0.5}, "beta: only applies to objective: dpo or kto (this recipe has objective: sft)"),
    "an unknown objective": ({"objective": "ppo"},
                             "objective: 'ppo' is not one of sft, dpo, kto (did you mean `dpo`?)"),
    "max_prompt_length zero": ({"objective": "dpo", "max_prompt_length": 0},
                               "max_prompt_length: must be a positive integer, got 0"),
    "sft_weight for kto": ({"objective": "kto", "sft_weight": 1},
                           "sft_weight: only applies to objective: dpo (this recipe has objective: kto)"),
    "sft_weight negative": ({"objective": "dpo", "sft_weight": -1}, "sft_weight: must be 0 or more, got -1.0"),
    "kto with one row per batch": ({"objective": "kto", "per_device_train_batch_size": 1},
                                   "per_device_train_batch_size: objective kto (loss_type kto) needs 2 or more rows "
                                   "per batch (its KL term pairs each answer with another row's prompt); raise it, or "
                                   "use loss_type: apo_zero_unpaired"),
    "an adapter on lm_head": ({"objective": "dpo", "lora_target_modules": ["q_proj", "lm_head"]},
                              "lora_target_modules: lm_head can't take an adapter with objective dpo (TRL computes "
                              "log-probabilities from lm_head's weight directly, so the adapter would never train); "
                              "leave lm_head out"),
    "a misspelt key": ({"objective": "dpo", "betta": 0.1}, None),
}


@pytest.mark.parametrize("case", KEY_CASES)
def test_a_bad_objective_key_is_one_line(case, tmp_path, capsys, monkeypatch, pair_file):
    monkeypatch.chdir(REPO)
    values, message = KEY_CASES[case]
    assert main(recipe_argv("tiny", **{"dataset": pair_file, "output_dir": tmp_path / "out", **values})) == \
        errors.USAGE
    err = capsys.readouterr().err
    if message is None:
        assert err.startswith("error: unknown key `betta` on the command line (did you mean `beta`?)")
    else:
        assert err == f"error: {message}\n"
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_init_from_refusals(tmp_path, capsys, monkeypatch, pair_file, llama_dir):
    monkeypatch.chdir(tmp_path)
    base = {"dataset": pair_file, "output_dir": tmp_path / "out", "objective": "dpo", "model_name_or_path": llama_dir}
    sft = finished_run(tmp_path / "sft", model_name_or_path=str(llama_dir), use_lora=True, lora_r=16, lora_alpha=32,
                       lora_target_modules=["all-linear"])  # recipes/tiny.yaml's adapter
    cases = [
        ({"init_from": "nowhere"}, f"init_from: nowhere is no such directory (relative paths are read from the "
                                   f"working directory, {tmp_path}); give the output_dir of a finished training run"),
        ({"init_from": pair_file.parent}, f"init_from: {pair_file.parent} is not a training run's output_dir (no "
                                          "recipe.yaml); give the output_dir of a finished training run"),
        ({"init_from": sft, "lora_r": 8}, f"lora_r: 8 differs from the init_from run's 16 ({sft}); leave lora_r out "
                                          "of the recipe or match it"),
        ({"init_from": sft, "use_lora": "false"},
         f"use_lora: False differs from the init_from run's True ({sft}) (to train every weight of it, merge it "
         "first with `finetune merge` and give the merged directory as model_name_or_path); leave use_lora out of "
         "the recipe or match it"),
        ({"init_from": sft, "output_dir": sft}, f"output_dir: {sft} is the init_from run; give this run a directory "
                                                "of its own"),
    ]
    for values, message in cases:
        argv = [str(REPO / "recipes/tiny.yaml")]
        argv += [item for key, value in {**base, **values}.items() for item in (f"--{key}", str(value))]
        assert main(argv) == errors.USAGE, values
        assert capsys.readouterr().err == f"error: {message}\n", values
    (sft / rundir.SUMMARY).unlink()
    assert main([str(REPO / "recipes/tiny.yaml"), *[item for key, value in {**base, "init_from": sft}.items()
                                                    for item in (f"--{key}", str(value))]]) == errors.USAGE
    assert capsys.readouterr().err == (f"error: init_from: {sft} has not finished training (no summary.json); "
                                       "finish it first (its own command again resumes it), or start from a "
                                       "finished run\n")
    assert not (tmp_path / "out").exists()


def test_init_from_decides_what_a_recipe_only_inherits(tmp_path, monkeypatch, pair_file, llama_dir):
    """The documented flow `make train RECIPE=recipes/dpo_qlora.yaml ARGS="--init_from outputs/qlora_int4"` after an
    SFT run with `--lora_r 64`: the base and adapter shape the DPO recipe inherits (`extends`) yield to the run's;
    written in the recipe itself or on the command line, a different value is still refused."""
    monkeypatch.chdir(tmp_path)
    sft = finished_run(tmp_path / "sft", model_name_or_path=str(llama_dir), use_lora=True, lora_r=64, lora_alpha=128,
                       lora_target_modules=["q_proj", "v_proj"])
    write_recipe(tmp_path / "parent.yaml", model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct", use_lora=True, lora_r=16,
                 lora_alpha=32, lora_target_modules=["all-linear"], dataset=str(pair_file), objective="dpo")
    (tmp_path / "child.yaml").write_text(f"extends: parent.yaml\ninit_from: {sft}\n")
    recipe = load([str(tmp_path / "child.yaml")])
    assert (recipe.model.model_name_or_path, recipe.model.lora_r, recipe.model.lora_alpha,
            recipe.model.lora_target_modules) == (str(llama_dir), 64, 128, ["q_proj", "v_proj"])
    with pytest.raises(UsageError, match=r"lora_r: 16 differs from the init_from run's 64"):
        load([str(tmp_path / "child.yaml"), "--lora_r", "16"])
    (tmp_path / "child.yaml").write_text(f"extends: parent.yaml\ninit_from: {sft}\nlora_alpha: 32\n")
    with pytest.raises(UsageError, match=r"lora_alpha: 32 differs from the init_from run's 128"):
        load([str(tmp_path / "child.yaml")])


@pytest.mark.parametrize("objective,data,message", [
    ("dpo", "messages", "objective: dpo needs prompt+chosen+rejected rows; the dataset is messages data (columns "
                        "messages)"),
    ("sft", "pairs", "dataset: its rows are preference data (columns chosen, prompt, rejected); train them with "
                     "objective: dpo (or kto)"),
    ("dpo", "feedback", "objective: dpo needs prompt+chosen+rejected rows; the dataset is unpaired_preference data "
                        "(columns completion, label, prompt)"),
    ("dpo", "half pairs", "dataset: objective dpo needs the columns `prompt`+`chosen`+`rejected` or `chosen`+"
                          "`rejected`; the dataset has ['chosen', 'prompt'] (rename its columns, or set "
                          "dataset_format)"),
    ("kto", "half pairs", "dataset: objective kto needs the columns `prompt`+`chosen`+`rejected` or `chosen`+"
                          "`rejected` or `prompt`+`completion`+`label`; the dataset has ['chosen', 'prompt'] (rename "
                          "its columns, or set dataset_format)"),
])
def test_data_of_another_objective_is_refused(objective, data, message, tmp_path, capsys, monkeypatch, pair_file,
                                              feedback_file, data_files):
    monkeypatch.chdir(REPO)
    half_pairs = write_jsonl([{"prompt": "Reverse abc", "chosen": "cba"}] * 4, tmp_path / "half.jsonl")
    dataset = {"messages": data_files["messages"], "pairs": pair_file, "feedback": feedback_file,
               "half pairs": half_pairs}[data]
    assert main(recipe_argv("tiny", dataset=dataset, objective=objective, output_dir=tmp_path / "out")) == \
        errors.USAGE
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [f"error: {message}"]
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_bad_key_is_refused_through_the_launch_wrapper(tmp_path, pair_file):
    result = subprocess.run([str(REPO / "launch/train.sh"), str(REPO / "recipes/tiny_dpo.yaml"), "--beta", "-1",
                             "--dataset", str(pair_file), "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=120)
    assert result.returncode == errors.USAGE, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "error: beta: must be more than 0, got -1.0"
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# Training: every variant, the reference, resume ------------------------------------------------------------------

VARIANTS = {"lora": {}, "qlora-int4": {"quantization": "int4"}, "lora-int8": {"quantization": "int8"},
            "full": {"use_lora": "false", "learning_rate": 1e-4}}


@pytest.mark.parametrize("objective", ["dpo", "kto"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains(objective, variant, tmp_path, llama_dir, pair_file, feedback_file):
    dataset = pair_file if objective == "dpo" else feedback_file
    trainer, summary = train_and_summarise("tiny", **keys(llama_dir, dataset, tmp_path / "out", objective=objective,
                                                          **VARIANTS[variant]))
    assert summary["final/total_steps"] == 4
    assert summary["model/weight_bits"] == {"qlora-int4": 4, "lora-int8": 8}.get(variant, 32)
    assert (summary["model/trainable_params"] < summary["model/total_params"]) == (variant != "full")
    # TRL's metrics reach the summary; a preference loss has no perplexity.
    assert "train/rewards/margins" in summary and "eval/rewards/margins" in summary
    assert not any("perplexity" in key for key in summary)
    if objective == "dpo":
        assert 0 <= summary["eval/preference_accuracy"] <= 1 and summary["eval/preference_pairs"] == 20
        assert 0 <= summary["train/rewards/accuracies"] <= 1
    # A pair reads its prompt twice: more input tokens than samples' prompts and answers once.
    assert summary["train/input_tokens"] > summary["train/target_tokens"] > 0
    assert summary["train/total_flops"] > 0
    reference_copies = trainer.ref_model is not None
    assert not reference_copies  # the reference is never a second model in memory
    assert trainer.args.precompute_ref_log_probs == (variant == "full")
    if variant != "full":
        assert "ref" not in trainer.model.peft_config  # a new adapter: the reference is the base, adapters off
        assert (Path(trainer.args.output_dir) / rundir.ADAPTER_WEIGHTS).is_file()


def test_sft_weight_adds_the_chosen_answers_cross_entropy(tmp_path, llama_dir, pair_file):
    """sft_weight: TRL's DPO loss plus its `sft` loss on the chosen answers (RPO): a larger loss than DPO alone on the
    same first batch, by the weighted cross-entropy."""
    plain, _ = train_and_summarise("tiny", **keys(llama_dir, pair_file, tmp_path / "plain", max_steps=1,
                                                   logging_steps=1))
    rpo, _ = train_and_summarise("tiny", **keys(llama_dir, pair_file, tmp_path / "rpo", max_steps=1, logging_steps=1,
                                                 sft_weight=0.5))
    assert rpo.loss_types == ["sigmoid", "sft"] and rpo.loss_weights == [1.0, 0.5]
    first = [next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry) for trainer in (plain, rpo)]
    # At the first step policy = reference: DPO's loss is log 2; the rest is half the chosen tokens' mean NLL.
    assert first[0] == pytest.approx(0.6931, abs=1e-3) and first[1] > first[0] + 0.5


def test_flops_count_the_reference_forward(tmp_path, llama_dir, pair_file):
    from finetune.training.flops import flops_per_token, forward_flops_per_token, matmul_parameters
    from finetune.training.metrics import preference_forwards

    trainer, summary = train_and_summarise("tiny", **keys(llama_dir, pair_file, tmp_path / "out"))
    assert preference_forwards(trainer) == (1, 2)  # a reference forward, two sequences per pair
    config = trainer.model.get_base_model().config
    tokens, pairs = summary["train/input_tokens"], summary["train/samples"]
    shape = (matmul_parameters(trainer.model, summary["model/total_params"]), config.num_hidden_layers,
             config.hidden_size, tokens / (2 * pairs))
    assert summary["train/total_flops"] == pytest.approx(tokens * (flops_per_token(*shape, True) +
                                                                   forward_flops_per_token(*shape)))


@pytest.mark.parametrize("objective,precomputed,kl,expected", [
    ("dpo", False, False, (1, 2)), ("dpo", True, False, (0, 2)), ("kto", False, True, (3, 1)),
    ("kto", True, True, (1, 1)), ("kto", False, False, (1, 1)), ("sft", False, False, (0, 1))])
def test_forward_passes_per_token_of_each_objective(objective, precomputed, kl, expected):
    """Besides training's own: the reference's forward (none when precomputed), and KTO's KL term (the policy's and,
    unless precomputed, the reference's forward over the mismatched answers)."""
    from types import SimpleNamespace

    from finetune.recipe.keys import ObjectiveArguments
    from finetune.training.metrics import preference_forwards

    trainer = SimpleNamespace(recipe=SimpleNamespace(objective=ObjectiveArguments(objective=objective)),
                              args=SimpleNamespace(precompute_ref_log_probs=precomputed), calculate_KL=kl)
    assert preference_forwards(trainer) == expected


def test_a_new_adapters_reference_is_the_base(tmp_path, llama_dir, pair_file):
    """A new adapter: the reference is the base, adapters off (no "ref" copy), so at the first step the policy and
    the reference agree exactly: rewards and margins 0."""
    trainer, _ = train_and_summarise("tiny", **keys(llama_dir, pair_file, tmp_path / "fresh", eval_on_start="true"))
    start = trainer.state.log_history[0]
    assert start["eval_rewards/margins"] == 0 and start["eval_rewards/chosen"] == 0
    assert "ref" not in trainer.model.peft_config and trainer.ref_model is None


def test_lora_dropout_that_trl_switches_off_is_named_where_it_comes_from(tmp_path, llama_dir, pair_file, sft_run,
                                                                         data_files, caplog):
    """A new adapter's dropout is the recipe's; from a LoRA run it is that run's adapter's, whatever the recipe says."""
    with caplog.at_level("WARNING", logger="finetune"):
        train_and_summarise("tiny", **keys(llama_dir, pair_file, tmp_path / "new", max_steps=1, lora_dropout=0.1))
    (warning,) = [r.getMessage() for r in caplog.records if "is not applied" in r.getMessage()]
    assert warning.startswith("lora_dropout: 0.1 is not applied") and warning.endswith("set lora_dropout: 0 to say so")
    caplog.clear()
    with caplog.at_level("WARNING", logger="finetune"):  # the SFT run's adapter has none
        train_and_summarise("tiny", **keys(llama_dir, pair_file, tmp_path / "on", max_steps=1, lora_dropout=0.1,
                                           init_from=sft_run))
    assert not [r for r in caplog.records if "is not applied" in r.getMessage()]
    with_dropout = tmp_path / "sft-with-dropout"
    train_and_summarise("tiny", model_name_or_path=llama_dir, dataset=data_files["messages"], output_dir=with_dropout,
                        max_steps=1, eval_size=4, lora_dropout=0.2)
    caplog.clear()
    with caplog.at_level("WARNING", logger="finetune"):
        train_and_summarise("tiny", **keys(llama_dir, pair_file, tmp_path / "on-dropout", max_steps=1,
                                           init_from=with_dropout))
    (warning,) = [r.getMessage() for r in caplog.records if "is not applied" in r.getMessage()]
    assert warning.startswith("lora_dropout: 0.2 is not applied") and warning.endswith(
        "(the init_from run's adapter has it)")


def test_no_usage_ping_to_the_hub(tmp_path, llama_dir, pair_file, monkeypatch):
    """TRL's trainers send one when they start, outside CI and offline mode; the toolkit's send none, as SFT runs."""
    import trl.trainer.base_trainer

    pings = []
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(trl.trainer.base_trainer, "send_telemetry", lambda **kwargs: pings.append(kwargs))
    train_and_summarise("tiny", **keys(llama_dir, pair_file, tmp_path / "out", max_steps=1))
    assert pings == []


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, llama_dir, data_files) -> Path:
    out = tmp_path_factory.mktemp("sft") / "run"
    train_and_summarise("tiny", model_name_or_path=llama_dir, dataset=data_files["messages"], output_dir=out,
                        max_steps=6, learning_rate=1e-2, eval_size=4, dtype="float32", lora_dropout=0.0)
    return out


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_from_an_sft_run_the_reference_is_the_sft_model(quantization, tmp_path, llama_dir, pair_file, sft_run):
    """From a LoRA run: a frozen copy of its adapter is the reference, so at the first step policy and reference agree
    exactly (also on a 4-bit base, where TRL would have turned the trained adapter to bf16), and the reference never
    moves; the policy trains on from the SFT adapter."""
    trained_adapter = load_file(str(sft_run / rundir.ADAPTER_WEIGHTS))
    trainer, summary = train_and_summarise("tiny", **keys(llama_dir, pair_file, tmp_path / "dpo", init_from=sft_run,
                                                          eval_on_start="true", quantization=quantization))
    start = trainer.state.log_history[0]
    assert start["eval_rewards/margins"] == 0 and start["eval_rewards/chosen"] == 0
    assert summary["run/init_from"] == str(sft_run)
    # The reference adapter at the last checkpoint is still the SFT run's, exactly; the final save leaves it out.
    (_, checkpoint), = rundir.checkpoints(tmp_path / "dpo")
    reference = load_file(str(checkpoint / "ref" / rundir.ADAPTER_WEIGHTS))
    assert reference.keys() == trained_adapter.keys()
    assert all(torch.equal(reference[name], weight) for name, weight in trained_adapter.items())
    assert not (tmp_path / "dpo" / "ref").exists() and "ref" not in trainer.model.peft_config
    policy = {name: param for name, param in trainer.model.named_parameters() if param.requires_grad}
    assert policy and all(param.dtype == torch.float32 for param in policy.values())
    # The policy started from the SFT adapter and moved away from it; what was saved is the policy alone.
    saved = load_file(str(tmp_path / "dpo" / rundir.ADAPTER_WEIGHTS))
    assert saved.keys() == trained_adapter.keys()
    assert any(not torch.equal(saved[name], trained_adapter[name]) for name in saved)
    if quantization == "none":
        # Before DPO, the held-out accuracy is the SFT model's: `finetune eval SFT --preferences DPO_RUN` agrees.
        assert main_eval([str(sft_run), "--preferences", str(tmp_path / "dpo")]) == errors.OK
        assert json.loads((sft_run / rundir.EVAL).read_text())["preference/accuracy"] == \
            summary["eval/preference_accuracy_start"]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_4bit_base_trains_alike_whether_or_not_the_cpu_has_avx512bf16(objective, tmp_path, monkeypatch, llama_dir,
                                                                       pair_file, feedback_file, sft_run):
    """CPU-dependent: bitsandbytes takes a packed 4-bit path (bf16 results, no backward) on CPUs with AVX512-BF16 once
    a layer has run in eval mode, and a preference run evaluates before its first step (held-out accuracy, eval on
    start) and between steps. Both of bitsandbytes' CPU paths are forced here (tests/test_kbit.py), on any machine:
    the same losses, gradient norms, margins and accuracies either way (relative 1e-4, fp32 compute)."""
    import bitsandbytes.nn.modules

    dataset = pair_file if objective == "dpo" else feedback_file
    results = []
    for reports in (True, False):
        monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda reports=reports: reports)
        trainer, summary = train_and_summarise("tiny", **keys(llama_dir, dataset, tmp_path / f"avx512bf16-{reports}",
                                                              objective=objective, quantization="int4",
                                                              init_from=sft_run, eval_on_start="true", eval_steps=1,
                                                              logging_steps=1))
        curve = [entry[key] for entry in trainer.state.log_history if "loss" in entry for key in ("loss", "grad_norm")]
        margins = [entry["eval_rewards/margins"] for entry in trainer.state.log_history if "eval_loss" in entry]
        accuracy = [summary.get(key) for key in ("eval/preference_accuracy_start", "eval/preference_accuracy")]
        results.append((curve, margins, accuracy))
    (curve, margins, accuracy), (expected_curve, expected_margins, expected_accuracy) = results
    assert len(curve) == 2 * 4 and len(margins) >= 5  # eval on start, after every step, and the final one
    assert curve == pytest.approx(expected_curve, rel=1e-4) and margins == pytest.approx(expected_margins, rel=1e-4,
                                                                                        abs=1e-6)
    assert accuracy == expected_accuracy and (objective == "kto") == (accuracy[0] is None)


def test_from_a_fully_trained_run_its_weights_are_the_base(tmp_path, llama_dir, pair_file, data_files):
    """From a full fine-tuning run, a new adapter on its saved weights; the reference is those weights."""
    full = tmp_path / "full"
    train_and_summarise("tiny", model_name_or_path=llama_dir, dataset=data_files["messages"], output_dir=full,
                        max_steps=2, eval_size=4, dtype="float32", use_lora="false", learning_rate=1e-3)
    trainer, summary = train_and_summarise("tiny", **{**keys(llama_dir, pair_file, tmp_path / "dpo",
                                                             init_from=full, eval_on_start="true"),
                                                      "model_name_or_path": full})
    assert trainer.recipe.model.model_name_or_path == str(full)
    assert "ref" not in trainer.model.peft_config
    assert trainer.state.log_history[0]["eval_rewards/margins"] == 0
    assert summary["run/init_from"] == str(full)


def main_eval(argv: list[str]) -> int:
    from finetune.commands.evaluate import main as evaluate

    return evaluate(argv)


@pytest.mark.slow
def test_the_reference_costs_no_second_copy_of_the_model(tmp_path):
    """Peak host memory of DPO with LoRA, measured against SFT with LoRA on the same model (a 100 MB one, so that a
    second copy would show) and the same sequences per step: within 0.6 of the model's size (measured: 36 MB, of which
    importing TRL's trainers is ~25 MB); the same for full fine-tuning with the reference's log-probabilities
    precomputed. The check can fail: full fine-tuning with the reference held as a model (precompute_ref_log_probs:
    false) is measured as a model's size above the same run with log-probabilities precomputed."""
    from finetune.embedded.tiny import make_task_examples, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", hidden_size=512, layers=8)
    model_bytes = (model_dir / "model.safetensors").stat().st_size
    assert model_bytes > 90e6
    pairs, _ = make_preference_examples(count=40, seed=3)
    data = {"dpo": write_jsonl(pairs, tmp_path / "pairs.jsonl"),
            "sft": write_jsonl(make_task_examples(40, seed=3), tmp_path / "chat.jsonl")}

    def peak(name: str, objective: str, **extra) -> float:
        values = keys(model_dir, data[objective], tmp_path / name, objective=objective, max_steps=2, eval_size=0,
                      eval_strategy="no", eval_on_start="false", save_strategy="no", report_to="none",
                      disable_tqdm="true", **extra)
        result = subprocess.run([sys.executable, str(REPO / "finetune/run.py"), *recipe_argv("tiny", **values)],
                                capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / name / "summary.json").read_text())["train/peak_ram_gb"] * 1e9

    # The same sequences per step (a pair is two), padded both ways, few enough that activations stay small.
    lora_sft = peak("sft", "sft", per_device_train_batch_size=2, padding_free="false")
    lora_dpo = peak("dpo", "dpo", per_device_train_batch_size=1)
    assert lora_dpo - lora_sft < 0.6 * model_bytes, (lora_sft, lora_dpo, model_bytes)
    full = {"use_lora": "false", "learning_rate": 1e-5, "per_device_train_batch_size": 1}
    full_sft = peak("full-sft", "sft", **{**full, "per_device_train_batch_size": 2, "padding_free": "false"})
    precomputed = peak("full-pre", "dpo", precompute_ref_log_probs="true", **full)
    assert precomputed - full_sft < 0.6 * model_bytes, (full_sft, precomputed, model_bytes)
    second_copy = peak("full-copy", "dpo", precompute_ref_log_probs="false", **full)
    assert second_copy - precomputed > 0.7 * model_bytes, (precomputed, second_copy, model_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_sigterm_then_rerun_matches_an_uninterrupted_run(objective, llama_dir, pair_file, feedback_file, tmp_path):
    """As for SFT (tests/test_resilience.py): the same adapter within 1e-5 and the same totals."""
    dataset = pair_file if objective == "dpo" else feedback_file

    def argv(out: Path) -> list[str]:
        return recipe_argv("tiny", **keys(llama_dir, dataset, out, objective=objective, max_steps=12, logging_steps=1,
                                          eval_size=0, eval_strategy="no", eval_on_start="false", save_steps=4,
                                          save_total_limit=10, disable_tqdm="true"))

    def run(out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "finetune/run.py"), *argv(out)], capture_output=True,
                              text=True, cwd=tmp_path, env=subprocess_env(WANDB_DISABLED="true"), timeout=600)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(straight).returncode == 0
    preempt_at_logged_step(argv(resumed), 5, tmp_path)
    stopped = rundir.checkpoints(resumed)[0]
    assert 5 <= stopped[0] < 12
    again = run(resumed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {stopped[1]}" in again.stderr
    expected, actual = (load_file(str(d / rundir.ADAPTER_WEIGHTS)) for d in (straight, resumed))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], rtol=0, atol=1e-5), name
    summaries = [json.loads((d / "summary.json").read_text()) for d in (straight, resumed)]
    for key in ("train/target_tokens", "train/input_tokens", "train/samples", "final/total_steps"):
        assert summaries[1][key] == summaries[0][key], key
    assert summaries[1]["train/mean_loss"] == pytest.approx(summaries[0]["train/mean_loss"], abs=1e-5)


@pytest.mark.slow
def test_dpo_on_two_processes_is_one_run(llama_dir, pair_file, tmp_path):
    """DDP over gloo (launch/accelerate/cpu_ddp.yaml): both ranks train, one W&B run, the summary counts both."""
    args = recipe_argv("tiny", **keys(llama_dir, pair_file, tmp_path / "out", per_device_train_batch_size=2,
                                      disable_tqdm="true"))
    result = run_to_end(accelerate_launch(*args, config=REPO / "launch/accelerate/cpu_ddp.yaml", script=True),
                        cwd=tmp_path, timeout=300, env=subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["run/world_size"] == 2 and summary["train/samples"] == 4 * 2 * 2  # 4 steps, 2 pairs, 2 ranks
    (run_dir,) = offline_runs(tmp_path)
    run = load_run(run_dir)
    assert run.summary["run/world_size"] == 2 and "train/rewards/margins" in run.summary


# What users rely on: W&B, eval, compare, chat, bench, merge ------------------------------------------------------

def test_wandb_offline_run_records_the_preference_metrics(tmp_path, llama_dir, pair_file, monkeypatch):
    for name, value in {"WANDB_DISABLED": "false", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"),
                        "WANDB_PROJECT": "prefs", "WANDB_TAGS": "mine"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "wb").mkdir()
    train_and_summarise("tiny", **keys(llama_dir, pair_file, tmp_path / "out", report_to="wandb"))
    (run_dir,) = offline_runs(tmp_path / "wb")
    run = load_run(run_dir)
    assert run.run.project == "prefs" and set(run.tags) >= {"dpo", "lora", "mine"}
    assert run.config["objective"] == "dpo" and run.run.display_name.split("-")[1] == "dpo"
    logged = {key for row in run.history for key in row}
    assert {"train/rewards/accuracies", "train/rewards/margins", "eval/rewards/accuracies", "train/loss",
            "train/input_tokens_per_second"} <= logged
    assert "train/perplexity" not in logged
    for key in ("eval/preference_accuracy", "eval/preference_accuracy_start", "train/rewards/margins",
                "train/total_flops", "train/peak_ram_gb"):
        assert key in run.summary, key
    assert run.exit_code == 0


def test_follow_up_commands_on_a_dpo_run(tmp_path, llama_dir, pair_file, capsys):
    from finetune.commands import bench, compare, merge

    out = tmp_path / "dpo"
    _, summary = train_and_summarise("tiny", **keys(llama_dir, pair_file, out))
    assert main_eval([str(out)]) == errors.OK  # a DPO run's default: its held-out pairs
    scored = json.loads((out / rundir.EVAL).read_text())
    assert scored["preference/accuracy"] == summary["eval/preference_accuracy"] and scored["preference/pairs"] == 20
    assert bench.main([str(out), "--samples", "4", "--max_new_tokens", "4"]) == errors.OK
    assert json.loads((out / rundir.BENCH).read_text())["inference/exact_match_samples"] == 4
    assert compare.main([str(out), "--out", str(tmp_path / "cmp")]) == errors.OK
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| objective | preference accuracy (held out) |" in table and "| dpo |" in table
    assert merge.main([str(out), "--out", str(tmp_path / "merged")]) == errors.OK
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    # Every pair of a data file, tokenized for the target; another run's held-out pairs only with its tokenizer.
    assert main_eval([str(out), "--preferences", str(pair_file)]) == errors.OK
    assert json.loads((out / rundir.EVAL).read_text())["preference/pairs"] == 120
    other = tmp_path / "other-template"
    shutil.copytree(out, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": None}))
    capsys.readouterr()
    assert main_eval([str(out), "--preferences", str(other)]) == errors.USAGE
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --preferences: {other}'s held-out pairs are token ids of another tokenizer (or chat template) than "
        f"{out}'s; give the pairs' data file instead, tokenized for it")
    # A DPO run that held nothing out: its default says what to give instead.
    bare = tmp_path / "dpo-nothing-held-out"
    train_and_summarise("tiny", **keys(llama_dir, pair_file, bare, max_steps=1, eval_size=0, eval_strategy="no",
                                       eval_on_start="false"))
    capsys.readouterr()
    assert main_eval([str(bare)]) == errors.USAGE
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --preferences: {bare} holds out no preference pairs (it trained without an eval split); give "
        "--preferences a data file of prompt/chosen/rejected rows or a run that held pairs out, or --tasks")


def test_held_out_accuracy_scores_chosen_above_rejected():
    """preference_wins against a model that prefers, by construction, token 40: a pair wins when its chosen answer
    has the higher summed log-probability; a tie is not a win."""
    import math

    from finetune.training.preference import preference_wins

    class Scripted(torch.nn.Module):
        """log p = log 0.9 for token 40, log 0.01 for any other: what TRL's fused head returns, per labelled token."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask, labels, fused_lm_head):
            assert fused_lm_head
            shifted = labels[:, 1:]
            scores = torch.where(shifted == 40, math.log(0.9), math.log(0.01))
            return type("Out", (), {"log_probs": torch.where(shifted == -100, 0.0, scores)})

    rows = [{"prompt_ids": [1, 5], "chosen_ids": [40, 2], "rejected_ids": [41, 2]},
            {"prompt_ids": [1, 6, 7], "chosen_ids": [41], "rejected_ids": [40]},
            {"prompt_ids": [1], "chosen_ids": [40, 40], "rejected_ids": [40, 41]},
            {"prompt_ids": [1, 9], "chosen_ids": [41], "rejected_ids": [42]}]  # a tie: not a win
    assert preference_wins(Scripted(), rows, pad_id=0, batch_size=3) == (2, 4)


def test_held_out_accuracy_on_each_rank_of_two():
    """Each rank scores its own pairs (rows rank, rank + 2, ...): together every pair once. (Without a process group
    the sum over ranks is the rank's own numbers.) A sharded model (FSDP, ZeRO-3) is not scored during training."""
    from types import SimpleNamespace

    from datasets import Dataset

    from finetune.training.preference import held_out_accuracy, sharded

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask, labels, fused_lm_head):
            return type("Out", (), {"log_probs": torch.zeros(labels[:, 1:].shape)})

    rows = Dataset.from_list([{"prompt_ids": [1, 5], "chosen_ids": [40], "rejected_ids": [41]}] * 5)
    pairs = []
    for rank in (0, 1):
        trainer = SimpleNamespace(model=Counting(), is_fsdp_enabled=False, args=SimpleNamespace(
            process_index=rank, world_size=2, per_device_eval_batch_size=2, output_dir="out"))
        pairs.append(held_out_accuracy(trainer, rows, pad_id=0)["pairs"])
        assert not sharded(trainer)
    assert pairs == [3, 2]
    assert sharded(SimpleNamespace(is_fsdp_enabled=True))


@pytest.mark.parametrize("row", [CHAT_PAIR, {"prompt": "Reverse the word. abc\nAnswer: ", "chosen": "cba",
                                             "rejected": "b"}], ids=["conversational", "text"])
def test_the_split_agrees_with_trls_own_tokenization(row, tokenizer, tmp_path):
    """Where TRL's way (the prompt tokenized alone, the common prefix with prompt plus answer) works, the toolkit's
    character-space split gives the same token ids."""
    from types import SimpleNamespace

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    trl_rows = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), Dataset.from_list([row]), tokenizer,
                                           DPOConfig(output_dir=str(tmp_path), max_length=None, bf16=False), "train")[0]
    ours = preference.tokenize_row(row, "preference", tokenizer, max_length=128, max_prompt_length=None,
                                   normalise=normalise_turns)
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[column] == trl_rows[column], column


@pytest.mark.parametrize("family", ["qwen2.5", "llama3", "llama3.2", "smollm2", "mistral", "gemma", "phi3"])
def test_answers_start_where_each_familys_template_puts_them(family, tmp_path):
    """On the real chat templates (tests/chat_templates/): the prompt is the template's generation prompt, the chosen
    answer starts with its own text, and where TRL's way works (no system message to move) the token ids are TRL's."""
    from types import SimpleNamespace

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tests.test_chat_templates import ANSWER, ANSWER_2, USER, family_tokenizer

    tokenizer = family_tokenizer(family)
    pair = {"prompt": [{"role": "user", "content": USER}], "chosen": [{"role": "assistant", "content": ANSWER}],
            "rejected": [{"role": "assistant", "content": ANSWER_2}]}
    ours = preference.tokenize_row(pair, "preference", tokenizer, max_length=256, max_prompt_length=None,
                                   normalise=normalise_turns)
    assert tokenizer.decode(ours["prompt_ids"]) == tokenizer.apply_chat_template(pair["prompt"], tokenize=False,
                                                                                 add_generation_prompt=True)
    assert tokenizer.decode(ours["chosen_ids"]).lstrip().startswith(ANSWER)
    assert tokenizer.decode(ours["rejected_ids"]).lstrip().startswith(ANSWER_2)
    # Prompt and answer together are the whole conversation as the template writes it, its end of turn included.
    assert tokenizer.decode(ours["prompt_ids"] + ours["chosen_ids"]) == \
        tokenizer.apply_chat_template(pair["prompt"] + pair["chosen"], tokenize=False)
    trl_row = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), Dataset.from_list([pair]), tokenizer,
                                          DPOConfig(output_dir=str(tmp_path), max_length=None, bf16=False),
                                          "train")[0]
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[column] == trl_row[column], column
