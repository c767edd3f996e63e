"""Hyperparameter sweeps from a W&B sweep file: online through W&B's servers, or here with W&B's own sweep engine.

    finetune sweep recipes/sweeps/tiny_lr_rank.yaml            # W&B's servers with credentials, else here
    finetune sweep recipes/sweeps/tiny_lr_rank.yaml --local    # here, whatever the credentials
    finetune sweep SWEEP.yaml --count 2                        # at most 2 trials in this invocation
    make sweep SWEEP=recipes/sweeps/tiny_lr_rank.yaml
    sbatch --array=0-5 launch/sweep.sbatch recipes/sweeps/tiny_lr_rank.yaml   # Slurm: a trial per array task

The file is a W&B sweep configuration (method, metric, parameters, early_terminate, run_cap) whose parameters are
recipe keys and whose `command` runs one of the toolkit's launchers on a recipe, with `${args}`:

    program: finetune/run.py
    command:
      - ${env}
      - ${interpreter}
      - ${program}
      - recipes/tiny.yaml
      - --max_steps=60
      - ${args}

Each trial runs that command with the trial's values as `--key=value`, as `wandb agent` runs it. Here (offline,
`--local`), W&B's engine (the `sweeps` package) proposes each trial from the finished ones; each trial is a normal
run in `outputs/sweeps/<name>/trial-NNN/` with an offline W&B run in the sweep's group; hyperband stops trials at
the metric's log steps; an interrupted sweep, run again, goes on where it stopped (a half-done trial resumes from
its checkpoint). At the end: the comparison table and Pareto plot over the trials, and the best trial as a recipe.
Every problem in the file is reported before any trial starts, one line each, exit 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune import errors
from finetune.errors import UsageError
from finetune.recipe.load import _UniqueKeyLoader, read_yaml
from finetune.training import preference, rundir
from finetune.training import sweep as state_file
from finetune.training.ranks import die_with_parent

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # W&B's, when the file has no `command`
ARGUMENT_FORMS = ("${args}", "${args_no_equals}")  # the `--key=value` and `--key value` forms the launchers read
# The numbers a training run logs, by their W&B names. At log steps (W&B history: what hyperband compares):
STEP_METRICS = ("train/loss", "train/grad_norm", "train/learning_rate", "train/epoch", "train/perplexity",
                "train/input_tokens_per_second", "train/samples_per_second", "train/peak_vram_gb", "eval/loss",
                "eval/perplexity", "eval/best_perplexity", "eval/runtime", "eval/samples_per_second",
                "eval/steps_per_second")
# Once, at the end (summary.json and the W&B summary):
SUMMARY_METRICS = ("eval/loss", "eval/perplexity", "eval/best_perplexity", "train/mean_loss", "train/input_tokens",
                   "train/target_tokens", "train/samples", "train/train_seconds", "train/input_tokens_per_second",
                   "train/samples_per_second", "train/peak_ram_gb", "train/peak_vram_gb",
                   "train/peak_vram_reserved_gb", "train/total_flops", "train/mfu", "model/total_params",
                   "model/trainable_params", "model/trainable_percent", "model/weight_bits", "model/base_weights_gb",
                   "model/memory_footprint_gb", "model/saved_weights_mb", "final/total_steps", "final/total_epochs")
PERPLEXITIES = ("train/perplexity", "eval/perplexity", "eval/best_perplexity")  # objective: sft only
CUDA_ONLY = ("train/peak_vram_gb", "train/peak_vram_reserved_gb", "train/mfu")
MAX_FAILURES_IN_A_ROW = 3  # trials failing one after another: the sweep stops (as `wandb agent` does)
STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclass
class Sweep:
    """A checked sweep file."""

    path: Path
    config: dict[str, Any]  # as W&B takes it
    name: str
    command: list[str]  # `command` with its macros (${env}, ${args}, ...)
    recipe: str
    metric: str | None
    goal: str  # minimize or maximize
    run_cap: int | None

    def better(self, a: float, b: float) -> bool:
        return a < b if self.goal == "minimize" else a > b

    @property
    def planned(self) -> int | None:
        """How many trials the sweep has in all: run_cap, else a grid's combinations (counted as W&B's grid counts
        them); None: until stopped."""
        if self.run_cap is not None or self.config["method"] != "grid":
            return self.run_cap
        return math.prod(grid_size(spec) for spec in self.config["parameters"].values())


def grid_size(spec: dict[str, Any]) -> int:
    import numpy as np

    if "values" in spec:
        return len(spec["values"])
    if spec.get("distribution") == "int_uniform":
        return spec["max"] - spec["min"] + 1
    if spec.get("distribution") == "q_uniform":
        return len(np.arange(spec["min"], spec["max"], spec["q"]))
    return 1  # a constant


# Reading and checking the file ------------------------------------------------------------------------------------

class _SweepLoader(_UniqueKeyLoader):
    """The recipe loader (a key written twice refused), reading `1e-5` as the number YAML 1.2 and W&B's own parser
    read (YAML 1.1, PyYAML's, reads a string, which W&B's schema refuses as a range's end)."""


_SweepLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"sweep file {path}: no such file; pass a W&B sweep file (see recipes/sweeps/)")
    config = read_yaml(path, "sweep file", _SweepLoader)
    if not isinstance(config, dict):
        raise UsageError(f"sweep file {path}: expected a W&B sweep configuration (method, metric, parameters, "
                         f"command), got a {type(config).__name__}")
    return config


def expanded(command: list[str], program: str | None) -> list[str]:
    """`command` with ${env}, ${interpreter}, ${program} and ${envvar:NAME} filled in as `wandb agent` fills them;
    the argument macros stay."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command

    filled = {"${env}": ["/usr/bin/env"], "${interpreter}": ["python"], "${program}": [program] if program else []}
    return [part for token in create_sweep_command([str(t) for t in command]) for part in filled.get(token, [token])]


def split_command(tokens: list[str]) -> tuple[int, str] | None:
    """(index after the launcher, launcher) when `tokens` runs one of the toolkit's launchers, else None."""
    for i, token in enumerate(tokens):
        following = tokens[i + 1:i + 3]
        if token.endswith(("finetune/run.py", "launch/train.sh")):
            return i + 1, token
        if token == "-m" and following[:1] in (["finetune.run"], ["finetune.commands.launch"]):
            return i + 2, f"-m {following[0]}"
        if token == "-m" and following[:1] == ["finetune"] and following[1:] in (["train"], ["launch"]):
            return i + 3, f"-m finetune {following[1]}"
        if Path(token).name == "finetune" and following[:1] in (["train"], ["launch"]):
            return i + 2, f"finetune {following[0]}"
    return None


def parse_command(config: dict[str, Any], problems: list[str]) -> tuple[list[str], str | None]:
    """The command's macros kept, and the recipe it runs; problems appended."""
    command = config.get("command") or DEFAULT_COMMAND
    if not isinstance(command, list):
        problems.append("command: give a list, one item a line: - ${env}, - ${interpreter}, - ${program}, "
                        "- recipes/tiny.yaml, - ${args} (see recipes/sweeps/)")
        return [], None
    tokens = expanded(command, config.get("program"))
    found = split_command(tokens)
    if found is None:
        problems.append(f"command: `{' '.join(tokens)}` runs none of the toolkit's launchers; run finetune/run.py, "
                        "launch/train.sh or `-m finetune train|launch` on a recipe, e.g. program: finetune/run.py and "
                        "a command of ${env}, ${interpreter}, ${program}, recipes/tiny.yaml, ${args} (see "
                        "recipes/sweeps/)")
        return [], None
    start, launcher = found
    if launcher.endswith((".py", ".sh")) and not Path(launcher).expanduser().is_file():
        problems.append(f"command: {launcher}: no such file (relative paths are read from the working directory, "
                        f"{Path.cwd()}); run the sweep from the repository, or give the path in full")
        return [], None
    rest = tokens[start:]
    recipe = rest[0] if rest and not rest[0].startswith(("${", "-")) else None
    if recipe is None or not recipe.endswith((".yaml", ".yml")):
        problems.append(f"command: {launcher} needs a recipe right after it (a .yaml file), then ${{args}}")
        return [], None
    macros = [t for t in rest if t.startswith("${")]
    forms = [t for t in macros if t in ARGUMENT_FORMS]
    others = [t for t in macros if t not in ARGUMENT_FORMS]
    if others:
        problems.append(f"command: {', '.join(others)} passes the parameters in a form the toolkit's launchers don't "
                        "read; use ${args} (--key=value)")
    elif len(forms) != 1:
        problems.append("command: give ${args} once, after the recipe: it is where each trial's --key=value go")
    return [str(t) for t in command], recipe


def fixed_arguments(sweep_command: list[str], program: str | None) -> list[str]:
    """The command's own overrides: the tokens after the recipe that are not macros."""
    tokens = expanded(sweep_command, program)
    start, _ = split_command(tokens)
    return [t for t in tokens[start + 1:] if not t.startswith("${")]


def candidate_values(spec: dict[str, Any]) -> list[Any]:
    """The values of a parameter worth checking against the recipe: each listed value, or a range's ends."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    distribution = spec.get("distribution", "")
    ends = [spec[k] for k in ("min", "max") if k in spec]
    if distribution in ("log_uniform", "q_log_uniform"):  # min and max are natural logs of the values
        return [math.exp(end) for end in ends]
    if "normal" in distribution:
        return []  # unbounded: nothing to check ahead
    return ends


def check_parameters(config: dict[str, Any], recipe_argv: list[str], problems: list[str]) -> None:
    """Every parameter a recipe key, every value the recipe takes, as a trial gets it (`--key=value`)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    from finetune.recipe import keys as recipe_keys
    from finetune.recipe.load import did_you_mean, read_checked

    known = recipe_keys.recipe_keys()
    for name, spec in (config.get("parameters") or {}).items():
        if isinstance(spec, dict) and "parameters" in spec:
            problems.append(f"parameters: {name} nests parameters; recipe keys are flat, list each one at the top")
            continue
        if name not in known:
            problems.append(f"parameters: `{name}` is not a recipe key{did_you_mean(name, known)} (`finetune train "
                            "--help` lists them)")
            continue
        if name in ("output_dir", "overwrite_output_dir", "resume_from_checkpoint"):
            problems.append(f"parameters: {name} can't be swept: each trial has its own output directory under the "
                            "sweep's")
            continue
        for value in candidate_values(spec if isinstance(spec, dict) else {}):
            argument = create_sweep_command_args({"args": {name: {"value": value}}})["args"]
            try:
                read_checked([*recipe_argv, *argument], data_needed=False)
            except UsageError as error:
                problems += [f"parameters: {name}={value!r}: {p}" for p in error.problems]


def check_metric(config: dict[str, Any], values: dict[str, Any] | None, problems: list[str]) -> str | None:
    """The sweep's metric, a name the toolkit logs (at log steps, for hyperband), from evaluations the recipe runs
    (`values`: its checked keys; None: the recipe could not be read); problems appended."""
    from finetune.recipe import keys as recipe_keys
    from finetune.recipe.load import did_you_mean

    metric = (config.get("metric") or {}).get("name")
    hyperband = (config.get("early_terminate") or {}).get("type") == "hyperband"
    if metric is None:
        if config.get("method") == "bayes" or hyperband:
            problems.append(f"metric: {'bayes' if config.get('method') == 'bayes' else 'hyperband'} needs one, e.g. "
                            "metric: {name: eval/loss, goal: minimize}")
        return None
    step = set(STEP_METRICS)
    known = step | set(SUMMARY_METRICS)
    objective = (values or {}).get("objective", "sft")
    if objective != "sft":  # TRL's metrics at log steps, and DPO's held-out preference accuracy (no evaluation's)
        step = (step - set(PERPLEXITIES)) | {f"{split}/{name}" for split in ("train", "eval")
                                             for name in preference.METRICS[objective]}
        known = (known - set(PERPLEXITIES)) | step | set(preference.ACCURACY if objective == "dpo" else ())
    if metric not in known:
        problems.append(f"metric: the toolkit never logs `{metric}`{did_you_mean(metric, known)}; its metrics are in "
                        "docs/outputs-and-metrics.md")
        return metric
    if hyperband and metric not in step:
        problems.append(f"metric: `{metric}` is in the summary only, and hyperband compares trials at log steps; use "
                        "one logged during training (eval/loss, train/loss, ...)")
    strategy = (values or {}).get("eval_strategy", recipe_keys.TOOLKIT_DEFAULTS.get("eval_strategy", "no"))
    if values is not None and metric in preference.ACCURACY and recipe_keys.holds_out_nothing(
            values.get("eval_split"), values.get("eval_fraction"), values.get("eval_size")):
        problems.append(f"metric: `{metric}` is measured on held-out pairs and the recipe holds none out (eval_size/"
                        "eval_fraction 0); hold some out, or give an eval_split")
    if values is not None and metric.startswith("eval/") and metric not in preference.ACCURACY and \
            str(strategy) == "no":
        problems.append(f"metric: `{metric}` comes from evaluations and the recipe never evaluates (eval_strategy: "
                        "no); set eval_strategy: steps and eval_steps in the recipe or the command")
    if metric in CUDA_ONLY:
        import torch

        if not torch.cuda.is_available():
            problems.append(f"metric: `{metric}` is logged on CUDA GPUs only, and this machine has none")
    return metric


def load(path: Path, count: int | None = None) -> Sweep:
    """The checked sweep file. Raises UsageError listing every problem: W&B's schema, the command, the recipe, each
    parameter and value, the metric, a search that never ends."""
    from finetune.recipe.load import read_checked

    config = read_file(path)
    problems = []
    run_cap = config.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1):
        problems.append(f"run_cap: {run_cap!r} is not a positive whole number of trials")
    parameters = config.get("parameters")
    for name, spec in (parameters.items() if isinstance(parameters, dict) else ()):
        if not isinstance(spec, dict):
            problems.append(f"parameters: {name}: {spec!r} is not a search space; write {{value: {spec!r}}} for one "
                            "value, {values: [...]} for several, or {min: ..., max: ...} for a range")
    if problems:
        raise UsageError([f"sweep file {path}: {p}" for p in problems])
    violations = state_file.engine().schema_violations_from_proposed_config(state_file.for_engine(config))
    problems += [f"{line} (W&B's sweep schema)" for line in dict.fromkeys(violations)]
    if not problems and config["method"] == "custom":
        problems.append("method: custom needs W&B's servers to propose trials; use grid, random or bayes")
    if not problems:
        try:
            state_file.propose(config, {"trials": []}, 0)  # what the engine refuses only when asked for a trial
        except ValueError as error:
            problems.append(f"{str(error).strip().splitlines()[0]} (W&B's sweep engine)")
    if problems:
        raise UsageError([f"sweep file {path}: {p}" for p in problems])
    if config["method"] in ("random", "bayes") and run_cap is None and count is None:
        problems.append(f"a {config['method']} search never ends on its own: set run_cap in the file, or pass "
                        "--count N (trials in this invocation)")
    command, recipe = parse_command(config, problems)
    values = None
    if recipe:
        argv = [recipe, *fixed_arguments(command, config.get("program"))]
        try:
            _, _, values, _ = read_checked(argv)
        except UsageError as error:
            problems += [f"command: {recipe}: {p}" for p in error.problems]
            values = None
        else:
            check_parameters(config, argv, problems)
    metric = check_metric(config, values, problems)
    if problems:
        raise UsageError([f"sweep file {path}: {p}" for p in problems])
    goal = (config.get("metric") or {}).get("goal", "minimize")
    return Sweep(path=path, config=config, name=str(config.get("name") or path.stem), command=command, recipe=recipe,
                 metric=metric, goal=goal, run_cap=run_cap)


def trial_command(sweep: Sweep, params: dict[str, Any]) -> list[str]:
    """The command line of a trial with `params`, as `wandb agent` builds it (its own functions)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    arguments = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    arguments.update(interpreter=["python"], program=[sweep.config.get("program") or ""], env=["/usr/bin/env"])
    command = []
    for token in create_sweep_command(list(sweep.command)):
        token = str(token)
        command += (arguments.get(token[2:-1]) or []) if token.startswith("${") and token.endswith("}") else [token]
    return command


# The sweep directory ---------------------------------------------------------------------------------------------

def directory_problem(sweep: Sweep, out: Path, seed: int) -> str | None:
    """Why the sweep can't run in `out`: a file, someone else's directory, or a sweep started from another file or
    with another seed."""
    for place in (out, *out.parents):
        if place.exists() and not place.is_dir():
            return f"--out: {place} is a file; give a directory for the sweep"
    if not out.is_dir() or not any(out.iterdir()):
        blocked = rundir.unwritable(out)
        return f"--out: {blocked} is not writable; give a writable place" if blocked else None
    started = out / state_file.SWEEP_FILE
    if not started.is_file():
        return f"--out: {out} holds files no sweep wrote; give another directory"
    before = read_file(started)
    if before != sweep.config:
        changed = sorted(k for k in set(before) | set(sweep.config) if before.get(k) != sweep.config.get(k))
        return (f"--out: {out} holds a sweep started from another file ({', '.join(changed)} differ); give another "
                "--out, or run that file to continue it")
    before_seed = state_file.read(out).get("seed", seed)
    if before_seed != seed:
        return f"--seed {seed}: the sweep in {out} started with --seed {before_seed}; give that, or another --out"
    return None


# Running it here ---------------------------------------------------------------------------------------------------

class Stop:
    """The first SIGTERM, SIGINT or SIGUSR1 to the sweep: passed on to the running trial (which checkpoints and
    exits 75), and no trial starts after it. Every further signal is passed on too (a second Ctrl-C stops the
    trial at once)."""

    def __init__(self):
        self.signum: int | None = None
        self.child: subprocess.Popen | None = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.receive) for s in STOPPING}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def receive(self, signum, frame):
        self.signum = self.signum or signum
        self.forward(signum)

    def forward(self, signum: int) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def trial_env(sweep: Sweep, trial_dir: Path) -> dict[str, str]:
    """The trial's environment: its directory, the sweep's W&B group, a run name of its own, and this interpreter
    first on PATH (the command's `python`)."""
    from finetune.recipe.load import SWEEP_TRIAL

    env = {**os.environ, SWEEP_TRIAL: str(trial_dir.resolve())}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["WANDB_RUN_GROUP"] = env.get("WANDB_RUN_GROUP") or sweep.name
    env["WANDB_NAME"] = f"{sweep.name}-{trial_dir.name}"
    env.pop("WANDB_RUN_ID", None)  # each trial a run of its own
    return env


def next_trial(sweep: Sweep, out: Path, seed: int) -> tuple[dict[str, Any], state_file.Claim] | None:
    """Claim the trial to run next: one interrupted (left running by a driver that is gone), else a new one the
    engine proposes. None when the sweep is done: grid exhausted, run_cap reached, or the metric's target met."""
    with state_file.locked(out) as state:
        state.setdefault("name", sweep.name)
        state.setdefault("seed", seed)
        state["config"] = sweep.config
        for trial in state["trials"]:
            if trial["state"] == state_file.RUNNING:
                claim = state_file.Claim(out, trial["name"])
                if not claim.take():
                    continue
                if not settled(sweep, out, trial):  # else its driver stopped after the run had finished
                    return trial, claim
                claim.release()
        if sweep.run_cap is not None and len(state["trials"]) >= sweep.run_cap:
            return None
        target = (sweep.config.get("metric") or {}).get("target")
        results = [t["result"] for t in state["trials"] if t.get("result") is not None]
        if target is not None and any(r == target or sweep.better(r, target) for r in results):
            return None
        params = state_file.propose(sweep.config, state, seed)
        if params is None:
            return None
        trial = {"name": f"trial-{len(state['trials']) + 1:03d}", "params": params, "state": state_file.RUNNING,
                 "history": []}
        claim = state_file.Claim(out, trial["name"])
        claim.take()
        state["trials"].append(trial)
        return trial, claim


def finish_trial(sweep: Sweep, out: Path, name: str, code: int, interrupted: bool) -> dict[str, Any]:
    """Record how a trial ended (`interrupted`: it stays `running`, for the next driver to resume); returns it."""
    with state_file.locked(out) as state:
        trial = next(t for t in state["trials"] if t["name"] == name)
        trial["exit_code"] = code
        if not settled(sweep, out, trial) and not interrupted:
            trial["state"] = state_file.FAILED
        return dict(trial)


def settled(sweep: Sweep, out: Path, trial: dict[str, Any]) -> bool:
    """Record the result of a trial whose run finished (its summary written: a signal that came while the run
    wrote its results may still have changed its exit code); False when it did not finish."""
    if not rundir.is_finished(out / trial["name"]):
        return False
    summary = rundir.read_json(out / trial["name"] / rundir.SUMMARY) or {}
    history = trial.get("history", [])
    result = summary.get(sweep.metric) if sweep.metric else None
    trial["result"] = history[-1][1] if result is None and history else result
    if trial["state"] == state_file.RUNNING:
        trial["state"] = state_file.FINISHED
    return True


INTERRUPTED = (errors.PREEMPTED, errors.DISK_FULL, 128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGUSR1)


def described(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def run_local(sweep: Sweep, out: Path, count: int | None, seed: int) -> int:
    """Run trials here until the sweep is done or `count` trials have run; then report. Returns the exit code."""
    started = time.monotonic()
    if not (out / state_file.SWEEP_FILE).is_file():
        rundir.write_text(out / state_file.SWEEP_FILE, sweep.path.read_text())
    ran, failures = 0, []
    with Stop() as stop:
        while (count is None or ran < count) and stop.signum is None:
            claimed = next_trial(sweep, out, seed)
            if claimed is None:
                break
            trial, claim = claimed
            try:
                code = run_trial(sweep, out, trial, stop)
                # Stopped by a signal (the sweep's, or one that reached the trial first), or out of disk, before
                # its run finished: the trial resumes later. A trial that ended otherwise, after a signal to the
                # sweep, is no failure; one whose run finished is finished, whatever its exit code.
                interrupted = not rundir.is_finished(out / trial["name"]) and (
                    code in INTERRUPTED or (stop.signum is not None and code != errors.OK))
                ended = finish_trial(sweep, out, trial["name"], code, interrupted)
            finally:
                claim.release()
            ran += 1
            if interrupted or code == errors.USAGE:
                return stopped(out, trial["name"], code, stop.signum)
            print(outcome(sweep, ended), file=sys.stderr, flush=True)
            failures = failures + [ended] if ended["state"] == state_file.FAILED else []
            if len(failures) >= MAX_FAILURES_IN_A_ROW:
                shown = ", ".join(f"{t['name']} (exit {t['exit_code']})" for t in failures)
                print(f"error: {shown} failed one after another, so the sweep stops; their output above says why. "
                      "Correct the sweep file or the recipe, or run the same command again to try the next trials",
                      file=sys.stderr)
                return 1
        if stop.signum is not None:
            return stopped(out, None, 128 + stop.signum, stop.signum)
    code = report(sweep, out)
    trials = state_file.read(out)["trials"]
    done = sum(t["state"] != state_file.RUNNING for t in trials)
    if code == errors.OK and count is not None and ran >= count and next_trial_exists(sweep, trials):
        print(f"sweep {sweep.name}: {done}{f' of {sweep.planned}' if sweep.planned else ''} trials done "
              f"(--count {count}); run it again to go on", file=sys.stderr)
    elif code == errors.OK:
        print(f"sweep {sweep.name} done: {done} trials, {time.monotonic() - started:.0f} s in this run",
              file=sys.stderr)
    return code


def next_trial_exists(sweep: Sweep, trials: list[dict[str, Any]]) -> bool:
    """Whether the sweep would run another trial: an unfinished one, or one below run_cap or the grid's size."""
    if any(t["state"] == state_file.RUNNING for t in trials):
        return True
    return sweep.planned is None or len(trials) < sweep.planned


def run_trial(sweep: Sweep, out: Path, trial: dict[str, Any], stop: Stop) -> int:
    trial_dir = out / trial["name"]
    command = trial_command(sweep, trial["params"])
    resumed = " (resuming)" if trial_dir.is_dir() else ""
    of = f" of {sweep.planned}" if sweep.planned else ""
    print(f"== {trial['name']}{of}{resumed}: {described(trial['params'])}\n   {shlex.join(command)}", file=sys.stderr,
          flush=True)
    # A session of its own: a Ctrl-C in the terminal reaches the trial once, through Stop. It dies with the sweep
    # (SIGTERM: it checkpoints), however the sweep ends.
    stop.child = subprocess.Popen(command, env=trial_env(sweep, trial_dir), start_new_session=True,
                                  preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    if stop.signum is not None:  # arrived while the trial was starting
        stop.forward(stop.signum)
    code = stop.child.wait()
    stop.child = None
    return 128 - code if code < 0 else code  # killed by a signal, as a shell reports it


def stopped(out: Path, trial: str | None, code: int, signum: int | None) -> int:
    done = sum(t["state"] != state_file.RUNNING for t in state_file.read(out)["trials"])
    if code == errors.USAGE:
        print(f"error: {trial} refused its settings (above); the sweep stops; correct the sweep file or the recipe",
              file=sys.stderr)
        return code
    why = f"stopped by {signal.Signals(signum).name}" if signum else f"stopped ({trial} exited {code})"
    where = f"; {trial} resumes from its last checkpoint, if it wrote one" if trial else ""
    print(f"error: sweep {why} with {done} trial(s) done{where}; run the same command again to go on",
          file=sys.stderr)
    return code


def outcome(sweep: Sweep, trial: dict[str, Any]) -> str:
    metric = f" ({sweep.metric} {trial['result']:.4g})" if sweep.metric and trial.get("result") is not None else ""
    if trial["state"] == state_file.STOPPED:
        return f"{trial['name']}: stopped early by hyperband at step {trial['stopped_at_step']}{metric}"
    if trial["state"] == state_file.FAILED:
        return f"{trial['name']}: failed (exit {trial['exit_code']}); the sweep goes on"
    return f"{trial['name']}: finished{metric}"


# The report -------------------------------------------------------------------------------------------------------

def report(sweep: Sweep, out: Path) -> int:
    """The table and the Pareto plot over the trials with a model (finished or stopped early), the best trial
    named, and best.yaml: the best finished trial as a recipe. Under the sweep's lock: drivers sharing the sweep
    (a Slurm array) write them one at a time."""
    with state_file.locked(out) as state:
        return write_report(sweep, out, state["trials"])


def write_report(sweep: Sweep, out: Path, trials: list[dict[str, Any]]) -> int:
    from finetune.commands import compare

    failed = [f"{t['name']} (exit {t['exit_code']})" for t in trials if t["state"] == state_file.FAILED]
    trials = [t for t in trials if t["state"] in (state_file.FINISHED, state_file.STOPPED)]
    if failed:
        print(f"failed trials, left out of the table: {', '.join(failed)}", file=sys.stderr)
    if not trials:
        print("error: no trial finished; nothing to compare", file=sys.stderr)
        return 1
    params = sorted({key for t in trials for key in t["params"]})
    rows = []
    for trial in trials:
        row = compare.read_run(out / trial["name"])
        state = "finished" if trial["state"] == state_file.FINISHED else f"stopped at {trial['stopped_at_step']}"
        rows.append({**row, "state": state, **trial["params"], **({sweep.metric: trial.get("result")}
                                                                   if sweep.metric else {})})
    extra = [("state", "state", "{}")] + [(p, p, "{:.4g}" if any(isinstance(r.get(p), float) for r in rows) else "{}")
                                          for p in params]
    if sweep.metric:
        extra.append((sweep.metric, sweep.metric, "{:.4f}"))
    comparison = out / "comparison"
    comparison.mkdir(exist_ok=True)
    compare.write_tables(rows, comparison, extra)
    quality = None
    if sweep.metric and all(r.get(sweep.metric) is not None for r in rows):
        higher = sweep.goal == "maximize"
        quality = (sweep.metric, f"{sweep.metric} ({'higher' if higher else 'lower'} is better)", higher)
    plot = compare.plot_pareto(rows, comparison / "pareto.png", measure=quality, what=f"Sweep {sweep.name}")
    print((comparison / "comparison.md").read_text())
    finished = [t for t in trials if t["state"] == state_file.FINISHED and t.get("result") is not None]
    lines = [f"table: {comparison / 'comparison.md'}, {comparison / 'comparison.csv'}", f"plot: {plot}"]
    if finished and sweep.metric:
        best = finished[0]
        for trial in finished[1:]:
            if sweep.better(trial["result"], best["result"]):
                best = trial
        recipe = write_best(sweep, out, best)
        lines.append(f"best: {best['name']} ({sweep.metric} {best['result']:.4g}): {described(best['params'])}")
        lines.append(f"its recipe: {recipe}; run it again with: finetune train {recipe}")
    print("\n".join(lines), file=sys.stderr)
    return errors.OK


def write_best(sweep: Sweep, out: Path, best: dict[str, Any]) -> Path:
    """best.yaml: the sweep's recipe with the command's overrides and the best trial's values; it trains the same
    run again (into <sweep>/best)."""
    path = out / "best.yaml"
    fixed = {}
    arguments = fixed_arguments(sweep.command, sweep.config.get("program"))
    from finetune.recipe.load import parse_cli_overrides

    overrides, _ = parse_cli_overrides(arguments)
    for key, value in overrides.items():
        fixed[key] = yaml.safe_load(value) if isinstance(value, str) else value
    recipe = Path(sweep.recipe)
    extends = os.path.relpath(recipe.resolve(), path.parent.resolve())
    body = {"extends": extends, **fixed, **best["params"], "output_dir": str(out / "best")}
    header = (f"# The best trial of sweep {sweep.name}: {best['name']}, {sweep.metric} {best['result']:.6g} "
              f"({sweep.goal}).\n#   finetune train {path}\n")
    rundir.write_text(path, header + yaml.safe_dump(body, sort_keys=False))
    return path


# Online ------------------------------------------------------------------------------------------------------------

def online_reason() -> str | None:
    """Why the sweep runs here rather than on W&B's servers (None: it goes online)."""
    from finetune.tracking import wandb_run as tracking

    settings = tracking.check({"report_to": ["wandb"]})
    if settings["disabled"]:
        return f"tracking is off ({settings['disabled']})"
    if settings["mode"] == "offline":
        return settings["offline_reason"] or "WANDB_MODE=offline"
    return tracking.online_problem()


def run_online(sweep: Sweep, count: int | None, create_only: bool) -> int:
    """Create the sweep on W&B's servers and run an agent here (or only print how to start agents)."""
    import wandb

    project = os.environ.get("WANDB_PROJECT") or sweep.config.get("project") or "finetune"
    entity = os.environ.get("WANDB_ENTITY") or sweep.config.get("entity")
    sweep_id = wandb.sweep(sweep.config, project=project, entity=entity)
    path = "/".join(p for p in (entity, project, sweep_id) if p)
    print(f"sweep {path} created on W&B; start agents with: wandb agent {path}  (Slurm: sbatch --array=0-N "
          f"launch/sweep.sbatch {path})", file=sys.stderr)
    if create_only:
        return errors.OK
    agent = [str(Path(sys.executable).parent / "wandb"), "agent", "--forward-signals",
             *(["--count", str(count)] if count else []), path]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.call(agent, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune sweep", description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="a W&B sweep file (see recipes/sweeps/)")
    parser.add_argument("--local", action="store_true", help="run here with W&B's engine, even with credentials")
    parser.add_argument("--count", type=int, help="at most this many trials in this invocation (as wandb agent's)")
    parser.add_argument("--out", type=Path, help="the sweep's directory, here (default outputs/sweeps/<name>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the engine's proposals, here (default 0)")
    parser.add_argument("--check", action="store_true", help="check the file and show a trial's command; run nothing")
    parser.add_argument("--create_only", action="store_true",
                        help="online: create the sweep and print the `wandb agent` line, without running an agent")
    args = parser.parse_args(argv)
    try:
        if args.count is not None and args.count < 1:
            raise UsageError(f"--count: {args.count} is not a positive number of trials")
        sweep = load(args.file, args.count)
        reason = "--local" if args.local else online_reason()
        out = args.out or Path("outputs") / "sweeps" / sweep.name
        if reason is not None:
            problem = directory_problem(sweep, out, args.seed)
            if problem:
                raise UsageError(problem)
            if not args.check:
                try:
                    out.mkdir(parents=True, exist_ok=True)
                except OSError as error:
                    raise UsageError(f"--out: can't create {out} ({error.strerror}); give a writable place") from None
    except UsageError as error:
        return errors.report(error)
    if args.check:
        trials = f"{sweep.planned} trials" if sweep.planned else "trials until stopped (--count)"
        tokens = expanded(sweep.command, sweep.config.get("program"))
        line = " ".join(token if token.startswith("${") else shlex.quote(token) for token in tokens)
        print(f"{sweep.path}: a {sweep.config['method']} sweep over {', '.join(sweep.config['parameters'])}, "
              f"{trials}, metric {sweep.metric or '-'} ({sweep.goal}); each trial runs\n  {line}")
        return errors.OK
    if reason is None:
        return run_online(sweep, args.count, args.create_only)
    print(f"sweep {sweep.name}: running here with W&B's sweep engine ({reason}); trials in {out}", file=sys.stderr)
    return run_local(sweep, out, args.count, args.seed)


if __name__ == "__main__":
    sys.exit(main())
