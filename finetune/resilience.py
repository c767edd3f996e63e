"""Resilience: resume from the newest complete checkpoint, stop cleanly when preempted, never save a diverged state.

- `plan_resume()` runs before anything heavy loads. Running the same command again continues from the newest
  *valid* checkpoint in output_dir (a partial or corrupt one is skipped, and the log says why); a finished run
  (summary.json present) is never silently overwritten; `overwrite_output_dir: true` starts over.
- `PreemptionCallback`: SIGTERM or SIGUSR1 (what Slurm sends before a time limit or preemption) asks every rank to
  stop at the next step boundary; the ranks agree, a complete checkpoint is written, and the run exits with
  PREEMPTED_EXIT_CODE. The same command resumes it.
- `NonFiniteGuard`: a non-finite loss or gradient norm stops training (or, with `on_nonfinite_loss: skip`, drops
  that batch's gradient); a checkpoint is never written from non-finite weights, so the last good one survives.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback

from finetune.recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" -- the same command resumes
DIVERGED_EXIT_CODE = 3
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
OPTIMIZER_STATE = ("optimizer.pt", "optimizer.bin")


class TrainingDiverged(Exception):
    """Training stopped on a non-finite loss, gradient norm or weight."""


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
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        return "no trainer_state.json (the save was cut short)"
    try:
        state = json.loads(state_file.read_text())
    except ValueError:
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
    return None


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


def plan_resume(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from, or None to start fresh. Checks only; deletes and loads nothing.

    Raises RecipeError when output_dir holds a finished run (and overwrite_output_dir is off), when auto_resume
    is off but checkpoints exist, or when an explicit resume_from_checkpoint is missing or incomplete.
    """
    args = recipe.training
    output_dir = Path(args.output_dir)
    explicit = args.resume_from_checkpoint
    if explicit:
        path = Path(explicit)
        problem = checkpoint_problem(path) if path.is_dir() else "no such directory"
        if problem:
            raise RecipeError([f"resume_from_checkpoint: {explicit}: {problem}"])
        return path
    if recipe.run.overwrite_output_dir:
        return None
    if (output_dir / "summary.json").is_file():
        raise RecipeError([f"output_dir: {output_dir} already holds a finished run (summary.json); choose another "
                           "output_dir, or pass --overwrite_output_dir true to replace it"])
    found = checkpoints(output_dir)
    if found and not recipe.run.auto_resume:
        raise RecipeError([f"output_dir: {output_dir} has checkpoints ({found[0][1].name} newest) and auto_resume is "
                           "off; pass --overwrite_output_dir true to start over, or drop --auto_resume false to "
                           "continue"])
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping %s: %s", path, problem)
    return None


def clear_output_dir(output_dir: Path) -> None:
    """For overwrite_output_dir: remove what a previous run left (checkpoints, summary, run id) before starting."""
    for _, path in checkpoints(output_dir):
        shutil.rmtree(path)
    for name in ("summary.json", "wandb_run.json"):
        (output_dir / name).unlink(missing_ok=True)


def agree(flag: bool, group=None) -> bool:
    """True when any rank says True. Given a gloo group, a CPU collective: no step waits on the GPU."""
    from finetune.metrics import reduce_across_ranks

    return reduce_across_ranks([1.0 if flag else 0.0], "max", group)[0] > 0


class PreemptionCallback(TrainerCallback):
    """Turns SIGTERM/SIGUSR1 into a checkpoint at the next step boundary and a clean stop, on every rank."""

    def __init__(self):
        self.received: str | None = None
        self.stopped_at: int | None = None
        self._group = None
        self._previous = {}

    def install(self) -> None:
        for signum in PREEMPT_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            logger.warning("%s received: saving a checkpoint at the end of this step, then stopping", self.received)

    def on_train_begin(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
                and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # collective: every rank creates it here

    def on_train_end(self, args, state, control, **kwargs):
        self._group = None  # the process groups are destroyed from Python when the run leaves them

    def on_step_end(self, args, state, control, **kwargs):
        # Every rank takes part, every step: one tiny CPU all-reduce, so that all stop at the same step.
        if agree(self.received is not None, self._group):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True


def leave_process_group(trainer=None, wait: bool = True) -> None:
    """End this rank's part in the process group; with `wait`, only once every rank has got here. A no-op in a
    single-process run, and once left.

    Called by every rank right after its last collective work (saving), before the main process alone writes
    the summary and finishes the W&B run, so that no rank exits while a peer still holds a live connection to it.
    The order avoids a deadlock in torch's gloo teardown: a process group destroyed by the last reference to it
    held in C++ (the DDP reducer) joins its worker threads while holding the GIL, and a worker that is releasing
    a finished collective's tensors needs the GIL. So the wrapped model (and the Accelerator's references to it)
    go first, and the process groups die last, from Python, which releases the GIL while it waits.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    if trainer is not None:
        trainer.model_wrapped = trainer.model
        trainer.accelerator.free_memory()  # drops its references to the DDP wrapper, then collects
    dist.destroy_process_group()


class NonFiniteGuard(TrainerCallback):
    """Stops on a non-finite logged loss or gradient norm; refuses to checkpoint non-finite weights."""

    def __init__(self, mode: str):
        self.mode = mode  # "stop" or "skip"
        self.problem: str | None = None
        self.skipped_batches = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.problem:
            return
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                self.stop(control, f"{key} is {value} at step {state.global_step}")
                return

    def stop(self, control, problem: str) -> None:
        self.problem = problem
        control.should_training_stop = True
        control.should_save = False

    def weights_are_finite(self, model) -> bool:
        """All trainable weights finite. A device sync: called before a checkpoint is written, not per step."""
        import torch

        return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)
