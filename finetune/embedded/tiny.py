"""The embedded default: a tiny Llama-shaped model and a synthetic instruction task, built offline.

`make train` (recipes/tiny.yaml) trains on these so a fresh clone shows the whole pipeline on a CPU in minutes,
with no download. Everything here is deterministic: the same seed gives byte-identical weights and data.

    python -m finetune.embedded.tiny    # writes assets/tiny/{model,tasks.jsonl,preferences.jsonl,feedback.jsonl}

For preference tuning (recipes/tiny_dpo.yaml, recipes/tiny_kto.yaml), the same tasks with a right and a wrong
answer: `preferences.jsonl` holds conversational pairs (prompt/chosen/rejected), `feedback.jsonl` text rows with one
answer each, labelled desirable or not (prompt/completion/label). A wrong answer is another task's answer for the
same word, the mistake a model that confuses the instructions makes.

The model starts from random weights, so the eval loss on the answers begins above 5 and falls to about 2.6
as the adapters learn the six string tasks below (answers are made of random letters, so some of it stays).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# One token per printable ASCII character plus newline: no merges, so every offset is one character.
CHARACTERS = [chr(code) for code in range(32, 127)] + ["\n"]
# Newlines are written as expressions: transformers renders templates with trim_blocks, which eats a newline
# that follows a block tag.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

TASKS = [
    ("Reverse the word.", lambda w: w[::-1]),
    ("Write the word in capital letters.", str.upper),
    ("Sort the letters of the word alphabetically.", lambda w: "".join(sorted(w))),
    ("Repeat the word twice.", lambda w: f"{w} {w}"),
    ("What is the first letter of the word?", lambda w: w[0]),
    ("How many letters does the word have?", lambda w: str(len(w))),
]


def build_tokenizer():
    """A character-level fast tokenizer with BOS/EOS/PAD and a small chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model_config(architecture: str = "llama", hidden_size: int = 128, layers: int = 4, vocab_size: int = 128,
                       initializer_range: float = 0.1):
    """A small causal-LM config of the named architecture (llama or qwen2).

    The init is wider than the usual 0.02: with tied, frozen embeddings that small, the logits can't leave a
    narrow range and LoRA alone can't sharpen the output distribution.
    """
    from transformers import LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[architecture]
    return config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=initializer_range,
    )


def save_tiny_model(directory: Path, architecture: str = "llama", seed: int = 0, **config_overrides) -> Path:
    """Write a randomly initialised model and the character tokenizer to `directory`, loadable with from_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_model_config(architecture, **config_overrides))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


def make_task_examples(count: int = 3000, seed: int = 0) -> list[dict]:
    """Chat examples (`messages`: a user request, the assistant's answer) of six string tasks on made-up words."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    examples = []
    for _ in range(count):
        word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 7)))
        instruction, solve = rng.choice(TASKS)
        examples.append({"messages": [{"role": "user", "content": f"{instruction} {word}"},
                                      {"role": "assistant", "content": solve(word)}]})
    return examples


def wrong_answer(rng: random.Random, instruction: str, word: str) -> str:
    """Another task's answer for `word` that differs from the right one (a task confused with another)."""
    right = dict(TASKS)[instruction](word)
    wrong = [solve(word) for other, solve in TASKS if other != instruction and solve(word) != right]
    return rng.choice(wrong) if wrong else right[::-1] + right[:1]


def make_preference_examples(count: int = 1200, seed: int = 1) -> tuple[list[dict], list[dict]]:
    """(conversational pairs: prompt/chosen/rejected, text rows: prompt/completion/label) of the six tasks, each
    with a right answer and a wrong one (wrong_answer); the text rows alternate between right and wrong."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs, rows = [], []
    for number in range(count):
        word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 7)))
        instruction, solve = rng.choice(TASKS)
        right, wrong = solve(word), wrong_answer(rng, instruction, word)
        pairs.append({"prompt": [{"role": "user", "content": f"{instruction} {word}"}],
                      "chosen": [{"role": "assistant", "content": right}],
                      "rejected": [{"role": "assistant", "content": wrong}]})
        desirable = number % 2 == 0
        rows.append({"prompt": f"{instruction} {word}\nAnswer: ", "completion": right if desirable else wrong,
                     "label": desirable})
    return pairs, rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    with tmp.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def ensure_assets(directory: Path = ASSETS_DIR) -> Path:
    """Build the embedded model and data once; later calls find them and return at once."""
    model_dir, data_file = directory / "model", directory / "tasks.jsonl"
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        # Built in a side directory of this process's own and renamed, so an interrupted build never looks
        # finished and two processes building at once (parallel tests, two runs) each rename a whole model.
        import shutil

        staging = directory / f"model.partial-{os.getpid()}"
        save_tiny_model(staging)
        try:
            os.replace(staging, model_dir)  # refused where model_dir exists and is not empty
        except OSError:
            if (model_dir / "model.safetensors").is_file():  # another process finished first: the same model
                shutil.rmtree(staging)
            else:  # a damaged copy
                shutil.rmtree(model_dir)
                os.replace(staging, model_dir)
    if not data_file.is_file():
        write_jsonl(make_task_examples(), data_file)
    pairs_file, feedback_file = directory / "preferences.jsonl", directory / "feedback.jsonl"
    if not pairs_file.is_file() or not feedback_file.is_file():
        pairs, rows = make_preference_examples()
        write_jsonl(rows, feedback_file)
        write_jsonl(pairs, pairs_file)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="where to write model/ and tasks.jsonl")
    args = parser.parse_args()
    directory = ensure_assets(args.out)
    print(f"tiny model: {directory / 'model'}\ntask data:  {directory / 'tasks.jsonl'}\n"
          f"preference data: {directory / 'preferences.jsonl'} (pairs), {directory / 'feedback.jsonl'} (labelled)")


if __name__ == "__main__":
    main()


def used_by(recipe) -> bool:
    """Whether a recipe trains on the embedded model or data (which are built on first use)."""
    from finetune.recipe.keys import embedded_assets

    return "tiny" in embedded_assets(recipe.model.model_name_or_path, recipe.data.dataset)
