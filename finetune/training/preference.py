"""Held-out preference accuracy: the share of preference pairs whose chosen answer a model gives a higher
log-probability than the rejected one, given the prompt.

It needs no reference model, so it compares any two models on the same pairs: the model a DPO run starts from
(`eval/preference_accuracy_start`) and the one it ends with (`eval/preference_accuracy`), an SFT run, the base
(`finetune eval RUN --preferences`). TRL's `rewards/accuracies` is another number: the share of pairs where the
policy moved the chosen answer up more than the rejected one *relative to the reference*, 0 before training by
construction.

Answers are scored through TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, which TRL's trainers put on
the model they train): only the answer positions are projected onto the vocabulary, never the full logits.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("finetune")

# TRL's metrics of each preference objective, per log step (the summary keeps the last of each, as `train/NAME` and
# `eval/NAME`), and the held-out preference accuracy of a DPO run (its start and its end).
METRICS = {
    "dpo": ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
            "logps/rejected"),
    "kto": ("rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"),
}
ACCURACY = ("eval/preference_accuracy", "eval/preference_accuracy_start")


def fuse_lm_head(model) -> None:
    """Put TRL's fused LM head on a model that doesn't have it yet (a model loaded for `finetune eval`); a PEFT model's
    goes on its base, as TRL's trainers do."""
    from trl.trainer.utils import add_fused_lm_head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.forward, "__func__", base.forward).__code__.co_name != "_fused_forward":
        add_fused_lm_head(base)


def answer_logps(model, sequences: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """The summed log-probability of each (prompt ids, answer ids)'s answer given its prompt, in one padded batch,
    through the fused head (fuse_lm_head)."""
    import torch

    length = max(len(p) + len(a) for p, a in sequences)
    device = next(model.parameters()).device
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (prompt, answer) in enumerate(sequences):
        end = len(prompt) + len(answer)
        ids[row, :end] = torch.tensor(prompt + answer)
        mask[row, :end] = 1
        labels[row, len(prompt):end] = torch.tensor(answer)
    with torch.no_grad():
        output = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device),
                       fused_lm_head=True)
    return output.log_probs.float().sum(dim=1).tolist()  # positions without a label count 0


def preference_wins(model, rows, pad_id: int, batch_size: int) -> tuple[int, int]:
    """(pairs whose chosen answer scores higher, pairs) over tokenized preference rows (`prompt_ids`, `chosen_ids`,
    `rejected_ids`; finetune.data.preference). A tie counts as a miss."""
    was_training = model.training
    model.eval()
    wins = total = 0
    try:
        for first in range(0, len(rows), batch_size):
            batch = rows[first: first + batch_size]
            if isinstance(batch, dict):  # a datasets.Dataset slice: columns of values
                batch = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
            sequences = [(row["prompt_ids"], row[column]) for row in batch
                         for column in ("chosen_ids", "rejected_ids")]
            scores = answer_logps(model, sequences, pad_id)
            wins += sum(1 for chosen, rejected in zip(scores[::2], scores[1::2], strict=True) if chosen > rejected)
            total += len(batch)
    finally:
        model.train(was_training)
    return wins, total


def preference_accuracy(model, rows, pad_id: int, batch_size: int = 8) -> dict[str, Any]:
    """{"accuracy": share of pairs whose chosen answer scores higher, "pairs": how many} in this process."""
    fuse_lm_head(model)
    wins, total = preference_wins(model, rows, pad_id, batch_size)
    return {"accuracy": wins / total if total else 0.0, "pairs": total}


def held_out_accuracy(trainer, rows, pad_id: int) -> dict[str, Any] | None:
    """Preference accuracy of the model a preference Trainer trains (its fused head in place), on every rank: each
    scores its share of the pairs and the counts are summed. None, with a warning, where a process ran out of
    memory (`finetune eval RUN --preferences` scores it later, with its own batch size)."""
    import torch

    from finetune.training.ranks import reduce_across_ranks

    rank, world = trainer.args.process_index, trainer.args.world_size
    mine = rows.select(range(rank, len(rows), world)) if world > 1 else rows
    try:
        wins, total = preference_wins(trainer.model, mine, pad_id, trainer.args.per_device_eval_batch_size)
        failed = 0
    except torch.OutOfMemoryError:
        wins = total = 0
        failed = 1
    wins, total, failed = reduce_across_ranks([wins, total, failed], "sum")
    if failed:
        logger.warning("held-out preference accuracy skipped: out of memory at per_device_eval_batch_size=%d; "
                       "`finetune eval %s --preferences --batch_size 1` scores it",
                       trainer.args.per_device_eval_batch_size, trainer.args.output_dir)
        return None
    return {"accuracy": wins / total if total else 0.0, "pairs": int(total)}


def sharded(trainer) -> bool:
    """Whether the model's weights are split across ranks (FSDP, DeepSpeed ZeRO-3), gathered at every forward by all
    ranks together: the held-out accuracy, ranks scoring pairs of their own, is not measured there."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return bool(getattr(trainer, "is_fsdp_enabled", False)) or is_deepspeed_zero3_enabled()


def has_pairs(split) -> bool:
    """Whether a tokenized split holds preference pairs (what preference_accuracy scores)."""
    return split is not None and "chosen_ids" in split.column_names
