"""Where one arm's training step spends its time: per-step times after warm-up, and a torch profile of three steps.

    python benchmarks/step_profile.py toolkit --steps 14                   # the CPU size, as make bench-train
    python benchmarks/step_profile.py toolkit --size gpu --variant qlora --steps 14
    python benchmarks/step_profile.py toolkit --size gpu --steps 14 --toolkit_set chunked_loss=false
    python benchmarks/step_profile.py trl-padding-free --size gpu --steps 14

The arm is one of `train_speed.py`'s (same model, data, order and settings), run in this process. Each step is timed
between device syncs at its start and end; steps 6 to 8 run under torch's profiler, whose tables (by GPU time where
there is a GPU, by CPU time) are printed after a SUMMARY line. The steady-state figures leave out the first three
steps (warm-up) and the profiled ones. A step's time here is the optimizer step with its micro-batches' forward and
backward; the data loading before it and logging after it are outside, so these figures run a little ahead of
`train_speed.py`'s (the Trainer's whole train time over the steps). `train_speed.py` says how fast each arm is;
this says where the time goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_speed  # noqa: E402

PROFILED = (6, 8)  # first and last profiled step (1-based)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arm", choices=train_speed.ARMS)
    parser.add_argument("--size", choices=list(train_speed.SIZES), default="cpu")
    parser.add_argument("--variant", choices=train_speed.VARIANTS, default="lora")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--toolkit_set", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, default=train_speed.ROOT / "outputs" / "bench-train")
    args = parser.parse_args()
    if args.steps < PROFILED[1] + 2:
        parser.error(f"--steps must be at least {PROFILED[1] + 2}: steady steps follow the profiled ones")
    toolkit_set = train_speed.recipe_settings(parser, args.toolkit_set)
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, state = [], {}

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, trainer_state, control, **kwargs):
            sync()
            state["start"] = time.perf_counter()
            if trainer_state.global_step + 1 == PROFILED[0]:
                activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                                      if cuda else [])
                state["profiler"] = torch.profiler.profile(activities=activities)
                state["profiler"].__enter__()

        def on_step_end(self, args, trainer_state, control, **kwargs):
            sync()
            times.append(time.perf_counter() - state["start"])
            if trainer_state.global_step == PROFILED[1]:
                state["profiler"].__exit__(None, None, None)

    original_init = transformers.Trainer.__init__

    def init_with_timer(self, *init_args, **init_kwargs):  # every arm's Trainer, the toolkit's subclass included
        original_init(self, *init_args, **init_kwargs)
        self.add_callback(StepTimer())

    transformers.Trainer.__init__ = init_with_timer
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = train_speed.run_arm(args.arm, args.size, args.variant, args.steps, args.workdir, toolkit_set)
    steady = times[3:PROFILED[0] - 1] + times[PROFILED[1]:]
    tokens_per_step = result["tokens_per_second"] * result["seconds_per_step"]
    print("STEP_TIMES " + " ".join(f"{t:.3f}" for t in times))
    print("SUMMARY " + json.dumps({**result, "set": toolkit_set, "first_step_s": times[0],
                                   "steady_median_s": statistics.median(steady), "steady_min_s": min(steady),
                                   "steady_tokens_per_s": tokens_per_step / statistics.median(steady)}))
    averages = state["profiler"].key_averages()
    if cuda:
        print(averages.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
