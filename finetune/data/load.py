"""Data: load a local file or hub dataset, detect its format, tokenize with answer-only labels, split off eval.

Formats (`dataset_format`, or `auto` to pick from the columns):
- `text`: a `text` column; the loss covers every token.
- `alpaca`: `instruction`, optional `input`, `output`; rendered with the Alpaca prompt; loss on the output.
- `messages`: a `messages` (or ShareGPT `conversations`) column of {role, content} turns, rendered with the
  tokenizer's chat template; loss on the assistant turns.
- `prompt_completion`: `prompt` and `completion` columns, concatenated; loss on the completion.
- `preference` (`prompt`, `chosen`, `rejected`) and `unpaired_preference` (`prompt`, `completion`, `label`): for
  `objective: dpo` and `kto`, tokenized into a prompt and its answers by `finetune.data.preference`.

Labels are found in character space: the rendered text is tokenized once with offsets, and a token is trained on
when it covers any character of a trainable span (so a token that straddles the boundary, like " Paris" after a
prompt ending in a space, is trained: the model has to produce it). Chat templates are handled in
`finetune.data.chat_templates`. EOS is appended where the template doesn't already end the answer.

A local file, or each file of a local directory, is checked before datasets reads it (`check_data_file`): the
first bad line or row is named as written, in its file. CSV columns are read as text (`csv_as_text`).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from finetune.data import chat_templates as chat
from finetune.data import preference
from finetune.errors import UsageError
from finetune.recipe.keys import DATA_FILE_EXTENSIONS, DataArguments, is_local_path

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
    "preference": [preference.PAIR_COLUMNS, preference.IMPLICIT_PAIR_COLUMNS],
    "unpaired_preference": [preference.UNPAIRED_COLUMNS],
    "prompt_completion": [("prompt", "completion")],
    "text": [("text",)],
}
PREFERENCE_FORMATS = ("preference", "unpaired_preference")
OBJECTIVE_FORMATS = {"dpo": ("preference",), "kto": PREFERENCE_FORMATS}  # sft: every other format
ROLE_ALIASES = {"model": "assistant", "bot": "assistant", "gpt": "assistant", "ai": "assistant", "human": "user"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}


def columns_format(columns, objective: str = "sft") -> str | None:
    """The first format whose columns are all among `columns` (None when none is), in FORMAT_COLUMNS' order with the
    objective's own formats first: for SFT the preference formats come last (`prompt`, `completion` and a `label`
    column of one's own are SFT data there), for DPO and KTO first (a preference dataset may carry `messages` too)."""
    order = sorted(FORMAT_COLUMNS, key=lambda name: (name in PREFERENCE_FORMATS) == (objective == "sft"))
    return next((name for name in order
                 if any(all(column in columns for column in needed) for needed in FORMAT_COLUMNS[name])), None)


def detect_format(columns: list[str], objective: str = "sft") -> str:
    """Pick the dataset format from column names. Raises UsageError when nothing fits."""
    fmt = columns_format(columns, objective)
    if fmt is not None:
        return fmt
    wanted = OBJECTIVE_FORMATS.get(objective)
    if wanted is not None:
        needs = " or ".join(f"`{'`+`'.join(needed)}`" for name in wanted for needed in FORMAT_COLUMNS[name])
        raise UsageError(f"dataset: objective {objective} needs the columns {needs}; the dataset has "
                         f"{sorted(columns)} (rename its columns, or set dataset_format)")
    raise UsageError([
        f"dataset: can't tell the format from the columns {sorted(columns)}; expected `messages`, "
        "`instruction`+`output` (alpaca), `prompt`+`completion`, `text`, or for preference tuning "
        "`prompt`+`chosen`+`rejected` or `prompt`+`completion`+`label`; or set dataset_format"
    ])


def check_format(fmt: str, columns: list[str]) -> None:
    if not any(all(column in columns for column in needed) for needed in FORMAT_COLUMNS[fmt]):
        wanted = " or ".join("+".join(needed) for needed in FORMAT_COLUMNS[fmt])
        raise UsageError(f"dataset_format: {fmt} needs the column(s) {wanted}; the dataset has "
                           f"{sorted(columns)}")


def alpaca_prompt(example: dict[str, Any]) -> str:
    """The Alpaca prompt for an instruction (and optional input), ending where the response begins."""
    has_input = bool(example.get("input"))
    return ALPACA_PROMPT.format(
        context=", paired with an input that provides further context" if has_input else "",
        instruction=example["instruction"],
        input_block=f"### Input:\n{example['input']}\n\n" if has_input else "",
    )


def normalise_messages(example: dict[str, Any]) -> list[dict[str, str]]:
    return normalise_turns(example.get("messages") or example.get("conversations") or [])


def normalise_turns(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    """{role, content} messages from turns in either form ({role, content} or ShareGPT's {from, value})."""
    messages = []
    for turn in turns:
        if turn.get("role") is not None:
            messages.append({"role": turn["role"], "content": turn.get("content")})
        else:  # ShareGPT: {"from": "human", "value": ...}
            role = turn.get("from")
            messages.append({"role": SHAREGPT_ROLES.get(role, role), "content": turn.get("value")})
    return messages


FIELDS = {  # format: (required text fields, optional text fields)
    "text": (("text",), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "prompt_completion": (("prompt", "completion"), ()),
}


def row_problem(example: dict[str, Any], fmt: str, roles: set[str] | None = None) -> str | None:
    """What is wrong with one raw example for its format, in words a user can act on; None when it is usable.
    `roles`: those the chat template renders; None leaves roles unchecked (before the tokenizer is known)."""
    present = sorted(k for k, v in example.items() if v is not None and k != ROW)
    if fmt in PREFERENCE_FORMATS:
        return preference.row_problem(example, fmt, lambda turns, column: turns_problem(turns, column, roles),
                                      ", ".join(present))
    if fmt in FIELDS:
        required, optional = FIELDS[fmt]
        for name in required + optional:
            value = example.get(name)
            if value is None and name in required:
                return f"`{name}` is missing or null (the row has {', '.join(present) or 'nothing'})"
            if value is not None and not isinstance(value, str):
                return f"`{name}` must be text, got {type(value).__name__} {value!r:.40}"
        return None
    column = "messages" if example.get("messages") is not None else "conversations"
    turns = example.get(column)
    if not turns:
        return (f"`messages` is missing, null or empty (the row has {', '.join(present) or 'nothing'}; "
                "one format per file)")
    return turns_problem(turns, column, roles)


def turns_problem(turns, column: str, roles: set[str] | None) -> str | None:
    """What is wrong with a list of {role, content} (or ShareGPT {from, value}) turns in `column`, or None."""
    if not isinstance(turns, list):
        return f"`{column}` must be a list of turns, got {type(turns).__name__}"
    if not turns:
        return f"`{column}` is an empty list of turns"
    where = "message" if column in ("messages", "conversations") else f"`{column}` turn"
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            return f"{where} {number} must be an object with role and content, got {type(turn).__name__}"
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = SHAREGPT_ROLES.get(role, role) if "role" not in turn else role
        if role is None:
            return f"{where} {number} has no `role`"
        if content is None:
            return f"{where} {number} ({role}) has no `content`"
        if not isinstance(content, str):
            return f"{where} {number} ({role}): `content` must be text, got {type(content).__name__} {content!r:.40}"
        if roles is not None and role not in roles:
            from finetune.recipe.load import did_you_mean

            alias = ROLE_ALIASES.get(str(role).lower())
            hint = f" (did you mean `{alias}`?)" if alias in roles else did_you_mean(str(role), roles)
            return (f"{where} {number}: role {role!r} is not one this chat template renders "
                    f"({', '.join(sorted(roles))}){hint}")
    return None


def template_roles(tokenizer) -> set[str]:
    """The roles a conversation may use with this tokenizer's chat template."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return {"system", "user", "assistant"} | ({"tool"} if "tool" in template else set())


def render(example: dict[str, Any], fmt: str, tokenizer,
           with_spans: bool = True) -> tuple[str, list[tuple[int, int]], bool, str | None]:
    """Render one example as text plus the character spans to train on.

    Returns (text, spans, append_eos, note). `append_eos` is False when the text already carries the end of turn;
    `note` says when a chat template needed the system message moved (see `finetune.data.chat_templates`). Raises
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
    cut_answer = any(label != IGNORE_INDEX for label in labels[max_length:])
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if cut_answer and any(label != IGNORE_INDEX for label in labels[1:]):  # wholly cut ones are dropped, and said so
        cut = (f"an answer cut at max_length={max_length} (its end and end-of-turn are not trained; raise "
               "max_length)")
        note = f"{note}; {cut}" if note else cut
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
    path = Path(name).expanduser()
    if not (is_local_path(name) and path.exists()):
        try:
            return load_dataset(name, data_args.dataset_config)
        except FileNotFoundError as exc:
            raise UsageError(f"dataset: can't load {name!r} ({str(exc).splitlines()[0]}); check the name, or "
                             "download it first when running offline") from None
        except (ConnectionError, OSError) as exc:
            raise UsageError(f"dataset: can't reach the hub for {name!r} ({type(exc).__name__}); download it "
                             "first or give a local file") from None
    try:
        if path.is_file():
            builder = DATA_FILE_EXTENSIONS.get(path.suffix.lower())
            if builder is None:
                raise UsageError(f"dataset: {name!r} has an unsupported extension; use "
                                 f"{', '.join(sorted(DATA_FILE_EXTENSIONS))}")
            files = {"train": [str(path)]}
        else:
            builder, files = local_data_files(name, data_args.dataset_config)
        if builder in ("json", "csv"):
            for file in (file for split_files in files.values() for file in split_files):
                check_data_file(Path(file), name if path.is_file() else shown_file(name, file))
        text_columns = csv_as_text(Path(next(iter(files.values()))[0])) if builder == "csv" else {}
        if path.is_file():
            return load_dataset(builder, data_files=files, **text_columns)
        return load_dataset(name, data_args.dataset_config, **text_columns)
    except UsageError:
        raise
    except FileNotFoundError as error:  # a directory without data files
        raise UsageError(f"dataset {name}: {str(error).splitlines()[0]}; give a directory holding "
                         f"{', '.join(sorted(DATA_FILE_EXTENSIONS))} files") from None
    except Exception as error:  # pyarrow and datasets raise many types; the checks above caught what they could
        reason = error.__cause__ or error  # datasets' DatasetGenerationError says only "An error occurred"
        raise UsageError(f"dataset {name}: {(str(reason).strip() or type(reason).__name__).splitlines()[0]}") \
            from None


def local_data_files(directory: str, config: str | None) -> tuple[str, dict[str, list[str]]]:
    """For a local dataset directory: the datasets builder that reads it ("json", "csv", ...) and each split's
    files, in the order datasets reads them into the split."""
    from datasets import load_dataset_builder

    builder = load_dataset_builder(directory, config)
    return builder.name, {str(split): list(files) for split, files in (builder.config.data_files or {}).items()}


def shown_file(directory: str, file: str) -> str:
    """A file of a dataset directory as a message names it: under the directory as the user wrote it."""
    try:
        return str(Path(directory) / Path(file).relative_to(Path(directory).expanduser().resolve()))
    except ValueError:
        return file


def csv_as_text(path: Path) -> dict[str, Any]:
    """load_dataset's arguments that read every column of a CSV file (named in its header, `path`) as text: a CSV
    can't say a column holds numbers, and pandas would read answers like 52 as integers (one empty cell: floats),
    and "None" or "NA" as missing. An empty cell is still missing."""
    import pandas as pd
    from datasets import Features, Value

    columns = pd.read_csv(path, nrows=0).columns
    return {"features": Features({column: Value("string") for column in columns}),
            "keep_default_na": False, "na_values": [""]}


NEWLINE = b"\n"


def check_data_file(path: Path, shown: str) -> None:
    """Refuse a local JSON Lines, JSON or CSV data file that is empty or not UTF-8 text, and a JSON one with a
    line that isn't a JSON object, or a row that doesn't fit the format its keys name (`row_problem`, roles
    aside). datasets would stop on such a line with a long traceback, and it changes values it can't type: a
    number among strings turns the field into JSON, after which the string "7" reads back as the number 7 (so a
    check of the loaded rows names the wrong row and a value the file doesn't hold), and a later file of a
    directory is cast to the first one's types (5 becomes "5"). Raises UsageError naming the file as `shown` and
    the line or row (rows count the non-empty lines, as datasets does). Read streaming, once: a file that passes
    is remembered by its size and modification time (rereading a large file costs its size in disk reads)."""
    from finetune.recipe.keys import cache_dir

    stat = path.stat()
    stamp = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:rows"  # ":rows": its rows were checked too
    cache = cache_dir() / "data-checks.txt"
    try:
        if stamp in cache.read_text().splitlines():
            return
    except OSError:
        pass
    problem = text_file_problem(path)
    if problem:
        raise UsageError(f"dataset {shown}: {problem}")
    if DATA_FILE_EXTENSIONS.get(path.suffix.lower()) == "json":
        first_form = None  # (turns or not, row): a preference file's rows all in one form
        for number, row in enumerate(json_rows(path, shown) or (), 1):
            pairs = "chosen" in row and "rejected" in row  # columns of preference data alone
            fmt = columns_format(row, "dpo" if pairs else "sft")
            problem = row_problem(row, fmt) if fmt else None
            if not problem and fmt in PREFERENCE_FORMATS:
                form = (isinstance(preference.explicit(row).get("prompt"), list), number)
                first_form = first_form or form
                if form[0] != first_form[0]:
                    problem = (f"its prompt and answers are {'turns' if form[0] else 'text'}, row {first_form[1]}'s "
                               f"are {'turns' if first_form[0] else 'text'}; give every row in one form")
            if problem:
                raise UsageError(f"dataset {shown}, row {number}: {problem}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.open("a") as handle:
            handle.write(stamp + "\n")
    except OSError:
        pass


def text_file_problem(path: Path) -> str | None:
    """Whether a text data file is empty or not UTF-8 (where: line and byte), read streaming."""
    import codecs

    decoder, offset, line, seen_text = codecs.getincrementaldecoder("utf-8")(), 0, 1, False
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError as error:
                where = line + block[: error.start].count(NEWLINE)
                return f"line {where}: not UTF-8 text (byte {offset + error.start} of the file); save it as UTF-8"
            offset, line, seen_text = offset + len(block), line + block.count(NEWLINE), seen_text or bool(text.strip())
    if not seen_text:
        return "the file is empty (or only whitespace); give a file with examples"
    return None


def json_rows(path: Path, shown: str) -> Iterator[dict[str, Any]] | None:
    """The rows of a UTF-8 JSON Lines file, or of a JSON file holding a list, in order, as written; None for a
    JSON file holding one object (datasets reads its columns with pandas). Raises UsageError naming the file as
    `shown` and the line that isn't valid JSON, or not an object."""
    import json

    if path.suffix.lower() == ".json":
        try:
            document = json.loads(path.read_bytes().decode("utf-8-sig"))
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # more than one document: JSON Lines, read line by line below
                raise UsageError(f"dataset {shown}: line {error.lineno}: not valid JSON ({error.msg}, column "
                                 f"{error.colno})") from None
        else:
            if not isinstance(document, list):
                return None
            return (row if isinstance(row, dict) else {"text": row} for row in document)  # strings: a text column
    return _json_lines(path, shown)


def _json_lines(path: Path, shown: str) -> Iterator[dict[str, Any]]:
    import json

    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # datasets skips a byte order mark
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise UsageError(f"dataset {shown}: line {number}: not valid JSON ({error.msg}, column "
                                 f"{error.colno})") from None
            if not isinstance(row, dict):
                raise UsageError(f"dataset {shown}: line {number}: expected a JSON object per line, got "
                                 f"{type(row).__name__}")
            yield row


def row_place(dataset: str, config: str | None, split: str, index: int) -> tuple[str, int]:
    """Where row `index` (0-based) of a split is, for a message: the file to name and the row's 1-based place in
    it. A local directory's split is its files one after another; any other dataset is named as given."""
    if is_local_path(dataset) and Path(dataset).expanduser().is_dir():
        builder, files = local_data_files(dataset, config)
        before = 0
        for file in files.get(split, []):
            rows = count_rows(builder, Path(file))
            if rows is None:
                break
            if index < before + rows:
                return shown_file(dataset, file), index - before + 1
            before += rows
    return dataset, index + 1


def count_rows(builder: str, path: Path) -> int | None:
    """How many rows datasets reads from one data file; None when this can't tell."""
    if builder == "json":
        rows = json_rows(path, str(path))
        return None if rows is None else sum(1 for _ in rows)
    if builder == "csv":
        import pandas as pd

        return len(pd.read_csv(path, dtype=str, keep_default_na=False))
    if builder == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


ROW = "finetune_row"  # column holding each example's position in its split as loaded, for error messages


def with_row_numbers(split):
    return split.add_column(ROW, list(range(len(split))))


def _tokenize_row(example: dict[str, Any], dataset: str, roles: set[str] | None = None, split: str = "train",
                  dataset_config: str | None = None, **kwargs) -> dict[str, Any]:
    """tokenize_example (or for preference rows preference.tokenize_row) after the row's own check; a problem in one
    row is bad input that names the file and the row (its 1-based place in that file: for JSON Lines, the n-th
    non-empty line; see `row_place`)."""
    problem = row_problem(example, kwargs["fmt"], roles or {"system", "user", "assistant"})
    if problem is None:
        try:
            if kwargs["fmt"] in PREFERENCE_FORMATS:
                return preference.tokenize_row(example, normalise=normalise_turns, **kwargs)
            return tokenize_example(example, **kwargs)
        except chat.ConversationError as error:
            problem = str(error)
    shown, row = row_place(dataset, dataset_config, split, example[ROW])
    raise UsageError(f"dataset {shown}, row {row}: {problem}")


class Splits(NamedTuple):
    train: Any  # tokenized datasets.Dataset
    eval: Any  # tokenized, or None
    format: str  # the dataset format, detected or given


def load_splits(data_args: DataArguments, tokenizer, seed: int, main_process_first: Callable, objective: str = "sft",
                max_prompt_length: int | None = None) -> Splits:
    """Load, format-check, shuffle, split and tokenize: the train split, the eval split (or None) and the format.
    For a preference objective the rows become prompt and answer ids (`finetune.data.preference`), cut to
    `max_prompt_length`."""
    train, evaluation, fmt = raw_splits(data_args, tokenizer, seed, main_process_first, objective)
    if objective == "kto" and fmt == "preference":  # each pair: a desirable and an undesirable answer
        held_out_from = data_args.eval_split or data_args.dataset_split
        for split, name in ((train, data_args.dataset_split), (evaluation, held_out_from)):
            check_rows(split, fmt, data_args, name, template_roles(tokenizer))
        train, evaluation, fmt = preference.unpair(train, seed), evaluation and preference.unpair(evaluation, seed), \
            "unpaired_preference"
    options = ({"max_prompt_length": max_prompt_length} if fmt in PREFERENCE_FORMATS else
               {"train_on_prompt": data_args.train_on_prompt})

    def tokenize(split, name: str):
        with main_process_first(desc="tokenizing"):
            tokenized = split.map(
                _tokenize_row,
                fn_kwargs={"fmt": fmt, "tokenizer": tokenizer, "max_length": data_args.max_length, **options,
                           "dataset": data_args.dataset, "dataset_config": data_args.dataset_config, "split": name,
                           "roles": template_roles(tokenizer)},
                remove_columns=split.column_names,
                desc="tokenizing",
            )
        notes = collections.Counter(note for note in tokenized["note"] if note)
        for note, count in notes.items():
            logger.warning("%d of %d examples: %s", count, len(tokenized), note)
        tokenized = tokenized.remove_columns("note")
        if fmt in PREFERENCE_FORMATS:
            return drop_unfitting(tokenized, data_args)
        before = len(tokenized)
        # An example with no answer tokens has nothing to learn from: its prompt fills max_length, or it has no
        # answer at all (a conversation without an assistant turn, an empty answer).
        flags = tokenized.map(lambda row: {"answerless": not any(label != IGNORE_INDEX for label in row["labels"][1:]),
                                           "full": len(row["input_ids"]) >= data_args.max_length},
                              remove_columns=tokenized.column_names, desc="finding answers")
        answerless = flags["answerless"]
        truncated = sum(1 for lost, full in zip(answerless, flags["full"], strict=True) if lost and full)
        no_answer = sum(answerless) - truncated
        if truncated:
            logger.warning("dropped %d of %d examples with no answer tokens left after truncation to "
                           "max_length=%d", truncated, before, data_args.max_length)
        if no_answer:
            logger.warning("dropped %d of %d examples with no answer to learn from (no assistant turn, or an empty "
                           "answer)", no_answer, before)
        if truncated + no_answer == before:
            raise UsageError(f"dataset {data_args.dataset}: " + (
                f"no example has answer tokens within max_length={data_args.max_length}; raise max_length"
                if truncated >= no_answer else
                f"no example has an answer to learn from ({no_answer} of {before} have no assistant turn or an "
                "empty answer); each needs the reply to train on"))
        if truncated or no_answer:
            tokenized = tokenized.select([i for i, lost in enumerate(answerless) if not lost])
        return tokenized

    held_out_from = data_args.eval_split or data_args.dataset_split  # the split the eval rows are numbered in
    return Splits(tokenize(train, data_args.dataset_split),
                  tokenize(evaluation, held_out_from) if evaluation is not None else None, fmt)


def check_rows(split, fmt: str, data_args: DataArguments, name: str, roles: set[str]) -> None:
    """Every row of an untokenized split fits its format (row_problem); UsageError naming the first that doesn't,
    by its file and row. For rows reshaped before tokenizing (KTO's unpaired pairs), whose places would be lost."""
    if split is None:
        return
    for example in split:
        problem = row_problem(example, fmt, roles)
        if problem:
            shown, row = row_place(data_args.dataset, data_args.dataset_config, name, example[ROW])
            raise UsageError(f"dataset {shown}, row {row}: {problem}")


def drop_unfitting(tokenized, data_args: DataArguments):
    """Preference rows whose prompt leaves no room for an answer within max_length dropped, and said so; UsageError
    when none is left."""
    fits = tokenized["fits"]
    tokenized = tokenized.remove_columns("fits")
    if all(fits):
        return tokenized
    if not any(fits):
        raise UsageError(f"dataset {data_args.dataset}: no prompt leaves room for an answer within "
                         f"max_length={data_args.max_length}; raise max_length or set max_prompt_length")
    logger.warning("dropped %d of %d examples whose prompt fills max_length=%d (set max_prompt_length to keep them, "
                   "their prompts cut)", fits.count(False), len(fits), data_args.max_length)
    return tokenized.select([i for i, fit in enumerate(fits) if fit])


def format_problem(fmt: str, objective: str, columns: list[str]) -> str | None:
    """Why a dataset format can't train an objective (preference rows need dpo or kto, and the reverse)."""
    wanted = OBJECTIVE_FORMATS.get(objective)
    if wanted is None and fmt in PREFERENCE_FORMATS:
        return (f"dataset: its rows are {fmt.replace('_', ' ')} data (columns {', '.join(sorted(columns))}); train "
                f"them with objective: {'dpo (or kto)' if fmt == 'preference' else 'kto'}")
    if wanted is not None and fmt not in wanted:
        needs = " or ".join("+".join(FORMAT_COLUMNS[name][0]) for name in wanted)
        return (f"objective: {objective} needs {needs} rows; the dataset is {fmt} data (columns "
                f"{', '.join(sorted(columns))})")
    return None


def raw_splits(data_args: DataArguments, tokenizer, seed: int, main_process_first: Callable, objective: str = "sft"):
    """Load, format-check, shuffle and split, untokenized: (train, eval or None, format). The examples a run
    held out, as rows of the dataset (for benchmarks built on them, finetune.commands.evaluate)."""
    with main_process_first(desc="loading the dataset"):
        raw = _load_raw(data_args)
    if data_args.dataset_split not in raw:
        raise UsageError(f"dataset_split: {data_args.dataset_split!r} is not a split of {data_args.dataset!r} "
                           f"(splits: {', '.join(raw)})")
    train = raw[data_args.dataset_split]
    columns = train.column_names
    train = with_row_numbers(train)
    fmt = data_args.dataset_format
    if fmt == "auto":
        fmt = detect_format(columns, objective)
        logger.info("dataset format: %s (detected from columns %s)", fmt, ", ".join(columns))
    else:
        check_format(fmt, columns)
    problem = format_problem(fmt, objective, columns)
    if problem:
        raise UsageError(problem)
    conversational = fmt == "messages" or (fmt in PREFERENCE_FORMATS and
                                           isinstance(preference.explicit(train[0]).get("prompt"), list))
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"dataset_format: {fmt} (rows as turns) needs a tokenizer with a chat template, and this "
                         "model's tokenizer has none; use a chat/instruct model or give the rows as text")

    train = train.shuffle(seed=seed)
    evaluation = None
    if data_args.eval_split:
        if data_args.eval_split not in raw:
            raise UsageError(f"eval_split: {data_args.eval_split!r} is not a split of {data_args.dataset!r} "
                               f"(splits: {', '.join(raw)})")
        evaluation = with_row_numbers(raw[data_args.eval_split])
    else:
        held_out = data_args.eval_size if data_args.eval_size is not None else \
            round(len(train) * (data_args.eval_fraction or 0))
        if data_args.eval_fraction and held_out == 0:
            held_out = 1
        if held_out >= len(train):
            raise UsageError(f"eval_size/eval_fraction: holding out {held_out} of {len(train)} examples leaves "
                               "nothing to train on; hold out fewer")
        if held_out:
            evaluation = train.select(range(held_out))
            train = train.select(range(held_out, len(train)))
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    return train, evaluation, fmt


def preview(splits: Splits, tokenizer, examples: int = 2) -> str:
    """What training will see: the format, example counts, token lengths, and the first examples with their
    loss-bearing text between [[ and ]]."""
    import statistics

    if splits.format in PREFERENCE_FORMATS:
        return preference.preview(splits.train, splits.eval, splits.format, tokenizer, examples)
    lengths = sorted(len(ids) for ids in splits.train["input_ids"])
    targets = [sum(1 for label in labels[1:] if label != IGNORE_INDEX) for labels in splits.train["labels"]]

    def quantile(q: float) -> int:
        return lengths[min(len(lengths) - 1, int(q * len(lengths)))]

    lines = [f"format: {splits.format}", f"examples: {len(splits.train)} train, "
             f"{len(splits.eval) if splits.eval is not None else 0} eval",
             f"tokens per example: min {lengths[0]}, median {quantile(0.5)}, p95 {quantile(0.95)}, max {lengths[-1]}; "
             f"target tokens per example: mean {statistics.fmean(targets):.1f}"]
    for number, row in enumerate(splits.train.select(range(min(examples, len(splits.train)))), 1):
        lines += [f"--- example {number} ({len(row['input_ids'])} tokens, loss on the [[ ]] parts):",
                  marked_targets(row["input_ids"], row["labels"], tokenizer)]
    return "\n".join(lines)

