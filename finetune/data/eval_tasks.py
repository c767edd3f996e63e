"""lm-evaluation-harness tasks from chat examples: a local JSONL and a YAML task the harness reads offline, scored as
`finetune bench` scores (greedy generation up to MAX_NEW_TOKENS, cut at EOS, exact match). The embedded recipes'
held-out tasks are written with it (finetune.embedded, finetune.commands.evaluate), and so can a user's own.
"""

from __future__ import annotations

from pathlib import Path

MAX_NEW_TOKENS = 32  # generated tokens per prompt, at most (finetune bench and the tasks written here)


def write_task(directory: Path, name: str, rows: list[dict[str, str]], max_new_tokens: int | None = None) -> Path:
    """Write a harness task `name` to `directory`: NAME.jsonl (`prompt`, `answer` per row) and NAME.yaml, a
    generate-until task scored by exact match. Returns the directory, for --include_path.

    The scoring is `finetune bench`'s: greedy, up to MAX_NEW_TOKENS, cut at EOS, special tokens dropped, and the
    answer compared with surrounding whitespace ignored (bench strips both sides). `max_new_tokens` raises the
    generation limit for longer answers.
    """
    import os

    import yaml

    from finetune.embedded.tiny import write_jsonl

    data = write_jsonl(rows, directory / f"{name}.jsonl").resolve()
    task = {
        "task": name,
        "dataset_path": "json",  # datasets' JSON builder: the file is read locally, no hub
        "dataset_kwargs": {"data_files": {"test": str(data)}},  # absolute: datasets resolves paths from the cwd
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        # The harness adds the tokenizer's EOS to `until` itself; no other stop string, as in bench.
        "generation_kwargs": {"until": [], "max_gen_toks": max_new_tokens or MAX_NEW_TOKENS, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "regexes_to_ignore": [r"^\s+", r"\s+$"]}],
        "metadata": {"version": 1.0},
    }
    header = (f"# A generate-until task on a local JSONL (finetune.data.eval_tasks.write_task); offline with:\n"
              f"#   finetune eval RUN --tasks {name} --include_path {directory.resolve()}\n")
    partial = directory / f".{name}.yaml.{os.getpid()}.tmp"
    partial.write_text(header + yaml.safe_dump(task, sort_keys=False))
    os.replace(partial, directory / f"{name}.yaml")
    return directory


def chat_rows(dataset) -> list[dict[str, str]]:
    """(prompt, answer) rows from single-turn chat examples: the user's message and the assistant's reply."""
    rows = []
    for example in dataset:
        turns = {message["role"]: message["content"] for message in example["messages"]}
        rows.append({"prompt": turns["user"], "answer": turns["assistant"]})
    return rows
