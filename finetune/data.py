"""Data: load a local file or hub dataset, detect its format, tokenize with answer-only labels, split off eval.

Formats (`dataset_format`, or `auto` to pick from the columns):
- `text`: a `text` column; the loss covers every token.
- `alpaca`: `instruction`, optional `input`, `output`; rendered with the Alpaca prompt; loss on the output.
- `messages`: a `messages` (or ShareGPT `conversations`) column of {role, content} turns, rendered with the
  tokenizer's chat template; loss on the assistant turns.
- `prompt_completion`: `prompt` and `completion` columns, concatenated; loss on the completion.

Labels are found in character space: the rendered text is tokenized once with offsets, and a token is trained on
when it covers any character of a trainable span (so a token that straddles the boundary, like " Paris" after a
prompt ending in a space, is trained: the model has to produce it). Chat templates are handled in
`finetune.chat`. EOS is appended where the template doesn't already end the answer.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune import chat
from finetune.config import DATA_FILE_EXTENSIONS, DataArguments, is_local_path
from finetune.errors import UsageError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that the loss skips (prompt tokens, padding)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)

FORMAT_COLUMNS = {
    "messages": [("messages",), ("conversations",)],
    "alpaca": [("instruction", "output")],
    "prompt_completion": [("prompt", "completion")],
    "text": [("text",)],
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}


def detect_format(columns: list[str]) -> str:
    """Pick the dataset format from column names. Raises UsageError when nothing fits."""
    for name, alternatives in FORMAT_COLUMNS.items():
        if any(all(column in columns for column in needed) for needed in alternatives):
            return name
    raise UsageError([
        f"dataset: can't tell the format from the columns {sorted(columns)}; expected `messages`, "
        "`instruction`+`output` (alpaca), `prompt`+`completion` or `text`, or set dataset_format"
    ])


def check_format(fmt: str, columns: list[str]) -> None:
    if not any(all(column in columns for column in needed) for needed in FORMAT_COLUMNS[fmt]):
        wanted = " or ".join("+".join(needed) for needed in FORMAT_COLUMNS[fmt])
        raise UsageError([f"dataset_format: {fmt} needs the column(s) {wanted}; the dataset has "
                           f"{sorted(columns)}"])


def alpaca_prompt(example: dict[str, Any]) -> str:
    """The Alpaca prompt for an instruction (and optional input), ending where the response begins."""
    has_input = bool(example.get("input"))
    return ALPACA_PROMPT.format(
        context=", paired with an input that provides further context" if has_input else "",
        instruction=example["instruction"],
        input_block=f"### Input:\n{example['input']}\n\n" if has_input else "",
    )


def normalise_messages(example: dict[str, Any]) -> list[dict[str, str]]:
    turns = example.get("messages") or example.get("conversations") or []
    messages = []
    for turn in turns:
        if "role" in turn:
            messages.append({"role": turn["role"], "content": turn["content"]})
        else:  # ShareGPT: {"from": "human", "value": ...}
            messages.append({"role": SHAREGPT_ROLES.get(turn["from"], turn["from"]), "content": turn["value"]})
    return messages


def render(example: dict[str, Any], fmt: str, tokenizer,
           with_spans: bool = True) -> tuple[str, list[tuple[int, int]], bool, str | None]:
    """Render one example as text plus the character spans to train on.

    Returns (text, spans, append_eos, note). `append_eos` is False when the text already carries the end of turn;
    `note` says when a chat template needed the system message moved (see `finetune.chat`). Raises
    chat.ConversationError for a conversation the chat template can't render as it is.
    """
    if fmt == "text":
        return example["text"], [(0, len(example["text"]))], True, None
    if fmt == "alpaca":
        prompt = alpaca_prompt(example)
        return prompt + example["output"], [(len(prompt), len(prompt) + len(example["output"]))], True, None
    if fmt == "prompt_completion":
        prompt, completion = example["prompt"], example["completion"]
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))], True, None
    text, spans, note = chat.render(normalise_messages(example), tokenizer, with_spans=with_spans)
    return text, spans, False, note


def tokenize_example(example: dict[str, Any], fmt: str, tokenizer, max_length: int,
                     train_on_prompt: bool) -> dict[str, Any]:
    """Token ids, attention mask and labels (IGNORE_INDEX outside the trained spans), truncated to max_length,
    and `note` (see `render`, "" when there is none)."""
    text, spans, append_eos, note = render(example, fmt, tokenizer, with_spans=not train_on_prompt)
    # Chat templates write their own BOS; the other formats rely on the tokenizer adding it.
    encoded = tokenizer(text, add_special_tokens=fmt != "messages", return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    if train_on_prompt:
        labels = list(input_ids)
    else:
        # A token is trained when it covers a character of a span and does not run past its end: a token that
        # starts in the prompt and reaches into the answer is the answer's first, one that runs past the end is
        # the template's. Zero-width offsets belong to special tokens the tokenizer added (BOS): never trained on.
        labels = [
            token if token_end > token_start and any(token_start < end and start < token_end <= end
                                                     for start, end in spans)
            else IGNORE_INDEX
            for token, (token_start, token_end) in zip(input_ids, encoded["offset_mapping"], strict=True)
        ]
    if append_eos and tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels, "note": note or ""}


def marked_targets(input_ids: list[int], labels: list[int], tokenizer, start: str = "[[", end: str = "]]") -> str:
    """The example's text with every run of loss-bearing tokens between `start` and `end`: what will be trained."""
    trained = [label != IGNORE_INDEX for label in labels]
    bounds = [0] + [i for i in range(1, len(trained)) if trained[i] != trained[i - 1]] + [len(trained)]
    # Decoding whole prefixes keeps each piece's spacing (SentencePiece decoders drop a leading "▁" per call).
    texts = [tokenizer.decode(input_ids[:b]) for b in bounds]
    pieces = []
    for (first, _), before, after in zip(zip(bounds, bounds[1:], strict=False), texts, texts[1:], strict=False):
        piece = after[len(before):]
        pieces.append(f"{start}{piece}{end}" if trained[first] else piece)
    return "".join(pieces)


def _load_raw(data_args: DataArguments):
    from datasets import load_dataset

    name = data_args.dataset
    if is_local_path(name) and Path(name).expanduser().is_file():
        path = Path(name).expanduser()
        builder = DATA_FILE_EXTENSIONS.get(path.suffix.lower())
        if builder is None:
            raise UsageError([f"dataset: {name!r} has an unsupported extension; use "
                               f"{', '.join(sorted(DATA_FILE_EXTENSIONS))}"])
        return load_dataset(builder, data_files={"train": str(path)})
    try:
        return load_dataset(name, data_args.dataset_config)
    except FileNotFoundError as exc:
        raise UsageError([f"dataset: can't load {name!r} ({str(exc).splitlines()[0]}); check the name, or "
                           "download it first when running offline"]) from None
    except (ConnectionError, OSError) as exc:
        raise UsageError([f"dataset: can't reach the hub for {name!r} ({type(exc).__name__}); download it "
                           "first or give a local file"]) from None


ROW = "finetune_row"  # column holding each example's position in its split as loaded, for error messages


def with_row_numbers(split):
    return split.add_column(ROW, list(range(len(split))))


def _tokenize_row(example: dict[str, Any], dataset: str, **kwargs) -> dict[str, Any]:
    """tokenize_example, with a problem in one row reported as bad input that names the row."""
    try:
        return tokenize_example(example, **kwargs)
    except chat.ConversationError as error:
        raise UsageError([f"dataset {dataset}, row {example[ROW] + 1}: {error}"]) from None


def load_splits(data_args: DataArguments, tokenizer, seed: int, main_process_first: Callable) -> tuple[Any, Any]:
    """Load, format-check, shuffle, split and tokenize. Returns (train, eval_or_None) tokenized datasets."""
    with main_process_first(desc="loading the dataset"):
        raw = _load_raw(data_args)
    if data_args.dataset_split not in raw:
        raise UsageError([f"dataset_split: {data_args.dataset_split!r} is not a split of {data_args.dataset!r} "
                           f"(splits: {', '.join(raw)})"])
    train = raw[data_args.dataset_split]
    columns = train.column_names
    train = with_row_numbers(train)
    fmt = data_args.dataset_format
    if fmt == "auto":
        fmt = detect_format(columns)
        logger.info("dataset format: %s (detected from columns %s)", fmt, ", ".join(columns))
    else:
        check_format(fmt, columns)
    if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
        raise UsageError(["dataset_format: messages needs a tokenizer with a chat template, and this model's "
                           "tokenizer has none; use a chat/instruct model or convert the data to alpaca or "
                           "prompt_completion"])

    train = train.shuffle(seed=seed)
    evaluation = None
    if data_args.eval_split:
        if data_args.eval_split not in raw:
            raise UsageError([f"eval_split: {data_args.eval_split!r} is not a split of {data_args.dataset!r} "
                               f"(splits: {', '.join(raw)})"])
        evaluation = with_row_numbers(raw[data_args.eval_split])
    else:
        held_out = data_args.eval_size if data_args.eval_size is not None else \
            round(len(train) * (data_args.eval_fraction or 0))
        if data_args.eval_fraction and held_out == 0:
            held_out = 1
        if held_out >= len(train):
            raise UsageError([f"eval_size/eval_fraction: holding out {held_out} of {len(train)} examples leaves "
                               "nothing to train on; hold out fewer"])
        if held_out:
            evaluation = train.select(range(held_out))
            train = train.select(range(held_out, len(train)))
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))

    def tokenize(split):
        with main_process_first(desc="tokenizing"):
            tokenized = split.map(
                _tokenize_row,
                fn_kwargs={"fmt": fmt, "tokenizer": tokenizer, "max_length": data_args.max_length,
                           "train_on_prompt": data_args.train_on_prompt, "dataset": data_args.dataset},
                remove_columns=split.column_names,
                desc="tokenizing",
            )
        notes = collections.Counter(note for note in tokenized["note"] if note)
        for note, count in notes.items():
            logger.warning("%d of %d examples: %s", count, len(tokenized), note)
        tokenized = tokenized.remove_columns("note")
        before = len(tokenized)
        # An example whose prompt fills max_length has nothing left to learn from.
        tokenized = tokenized.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"][1:]))
        if len(tokenized) < before:
            logger.warning("dropped %d of %d examples with no answer tokens left after truncation to "
                           "max_length=%d", before - len(tokenized), before, data_args.max_length)
        if len(tokenized) == 0:
            raise UsageError([f"dataset: no example has answer tokens within max_length={data_args.max_length}; "
                               "raise max_length"])
        return tokenized

    return tokenize(train), (tokenize(evaluation) if evaluation is not None else None)
