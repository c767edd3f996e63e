"""Held-out preference accuracy: the share of preference pairs whose chosen answer a model gives a higher
log-probability than the rejected one, given the prompt.

It needs no reference model, so it compares any two models on the same pairs: the model a DPO run starts from
(`eval/preference_accuracy_start`) and the one it ends with (`eval/preference_accuracy`), an SFT run, the base
(`finetune eval RUN --preferences`). TRL's `rewards/accuracies` is another number: the share of pairs where the
policy moved the chosen answer up more than the rejected one *relative to the reference*, 0 before training by
construction.
"""

from __future__ import annotations

from typing import Any


def answer_logps(model, sequences: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """The summed log-probability of each (prompt ids, answer ids)'s answer given its prompt, in one padded batch."""
    import torch

    length = max(len(p) + len(a) for p, a in sequences)
    device = next(model.parameters()).device
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, answer) in enumerate(sequences):
        ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        mask[row, : len(prompt) + len(answer)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
    scores = []
    for row, (prompt, answer) in enumerate(sequences):
        start = len(prompt)
        predicted = logits[row, start - 1: start - 1 + len(answer)].log_softmax(-1)
        scores.append(float(predicted.gather(-1, torch.tensor(answer, device=device)[:, None]).sum()))
    return scores


def preference_accuracy(model, rows, pad_id: int, batch_size: int = 4) -> dict[str, Any]:
    """{"accuracy": share of pairs whose chosen answer scores higher, "pairs": how many} over tokenized preference
    rows (`prompt_ids`, `chosen_ids`, `rejected_ids`; finetune.data.preference). A tie counts as a miss."""
    was_training = model.training
    model.eval()
    wins = total = 0
    try:
        for first in range(0, len(rows), batch_size):
            batch = rows[first: first + batch_size]
            batch = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)] \
                if isinstance(batch, dict) else list(batch)
            sequences = [(row["prompt_ids"], row[column]) for row in batch for column in ("chosen_ids",
                                                                                           "rejected_ids")]
            scores = answer_logps(model, sequences, pad_id)
            wins += sum(1 for chosen, rejected in zip(scores[::2], scores[1::2], strict=True) if chosen > rejected)
            total += len(batch)
    finally:
        model.train(was_training)
    return {"accuracy": wins / total if total else 0.0, "pairs": total}


def has_pairs(split) -> bool:
    """Whether a tokenized split holds preference pairs (what preference_accuracy scores)."""
    return split is not None and "chosen_ids" in split.column_names
