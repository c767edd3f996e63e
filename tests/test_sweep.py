"""finetune sweep: W&B sweep files checked before any trial, trial command lines as `wandb agent` builds them, and an
offline bayes sweep with hyperband on the embedded tiny recipe, interrupted and run again to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finetune.commands import sweep as sweep_command
from finetune.training import sweep as state_file
from tests.conftest import REPO, run_to_end, subprocess_env

TINY = "recipes/tiny.yaml"  # relative to the repository, where the tests run the sweeps


def sweep_file(path: Path, **changes) -> Path:
    """A sweep file on the tiny recipe (a short run), with `changes` over it (a value None drops the key)."""
    config = {
        "name": "t",
        "program": str(REPO / "finetune/run.py"),
        "command": ["${env}", "${interpreter}", "${program}", TINY, "--max_steps=30", "--eval_steps=10",
                    "--save_steps=10", "--logging_steps=10", "--eval_size=100", "--disable_tqdm=true", "${args}"],
        "method": "bayes",
        "run_cap": 4,
        "metric": {"name": "eval/loss", "goal": "minimize"},
        "parameters": {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-6, "max": 3e-2},
                       "lora_r": {"values": [4, 8]}},
        "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2},
    }
    config.update(changes)
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}, sort_keys=False))
    return path


# Checked before any trial ------------------------------------------------------------------------------------------

BAD = {  # sweep file changes -> what the one line says
    "schema": ({"method": "bogus"}, "'bogus' is not one of ['bayes', 'random', 'grid', 'custom'] (W&B's sweep schema)"),
    "not-a-key": ({"parameters": {"lora_rank": {"values": [4, 8]}}}, "`lora_rank` is not a recipe key (did you mean "
                                                                      "`lora_r`"),
    "value-refused": ({"parameters": {"dtype": {"values": ["float32", "float17"]}}}, "dtype='float17': dtype: "
                                                                                      "'float17' is not one of"),
    "range-end-refused": ({"parameters": {"lora_dropout": {"min": 0.0, "max": 1.5}}}, "lora_dropout=1.5"),
    "nested": ({"parameters": {"opt": {"parameters": {"lr": {"values": [1]}}}}}, "opt nests parameters"),
    "output-dir": ({"parameters": {"output_dir": {"values": ["a", "b"]}}}, "output_dir can't be swept"),
    "unknown-metric": ({"metric": {"name": "eval/los", "goal": "minimize"}},
                       "the toolkit never logs `eval/los` (did you mean `eval/loss`"),
    "summary-metric-hyperband": ({"metric": {"name": "train/peak_ram_gb", "goal": "minimize"}},
                                 "`train/peak_ram_gb` is in the summary only, and hyperband"),
    "no-evaluation": ({"command": ["${env}", "${interpreter}", "${program}", TINY, "--eval_strategy=no", "${args}"]},
                      "the recipe never evaluates (eval_strategy: no)"),
    "not-a-launcher": ({"command": ["python", "train.py", "${args}"]}, "runs none of the toolkit's launchers"),
    "no-program": ({"program": "elsewhere/finetune/run.py"}, "elsewhere/finetune/run.py: no such file"),
    "no-recipe": ({"command": ["${env}", "${interpreter}", "${program}", "${args}"]}, "needs a recipe right after it"),
    "no-args": ({"command": ["${env}", "${interpreter}", "${program}", TINY]}, "give ${args} once"),
    "json-args": ({"command": ["${env}", "${interpreter}", "${program}", TINY, "${args_json}"]},
                  "${args_json} passes the parameters in a form"),
    "recipe-refused": ({"command": ["${env}", "${interpreter}", "${program}", TINY, "--lora_alpah=3", "${args}"]},
                       "unknown key `lora_alpah` on the command line (did you mean `lora_alpha`"),
    "never-ends": ({"run_cap": None}, "a bayes search never ends on its own: set run_cap"),
    "bad-run-cap": ({"run_cap": 0}, "run_cap: 0 is not a positive whole number"),
    "custom": ({"method": "custom"}, "custom needs W&B's servers"),
    "bare-value": ({"parameters": {"lora_r": 8}}, "lora_r: 8 is not a search space; write {value: 8}"),
    "grid-over-a-range": ({"method": "grid", "parameters": {"learning_rate": {"min": 1e-5, "max": 1e-3}}},
                          "Parameter learning_rate is a disallowed type with grid search"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_each_bad_sweep_file_is_refused_in_one_line_before_any_trial(case, tmp_path, capsys, monkeypatch):
    changes, expected = BAD[case]
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    code = sweep_command.main([str(sweep_file(tmp_path / "s.yaml", **changes)), "--local", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: sweep file {tmp_path / 's.yaml'}: "), err
    assert expected in lines[0], err
    assert not out.exists()


def test_the_command_line_refuses_a_missing_file_a_broken_one_and_a_key_twice_without_a_traceback(tmp_path):
    broken, twice = tmp_path / "broken.yaml", sweep_file(tmp_path / "twice.yaml")
    broken.write_text("method: [grid\n")
    twice.write_text(twice.read_text() + "run_cap: 5\n")
    for path, expected in ((tmp_path / "nope.yaml", "no such file"), (broken, "invalid YAML at line 2"),
                           (twice, "`run_cap` is set twice")):
        result = subprocess.run([sys.executable, "-m", "finetune", "sweep", str(path), "--local"], cwd=REPO,
                                capture_output=True, text=True, env=subprocess_env(), timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr


def test_numbers_written_1e_5_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-5` as a string, which W&B's schema refuses as a range's end; recipes take it."""
    path = sweep_file(tmp_path / "s.yaml")
    path.write_text(path.read_text().replace("1.0e-06", "1e-6").replace("0.03", "3e-2"))
    assert "min: 1e-6" in path.read_text()
    assert sweep_command.load(path).config["parameters"]["learning_rate"] == {
        "distribution": "log_uniform_values", "min": 1e-6, "max": 3e-2}


def test_the_engine_proposes_the_same_trials_in_any_process_and_other_ones_for_another_seed():
    import copy

    config = {"method": "random", "parameters": {"learning_rate": {"distribution": "log_uniform_values",
                                                                   "min": 1e-6, "max": 1e-2}}}
    state = {"trials": [{"name": "trial-001", "params": {"learning_rate": 1e-3}, "state": state_file.FINISHED}]}
    script = ("import json, sys; from finetune.training import sweep; "
              "print(json.dumps(sweep.propose(*json.loads(sys.argv[1]))))")
    fresh = subprocess.run([sys.executable, "-c", script, json.dumps([config, state, 0])], capture_output=True,
                           text=True, cwd=REPO, check=True).stdout
    here = [state_file.propose(config, copy.deepcopy(state), 0) for _ in range(2)]
    assert here[0] == here[1] == json.loads(fresh)
    others = [state_file.propose(config, copy.deepcopy(state), seed)["learning_rate"] for seed in (1, 2)]
    assert len({here[0]["learning_rate"], *others}) == 3


def test_a_sweep_directory_of_another_file_or_of_other_files_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    out.mkdir()
    (out / state_file.SWEEP_FILE).write_text(yaml.safe_dump({"method": "grid"}))
    assert sweep_command.main([str(sweep_file(tmp_path / "s.yaml")), "--local", "--out", str(out)]) == 2
    assert "holds a sweep started from another file" in capsys.readouterr().err
    (out / state_file.SWEEP_FILE).unlink()
    (out / "notes.txt").write_text("mine")
    assert sweep_command.main([str(sweep_file(tmp_path / "s.yaml")), "--local", "--out", str(out)]) == 2
    assert "holds files no sweep wrote" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes/sweeps").glob("*.yaml")))
def test_the_shipped_sweep_files_pass_every_check(name, monkeypatch):
    monkeypatch.chdir(REPO)
    if name.startswith("smollm2") and not (REPO / "assets/smollm2").is_dir():
        pytest.skip("the real model's assets are not here (make smollm2; make test makes them)")
    sweep = sweep_command.load(REPO / "recipes/sweeps" / name)
    assert sweep.metric == "eval/loss" and sweep.planned


def test_check_shows_the_trials_command_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    assert sweep_command.main([str(sweep_file(tmp_path / "s.yaml")), "--local", "--check", "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "a bayes sweep over learning_rate, lora_r, 4 trials, metric eval/loss (minimize)" in shown
    assert shown.rstrip().endswith(f"{REPO / 'finetune/run.py'} {TINY} --max_steps=30 --eval_steps=10 "
                                   "--save_steps=10 --logging_steps=10 --eval_size=100 --disable_tqdm=true ${args}")
    assert not out.exists()


def test_out_and_seed_problems_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    path = sweep_file(tmp_path / "s.yaml")
    (tmp_path / "afile").write_text("")
    cases = [(tmp_path / "afile" / "sub", f"--out: {tmp_path / 'afile'} is a file"),
             (Path("/proc/sweep"), "--out: /proc is not writable")]
    out = tmp_path / "out"
    out.mkdir()
    (out / state_file.SWEEP_FILE).write_text(path.read_text())
    state_file.rundir.write_json(out / state_file.STATE, {"seed": 0, "trials": []})
    for place, expected in cases:
        assert sweep_command.main([str(path), "--local", "--out", str(place)]) == 2
        assert expected in capsys.readouterr().err
    assert sweep_command.main([str(path), "--local", "--out", str(out), "--seed", "1"]) == 2
    assert f"--seed 1: the sweep in {out} started with --seed 0" in capsys.readouterr().err


def test_a_signal_while_a_trial_starts_leaves_the_trial_to_resume(tmp_path, capsys, monkeypatch):
    """SIGTERM to the sweep before the trial can handle it (still importing): the trial is killed by it, and stays
    `running` for the next run to resume, instead of being marked failed."""
    import threading

    monkeypatch.chdir(REPO)
    started = tmp_path / "started"
    monkeypatch.setattr(sweep_command, "trial_command", lambda sweep, params: [
        sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(60)"])

    def stop_when_the_trial_runs():
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_the_trial_runs, daemon=True).start()
    out = tmp_path / "out"
    assert sweep_command.main([str(sweep_file(tmp_path / "s.yaml")), "--local", "--out", str(out)]) == 143
    assert "sweep stopped by SIGTERM with 0 trial(s) done; trial-001 resumes" in capsys.readouterr().err
    (trial,) = state_file.read(out)["trials"]
    assert trial["state"] == state_file.RUNNING and trial["exit_code"] == 143


def test_a_trial_whose_run_finished_is_finished_whatever_its_driver_saw(tmp_path, monkeypatch):
    """A SIGTERM that lands while the trial writes its results leaves a finished run and a signal's exit code (or
    a driver killed then): the next run records the trial as finished, with its result, and goes on."""
    monkeypatch.chdir(REPO)
    sweep = sweep_command.load(sweep_file(tmp_path / "s.yaml"))
    out = tmp_path / "out"
    (out / "trial-001").mkdir(parents=True)
    state_file.rundir.write_json(out / "trial-001" / "summary.json", {"eval/loss": 3.25})
    state_file.rundir.write_json(out / state_file.STATE, {"name": "t", "seed": 0, "trials": [
        {"name": "trial-001", "params": {"learning_rate": 1e-3, "lora_r": 4}, "state": state_file.RUNNING,
         "history": [[0, 5.0], [10, 3.25]], "exit_code": 143}]})
    trial, claim = sweep_command.next_trial(sweep, out, 0)
    claim.release()
    assert trial["name"] == "trial-002"
    first = state_file.read(out)["trials"][0]
    assert (first["state"], first["result"]) == (state_file.FINISHED, 3.25)


# The trials' command lines and arguments ----------------------------------------------------------------------------

def test_trial_command_lines_are_what_wandb_agent_runs(tmp_path, monkeypatch):
    """W&B's own agent, given a run of this sweep, starts the command `finetune sweep` runs for it."""
    import wandb.wandb_agent as agent_module

    started = []

    class Recorder:
        def __init__(self, command=None, env=None, **kwargs):
            started.append(command)

    monkeypatch.setattr(agent_module, "AgentProcess", Recorder)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "unused")  # restored afterwards: the agent sets it
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "unused")
    monkeypatch.chdir(REPO)
    sweep = sweep_command.load(sweep_file(tmp_path / "s.yaml"))
    params = {"learning_rate": 1.5e-05, "lora_r": 8, "lora_target_modules": ["q_proj", "v_proj"], "bf16": False}
    agent = agent_module.Agent(api=None, queue=None, sweep_id="abc123")
    agent._sweep_command = sweep.config["command"]
    agent._command_run({"type": "run", "run_id": "r1", "program": sweep.config["program"],
                        "args": {key: {"value": value} for key, value in params.items()}})
    assert started == [sweep_command.trial_command(sweep, params)]
    assert started[0][-4:] == ["--learning_rate=1.5e-05", "--lora_r=8", "--lora_target_modules=['q_proj', 'v_proj']",
                               "--bf16=False"]


def test_the_agent_argument_form_gives_the_recipe_its_values(monkeypatch):
    """`--key=value` as `wandb agent` writes every kind of value: floats, ints, booleans, lists, strings."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    from finetune.recipe.load import read_checked

    monkeypatch.chdir(REPO)
    params = {"learning_rate": 1e-05, "lora_r": 8, "bf16": False, "lora_target_modules": ["q_proj", "v_proj"],
              "lr_scheduler_type": "linear", "warmup_steps": 0.1}
    arguments = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]
    _, _, values, _ = read_checked([TINY, *arguments])
    assert {key: values[key] for key in params} == params


def test_a_trial_writes_into_its_own_directory(monkeypatch, tmp_path):
    from finetune.recipe.load import read_checked

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "run7")  # under `wandb agent`
    assert read_checked([TINY])[2]["output_dir"] == str(Path("outputs/tiny/sweep-sw1/run7"))
    monkeypatch.setenv("FINETUNE_SWEEP_TRIAL", str(tmp_path / "trial-002"))  # under `finetune sweep`
    assert read_checked([TINY, "--output_dir", "elsewhere"])[2]["output_dir"] == str(tmp_path / "trial-002")


def test_online_the_sweep_is_created_in_wandb_and_an_agent_runs_it(tmp_path, monkeypatch, capsys):
    """With credentials and a server: wandb.sweep gets the file as written (run_cap included, which W&B's servers
    take), and `wandb agent` runs here with the count; no local sweep directory is made."""
    import wandb

    created, agents = [], []
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sweep_command, "online_reason", lambda: None)
    monkeypatch.setattr(wandb, "sweep", lambda config, project, entity: created.append((config, project, entity))
                        or "abc123xy")
    monkeypatch.setattr(sweep_command.subprocess, "call", lambda command, env: agents.append(command) or 0)
    monkeypatch.setenv("WANDB_PROJECT", "p")
    monkeypatch.setenv("WANDB_ENTITY", "team")
    path = sweep_file(tmp_path / "s.yaml")
    assert sweep_command.main([str(path), "--count", "3", "--out", str(tmp_path / "out")]) == 0
    assert created == [(yaml.safe_load(path.read_text()), "p", "team")]
    assert agents[0][1:] == ["agent", "--forward-signals", "--count", "3", "team/p/abc123xy"]
    assert "start agents with: wandb agent team/p/abc123xy" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_credentials_or_a_server_the_sweep_runs_here_saying_why(monkeypatch):
    monkeypatch.delenv("WANDB_DISABLED")
    monkeypatch.setenv("NETRC", "/nonexistent")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert "no W&B credentials" in sweep_command.online_reason()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert "can't be reached" in sweep_command.online_reason()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert sweep_command.online_reason() == "WANDB_MODE=offline"


def test_hyperband_stops_a_trial_worse_than_the_others_at_a_band(tmp_path):
    """W&B's hyperband on the recorded histories: with eta 2, a trial whose best is worse than the median of the
    trials at a band stops there; one at or better than it goes on."""
    config = yaml.safe_load(sweep_file(tmp_path / "s.yaml").read_text())
    trials = [{"name": f"trial-00{i}", "params": {"learning_rate": 1e-3, "lora_r": 4}, "state": state_file.FINISHED,
               "history": [[0, 5.0], [10, loss]], "result": loss} for i, loss in ((1, 3.0), (2, 3.5))]
    trials.append({"name": "trial-003", "params": {"learning_rate": 1e-6, "lora_r": 4}, "state": state_file.RUNNING,
                   "history": [[0, 5.0]]})
    state_file.rundir.write_json(tmp_path / state_file.STATE, {"name": "t", "config": config, "trials": trials})
    assert state_file.record(tmp_path / "trial-003", 10, 3.2) is False  # better than the median (3.2 of 3.0/3.2/3.5)
    assert state_file.record(tmp_path / "trial-003", 10, 4.9) is True  # a log step run again after a resume: replaced
    trial = state_file.read(tmp_path)["trials"][2]
    assert trial["history"] == [[0, 5.0], [10, 4.9]] and trial["state"] == state_file.STOPPED


# An offline sweep, interrupted and run again -------------------------------------------------------------------------

def wait_for(condition, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_offline_bayes_sweep_with_hyperband_interrupted_and_finished(tmp_path):
    """Four bayes trials on the tiny recipe with hyperband (eta 3, a first band at the third evaluation): Ctrl-C
    during the second trial checkpoints it (exit 75); the same command then resumes it, runs the rest, stops at
    least one trial early, and writes the table, the plot and best.yaml, which trains the best trial again to the
    same loss."""
    from tests.wandb_file import load_run, offline_runs

    path = sweep_file(tmp_path / "s.yaml", early_terminate={"type": "hyperband", "min_iter": 2, "eta": 3})
    out, wandb_dir = tmp_path / "sweep", tmp_path / "wb"

    command = [sys.executable, "-m", "finetune", "sweep", str(path), "--local", "--out", str(out)]
    env = subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_PROJECT="sweeps")
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)

    def second_trial_training():  # its evaluation at step 0 recorded; hyperband's first decision is at step 20
        trials = state_file.read(out)["trials"]
        return len(trials) == 2 and trials[1]["history"]

    wait_for(second_trial_training, 300, driver)
    os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 75, err[-3000:]
    assert "sweep stopped by SIGINT with 1 trial(s) done; trial-002 resumes from its last checkpoint, if it wrote " \
           "one; run the same command again to go on" in err
    first_summary = (out / "trial-001" / "summary.json").stat().st_mtime_ns
    assert state_file.read(out)["trials"][1]["state"] == state_file.RUNNING

    result = run_to_end(command, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "== trial-001" not in result.stderr and "== trial-002 of 4 (resuming)" in result.stderr
    assert (out / "trial-001" / "summary.json").stat().st_mtime_ns == first_summary  # not run again
    segments = json.loads((out / "trial-002" / ".finetune-run").read_text())["segments"]
    assert len(segments) == 2 and 0 < segments[1]["from_step"] < 30, segments

    trials = state_file.read(out)["trials"]
    assert [t["name"] for t in trials] == ["trial-001", "trial-002", "trial-003", "trial-004"]
    states = [t["state"] for t in trials]
    assert state_file.STOPPED in states and state_file.FINISHED in states, trials
    for trial in trials:
        summary = json.loads((out / trial["name"] / "summary.json").read_text())
        steps = [step for step, _ in trial["history"]]
        assert steps == list(range(0, steps[-1] + 1, 10)) and trial["result"] == summary["eval/loss"]
        if trial["state"] == state_file.STOPPED:
            assert summary["final/total_steps"] == trial["stopped_at_step"] < 30
            assert f"{trial['name']}: stopped early by hyperband at step {trial['stopped_at_step']}" in result.stderr
        else:
            assert summary["final/total_steps"] == 30
    # Each trial an offline W&B run in the sweep's group, its values at the top of its config (a resumed trial: two).
    runs = [load_run(d) for d in offline_runs(wandb_dir)]
    assert len(runs) == 5 and {r.run.run_group for r in runs} == {"t"}
    for trial in trials:
        configs = [r.config for r in runs if r.config["sweep_trial"] == trial["name"]]
        assert configs and all(c["learning_rate"] == trial["params"]["learning_rate"] and c["sweep"] == "t"
                                for c in configs)

    # The metric names a sweep file may use are the ones runs log: at log steps, and in the summary (CUDA's aside).
    logged = {key for r in runs for row in r.history for key in row if not key.startswith("_")}
    assert logged - {"train/global_step"} <= set(sweep_command.STEP_METRICS)
    assert set(sweep_command.STEP_METRICS) - set(sweep_command.CUDA_ONLY) <= logged
    numbers = {key for key, value in summary.items() if isinstance(value, (int, float)) and not key.startswith("run/")}
    assert numbers == set(sweep_command.SUMMARY_METRICS) - set(sweep_command.CUDA_ONLY)

    finished = [t for t in trials if t["state"] == state_file.FINISHED]
    best = min(finished, key=lambda t: t["result"])
    table = (out / "comparison" / "comparison.md").read_text()
    assert all(f"| {t['name']} |" in table for t in trials) and (out / "comparison" / "pareto.png").stat().st_size
    assert f"best: {best['name']} (eval/loss {best['result']:.4g})" in result.stderr
    rerun = run_to_end([sys.executable, "-m", "finetune", "train", str(out / "best.yaml"), "--report_to", "none"],
                       timeout=300, cwd=REPO, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again = json.loads((out / "best" / "summary.json").read_text())
    assert again["eval/loss"] == pytest.approx(best["result"], rel=1e-5)
