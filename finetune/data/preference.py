"""Preference data for `objective: dpo` and `kto`: rows checked, then tokenized into a prompt and its answers.

Formats (detected from the columns like the SFT ones, `finetune.data.load.FORMAT_COLUMNS`):
- `preference`: `prompt`, `chosen`, `rejected` (DPO's pairs; KTO reads each pair as a desirable and an
  undesirable answer);
- `unpaired_preference`: `prompt`, `completion`, `label` (true: desirable), KTO's rows.

Each is in text form (strings: the prompt and the answers are concatenated, EOS appended) or conversational form
(lists of {role, content} turns: the prompt's turns, then the answer's, through the model's chat template). Pairs
may also leave the prompt implicit, as many hub datasets do: no `prompt` column, and `chosen` and `rejected` whole
conversations whose shared first turns are the prompt (`explicit`).

The split between prompt and answer is found in character space, as for SFT labels (`finetune.data.load`): the
answer starts at the first token that covers a character of it; a conversational answer starts where the chat
template puts its first assistant turn's content (`finetune.data.chat_templates.answer_spans`), so the template's
own header ("<|im_start|>assistant\n") is prompt and its end-of-turn is answer, on every template the SFT path
handles. TRL tokenizes the prompt alone and takes the common prefix instead; the toolkit hands TRL's trainers the
token ids made here.
"""

from __future__ import annotations

from typing import Any

from finetune.data import chat_templates as chat

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
IMPLICIT_PAIR_COLUMNS = ("chosen", "rejected")  # the prompt: the conversations' shared first turns
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
LABEL_WORDS = {"true": True, "false": False}  # a CSV's labels are read as text


def answers(fmt: str) -> tuple[str, ...]:
    """The columns holding answers in a preference format."""
    return ("chosen", "rejected") if fmt == "preference" else ("completion",)


def shared_turns(chosen: list, rejected: list) -> int:
    """How many first turns of two conversations are the prompt: those they share, short of an assistant turn at
    the end (an answer starts with the assistant's turn)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and isinstance(chosen[shared - 1], dict) and \
            chosen[shared - 1].get("role", chosen[shared - 1].get("from")) in ("assistant", "gpt"):
        shared -= 1
    return shared


def explicit(example: dict[str, Any]) -> dict[str, Any]:
    """A pair with its prompt as the answers have it: as it is, or split from whole conversations (their shared
    first turns; a text `prompt` beside them, as some hub datasets add, is one of those turns)."""
    if isinstance(example.get("prompt"), list) or not isinstance(example.get("chosen"), list):
        return example
    shared = shared_turns(example["chosen"], example["rejected"])
    return {**example, "prompt": example["chosen"][:shared], "chosen": example["chosen"][shared:],
            "rejected": example["rejected"][shared:]}


def row_problem(example: dict[str, Any], fmt: str, turn_problem, present: str) -> str | None:
    """What is wrong with one preference row, or None. `turn_problem(turns, column)` checks a list of turns (the
    SFT check, roles included); `present` lists the row's fields for messages."""
    if fmt == "preference" and example.get("prompt") is None and isinstance(example.get("chosen"), str):
        return ("no `prompt`: text pairs need one (the prompt is split off only from conversations, `chosen` and "
                "`rejected` as lists of turns that share their first turns)")
    prompt = example.get("prompt")
    whole_conversations = isinstance(example.get("chosen"), list) and (
        prompt is None or isinstance(prompt, str) and isinstance(example.get("rejected"), list))
    if fmt == "preference" and whole_conversations:
        if example.get("rejected") is None:
            return f"`rejected` is missing or null (the row has {present or 'nothing'})"
        if not isinstance(example["rejected"], list):
            return f"`rejected` must be a list of turns, as `chosen` is; got {type(example['rejected']).__name__}"
        for column in ("chosen", "rejected"):
            problem = turn_problem(example[column], column)
            if problem:
                return problem
        shared = shared_turns(example["chosen"], example["rejected"])
        if shared == 0:
            return (f"{'no `prompt`' if prompt is None else '`prompt` is text'}, and `chosen` and "
                    "`rejected` don't start with the same turns (the prompt); give `prompt` as a list of turns, or "
                    "conversations that share their first turns")
        if prompt is not None and not any(isinstance(turn, dict) and turn.get("content", turn.get("value")) == prompt
                                          for turn in example["chosen"][:shared]):
            return (f"`prompt` {prompt!r:.40} is none of the turns `chosen` and `rejected` start with; give it as a "
                    "list of turns before the answers, or leave it out")
        example = explicit(example)
    conversational = isinstance(example.get("prompt"), list)
    for column in ("prompt", *answers(fmt)):
        value = example.get(column)
        if value is None:
            return f"`{column}` is missing or null (the row has {present or 'nothing'})"
        if conversational:
            if not isinstance(value, list):
                return (f"`{column}` is {type(value).__name__} but `prompt` is a list of turns; give every column as "
                        "turns or every one as text")
            problem = turn_problem(value, column)
            if problem:
                return problem
            if column != "prompt" and not any(isinstance(turn, dict) and turn.get("role", turn.get("from")) in
                                               ("assistant", "gpt") for turn in value):
                return f"`{column}` has no assistant turn; it holds the answer to the prompt"
        elif not isinstance(value, str):
            what = "text, as `prompt` is" if isinstance(value, list) else "text or a list of turns"
            return f"`{column}` must be {what}; got {type(value).__name__} {value!r:.40}"
    if fmt == "unpaired_preference" and label_value(example.get("label")) is None:
        label = example.get("label")
        return f"`label` must be true (desirable) or false (undesirable), got {label!r:.40}"
    return None


def label_value(value: Any) -> bool | None:
    """A row's KTO label as a bool (true/false, or the words in a CSV), None when it is neither."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return LABEL_WORDS.get(value.strip().lower())
    return None


def split_answer(prompt, answer, tokenizer, normalise) -> tuple[list[int], list[int], str | None]:
    """(prompt ids, answer ids, note) of one prompt and one answer, text or turns (`normalise` maps a list of
    turns to {role, content} messages)."""
    if isinstance(prompt, str):
        text, start, append_eos, note = prompt + answer, len(prompt), True, None
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    else:
        before = normalise(prompt)
        messages = before + normalise(answer)
        text, spans, note = chat.render(messages, tokenizer)
        start = spans[sum(1 for turn in before if turn["role"] == "assistant")][0]
        append_eos = False  # the template ends the turn
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    # The answer starts at the first token that reaches past its first character (zero-width: a special token
    # the tokenizer added, e.g. BOS).
    first = next((i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and b > start), len(ids))
    answer_ids = ids[first:]
    if append_eos and tokenizer.eos_token_id is not None and answer_ids[-1:] != [tokenizer.eos_token_id]:
        answer_ids.append(tokenizer.eos_token_id)
    return ids[:first], answer_ids, note


def common_prefix(a: list[int], b: list[int]) -> int:
    size = min(len(a), len(b))
    return next((i for i in range(size) if a[i] != b[i]), size)


def tokenize_row(example: dict[str, Any], fmt: str, tokenizer, max_length: int, max_prompt_length: int | None,
                 normalise) -> dict[str, Any]:
    """One row as token ids: `prompt_ids` and `chosen_ids`/`rejected_ids` (preference) or `completion_ids`/`label`
    (unpaired), cut to max_prompt_length (the prompt keeps its end) and max_length (the answers keep their start);
    `note` says what was changed ("" when nothing was); `fits` is False when the prompt leaves no room for an
    answer token. Raises chat.ConversationError for a conversation the chat template can't render."""
    notes = []
    columns = answers(fmt)
    example = explicit(example)
    split = [split_answer(example["prompt"], example[column], tokenizer, normalise) for column in columns]
    prompt_ids = split[0][0]
    notes += [note for _, _, note in split[:1] if note]
    answer_ids = [a for _, a, _ in split]
    if len(split) == 2 and split[0][0] != split[1][0]:
        # The prompt's last tokens merged with an answer's first ones differently: the shared part is the prompt.
        shared = common_prefix(split[0][0], split[1][0])
        prompt_ids = split[0][0][:shared]
        answer_ids = [p[shared:] + a for p, a, _ in split]
        notes.append("the prompt's last tokens differ between the answers (merged across the boundary); the shared "
                     "part is the prompt")
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        notes.append(f"a prompt cut to its last max_prompt_length={max_prompt_length} tokens")
    room = max_length - len(prompt_ids)
    if any(len(a) > room for a in answer_ids) and room > 0:
        notes.append(f"an answer cut at max_length={max_length} (its end is not trained; raise max_length)")
    answer_ids = [a[:max(room, 0)] for a in answer_ids]
    row = {"prompt_ids": prompt_ids, **dict(zip((f"{c}_ids" for c in columns), answer_ids, strict=True)),
           "note": "; ".join(notes), "fits": room > 0}
    if fmt == "unpaired_preference":
        row["label"] = label_value(example["label"])
    return row


def unpair(split, seed: int):
    """Preference pairs as KTO's rows, shuffled by `seed`: each pair's chosen answer desirable, its rejected one
    undesirable (TRL's `unpair_preference_dataset`, kept row-numbered: both rows keep their pair's place)."""
    from datasets import concatenate_datasets

    from finetune.data.load import ROW

    split = split.map(explicit, desc="finding the prompts")
    keep = ["prompt", ROW]
    chosen = split.select_columns([*keep, "chosen"]).rename_column("chosen", "completion")
    rejected = split.select_columns([*keep, "rejected"]).rename_column("rejected", "completion")
    chosen = chosen.add_column("label", [True] * len(chosen))
    rejected = rejected.add_column("label", [False] * len(rejected))
    return concatenate_datasets([chosen, rejected]).shuffle(seed=seed)


def counts(features: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(examples, input tokens, target tokens) of tokenized preference rows: a pair feeds the model its prompt
    twice, once before each answer; the targets are the answer tokens (their log-probabilities make the loss)."""
    inputs = targets = 0
    for feature in features:
        for column in ("chosen_ids", "rejected_ids", "completion_ids"):
            if column in feature:
                inputs += len(feature["prompt_ids"]) + len(feature[column])
                targets += len(feature[column])
    return len(features), inputs, targets


def preview(train, evaluation, fmt: str, tokenizer, examples: int = 2) -> str:
    """What preference training will see: the format, counts, token lengths, and the first rows with each answer
    (what the loss scores) between [[ and ]] after its prompt."""
    import statistics

    columns = [f"{column}_ids" for column in answers(fmt)]
    prompts = [len(ids) for ids in train["prompt_ids"]]
    answer_lengths = [len(ids) for column in columns for ids in train[column]]
    lines = [f"format: {fmt}", f"examples: {len(train)} train, {len(evaluation) if evaluation is not None else 0} eval",
             f"prompt tokens: median {statistics.median(prompts):g}, max {max(prompts)}; answer tokens: median "
             f"{statistics.median(answer_lengths):g}, max {max(answer_lengths)}"]
    if fmt == "unpaired_preference":
        desirable = sum(train["label"])
        lines.append(f"labels: {desirable} desirable, {len(train) - desirable} undesirable")
    for number, row in enumerate(train.select(range(min(examples, len(train)))), 1):
        lines.append(f"--- example {number} (prompt {len(row['prompt_ids'])} tokens; answers in [[ ]]):")
        lines.append(tokenizer.decode(row["prompt_ids"]))
        for column in columns:
            label = column[:-4] if fmt == "preference" else ("desirable" if row["label"] else "undesirable")
            lines.append(f"{label}: [[{tokenizer.decode(row[column])}]]")
    return "\n".join(lines)
