"""Answer-only labels on the real chat templates of the families users train (tests/chat_templates/README.md).

Each family: its template, its special tokens and whether its tokenizer adds BOS, on a small tokenizer of the same
kind (byte-level BPE, or SentencePiece-style with a "▁" word boundary), trained here on the test sentences so that
words merge the way real vocabularies merge them (" Paris" is one token that starts with the space before it).
Every case states the exact loss-bearing text: the characters of the rendered text covered by trained tokens, run
by run, plus the EOS the toolkit appends for non-chat formats, and the number of target tokens by hand.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from finetune.data import chat_templates as chat
from finetune.data.load import IGNORE_INDEX, ROW, _tokenize_row, marked_targets, render, tokenize_example
from finetune.errors import UsageError

TEMPLATES = Path(__file__).parent / "chat_templates"

BYTE_LEVEL, SENTENCEPIECE = "byte-level", "sentencepiece"
FAMILIES = {  # template, tokenizer kind, special tokens, bos/eos/pad, whether the tokenizer adds BOS itself
    "qwen2.5": dict(template="qwen2_5", kind=BYTE_LEVEL, special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    bos=None, eos="<|im_end|>", pad="<|endoftext|>", adds_bos=False),
    "llama3": dict(template="llama3", kind=BYTE_LEVEL,
                   special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, adds_bos=True),
    "llama3.2": dict(template="llama3_2", kind=BYTE_LEVEL,
                     special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, adds_bos=True),
    "smollm2": dict(template="smollm2", kind=BYTE_LEVEL, special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", adds_bos=False),
    "mistral": dict(template="mistral_v3", kind=SENTENCEPIECE, special=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                    bos="<s>", eos="</s>", pad=None, adds_bos=True),
    "gemma": dict(template="gemma", kind=SENTENCEPIECE,
                  special=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                  bos="<bos>", eos="<eos>", pad="<pad>", adds_bos=True),
    "phi3": dict(template="phi3", kind=SENTENCEPIECE,
                 special=["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
                 bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", adds_bos=False),
}

SYSTEM, USER, ANSWER, USER_2, ANSWER_2 = "Be brief.", "Capital of France?", "Paris", "And of Spain?", "Madrid"
CORPUS = [SYSTEM, USER, ANSWER, USER_2, ANSWER_2, "Q: capital of France?\nA: Paris", "Paris is the capital",
          "Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\nName the capital of France.\n\n### Response:\nParis",
          "You are a helpful assistant", "Cutting Knowledge Date: December 2023\nToday Date:"]


def conversation(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


CASES = {  # name: (format, example)
    "system": ("messages", conversation(("system", SYSTEM), ("user", USER), ("assistant", ANSWER))),
    "no-system": ("messages", conversation(("user", USER), ("assistant", ANSWER))),
    "assistant-first": ("messages", conversation(("assistant", ANSWER), ("user", USER_2), ("assistant", ANSWER_2))),
    "multi-turn": ("messages", conversation(("user", USER), ("assistant", ANSWER), ("user", USER_2),
                                            ("assistant", ANSWER_2))),
    "prompt-ends-in-space": ("prompt_completion", {"prompt": "Q: capital of France?\nA: ", "completion": "Paris"}),
    "alpaca": ("alpaca", {"instruction": "Name the capital of France.", "output": "Paris"}),
    "prompt-completion": ("prompt_completion", {"prompt": f"{USER}\n", "completion": "Paris"}),
}


@functools.cache
def family_tokenizer(name: str):
    """A fast tokenizer of the family's kind, with its special tokens, BOS behaviour and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[name]
    backend = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in spec["special"] else None))
    if spec["kind"] == BYTE_LEVEL:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # offsets keep the leading space
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        # SentencePiece vocabularies keep newlines apart from words (Llama 2/Mistral as a byte token).
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                         pre_tokenizers.Metaspace(replacement="▁",
                                                                                  prepend_scheme="first")])
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = [chr(c) for c in range(33, 127)] + ["▁", "\n"]
    backend.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=1000, special_tokens=spec["special"],
                                                                initial_alphabet=alphabet, show_progress=False))
    if spec["adds_bos"]:
        bos = spec["bos"]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, backend.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=spec["bos"], eos_token=spec["eos"],
                                        pad_token=spec["pad"], unk_token="<unk>" if "<unk>" in spec["special"]
                                        else None, name_or_path=f"tiny-{name}")
    tokenizer.chat_template = (TEMPLATES / f"{spec['template']}.jinja").read_text()
    return tokenizer


def loss_runs(tokenizer, fmt: str, example: dict, max_length: int = 1024) -> tuple[list[str], str, int]:
    """(loss-bearing text, run by run; the rendered text; target tokens as the metrics count them)."""
    row = tokenize_example(example, fmt, tokenizer, max_length, train_on_prompt=False)
    text = render(example, fmt, tokenizer)[0]
    offsets = tokenizer(text, add_special_tokens=fmt != "messages", return_offsets_mapping=True)["offset_mapping"]
    runs, previous = [], False
    for position, label in enumerate(row["labels"]):
        trained = label != IGNORE_INDEX
        if trained:
            start, end = offsets[position] if position < len(offsets) else (0, 0)
            piece = text[start:end] if end > start else tokenizer.convert_ids_to_tokens(label)
            if previous:
                runs[-1] += piece
            else:
                runs.append(piece)
        previous = trained
    targets = sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX)
    return runs, text, targets


def test_family_tokenizers_merge_words_with_their_leading_space():
    """The trap of defect 1 exists in these tokenizers as in the real ones: ' Paris' is a single token."""
    for name in FAMILIES:
        tokenizer = family_tokenizer(name)
        text = "A: Paris"
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [text[s:e] for s, e in encoded["offset_mapping"]]
        assert " Paris" in spans, (name, spans)


CHATML = {"system": (["Paris<|im_end|>\n"], 3), "no-system": (["Paris<|im_end|>\n"], 3),
          "assistant-first": (["Paris<|im_end|>\n", "Madrid<|im_end|>\n"], 6),
          "multi-turn": (["Paris<|im_end|>\n", "Madrid<|im_end|>\n"], 6),
          "prompt-ends-in-space": ([" Paris<|im_end|>"], 2), "alpaca": (["Paris<|im_end|>"], 2),
          "prompt-completion": (["Paris<|im_end|>"], 2)}
LLAMA3 = {"system": (["Paris<|eot_id|>"], 2), "no-system": (["Paris<|eot_id|>"], 2),
          "assistant-first": (["Paris<|eot_id|>", "Madrid<|eot_id|>"], 4),
          "multi-turn": (["Paris<|eot_id|>", "Madrid<|eot_id|>"], 4),
          "prompt-ends-in-space": ([" Paris<|eot_id|>"], 2), "alpaca": (["Paris<|eot_id|>"], 2),
          "prompt-completion": (["Paris<|eot_id|>"], 2)}
REFUSED_ALTERNATION = "roles must alternate user/assistant"
EXPECTED = {  # family: {case: (loss-bearing runs, target tokens) or the start of the refusal}
    "qwen2.5": CHATML,
    "smollm2": CHATML,
    "llama3": LLAMA3,
    "llama3.2": LLAMA3,
    # "▁Paris" starts at the space the template writes before an answer: trained, space and all.
    "mistral": {"system": ([" Paris</s>"], 2), "no-system": ([" Paris</s>"], 2),
                "assistant-first": REFUSED_ALTERNATION,
                "multi-turn": ([" Paris</s>", " Madrid</s>"], 4),
                "prompt-ends-in-space": ([" Paris</s>"], 2), "alpaca": (["Paris</s>"], 2),
                "prompt-completion": (["Paris</s>"], 2)},
    # "Madrid" is two tokens here ("Ma", "drid"): a word that only followed a newline in the training text.
    "gemma": {"system": (["Paris<end_of_turn>\n"], 3), "no-system": (["Paris<end_of_turn>\n"], 3),
              "assistant-first": REFUSED_ALTERNATION,
              "multi-turn": (["Paris<end_of_turn>\n", "Madrid<end_of_turn>\n"], 7),
              "prompt-ends-in-space": ([" Paris<eos>"], 2), "alpaca": (["Paris<eos>"], 2),
              "prompt-completion": (["Paris<eos>"], 2)},
    # Phi-3 writes its EOS only after the last message: every answer's <|end|>, and the EOS once, are trained.
    "phi3": {"system": (["Paris<|end|>\n<|endoftext|>"], 4), "no-system": (["Paris<|end|>\n<|endoftext|>"], 4),
             "assistant-first": (["Paris<|end|>\n", "Madrid<|end|>\n<|endoftext|>"], 8),
             "multi-turn": (["Paris<|end|>\n", "Madrid<|end|>\n<|endoftext|>"], 8),
             "prompt-ends-in-space": ([" Paris<|endoftext|>"], 2), "alpaca": (["Paris<|endoftext|>"], 2),
             "prompt-completion": (["Paris<|endoftext|>"], 2)},
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", FAMILIES)
def test_loss_bearing_text_on_each_family(name, case):
    tokenizer, (fmt, example), expected = family_tokenizer(name), CASES[case], EXPECTED[name][case]
    if isinstance(expected, str):
        with pytest.raises(chat.ConversationError, match=expected):
            tokenize_example(example, fmt, tokenizer, 1024, train_on_prompt=False)
        return
    runs, text, targets = loss_runs(tokenizer, fmt, example)
    assert (runs, targets) == expected, text
    row = tokenize_example(example, fmt, tokenizer, 1024, train_on_prompt=False)
    if FAMILIES[name]["adds_bos"] or "bos_token" in tokenizer.chat_template:
        assert row["input_ids"].count(tokenizer.bos_token_id) == 1  # one BOS, never two
    if fmt == "messages":  # nothing of the conversation is dropped
        for message in example["messages"]:
            assert message["content"] in text


@pytest.mark.parametrize("name", FAMILIES)
def test_truncation_inside_an_answer_keeps_the_answer_start(name):
    tokenizer = family_tokenizer(name)
    example = conversation(("user", USER), ("assistant", "Paris is the capital"))
    full = tokenize_example(example, "messages", tokenizer, 1024, train_on_prompt=False)
    first = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    cut = tokenize_example(example, "messages", tokenizer, first + 2, train_on_prompt=False)
    assert cut["input_ids"] == full["input_ids"][: first + 2]
    trained = [label for label in cut["labels"] if label != IGNORE_INDEX]
    assert trained == full["input_ids"][first: first + 2]
    assert tokenizer.decode(trained).strip().startswith("Paris")


# The five defects, each as it was found.

def test_defect_1_a_prompt_ending_in_a_space_still_trains_the_answers_first_token():
    for name in ("qwen2.5", "llama3"):
        runs, _, _ = loss_runs(family_tokenizer(name), *CASES["prompt-ends-in-space"])
        assert runs[0].startswith(" Paris"), (name, runs)


def test_defect_2_an_assistant_first_conversation_trains_no_prompt():
    for name in ("qwen2.5", "llama3.2", "smollm2"):
        runs, text, _ = loss_runs(family_tokenizer(name), *CASES["assistant-first"])
        assert len(runs) == 2 and "system" not in "".join(runs) and "helpful" not in "".join(runs), (name, runs)


def test_defect_3_mistral_with_a_system_message():
    """One user turn: the system text goes where Mistral puts it itself (into that turn), nothing is dropped.
    Several user turns: refused, naming the row, with advice that works when followed."""
    tokenizer = family_tokenizer("mistral")
    single = conversation(("system", SYSTEM), ("user", USER), ("assistant", ANSWER))
    text = render(single, "messages", tokenizer)[0]
    assert text == f"<s>[INST] {SYSTEM}\n\n{USER}[/INST] {ANSWER}</s>"
    assert tokenize_example(single, "messages", tokenizer, 1024, train_on_prompt=True)["labels"]
    several = conversation(("system", SYSTEM), ("user", USER), ("assistant", ANSWER), ("user", USER_2),
                           ("assistant", ANSWER_2))
    for train_on_prompt in (False, True):
        with pytest.raises(UsageError) as error:
            _tokenize_row({**several, ROW: 6}, "data.jsonl", fmt="messages", tokenizer=tokenizer, max_length=1024,
                          train_on_prompt=train_on_prompt)
        (line,) = error.value.problems
        assert line.startswith("dataset data.jsonl, row 7: the Mistral chat template puts the system message into "
                               "the last user turn only") and "split the conversation into one row per user" in line
    # The advice, followed: one row per user turn, each with the system message.
    for turns in (several["messages"][:3], [several["messages"][0], *several["messages"][3:]]):
        runs, _, _ = loss_runs(tokenizer, "messages", {"messages": turns})
        assert len(runs) == 1


def test_defect_4_gemma_with_a_system_turn_or_roles_that_do_not_alternate(tmp_path):
    tokenizer = family_tokenizer("gemma")
    text = render(CASES["system"][1], "messages", tokenizer)[0]
    assert f"<start_of_turn>user\n{SYSTEM}\n\n{USER}<end_of_turn>" in text  # as Gemma 3 does it
    twice = conversation(("user", USER), ("user", USER_2), ("assistant", ANSWER))
    with pytest.raises(UsageError, match=r"^dataset d.jsonl, row 3: the Gemma chat template refuses this "
                                          r"conversation \(Conversation roles must alternate"):
        _tokenize_row({**twice, ROW: 2}, "d.jsonl", fmt="messages", tokenizer=tokenizer, max_length=1024,
                      train_on_prompt=False)


def test_defect_5_phi3_multi_turn_trains_every_end_of_turn():
    runs, _, _ = loss_runs(family_tokenizer("phi3"), *CASES["multi-turn"])
    assert runs == ["Paris<|end|>\n", "Madrid<|end|>\n<|endoftext|>"]


# Against TRL's training templates: the tokens its {% generation %} blocks mark are the tokens we train.

@pytest.mark.parametrize("name", ["qwen2.5", "llama3", "gemma", "phi3"])
@pytest.mark.parametrize("case", ["no-system", "multi-turn", "assistant-first", "system"])
def test_labels_match_trls_generation_masks(name, case):
    tokenizer = family_tokenizer(name)
    example = CASES[case][1]
    expected = EXPECTED[name][case]
    if isinstance(expected, str) or (name == "gemma" and case == "system"):
        return  # refused by the template itself (TRL's training variant refuses it too), or folded by us
    training = (TEMPLATES / f"{FAMILIES[name]['template']}_training.jinja").read_text()
    marked = tokenizer.apply_chat_template(example["messages"], chat_template=training, tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True)
    row = tokenize_example(example, "messages", tokenizer, 1024, train_on_prompt=False)
    assert marked["input_ids"] == row["input_ids"]  # the training variant renders the same text
    ours = [label != IGNORE_INDEX for label in row["labels"]]
    theirs = [bool(m) for m in marked["assistant_masks"]]
    if name == "qwen2.5":
        # TRL's Qwen2.5 variant opens the generation block before the newline that ends the assistant header
        # (a newline the prompt already holds at inference, add_generation_prompt writes it); we start at the
        # answer. That newline is the only difference.
        newline = tokenizer.convert_tokens_to_ids("Ċ")
        header_ends = [i for i, token in enumerate(row["input_ids"][:-1])
                       if token == newline and theirs[i] and not ours[i] and ours[i + 1]]
        assert len(header_ends) == sum(m["role"] == "assistant" for m in example["messages"])
        theirs = [flag and i not in header_ends for i, flag in enumerate(theirs)]
    assert ours == theirs


def test_the_preview_marks_exactly_the_trained_text():
    tokenizer = family_tokenizer("mistral")
    row = tokenize_example(CASES["multi-turn"][1], "messages", tokenizer, 1024, train_on_prompt=False)
    assert marked_targets(row["input_ids"], row["labels"], tokenizer) == (
        "<s>[INST] Capital of France?[/INST][[ Paris</s>]][INST] And of Spain?[/INST][[ Madrid</s>]]")


@pytest.mark.parametrize("name", FAMILIES)
def test_a_run_counts_the_hand_counted_target_tokens(name, tmp_path):
    """Through the runner: a tiny model with the family's tokenizer trains one step on every accepted chat case;
    the summary's target tokens are the hand counts summed."""
    from finetune.embedded.tiny import save_tiny_model, write_jsonl
    from tests.conftest import train_and_summarise

    tokenizer = family_tokenizer(name)
    model_dir = save_tiny_model(tmp_path / "model", hidden_size=64, layers=2, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(model_dir)
    cases = [case for case, (fmt, _) in CASES.items() if fmt == "messages" and
             not isinstance(EXPECTED[name][case], str)]
    data = write_jsonl([CASES[case][1] for case in cases], tmp_path / "chat.jsonl")
    _, summary = train_and_summarise("lora_bf16", model_name_or_path=model_dir, dataset=data, max_steps=1,
                                     output_dir=tmp_path / "out", per_device_train_batch_size=len(cases),
                                     eval_size=0, eval_strategy="no", dtype="float32", save_strategy="no")
    assert summary["train/samples"] == len(cases)
    assert summary["train/target_tokens"] == sum(EXPECTED[name][case][1] for case in cases)


def test_a_refused_row_stops_loading_with_its_row_number(tmp_path):
    """Through datasets.map and the eval split: the row is its line in the file, whatever the shuffle."""
    from contextlib import nullcontext

    from finetune.data.load import load_splits
    from finetune.embedded.tiny import write_jsonl
    from finetune.recipe.keys import DataArguments

    rows = [CASES["no-system"][1]] * 5
    rows[3] = conversation(("user", USER), ("user", USER_2), ("assistant", ANSWER))
    path = write_jsonl(rows, tmp_path / "chat.jsonl")
    with pytest.raises(UsageError) as error:
        load_splits(DataArguments(dataset=str(path), eval_size=2), family_tokenizer("gemma"), 0,
                    lambda **_: nullcontext())
    assert error.value.problems == [f"dataset {path}, row 4: the Gemma chat template refuses this conversation "
                                    "(Conversation roles must alternate user/assistant/user/assistant/...)"]
