"""Resilience: resume from the newest complete checkpoint, stop cleanly when preempted, never save a diverged state.

- `plan_resume()` runs before anything heavy loads. Running the same command again continues from the newest
  *valid* checkpoint in output_dir (a partial or corrupt one is skipped, and the log says why); a finished run
  (summary.json present) is never silently overwritten; `overwrite_output_dir: true` starts over.
- `PreemptionCallback`: SIGTERM or SIGUSR1 (what Slurm sends before a time limit or preemption) asks every rank to
  stop at the next step boundary; the ranks agree, a complete checkpoint is written, and the run exits with
  errors.PREEMPTED. The same command resumes it.
- `NonFiniteGuard`: a non-finite loss or gradient norm stops training (or, with `on_nonfinite_loss: skip`, drops
  that batch's gradient); a checkpoint is never written from non-finite weights, so the last good one survives.
"""

from __future__ import annotations

import logging
import math
import signal
from pathlib import Path

from transformers import TrainerCallback

from finetune import rundir
from finetune.config import Recipe
from finetune.errors import UsageError
from finetune.ranks import agree

logger = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingDiverged(Exception):
    """Training stopped on a non-finite loss, gradient norm or weight."""


def plan_resume(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from, or None to start fresh. Checks only; deletes and loads nothing.

    Raises UsageError when output_dir holds a finished run (and overwrite_output_dir is off), when auto_resume
    is off but checkpoints exist, or when an explicit resume_from_checkpoint is missing or incomplete.
    """
    args = recipe.training
    output_dir = Path(args.output_dir)
    explicit = args.resume_from_checkpoint
    if explicit:
        path = Path(explicit)
        problem = rundir.checkpoint_problem(path) if path.is_dir() else "no such directory"
        if problem:
            raise UsageError(f"resume_from_checkpoint: {explicit}: {problem}")
        return path
    if recipe.run.overwrite_output_dir:
        return None
    if rundir.is_finished(output_dir):
        raise UsageError(f"output_dir: {output_dir} already holds a finished run ({rundir.SUMMARY}); choose another "
                         "output_dir, or pass --overwrite_output_dir true to replace it")
    found = rundir.checkpoints(output_dir)
    if found and not recipe.run.auto_resume:
        raise UsageError(f"output_dir: {output_dir} has checkpoints ({found[0][1].name} newest) and auto_resume is "
                         "off; pass --overwrite_output_dir true to start over, or drop --auto_resume false to "
                         "continue")
    for _, path in found:
        problem = rundir.checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping %s: %s", path, problem)
    return None


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


def end_early(trainer, run, output_dir: Path):
    """After training stopped before its end: every rank leaves the process group (they stopped at the same step),
    then the W&B run ends with the run's exit code. Raises TrainingDiverged for a non-finite loss; returns the
    trainer when preempted."""
    from finetune import errors, ranks

    ranks.leave_process_group(trainer)
    if trainer.guard.problem:
        if run is not None:
            run.finish(exit_code=errors.DIVERGED)
        good = next((p for _, p in rundir.checkpoints(output_dir) if not rundir.checkpoint_problem(p)), None)
        raise TrainingDiverged(f"training stopped: {trainer.guard.problem}. Last good checkpoint: {good or 'none'}. "
                               "Lower learning_rate, raise warmup_steps, or set on_nonfinite_loss: skip; then rerun "
                               "to resume")
    if trainer.is_world_process_zero():
        logger.warning("stopped by %s at step %d, checkpoint saved in %s; run the same command again to resume",
                       trainer.preemption.received, trainer.preemption.stopped_at, output_dir)
    if run is not None:
        run.mark_preempting()
        run.finish(exit_code=errors.PREEMPTED)
    return trainer
