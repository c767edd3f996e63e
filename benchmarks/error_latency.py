"""How long a user waits for the error line of a bad recipe: a typo in a key, a value out of range.

    make bench-errors                                      # this checkout
    python benchmarks/error_latency.py --before /path/to/an/older/checkout --rounds 5

Each case is a fresh process, as a user runs it (the interpreter's start-up and every import included), timed
from start to exit; it must fail (exit 2 here; an older checkout may get further first, and fail later). Rounds
are interleaved across checkouts, so a busy machine shows as spread, and min and median are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # name: (launcher, recipe arguments)
    "bad key, finetune/run.py": ("run.py", ["recipes/tiny.yaml", "--lora_rank", "8"]),
    "bad value, finetune/run.py": ("run.py", ["recipes/tiny.yaml", "--learning_rate", "-1"]),
    "bad key, launch/train.sh": ("train.sh", ["recipes/tiny.yaml", "--lora_rank", "8"]),
}


def command(checkout: Path, launcher: str, argv: list[str]) -> list[str]:
    if launcher == "train.sh":
        return [str(checkout / "launch/train.sh"), *argv]
    return [sys.executable, str(checkout / "finetune/run.py"), *argv]


def timed(checkout: Path, launcher: str, argv: list[str]) -> float:
    env = {**os.environ, "WANDB_DISABLED": "true", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    result = subprocess.run(command(checkout, launcher, argv), cwd=checkout, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode == 0:  # an older checkout may fail later, with a traceback: that is the wait measured
        sys.exit(f"{checkout}: {launcher} {' '.join(argv)} did not fail:\n{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="another checkout to measure in the same rounds")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    checkouts = {"this checkout": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    seconds = {(who, case): [] for who in checkouts for case in CASES}
    for _ in range(args.rounds):
        for case, (launcher, argv) in CASES.items():
            for who, checkout in checkouts.items():
                if launcher == "train.sh" and not (checkout / "launch/train.sh").is_file():
                    continue
                seconds[who, case].append(timed(checkout, launcher, argv))
    print(f"{'case':32}" + "".join(f"{who + ' min/median (s)':>32}" for who in checkouts))
    for case in CASES:
        cells = [seconds[who, case] for who in checkouts]
        print(f"{case:32}" + "".join(f"{min(c):>20.2f} / {statistics.median(c):<9.2f}" if c else f"{'-':>32}"
                                     for c in cells))


if __name__ == "__main__":
    main()
