"""The run directory (`output_dir`): every file a run writes there, written atomically, and read back.

    output_dir/
      adapter_model.safetensors, adapter_config.json   LoRA runs (model*.safetensors + config.json: full runs)
      tokenizer files, chat_template.jinja              the tokenizer, as the Trainer saves it
      recipe.yaml      every key with its effective value (finetune.recipe.load.recipe_yaml)
      summary.json     the run summary, written last: its presence means the run finished
      wandb_run.json   the W&B run id, so that a resumed run continues it
      bench.json       the inference benchmark (finetune.commands.bench)
      eval.json        lm-evaluation-harness results (finetune.commands.evaluate)
      eval_split/      the tokenized eval split (datasets' save_to_disk): a finished run's benchmark needs no data
      checkpoint-N/    Trainer checkpoints

Everything else asks this module for those names. A write goes to a temporary file in the same directory and is
renamed into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from finetune.errors import UsageError

logger = logging.getLogger(__name__)

RECIPE = "recipe.yaml"
SUMMARY = "summary.json"
WANDB_RUN = "wandb_run.json"
BENCH = "bench.json"
EVAL = "eval.json"
EVAL_SPLIT = "eval_split"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# A checkpoint's model weights (adapter, full model, or a sharded full model) and its optimizer state.
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
OPTIMIZER_STATE = ("optimizer.pt", "optimizer.bin")
# Files of a checkpoint that are training state, not model: never uploaded as a model.
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state", "training_args.bin")


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (a temporary file in the same directory, renamed into place)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk, a read-only directory, Ctrl-C: no half file left behind
        raise


def save_eval_split(output_dir: Path, split) -> None:
    """Keep the run's tokenized eval split (a datasets.Dataset; None: the run has none, kept as an empty directory)
    beside its model, written to a temporary directory and renamed into place."""
    target = output_dir / EVAL_SPLIT
    if split is None:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        return
    staging = output_dir / f".{EVAL_SPLIT}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    split.save_to_disk(str(staging))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def saved_eval_split(output_dir: Path):
    """The eval split a run saved (`save_eval_split`), or None: the run has none (an empty EVAL_SPLIT), or is of an
    earlier version (no EVAL_SPLIT)."""
    if not (output_dir / EVAL_SPLIT / "state.json").is_file():
        return None
    from datasets import load_from_disk

    return load_from_disk(str(output_dir / EVAL_SPLIT))


def unwritable(directory: Path) -> Path | None:
    """What keeps anything from being written into `directory` (or it from being created): itself or its nearest
    existing parent, when a file can't be made there (permissions, a read-only or special file system such as
    /proc, where root's permission checks pass and writes still fail: so a file is made and removed); None when
    it can be."""
    import tempfile

    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return None  # a file in the way: the callers say so themselves
    if not os.access(existing, os.W_OK | os.X_OK):
        return existing
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".finetune-probe-")
    except OSError:
        return existing
    os.close(handle)
    os.unlink(probe)
    return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_finished(output_dir: Path) -> bool:
    return (output_dir / SUMMARY).is_file()


def saved_weights(output_dir: Path, use_lora: bool) -> list[Path]:
    """The weight files a finished run saved: its adapter, or every shard of its full model."""
    return sorted(output_dir.glob("adapter_model*.safetensors" if use_lora else "model*.safetensors"))


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory (safetensors, or legacy .bin), for sizes on disk."""
    return sorted(directory.glob("*.safetensors")) + sorted(p for p in directory.glob("*.bin")
                                                            if p.name != "training_args.bin")


def model_files(directory: Path) -> list[Path]:
    """The files of a saved adapter/model/checkpoint worth uploading: weights, configs, tokenizer, recipe."""
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(TRAINING_STATE_FILES) and not p.name.startswith("."))


# Checkpoints -------------------------------------------------------------------------------------------------

def checkpoint_dir(output_dir: Path, step: int) -> Path:
    """Where the Trainer writes the checkpoint of a step."""
    return output_dir / f"checkpoint-{step}"


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N directory, newest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return sorted(found, reverse=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint can't be resumed from (missing or unreadable parts), or None when it is complete.

    The Trainer writes trainer_state.json last, so a save that was cut short has none.
    """
    state = read_json(path / "trainer_state.json")
    if not (path / "trainer_state.json").is_file():
        return "no trainer_state.json (the save was cut short)"
    if state is None:
        return "trainer_state.json is not valid JSON"
    match = CHECKPOINT.match(path.name)
    if match and state.get("global_step") != int(match.group(1)):
        return f"trainer_state.json says step {state.get('global_step')}, the directory says {match.group(1)}"
    weights = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    sharded = any(p.is_dir() and p.name.startswith(("pytorch_model_fsdp", "global_step")) for p in path.iterdir())
    if not weights and not sharded:
        return "no model or adapter weights"
    for weight in weights:
        if weight.suffix == ".safetensors":
            problem = _safetensors_problem(weight)
            if problem:
                return problem
    if not sharded and not any((path / name).is_file() for name in OPTIMIZER_STATE):
        return "no optimizer state"
    return manifest_problem(path)


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
            if keys:
                handle.get_tensor(keys[-1])  # the last tensor ends the file: a truncated file fails here
    except Exception as error:  # safetensors raises its own error types for every kind of damage
        return f"{path.name} is unreadable ({str(error).splitlines()[0][:80]})"
    return None


def set_aside_previous_run(output_dir: Path) -> None:
    """For overwrite_output_dir: move what a previous run left (checkpoints, recipe, summary, run id, benchmark,
    evaluation, history) into PREVIOUS, where it stays until the new run has a checkpoint or has finished
    (`drop_previous_run`); a new run that fails before that puts it back (`restore_previous_run`)."""
    aside = output_dir / PREVIOUS
    if aside.exists():
        shutil.rmtree(aside)  # an older set-aside run whose replacement got that far
    names = [path.name for _, path in checkpoints(output_dir)] + [
        name for name in (RECIPE, SUMMARY, WANDB_RUN, BENCH, EVAL, MARKER) if (output_dir / name).exists()]
    if not names:
        return
    aside.mkdir()
    for name in names:
        os.replace(output_dir / name, aside / name)


def restore_previous_run(output_dir: Path) -> bool:
    """Put back a run set aside by `set_aside_previous_run` (the run replacing it wrote nothing that counts).
    True when there was one."""
    aside = output_dir / PREVIOUS
    if not aside.is_dir():
        return False
    for path in aside.iterdir():
        target = output_dir / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    aside.rmdir()
    return True


def drop_previous_run(output_dir: Path) -> None:
    """The run that replaced a set-aside one has a checkpoint or has finished: the old one goes."""
    shutil.rmtree(output_dir / PREVIOUS, ignore_errors=True)


def recover_interrupted_overwrite(output_dir: Path) -> None:
    """A run set aside by an --overwrite_output_dir replacement that was killed (PREVIOUS left behind): dropped when
    the replacement got as far as a checkpoint or its end, else put back, and said. Call it holding the directory
    (or with nobody holding it)."""
    if not (output_dir / PREVIOUS).is_dir():
        return
    if checkpoints(output_dir) or is_finished(output_dir):
        drop_previous_run(output_dir)
    elif restore_previous_run(output_dir):
        logger.warning("%s: put back the run that an interrupted --overwrite_output_dir was replacing", output_dir)


def foreign_problem(directory: Path, option: str, overwrite: bool) -> str | None:
    """Why a run can't write into `directory` given its files no finetune run wrote, or None. Without
    `overwrite`, any such file refuses; with it, a run writes beside them, never over one (README.md, config.json,
    tokenizer files, ...: the names in WRITTEN_BY_RUN)."""
    foreign = foreign_files(directory)
    if not foreign:
        return None
    if not overwrite:
        return (f"{option}: {directory} holds files no finetune run wrote ({shown(foreign)}); choose another "
                f"{option}, or pass --overwrite_output_dir true to write beside them")
    clashing = [name for name in foreign if any(fnmatch.fnmatch(name, pattern) for pattern in WRITTEN_BY_RUN)]
    if clashing:
        them = "it" if len(clashing) == 1 else "them"
        return (f"{option}: {directory} holds {shown(clashing)}, which no finetune run wrote and a run would "
                f"overwrite (it saves its model, tokenizer and model card there); move {them} away, or choose "
                f"another {option}")
    return None


def destination_problem(out: Path, writer: str, ours, writable: Path | None = None) -> str | None:
    """Why a follow-up command (`writer`: "merge", "comparison", "evaluation") must not write into `out` (its
    --out), or None: new, empty, or holding only what it writes itself (`ours`, names it may replace). Never a
    file, a place it can't write (`writable`, default `out`), or a directory holding other files."""
    if out.exists() and not out.is_dir():
        return f"--out: {out} is a file; give a directory"
    blocked = unwritable(writable or out)
    if blocked:
        return f"--out: {blocked} is not writable; give a directory you can write to"
    others = sorted({path.name for path in out.iterdir()} - set(ours)) if out.is_dir() else []
    if others:
        return (f"--out: {out} holds files no {writer} wrote ({shown(others)}); give a new or empty directory, or "
                f"an earlier {writer}'s")
    return None


def shown(names: list[str], limit: int = 4) -> str:
    """`names` for a message: the first few, then "..."."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


# A finished run, read back ------------------------------------------------------------------------------------

def trained_recipe(output_dir: Path):
    """The recipe of a finished training run in `output_dir`; its data need not be there any more. Raises
    UsageError when it is not one."""
    from finetune import logs
    from finetune.recipe.load import load_recipe

    holder = lock_holder(output_dir)
    if holder:
        raise UsageError(f"{output_dir} is in use by a running training ({holder}); wait for it to finish")
    recover_interrupted_overwrite(output_dir)  # as the next training command would
    if not (output_dir / RECIPE).is_file():
        raise UsageError(f"{output_dir}: no {RECIPE}; give the output_dir of a finished training run")
    if not logs.verbose():
        logs.quiet_third_party()  # before the recipe loads transformers: some of its libraries' noise is at import
    recipe = load_recipe([str(output_dir / RECIPE)], data_needed=False)
    if recipe.model.use_lora and not (output_dir / ADAPTER_WEIGHTS).is_file():
        raise UsageError(f"{output_dir}: no {ADAPTER_WEIGHTS}; has the training finished?")
    return recipe


def load_for_inference(output_dir, dtype: str | None = None):
    """(recipe, tokenizer, model) of a finished run, for inference: the base loaded as trained (same quantization)
    plus the adapter, or the full model; `dtype` (a recipe dtype name; default inference_dtype's) for the weights
    that aren't quantized and the compute. Raises UsageError when `output_dir` is not a finished run."""
    import dataclasses

    from peft import PeftModel

    from finetune.model.load import inference_dtype, load_model, load_tokenizer

    recipe = trained_recipe(output_dir)
    recipe.model = dataclasses.replace(recipe.model, dtype=dtype or inference_dtype(recipe.model.dtype))
    tokenizer = load_tokenizer(recipe.model)
    if not recipe.model.use_lora:
        full = dataclasses.replace(recipe.model, model_name_or_path=str(output_dir))
        return recipe, tokenizer, load_model(full, for_training=False)
    base = load_model(recipe.model, for_training=False)
    return recipe, tokenizer, PeftModel.from_pretrained(base, str(output_dir)).eval()


def results(output_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(recipe keys, summary, benchmark, evaluation) of a run directory, each {} when missing. For comparisons."""
    import yaml

    recipe_file = output_dir / RECIPE
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else {}
    return (recipe or {}, read_json(output_dir / SUMMARY) or {}, read_json(output_dir / BENCH) or {},
            read_json(output_dir / EVAL) or {})


def prepare(output_dir: Path, recipe_text: str, segment: dict[str, Any]) -> None:
    """Make the directory ready for a run (main process only): the segment is recorded and the recipe written,
    its header listing every segment of the run and what changed at each."""
    output_dir.mkdir(parents=True, exist_ok=True)
    mark(output_dir, segment)
    history = []
    for number, past in enumerate(segments(output_dir), 1):
        changes = ", ".join(f"{key} {before!r} -> {after!r}" for key, (before, after) in past["changed"].items())
        history.append(f"# segment {number}: started {past['started']} at step {past['from_step']}"
                       + (f"; changed: {changes}" if changes else ""))
    write_text(output_dir / RECIPE, recipe_text + "".join(f"{line}\n" for line in history))


# Resuming: what a resumed run may change -------------------------------------------------------------------------

# Settings a resumed run cannot change: what is trained (model, adapter shape, quantization, data and its order)
# and how (the optimizer and learning-rate schedule restored from the checkpoint). Every other key may change
# on resume (steps, saving, evaluation, logging, tracking), and the change applies from the resume step.
FIXED_ON_RESUME = (
    "model_name_or_path", "dtype", "trust_remote_code", "quantization", "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant", "use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "dataset", "dataset_format", "dataset_config", "dataset_split", "eval_split", "eval_fraction", "eval_size",
    "max_train_samples", "max_length", "train_on_prompt", "seed", "data_seed", "per_device_train_batch_size",
    "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    "weight_decay", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "bf16",
    "fp16", "objective", "init_from", "beta", "loss_type", "sft_weight", "max_prompt_length",
    "precompute_ref_log_probs", "desirable_weight", "undesirable_weight",
)
NOT_COMPARED = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "auto_resume", "run_name")




def changed_settings(now: dict[str, Any], run_dir: Path) -> dict[str, tuple]:
    """{key: (before, now)} for every key of `now` (recipe keys and values) that differs from the recipe the run in
    `run_dir` last ran with. Raises UsageError naming each one that a resumed run cannot change, and a local dataset
    whose content changed since (its digest, recorded with each segment)."""
    import yaml

    from finetune.recipe.keys import absolute_paths

    saved_file = run_dir / RECIPE
    if not saved_file.is_file():
        return {}
    saved = absolute_paths(yaml.safe_load(saved_file.read_text()) or {})  # relative in runs of earlier versions
    now = absolute_paths(now)
    changed = {key: (saved.get(key), value) for key, value in now.items()
               if key not in NOT_COMPARED and key in saved and saved[key] != value}
    fixed = [f"{key} ({before!r} -> {after!r})" for key, (before, after) in changed.items()
             if key in FIXED_ON_RESUME]
    trained_on = (segments(run_dir) or [{}])[-1].get("dataset_sha256")
    dataset = now.get("dataset", saved.get("dataset"))
    if trained_on and "dataset" not in changed and dataset and content_digest(Path(dataset)) != trained_on:
        fixed.append(f"dataset (the content of {dataset} changed since the run last trained on it)")
    if fixed:
        raise UsageError(f"output_dir: resuming the run in {run_dir}, whose model, data, optimizer and schedule "
                         f"a resumed run continues; these settings differ from it: {', '.join(fixed)}. Rerun with "
                         "the run's values, or start over with --overwrite_output_dir true (or another output_dir)")
    return changed


def rerun_hint(overwrite: bool) -> str:
    """How to go on from the last checkpoint: the same command, unless that command starts over."""
    if overwrite:
        return ("run the command again without --overwrite_output_dir to resume (with it, the run starts over and "
                "the checkpoint is lost)")
    return "run the same command again to resume"


def refuse_occupied(output_dir: Path, overwrite: bool, auto_resume: bool) -> None:
    """Raise UsageError when a run may not write into `output_dir` as asked: files no run wrote (`foreign_problem`),
    a finished run (without `overwrite`), checkpoints with auto_resume off."""
    foreign = foreign_problem(output_dir, "output_dir", overwrite=overwrite)
    if foreign:
        raise UsageError(foreign)
    if overwrite:
        return
    if is_finished(output_dir):
        raise UsageError(f"output_dir: {output_dir} already holds a finished run ({SUMMARY}); choose another "
                         "output_dir, or pass --overwrite_output_dir true to replace it")
    found = checkpoints(output_dir)
    if found and not auto_resume:
        raise UsageError(f"output_dir: {output_dir} has checkpoints ({found[0][1].name} newest) and auto_resume is "
                         "off; pass --overwrite_output_dir true to start over, or drop --auto_resume false to "
                         "continue")


def refuse_explicit_resume(output_dir: Path, overwrite: bool) -> None:
    """resume_from_checkpoint continues a run into output_dir: refused with overwrite_output_dir (which starts over)
    and into a finished run (which it would replace)."""
    if overwrite:
        raise UsageError("resume_from_checkpoint and overwrite_output_dir: one continues a run, the other starts "
                         "over; give one of them")
    if is_finished(output_dir):
        raise UsageError(f"output_dir: {output_dir} already holds a finished run ({SUMMARY}), which resuming into it "
                         "would replace; give another output_dir, or --overwrite_output_dir true without "
                         "resume_from_checkpoint to start over")


def check_output_dir(values: dict[str, Any]) -> None:
    """Before anything heavy loads, from the recipe's own keys (`recipe.read_checked`): raise UsageError when its
    output_dir is in use by a running training, may not be written as asked (`refuse_occupied`), or holds a run to
    resume whose fixed settings these keys change. The run checks all of this again once it holds the directory
    (finetune.training.resilience.plan_resume), with every key's effective value."""
    output_dir = Path(values["output_dir"]).expanduser()
    holder = lock_holder(output_dir)
    if holder:
        raise UsageError(in_use(output_dir, holder))
    if values.get("resume_from_checkpoint"):
        refuse_explicit_resume(output_dir, bool(values.get("overwrite_output_dir")))
        return
    refuse_occupied(output_dir, bool(values.get("overwrite_output_dir")), values.get("auto_resume", True))
    if not values.get("overwrite_output_dir") and any((path / "trainer_state.json").is_file()
                                                      for _, path in checkpoints(output_dir)):
        changed_settings(values, output_dir)


def trained_adapter(run: str | Path | None) -> Path | None:
    """The LoRA adapter a run saved (its output_dir), or None: no run, or one that trained every weight."""
    if not run:
        return None
    directory = Path(run).expanduser()
    return directory if (directory / "adapter_config.json").is_file() else None


def check_init_from(values: dict[str, Any]) -> None:
    """Raise UsageError when the run a recipe starts from (`init_from`) is running or unfinished, or lacks the
    weights it saved."""
    if not values.get("init_from"):
        return
    run = Path(values["init_from"]).expanduser()
    holder = lock_holder(run)
    if holder:
        raise UsageError(f"init_from: {run} is in use by a running training ({holder}); wait for it to finish")
    if not is_finished(run):
        raise UsageError(f"init_from: {run} has not finished training (no {SUMMARY}); finish it first (its own "
                         "command again resumes it), or start from a finished run")
    if not saved_weights(run, use_lora=trained_adapter(run) is not None):
        raise UsageError(f"init_from: {run} holds no saved weights ({ADAPTER_WEIGHTS} or model.safetensors); give "
                         "a finished run's output_dir")


# Ownership and the lock ----------------------------------------------------------------------------------------

MARKER = ".finetune-run"  # JSON: this directory belongs to a finetune run (and the history of its segments)
MERGED_MARKER = ".finetune-merged"  # this directory holds a model `finetune merge` wrote, which a merge may replace
LOCK = ".finetune-lock"  # holds an exclusive lock for the life of a run; says who holds it
PREVIOUS = ".finetune-previous"  # the run an overwrite replaces, kept until the new one has a checkpoint
# What a run writes in output_dir besides the files above: its model (adapter or full) and tokenizer as
# transformers and peft save them, PEFT's model card, the Trainer's arguments. A file of one of these names
# that no finetune run wrote is never overwritten.
WRITTEN_BY_RUN = (RECIPE, SUMMARY, WANDB_RUN, BENCH, EVAL, "README.md", "config.json", "generation_config.json",
                  "adapter_*", "model*.safetensors*", "pytorch_model*", "tokenizer*", "special_tokens_map.json",
                  "added_tokens.json", "chat_template.jinja", "vocab.*", "merges.txt", "training_args.bin",
                  "checkpoint-*", "merged", EVAL_SPLIT)


def foreign_files(output_dir: Path) -> list[str]:
    """The entries of an existing, non-empty directory that no finetune run wrote: [] for an empty or missing
    directory and for one of ours (the marker, or a recipe.yaml a run resolved, from before the marker)."""
    if not output_dir.is_dir():
        return []
    entries = sorted(p.name for p in output_dir.iterdir() if p.name not in (LOCK, PREVIOUS))
    if not entries or MARKER in entries:
        return []
    recipe = output_dir / RECIPE
    if recipe.is_file() and recipe.read_text(errors="replace").startswith("# Resolved from"):
        return []
    return entries


def in_use(output_dir: Path, holder: str) -> str:
    return f"output_dir: {output_dir} is in use by a running training ({holder}); wait for it to end, or choose " \
           "another output_dir"


def lock_holder(output_dir: Path) -> str | None:
    """Who holds the lock of `output_dir` (pid, host, start time), or None when nobody does. Takes no lock."""
    import fcntl

    try:
        handle = open(output_dir / LOCK)  # noqa: SIM115 - closed below, the lock with it
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return handle.read().strip() or "another process"
    return None


class Claim:
    """A run's hold on its directory: an exclusive lock (fcntl) on LOCK for the life of the run, released on
    every exit path, including a crash (the kernel drops the lock with the process). Stale locks of dead
    processes don't block: their lock is gone with them."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.created = not output_dir.exists()
        self.handle = None

    def acquire(self) -> None:
        """Raises UsageError naming the holder (pid, host, start time) when another live run holds the lock."""
        import fcntl
        import socket
        import time

        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise UsageError(f"output_dir: {self.output_dir} is a file; give a directory")
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.output_dir / LOCK, "a+")  # noqa: SIM115 - held open for the life of the run
        except OSError as error:
            raise UsageError(f"output_dir: can't write to {self.output_dir} ({error.strerror}); choose a writable "
                             "directory") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UsageError(in_use(self.output_dir, holder)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self.handle = handle

    def release(self, clean: bool = False) -> None:
        """Let go of the lock. With `clean` (the run wrote nothing that matters), the lock file goes too, and the
        directory if this run created it and it is empty."""
        if self.handle is None:
            return
        import fcntl

        if clean:
            (self.output_dir / LOCK).unlink(missing_ok=True)
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None
        if clean and self.created and self.output_dir.is_dir() and not any(self.output_dir.iterdir()):
            self.output_dir.rmdir()


def mark(output_dir: Path, segment: dict[str, Any]) -> None:
    """Record that a run (segment) started here: the ownership marker, with the history of segments."""
    from finetune import __version__

    marker = read_json(output_dir / MARKER) or {"finetune_version": __version__, "segments": []}
    marker["segments"].append(segment)
    write_json(output_dir / MARKER, marker)


def segments(output_dir: Path) -> list[dict[str, Any]]:
    return (read_json(output_dir / MARKER) or {}).get("segments", [])


# Checkpoint manifests -------------------------------------------------------------------------------------------

MANIFEST = "finetune-manifest.json"  # in a checkpoint, written last: every file's size (and checksum)
CHECKSUM_LIMIT = 256 * 2**20  # bytes: larger files are checked by size (hashing them would slow every save)


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_digest(path: Path) -> str | None:
    """sha256 of a local file, or of a directory's files (names and contents, in order); None when `path` is not
    local (a hub name). Recorded with each segment of a run, so that a resume notices data replaced in place."""
    import hashlib

    path = path.expanduser()
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    # One read per version of the data in a process: a resume asks before torch loads, again holding the
    # directory, and for the segment it records.
    stamp = tuple((str(file), file.stat().st_size, file.stat().st_mtime_ns) for file in files)
    if stamp not in _digests:
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{file.relative_to(path) if file != path else ''}\0{_sha256(file)}\0".encode())
        _digests[stamp] = digest.hexdigest()
    return _digests[stamp]


_digests: dict[tuple, str] = {}  # content_digest's, by the files' paths, sizes and modification times


def seal_checkpoint(checkpoint: Path) -> None:
    """Make a checkpoint durable and verifiable: every file fsync'd, then a manifest of sizes (and sha256 for
    files up to CHECKSUM_LIMIT) written atomically and fsync'd with its directory. Main process, after every
    rank has written its part."""
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST):
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        size = path.stat().st_size
        files[str(path.relative_to(checkpoint))] = {"size": size,
                                                    **({"sha256": _sha256(path)} if size <= CHECKSUM_LIMIT else {})}
    tmp = checkpoint / f".{MANIFEST}.tmp"
    with tmp.open("w") as handle:
        handle.write(json.dumps({"files": files}, indent=1))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, checkpoint / MANIFEST)
    directory = os.open(checkpoint, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def manifest_problem(checkpoint: Path) -> str | None:
    """Why a sealed checkpoint's files don't match its manifest, or None. Unsealed checkpoints: a trial load of
    the training state (a file cut short does not load)."""
    manifest = read_json(checkpoint / MANIFEST)
    if manifest is None:
        return _trial_load_problem(checkpoint)
    for name, expected in manifest.get("files", {}).items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} is {path.stat().st_size} bytes, {expected['size']} were written"
        if "sha256" in expected and _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _trial_load_problem(checkpoint: Path) -> str | None:
    import torch

    for path in sorted(checkpoint.glob("*.pt")) + sorted(checkpoint.glob("*.pth")):
        try:
            torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as error:  # torch raises several types for a damaged file
            return f"{path.name} does not load ({str(error).splitlines()[0][:80]})"
    return None
