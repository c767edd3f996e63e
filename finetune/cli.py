"""The `finetune` command: one entry for every job of the toolkit.

    finetune train recipes/tiny.yaml --max_steps 100        # the same as finetune/run.py (single process)
    finetune launch recipes/tiny.yaml                       # through accelerate, as launch/train.sh does
    finetune chat outputs/tiny                              # talk to it; --prompt "..." for one answer
    finetune bench outputs/tiny
    finetune eval outputs/tiny --tasks tiny_tasks
    finetune compare outputs/matrix/* --out outputs/comparison
    finetune merge outputs/tiny
    finetune export outputs/smollm2-lora --gguf contacts.gguf    # GGUF for llama.cpp / Ollama; --type q8_0
    finetune sweep recipes/sweeps/tiny_lr_rank.yaml             # W&B sweep file; --local: here, offline

Multi-process training goes through accelerate: `accelerate launch -m finetune.run RECIPE ...` (or the script
path, `accelerate launch finetune/run.py RECIPE ...`).
"""

from __future__ import annotations

import errno
import importlib
import signal
import sys

from finetune.errors import DISK_FULL, USAGE, says_disk_full

COMMANDS = {  # command: (module with main(argv), one line)
    "train": ("finetune.run", "train from a YAML recipe, in this process"),
    "launch": ("finetune.commands.launch",
               "train through accelerate (ACCELERATE_CONFIG): exact exit codes, signals passed on"),
    "chat": ("finetune.commands.chat", "talk to a trained model (interactive, or --prompt for one answer)"),
    "bench": ("finetune.commands.bench", "inference benchmark of a finished run"),
    "eval": ("finetune.commands.evaluate", "lm-evaluation-harness tasks on a finished run (eval.json, W&B)"),
    "compare": ("finetune.commands.compare", "comparison table and Pareto plot of several runs"),
    "download": ("finetune.model.hub",
                 "fetch a recipe's hub model and dataset into the HF cache, for offline training"),
    "sync": ("finetune.commands.sync", "upload offline W&B runs (checks the login and the network first)"),
    "merge": ("finetune.commands.merge", "merge an adapter into a standalone model"),
    "export": ("finetune.commands.export", "a finished run as one GGUF file, for llama.cpp, Ollama and LM Studio"),
    "sweep": ("finetune.commands.sweep",
              "hyperparameter sweep from a W&B sweep file: on W&B's servers, or here (--local) with W&B's engine"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:8} {summary}" for name, (_, summary) in COMMANDS.items()]
        usage = "usage: finetune COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0
    module, _ = COMMANDS[argv[0]]
    try:
        return importlib.import_module(module).main(argv[1:])
    except KeyboardInterrupt:
        print(f"error: finetune {argv[0]} stopped by Ctrl-C", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as error:  # what a command writes: the disk full, or its directory read-only
        full = says_disk_full(error)
        if not full and not (isinstance(error, OSError) and error.errno in (errno.EROFS, errno.EACCES)):
            raise
        what = "No space left on device" if full else f"{error.strerror} ({error.filename})"
        print(f"error: finetune {argv[0]}: {what}; {'free some space' if full else 'give a writable place'} and run "
              "it again", file=sys.stderr)
        return DISK_FULL if full else USAGE


if __name__ == "__main__":
    sys.exit(main())
