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

import contextlib
import logging
import math
import os
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback

from finetune import errors
from finetune.errors import UsageError
from finetune.recipe.keys import Recipe
from finetune.tracking import wandb_run as tracking
from finetune.training import rundir
from finetune.training.ranks import agree

logger = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class TrainingDiverged(Exception):
    """Training stopped on a non-finite loss, gradient norm or weight."""


class Interrupted(Exception):
    """A stop signal arrived before training began: there is nothing to save. `code` is 128 + the signal."""

    def __init__(self, signum: int):
        self.code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} before training began; nothing was saved")


class DiskFull(Exception):
    """The disk (or the quota) filled up while the run was writing."""


def disk_full(error: BaseException, directory: Path) -> bool:
    """Whether `error`, raised while writing into `directory`, is the disk or quota filling up. torch.save says
    only "unexpected pos ..." then, so a directory with almost nothing free counts too."""
    if errors.says_disk_full(error):
        return True
    try:
        return shutil.disk_usage(directory).free < 16 * 2**20
    except OSError:
        return False


@contextlib.contextmanager
def disk_full_said(output_dir: Path, what: str, partial: bool = False, overwrite: bool = False):
    """Turn a full disk while writing `what` into `output_dir` into DiskFull, saying how to go on. With `partial`,
    `what` is a directory left half written, removed first: the space it holds is needed."""
    try:
        yield
    except Exception as error:
        if not disk_full(error, output_dir):
            raise
        if partial:
            shutil.rmtree(output_dir / what, ignore_errors=True)
        last = next((p.name for _, p in rundir.checkpoints(output_dir) if not rundir.checkpoint_problem(p)), None)
        go_on = f"{rundir.rerun_hint(overwrite)} from {last}" if last else "run the same command again"
        raise DiskFull(f"no space left on device while writing {what} into {output_dir}"
                       f"{' (removed, unfinished)' if partial else ''}; free some space and {go_on}") from None


def stop_before_training() -> None:
    """Until training begins (PreemptionCallback takes over), a stop signal ends the run at once, cleanly."""
    def interrupt(signum, frame):
        raise Interrupted(signum)

    for signum in PREEMPT_SIGNALS:
        signal.signal(signum, interrupt)


def _finish_first(signum, frame) -> None:
    global _finishing_signals
    _finishing_signals += 1
    if signum == signal.SIGINT and _finishing_signals > 1:
        os._exit(130)
    logger.warning("%s received after training: finishing the final evaluation and save first",
                   signal.Signals(signum).name)


_finishing_signals = 0


def plan_resume(recipe: Recipe) -> tuple[Path | None, dict[str, tuple]]:
    """(the checkpoint to resume from or None, the settings that changed since the run's last segment).
    Checks only; deletes and loads nothing.

    Raises UsageError when output_dir holds a finished run (and overwrite_output_dir is off), when auto_resume
    is off but checkpoints exist, when an explicit resume_from_checkpoint is missing or incomplete, or when a
    setting a resumed run cannot change differs from the run being resumed (each one named).
    """
    args = recipe.training
    output_dir = Path(args.output_dir)
    explicit = args.resume_from_checkpoint
    if explicit:
        rundir.refuse_explicit_resume(output_dir, recipe.run.overwrite_output_dir)
        path = Path(explicit)
        problem = rundir.checkpoint_problem(path) if path.is_dir() else "no such directory"
        if problem:
            raise UsageError(f"resume_from_checkpoint: {explicit}: {problem}")
        return path, changed_settings(recipe, path.parent)
    rundir.refuse_occupied(output_dir, recipe.run.overwrite_output_dir, recipe.run.auto_resume)
    if recipe.run.overwrite_output_dir:
        return None, {}
    for _, path in rundir.checkpoints(output_dir):
        problem = rundir.checkpoint_problem(path)
        if problem is None:
            return path, changed_settings(recipe, output_dir)
        logger.warning("skipping %s: %s", path, problem)
    return None, {}


def changed_settings(recipe: Recipe, run_dir: Path) -> dict[str, tuple]:
    """rundir.changed_settings for the whole resolved recipe (every key, defaults included)."""
    return rundir.changed_settings(recipe.resolved(), run_dir)


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
        """Training is over: a signal now lets the final evaluation and save finish (a second Ctrl-C does not)."""
        for signum in PREEMPT_SIGNALS:
            signal.signal(signum, _finish_first)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            again = " (Ctrl-C again to stop at once, without saving)" if signum == signal.SIGINT else ""
            logger.warning("%s received: saving a checkpoint at the end of this step, then stopping%s",
                           self.received, again)
        elif signum == signal.SIGINT:  # a second Ctrl-C: the user wants out now
            logger.warning("stopped at once; a rerun resumes from the last checkpoint, if one was written")
            os._exit(130)

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


class ResumedSettings(TrainerCallback):
    """A resumed run logs, evaluates and saves at the intervals its recipe says now: the Trainer would keep the
    ones stored in the checkpoint's state."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)


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
    from finetune import errors
    from finetune.training import ranks

    ranks.leave_process_group(trainer)
    if trainer.guard.problem:
        if run is not None:
            tracking.survive(run.finish, exit_code=errors.DIVERGED)
        good = next((p for _, p in rundir.checkpoints(output_dir) if not rundir.checkpoint_problem(p)), None)
        start_over = "start over with a lower learning_rate or more warmup_steps (--overwrite_output_dir true)"
        advice = (f"Last good checkpoint: {good}. Rerun with --on_nonfinite_loss skip to resume from it, skipping "
                  f"such batches; or {start_over}" if good else f"No checkpoint was written: {start_over}")
        raise TrainingDiverged(f"training stopped: {trainer.guard.problem}. {advice}")
    if trainer.is_world_process_zero():
        hint = rundir.rerun_hint(trainer.recipe.run.overwrite_output_dir)
        logger.warning("stopped by %s at step %d, checkpoint saved in %s; %s", trainer.preemption.received,
                       trainer.preemption.stopped_at, output_dir, hint)
    if run is not None:
        tracking.survive(run.mark_preempting)
        tracking.survive(run.finish, exit_code=errors.PREEMPTED)
    return trainer


class Attempt:
    """One invocation of a run in its output_dir: holds the directory's lock for its life (main process), and if
    it fails before writing a checkpoint, puts back what it wrote (recipe, run id, history) and the run it was
    replacing (overwrite_output_dir), so that nothing it leaves makes the next attempt wrong. A W&B run it started
    is finished as failed."""

    RESTORED = (rundir.RECIPE, rundir.WANDB_RUN, rundir.MARKER)

    def __init__(self, output_dir: Path, main: bool):
        self.output_dir, self.main = output_dir, main
        self.claim = rundir.Claim(output_dir) if main else None
        self.before: dict[str, bytes | None] = {}
        self.checkpoints: list = []
        self.run = None  # the W&B run, once started

    def __enter__(self):
        from finetune.training import ranks

        problem = None
        if self.main:
            try:
                self.claim.acquire()
            except UsageError as error:
                problem = error
        if ranks.agree(problem is not None):  # every rank stops, not only the one that found the problem
            raise problem or UsageError(f"output_dir: {self.output_dir} could not be claimed (see the main process)")
        if self.main:
            rundir.recover_interrupted_overwrite(self.output_dir)
        if self.main:
            self.before = {name: (self.output_dir / name).read_bytes() if (self.output_dir / name).is_file()
                           else None for name in self.RESTORED}
            self.checkpoints = rundir.checkpoints(self.output_dir)
        return self

    def __exit__(self, kind, error, traceback):
        if not self.main:
            return False
        wrote_nothing = kind is not None and rundir.checkpoints(self.output_dir) == self.checkpoints \
            and not rundir.is_finished(self.output_dir)
        if wrote_nothing:
            rundir.restore_previous_run(self.output_dir)
            for name, content in self.before.items():
                path = self.output_dir / name
                if content is None:
                    path.unlink(missing_ok=True)
                else:
                    rundir.write_text(path, content.decode())
        else:
            rundir.drop_previous_run(self.output_dir)
        if kind is not None and self.run is not None and not isinstance(error, TrainingDiverged):
            tracking.survive(self.run.finish, exit_code=1)
        self.claim.release(clean=wrote_nothing)
        return False

    def replace_previous(self) -> None:
        """overwrite_output_dir: set the previous run aside; it is dropped once this one has a checkpoint or has
        finished, and put back if this one fails before that."""
        rundir.set_aside_previous_run(self.output_dir)
        self.checkpoints = []


def segment(resume_from: Path | None, changed: dict[str, tuple], dataset: str | None = None) -> dict:
    """What the run's history records for this invocation: when, from which step, what changed, and the
    dataset's content digest (a local dataset; a resume compares it)."""
    import time

    step = int(resume_from.name.rsplit("-", 1)[-1]) if resume_from is not None else 0
    if changed:
        logger.info("resuming with changed settings: %s", ", ".join(f"{key} {before!r} -> {after!r}"
                                                                     for key, (before, after) in changed.items()))
    digest = rundir.content_digest(Path(dataset)) if dataset else None
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "from_step": step,
            "changed": {key: list(values) for key, values in changed.items()},
            **({"dataset_sha256": digest} if digest else {})}
