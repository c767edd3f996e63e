"""Conversations through a model's own chat template: the rendered text and the character spans of each answer.

Answer spans are found by rendering, not by parsing: for assistant turn i,
- its start is where the template puts a marker given as that turn's content, after the turns before it;
- its end is how far the conversation cut after turn i agrees with the whole conversation: the answer, its
  end-of-turn marker, and whatever else the template writes after an answer (Phi-3 writes its EOS only at the end
  of a conversation, so there the last answer carries it).
So the first assistant turn is found like every other (a default system prompt before it stays prompt), and a
template that renders earlier turns differently once later turns follow is detected rather than mis-labelled.

Templates without a place for a system message are handled deliberately (`fit_to_template`): the system text goes
to the start of the first user message where that is what the family does itself (Gemma 3 does it; Gemma 1/2
refuse a system role; Mistral v0.3 puts it into the last user message, which is the first when there is one user
turn); otherwise the row is refused with a message that names it and says what to do. Text is never dropped.
"""

from __future__ import annotations

from typing import Any

MARKER = "FINETUNE7ANSWER3MARKER"  # stands in for an answer's content while its start is located

# A substring of the template that names its family in messages (first match wins).
FAMILIES = [
    ("<|im_start|>", "ChatML (Qwen, SmolLM)"),
    ("<|start_header_id|>", "Llama 3"),
    ("<start_of_turn>", "Gemma"),
    ("[INST]", "Mistral"),
    ("<|assistant|>", "Phi-3"),
]


class ConversationError(ValueError):
    """A conversation this chat template can't render, or can't render with answer-only labels; one line."""


def family(tokenizer) -> str:
    """A short name for the tokenizer's chat template, for messages: 'the Gemma chat template'."""
    template = getattr(tokenizer, "chat_template", None) or ""
    name = next((label for marker, label in FAMILIES if marker in template), None)
    return f"the {name} chat template" if name else f"the chat template of {tokenizer.name_or_path or 'this model'}"


def apply(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The template's text for `messages`; ConversationError (one line, the template's own words) if it refuses."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja2's TemplateError from raise_exception, or TypeError/UndefinedError on data
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversationError(f"{family(tokenizer)} refuses this conversation ({reason})") from None


def _missing(text: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [m for m in messages if m["content"].strip() and m["content"].strip() not in text]


def _fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """The system text at the start of the first user message (Gemma 3's own way), or None if no user turn
    follows the system message."""
    system, rest = messages[0], messages[1:]
    if not rest or rest[0]["role"] != "user":
        return None
    return [{**rest[0], "content": f"{system['content']}\n\n{rest[0]['content']}"}, *rest[1:]]


def fit_to_template(messages: list[dict[str, str]], tokenizer) -> tuple[list[dict[str, str]], str, str | None]:
    """The messages as this template can render them without losing text, the rendered text, and a note when
    the system message had to move (None otherwise). Raises ConversationError when no such rendering exists."""
    has_system = bool(messages) and messages[0]["role"] == "system"
    refused = None
    try:
        text = apply(tokenizer, messages)
        missing = _missing(text, messages)
    except ConversationError as error:
        if not has_system:
            raise
        refused, missing = error, [messages[0]]
    if not missing:
        return messages, text, None
    if [m["role"] for m in missing] != ["system"] or not has_system:
        raise ConversationError(f"{family(tokenizer)} leaves out the text of a {missing[0]['role']!r} message; "
                                "use the roles it renders (system, user, assistant)")
    users = [m for m in messages if m["role"] == "user"]
    folded = _fold_system(messages)
    if folded is None:
        raise ConversationError(f"{family(tokenizer)} has no place for a system message before an assistant "
                                "turn; put the system text into a first user message")
    if refused is None:
        # Rendered, but the system text is gone: templates like Mistral v0.3 put it into the last user turn, which
        # is only there when the conversation ends with a user turn.
        if len(users) > 1:
            raise ConversationError(
                f"{family(tokenizer)} puts the system message into the last user turn only, so the earlier turns "
                "of this conversation would be trained without it; split the conversation into one row per user "
                "turn (each with the system message), or move the system text into the user messages yourself")
        note = "system message put into the (only) user turn, where this template puts it at inference"
    else:
        note = "system message put at the start of the first user turn: the template has no system role"
    text = apply(tokenizer, folded)
    if _missing(text, folded):
        raise ConversationError(f"{family(tokenizer)} leaves out text of this conversation even with the system "
                                "message in the first user turn; put it there yourself and check the result")
    return folded, text, note


def answer_spans(messages: list[dict[str, str]], text: str, tokenizer) -> list[tuple[int, int]]:
    """(start, end) character spans in `text` of each assistant turn: the answer through what ends its turn.

    Raises ConversationError when the template renders earlier turns differently once later turns follow (then
    answer-only labels can't be placed; train_on_prompt: true trains on the whole text instead)."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        probe = apply(tokenizer, [*messages[:index], {**message, "content": MARKER}])
        start = probe.find(MARKER)
        through = apply(tokenizer, messages[: index + 1])
        end = _common_prefix(through, text)
        if start < 0 or not text.startswith(probe[:start]) or end <= start or \
                message["content"].strip() not in text[start:end]:
            raise ConversationError(
                f"{family(tokenizer)} renders assistant turn {index + 1} differently once later turns follow, so "
                "its tokens can't be told apart from the prompt; set train_on_prompt: true to train on every token")
        spans.append((start, end))
    return spans


def _common_prefix(a: str, b: str) -> int:
    size = min(len(a), len(b))
    for i in range(size):
        if a[i] != b[i]:
            return i
    return size


def render(messages: list[dict[str, Any]], tokenizer, with_spans: bool = True):
    """(text, answer spans or [], note) for a conversation; see the module docstring."""
    fitted, text, note = fit_to_template(messages, tokenizer)
    return text, (answer_spans(fitted, text, tokenizer) if with_spans else []), note
