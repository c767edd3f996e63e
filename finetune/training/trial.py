"""A sweep trial's side of a local sweep (`finetune sweep`): the sweep's metric recorded at each log step, and the
training ended there when hyperband stops the trial. The sweep's state is `finetune.training.sweep`."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback
from transformers.integrations.integration_utils import rewrite_logs

from finetune.training import sweep
from finetune.training.ranks import agree

logger = logging.getLogger("finetune")


class SweepTrial(TrainerCallback):
    """Records `metric` (a W&B name such as `eval/loss`: the Trainer's logs renamed as W&B's callback renames them)
    into the sweep's state at every log that has it, and stops training when the sweep's hyperband says so. The
    main process decides; every rank stops with it. The run then ends as any finished run does (model, summary)."""

    def __init__(self, trial_dir: Path, metric: str):
        self.trial_dir, self.metric = trial_dir, metric
        self.resumed_at = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.resumed_at = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        value = rewrite_logs(logs or {}).get(self.metric)
        if not isinstance(value, (int, float)):
            return
        if 0 < self.resumed_at == state.global_step:  # eval_on_start of a resumed trial: off the schedule, and
            return  # hyperband counts a trial's evaluations

        stop = sweep.record(self.trial_dir, state.global_step, float(value)) if state.is_world_process_zero else False
        if args.world_size > 1:
            stop = agree(stop)
        if stop:
            logger.info("hyperband stops this trial at step %d (%s %.4g): other trials did better at this point",
                        state.global_step, self.metric, value)
            control.should_training_stop = True


def callbacks() -> list[TrainerCallback]:
    """[SweepTrial] in a trial of a local sweep whose file names a metric; [] otherwise."""
    trial_dir, metric = sweep.current_trial(), sweep.metric_name()
    return [SweepTrial(trial_dir, metric)] if trial_dir is not None and metric else []
