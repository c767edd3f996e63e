"""A local sweep's state on disk, shared by `finetune sweep` (which proposes trials and runs them) and each trial's
training process (which records the sweep's metric and asks whether hyperband stops it). Imports nothing heavy.

    outputs/sweeps/<name>/
      sweep.yaml          the sweep file as the sweep started (a rerun with another file is refused)
      sweep.json          every trial: its parameters, state, the metric at each log step, its exit code
      trial-001/ ...      each trial a normal run directory (recipe.yaml, summary.json, checkpoints, the model)
      comparison/         the table and the Pareto plot over the trials; best.yaml: the best trial as a recipe

W&B's own sweep engine (the `sweeps` package, what its servers run) proposes the next trial from the ones recorded
here (`propose`) and picks the trials to stop (`stopped`). Every read and write of sweep.json holds an exclusive
lock on the sweep directory, so that several drivers (a Slurm array, one trial each) share one sweep; a trial is
claimed by the driver that runs it (`Claim`), and a claim dies with its driver, which frees an interrupted trial
for the next one to resume.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import warnings
from pathlib import Path
from typing import Any

from finetune.recipe.load import SWEEP_TRIAL
from finetune.training import rundir

SWEEP_FILE = "sweep.yaml"
STATE = "sweep.json"
LOCK = ".finetune-sweep-lock"
# A trial's states here; the engine's RunState for each. A trial hyperband stopped is a finished run (its model,
# its summary), shorter than the others: the engine sees it as finished, with the history it has.
RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped", "failed"
ENGINE_STATE = {RUNNING: "running", FINISHED: "finished", STOPPED: "finished", FAILED: "failed"}


@functools.cache
def engine():
    """W&B's sweep engine (`pip install sweeps`, in requirements.txt). Its pydantic models warn on import about
    their own config style; the warning says nothing to a user. Its first proposal of each method in a process
    imports modules that draw random numbers: done here once, so that every proposal after a seed is the same."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps

        parameters = {"x": {"min": 0.0, "max": 1.0}}
        done = sweeps.SweepRun(state="finished", config={"x": {"value": 0.5}}, summaryMetrics={"m": 1.0},
                               sampledHistory=[{"m": 1.0}])
        for method in ("grid", "random", "bayes"):
            sweeps.next_run({"method": method, "metric": {"name": "m", "goal": "minimize"},
                             "parameters": {"x": {"values": [0.5]}} if method == "grid" else parameters}, [done])
    return sweeps


@contextlib.contextmanager
def locked(sweep_dir: Path):
    """The sweep's state (a dict: name, config, trials), read under the sweep's lock and written back atomically
    when the block ends without an error. Blocks while another process holds the lock."""
    import fcntl

    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        state = rundir.read_json(sweep_dir / STATE) or {"trials": []}
        before = json.dumps(state, sort_keys=True)
        yield state
        if json.dumps(state, sort_keys=True) != before:
            rundir.write_json(sweep_dir / STATE, state)


def read(sweep_dir: Path) -> dict[str, Any]:
    """The sweep's state as last written (no lock: for reports)."""
    return rundir.read_json(sweep_dir / STATE) or {"trials": []}


class Claim:
    """A driver's hold on one trial: an exclusive lock on `<trial>.claim` in the sweep directory for as long as the
    driver runs it. The kernel drops it with the driver, however it ends, so a trial left `running` with no claim
    was interrupted and may be resumed by any driver."""

    def __init__(self, sweep_dir: Path, trial: str):
        self.path = sweep_dir / f".{trial}.claim"
        self.handle = None

    def take(self) -> bool:
        import fcntl

        handle = open(self.path, "a")  # noqa: SIM115 - held for the life of the trial
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self.handle = handle
        return True

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
            self.path.unlink(missing_ok=True)


def runs(state: dict[str, Any], metric: str | None):
    """The trials as the engine's SweepRuns: parameters, state, the metric's history and its final value."""
    sweeps = engine()
    made = []
    for trial in state["trials"]:
        history = [{metric: value} for _, value in trial.get("history", [])] if metric else []
        final = trial.get("result")
        made.append(sweeps.SweepRun(
            name=trial["name"], state=ENGINE_STATE[trial["state"]],
            config={key: {"value": value} for key, value in trial["params"].items()},
            sampledHistory=history, summaryMetrics={metric: final} if metric and final is not None else {}))
    return made


def for_engine(config: dict[str, Any]) -> dict[str, Any]:
    """The sweep file as the engine's schema takes it: without run_cap, which only W&B's servers know."""
    return {key: value for key, value in config.items() if key != "run_cap"}


def propose(config: dict[str, Any], state: dict[str, Any], seed: int) -> dict[str, Any] | None:
    """The next trial's parameters from W&B's engine (grid, random or bayes), or None when a grid is done. Seeded by
    the sweep's seed and the number of trials so far: the same sweep proposes the same trials, interrupted or not,
    and another seed other ones."""
    import numpy as np

    sweeps = engine()
    draw = int(hashlib.sha256(f"{seed}:{len(state['trials'])}".encode()).hexdigest()[:8], 16)
    random.seed(draw)
    np.random.seed(draw)
    metric = (config.get("metric") or {}).get("name")
    proposal = sweeps.next_run(for_engine(config), runs(state, metric))
    if proposal is None:
        return None
    return {key: plain(entry["value"]) for key, entry in proposal.config.items()}


def plain(value: Any) -> Any:
    """A value from the engine (numpy scalars among them) as a plain Python one, for JSON, YAML and command lines."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def record(trial_dir: Path, step: int, value: float) -> bool:
    """Record the sweep metric of the trial in `trial_dir` at `step` (a log step run again after a resume replaces
    the one before it); returns True when hyperband stops the trial here (the sweep file's `early_terminate`)."""
    sweep_dir, name = trial_dir.parent, trial_dir.name
    with locked(sweep_dir) as state:
        trial = next((t for t in state["trials"] if t["name"] == name), None)
        if trial is None:
            return False
        trial["history"] = [entry for entry in trial.get("history", []) if entry[0] < step] + [[step, value]]
        config = state["config"]
        if (config.get("early_terminate") or {}).get("type") != "hyperband" or trial["state"] != RUNNING:
            return False
        metric = config["metric"]["name"]
        stop = any(run.name == name for run in engine().stop_runs(for_engine(config), runs(state, metric)))
        if stop:
            trial.update(state=STOPPED, stopped_at_step=step)
        return stop


def current_trial(env=os.environ) -> Path | None:
    """The trial directory this process trains, when `finetune sweep` started it."""
    value = env.get(SWEEP_TRIAL)
    return Path(value) if value else None


def trial_config(env=os.environ) -> dict[str, Any]:
    """What a trial adds to its W&B run's config: the sweep, the trial, and the sweep's parameters at the top
    level, as W&B's own sweep runs have them."""
    trial_dir = current_trial(env)
    if trial_dir is None:
        return {}
    state = read(trial_dir.parent)
    trial = next((t for t in state["trials"] if t["name"] == trial_dir.name), {})
    return {"sweep": state.get("name"), "sweep_trial": trial_dir.name, **trial.get("params", {})}


def metric_name(env=os.environ) -> str | None:
    """The sweep's metric, in a trial (None: not a trial, or a sweep without one)."""
    trial_dir = current_trial(env)
    if trial_dir is None:
        return None
    return (read(trial_dir.parent).get("config", {}).get("metric") or {}).get("name")
