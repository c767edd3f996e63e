"""Data formats, answer-only labels on real token ids, truncation, eval splits and seeded shuffling."""

from __future__ import annotations

import pytest
from datasets import Dataset

from finetune.data.load import IGNORE_INDEX, alpaca_prompt, detect_format, load_splits, tokenize_example
from finetune.embedded.tiny import write_jsonl
from finetune.errors import UsageError
from finetune.recipe.keys import DataArguments


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode([label for label in row["labels"] if label != IGNORE_INDEX])


def no_context(**_):
    from contextlib import nullcontext

    return nullcontext()


@pytest.mark.parametrize("columns, expected", [
    (["text"], "text"),
    (["instruction", "input", "output"], "alpaca"),
    (["instruction", "output"], "alpaca"),
    (["messages"], "messages"),
    (["conversations", "id"], "messages"),
    (["prompt", "completion"], "prompt_completion"),
])
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_detect_format_names_the_columns_when_nothing_fits():
    with pytest.raises(UsageError, match=r"can't tell the format from the columns \['answer', 'question'\]"):
        detect_format(["question", "answer"])


def test_alpaca_labels_cover_exactly_the_output_and_eos(tokenizer):
    example = {"instruction": "Reverse the word.", "input": "abc", "output": "cba"}
    row = tokenize_example(example, "alpaca", tokenizer, max_length=1024, train_on_prompt=False)
    prompt_ids = tokenizer(alpaca_prompt(example))["input_ids"]
    assert row["input_ids"][:len(prompt_ids)] == prompt_ids  # BOS + prompt, untouched
    assert row["labels"][:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    answer_ids = tokenizer("cba", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert row["labels"][len(prompt_ids):] == answer_ids
    assert row["input_ids"][len(prompt_ids):] == answer_ids
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_prompt_completion_labels(tokenizer):
    row = tokenize_example({"prompt": "2+2=", "completion": "4"}, "prompt_completion", tokenizer, 1024, False)
    assert trained_text(tokenizer, row) == "4</s>"
    assert tokenizer.decode(row["input_ids"]) == "<s>2+2=4</s>"


def test_text_trains_on_everything_but_bos(tokenizer):
    row = tokenize_example({"text": "hello world"}, "text", tokenizer, 1024, False)
    assert row["input_ids"][0] == tokenizer.bos_token_id and row["labels"][0] == IGNORE_INDEX
    assert row["labels"][1:] == row["input_ids"][1:]
    assert trained_text(tokenizer, row) == "hello world</s>"


def test_messages_labels_cover_every_assistant_turn_only(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Reverse: ab"},
        {"role": "assistant", "content": "ba"},
        {"role": "user", "content": "Upper: cd"},
        {"role": "assistant", "content": "CD"},
    ]
    row = tokenize_example({"messages": messages}, "messages", tokenizer, 1024, False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(row["input_ids"]) == full
    assert row["input_ids"].count(tokenizer.bos_token_id) == 1  # the template's BOS, not a second one
    # Each assistant turn is trained on through its end-of-turn marker; nothing of the user's is.
    assert trained_text(tokenizer, row) == "ba</s>\nCD</s>\n"
    eos_positions = [i for i, token in enumerate(row["input_ids"]) if token == tokenizer.eos_token_id]
    assert len(eos_positions) == 2 and all(row["labels"][i] == tokenizer.eos_token_id for i in eos_positions)


def test_sharegpt_conversations_are_read_as_messages(tokenizer):
    example = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    row = tokenize_example(example, "messages", tokenizer, 1024, False)
    assert trained_text(tokenizer, row) == "yo</s>\n"


def test_train_on_prompt_keeps_every_label(tokenizer):
    example = {"instruction": "Reverse the word.", "input": "abc", "output": "cba"}
    row = tokenize_example(example, "alpaca", tokenizer, 1024, train_on_prompt=True)
    assert row["labels"] == row["input_ids"]


def test_truncation_to_max_length(tokenizer):
    row = tokenize_example({"text": "x" * 500}, "text", tokenizer, max_length=64, train_on_prompt=False)
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"]) == 64


def _split(path, tokenizer, seed=0, **keys):
    args = DataArguments(dataset=str(path), **keys)
    return load_splits(args, tokenizer, seed, no_context)[:2]


def test_eval_size_and_fraction(tokenizer, data_files):
    train, evaluation = _split(data_files["alpaca"], tokenizer, eval_size=7)
    assert (len(train), len(evaluation)) == (33, 7)
    train, evaluation = _split(data_files["alpaca"], tokenizer, eval_fraction=0.25)
    assert (len(train), len(evaluation)) == (30, 10)
    train, evaluation = _split(data_files["alpaca"], tokenizer, eval_size=0)
    assert len(train) == 40 and evaluation is None
    train, _ = _split(data_files["alpaca"], tokenizer, eval_size=5, max_train_samples=12)
    assert len(train) == 12


def test_named_eval_split(tmp_path, tokenizer):
    write_jsonl([{"text": f"train {i}"} for i in range(10)], tmp_path / "train.jsonl")
    write_jsonl([{"text": f"test {i}"} for i in range(4)], tmp_path / "test.jsonl")
    train, evaluation = _split(tmp_path, tokenizer, eval_split="test")
    assert (len(train), len(evaluation)) == (10, 4)
    assert all(tokenizer.decode(row["input_ids"]).startswith("<s>test") for row in evaluation)
    with pytest.raises(UsageError, match="eval_split: 'validation' is not a split"):
        _split(tmp_path, tokenizer, eval_split="validation")


def test_shuffling_follows_the_seed(tokenizer, data_files):
    first, _ = _split(data_files["text"], tokenizer, seed=3, eval_size=0)
    again, _ = _split(data_files["text"], tokenizer, seed=3, eval_size=0)
    other, _ = _split(data_files["text"], tokenizer, seed=4, eval_size=0)
    assert first["input_ids"] == again["input_ids"]
    assert first["input_ids"] != other["input_ids"]
    assert sorted(map(tuple, first["input_ids"])) == sorted(map(tuple, other["input_ids"]))


def test_explicit_format_needs_its_columns(tokenizer, data_files):
    with pytest.raises(UsageError, match=r"dataset_format: alpaca needs the column\(s\) instruction\+output"):
        _split(data_files["text"], tokenizer, dataset_format="alpaca")


def test_messages_without_chat_template_is_refused(tokenizer, data_files, tmp_path):
    import copy

    plain = copy.deepcopy(tokenizer)  # the same tokenizer without its chat template
    plain.chat_template = None
    with pytest.raises(UsageError, match="needs a tokenizer with a chat template"):
        _split(data_files["messages"], plain)
    # Preference pairs as whole conversations, a text `prompt` beside them (HuggingFaceH4's UltraFeedback): turns too.
    turns = [{"role": "user", "content": "hi"}]
    pairs = write_jsonl([{"prompt": "hi", "chosen": turns + [{"role": "assistant", "content": "yo"}],
                          "rejected": turns + [{"role": "assistant", "content": "no"}]}] * 8,
                        tmp_path / "whole-pairs.jsonl")
    with pytest.raises(UsageError, match="dataset_format: preference .rows as turns. needs a tokenizer with a chat"):
        load_splits(DataArguments(dataset=str(pairs)), plain, 0, no_context, objective="dpo")


def test_csv_columns_are_text_and_an_empty_cell_is_a_missing_answer(tokenizer, tmp_path):
    """A CSV can't say that a column holds numbers: answers that look like numbers, or like pandas' words for a
    missing value, are trained on as written."""
    import re

    path = tmp_path / "sums.csv"
    path.write_text("prompt,completion\n" + "".join(f"{i}+{i}=,{2 * i}\n" for i in range(1, 6)) +
                    "Which of 4 6 8 is odd?,None\nBond's number:,007\n")
    train, _ = _split(path, tokenizer, eval_size=0)
    assert sorted(trained_text(tokenizer, row) for row in train) == \
        ["007</s>", "10</s>", "2</s>", "4</s>", "6</s>", "8</s>", "None</s>"]
    path.write_text(path.read_text() + "5+5=,\n")
    with pytest.raises(UsageError, match=f"^dataset {re.escape(str(path))}, row 8: `completion` is missing or null "
                                         r"\(the row has prompt\)$"):
        _split(path, tokenizer, eval_size=0)


def test_examples_without_answer_tokens_are_dropped(tokenizer, tmp_path):
    rows = [{"prompt": "p" * 100, "completion": "c"}, {"prompt": "short", "completion": "answer"}]
    path = write_jsonl(rows, tmp_path / "pc.jsonl")
    train, _ = _split(path, tokenizer, eval_size=0, max_length=50)
    assert len(train) == 1 and trained_text(tokenizer, train[0]) == "answer</s>"


def test_answers_cut_by_max_length_are_counted_and_said(tokenizer, tmp_path, caplog):
    rows = [{"prompt": "short", "completion": "a" * 200}, {"prompt": "short", "completion": "b" * 200},
            {"prompt": "short", "completion": "fits"}]
    caplog.set_level("WARNING")
    train, _ = _split(write_jsonl(rows, tmp_path / "pc.jsonl"), tokenizer, eval_size=0, max_length=50)
    assert len(train) == 3
    assert ("2 of 3 examples: an answer cut at max_length=50 (its end and end-of-turn are not trained; raise "
            "max_length)") in caplog.text
    whole = [row for row in train if trained_text(tokenizer, row) == "fits</s>"]
    assert len(whole) == 1  # the answer that fits keeps its end-of-sequence


def test_bpe_tokenizer_offsets_mask_the_prompt(tmp_path):
    """A merging (byte-level BPE) tokenizer: labels still cover the answer and nothing before it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [alpaca_prompt({"instruction": "Reverse the word.", "input": w}) + w[::-1]
              for w in ("alpha", "beta", "gamma", "delta")] * 20
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"]))
    bpe = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    example = {"instruction": "Reverse the word.", "input": "gamma", "output": "ammag"}
    row = tokenize_example(example, "alpaca", bpe, 1024, False)
    assert len(row["input_ids"]) < len(alpaca_prompt(example))  # merges happened
    assert trained_text(bpe, row) == "ammag<eos>"
    assert bpe.decode(row["input_ids"]).endswith("### Response:\nammag<eos>")


def test_in_memory_dataset_round_trip(tokenizer):
    ds = Dataset.from_list([{"text": "abc"}])
    assert ds.map(tokenize_example, fn_kwargs={"fmt": "text", "tokenizer": tokenizer, "max_length": 8,
                                                "train_on_prompt": False})[0]["labels"][-1] == tokenizer.eos_token_id
