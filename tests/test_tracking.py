"""W&B from the environment: resolution rules, and real offline run files read back after real runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.errors import UsageError
from finetune.recipe.keys import looks_secret
from finetune.tracking import wandb_run as tracking
from finetune.training import rundir
from tests.conftest import REPO, accelerate_launch, load, recipe_argv, run_to_end, subprocess_env
from tests.wandb_file import load_run, offline_runs

QLORA = REPO / "recipes/qlora_int4.yaml"
SECRET = "planted-secret-value-7f3a9c"


@pytest.fixture
def qlora_recipe(llama_dir, data_files, tmp_path):
    def build(*extra: str):
        return load(recipe_argv(QLORA, model_name_or_path=llama_dir, dataset=data_files["text"],
                                output_dir=tmp_path / "out") + list(extra))
    return build


def env(**values) -> dict[str, str]:
    """A bare environment: nothing W&B-related but what the test sets; no saved login (NETRC points nowhere)."""
    return {"NETRC": "/nonexistent/netrc", **values}


# Resolution rules: pure, no run is made.

def test_tags_are_split_trimmed_deduplicated_and_get_variant_tags(qlora_recipe):
    plan = tracking.resolve(qlora_recipe(), env(WANDB_TAGS="a, b,,b , a"))
    assert plan.init["tags"] == ["a", "b", "int4", "lora", "qlora"]
    assert tracking.split_tags(" a, b,,b") == ["a", "b"]


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "On"])
def test_wandb_disabled_truthy_turns_tracking_off(value, qlora_recipe):
    plan = tracking.resolve(qlora_recipe(), env(WANDB_DISABLED=value, WANDB_MODE="online"))
    assert plan.report_to == [] and not plan.uses_wandb and plan.init == {}


@pytest.mark.parametrize("value", ["false", "0", "no", "off", ""])
def test_wandb_disabled_falsy_keeps_tracking_on(value, qlora_recipe):
    assert tracking.resolve(qlora_recipe(), env(WANDB_DISABLED=value)).report_to == ["wandb"]


def test_bad_values_are_refused_together_naming_the_variable(qlora_recipe):
    with pytest.raises(UsageError) as error:
        tracking.resolve(qlora_recipe(), env(WANDB_MODE="cloud", WANDB_RESUME="sometimes", WANDB_LOG_MODEL="all",
                                             WANDB_INIT_TIMEOUT="-3", WANDB_DISABLED="maybe"))
    text = "\n".join(error.value.problems)
    assert "WANDB_MODE='cloud' is not a W&B mode; use one of online, offline, disabled" in text
    for name in ("WANDB_RESUME", "WANDB_LOG_MODEL", "WANDB_INIT_TIMEOUT", "WANDB_DISABLED"):
        assert name in text
    assert len(error.value.problems) == 5


# What wandb.init itself would refuse, refused by tracking.check (pure, before torch loads) in one line each.

CHECKED = {"wandb_project": "finetune", "report_to": "wandb"}  # read_checked's values, no W&B key set
PROJECT_RULE = "(a W&B project name can't hold / \\ # ? % :)"
SHORT_200 = "'tttttttttttttttttttt...tttttttttttttttttttt'"  # 200 t's as the line shows them

REFUSED = {  # name: (environment, recipe values, the line the user sees)
    "team/project in WANDB_PROJECT": (
        {"WANDB_PROJECT": "team/proj"}, {},
        f"WANDB_PROJECT: 'team/proj' contains '/' {PROJECT_RULE}; for a team's project set WANDB_ENTITY=team "
        "WANDB_PROJECT=proj"),
    "team/project in the recipe": (
        {}, {"wandb_project": "team/proj"},
        f"wandb_project: 'team/proj' contains '/' {PROJECT_RULE}; for a team's project set wandb_entity: team and "
        "wandb_project: proj"),
    "other reserved characters": ({"WANDB_PROJECT": "a:b?"}, {},
                                  f"WANDB_PROJECT: 'a:b?' contains ':', '?' {PROJECT_RULE}; leave them out"),
    "project over 128 characters": ({"WANDB_PROJECT": "p" * 129}, {},
                                    f"WANDB_PROJECT: '{'p' * 20}...{'p' * 20}' is 129 characters; a W&B project name "
                                    "has at most 128"),
    "tag over 64 characters in WANDB_TAGS": ({"WANDB_TAGS": "ok," + "t" * 200}, {},
                                             f"WANDB_TAGS: tag {SHORT_200} is 200 characters; a W&B tag has at most "
                                             "64"),
    "tag over 64 characters in the recipe": ({}, {"wandb_tags": ["ok", "t" * 200]},
                                             f"wandb_tags: tag {SHORT_200} is 200 characters; a W&B tag has at most "
                                             "64"),
    "run id with reserved characters": ({"WANDB_RUN_ID": "team/run:1"}, {},
                                        "WANDB_RUN_ID: 'team/run:1' contains '/', ':' (a W&B run id can't hold : ; , "
                                        "# ? / '); leave them out"),
    "run id with a space around it": ({"WANDB_RUN_ID": "abc "}, {},
                                      "WANDB_RUN_ID: 'abc ' starts or ends with whitespace, which a W&B run id can't; "
                                      "remove it"),
    "infinite init timeout": ({"WANDB_INIT_TIMEOUT": "inf"}, {},
                              "WANDB_INIT_TIMEOUT='inf': give a positive number of seconds"),
    "API key with a newline": ({"WANDB_API_KEY": "k" * 40 + "\n"}, {},
                               "WANDB_API_KEY starts or ends with whitespace (a newline read with it?), which W&B "
                               "refuses; export it without"),
    "a W&B setting the toolkit leaves to wandb": ({"WANDB_CONSOLE": "nope"}, {},
                                                  "WANDB_CONSOLE='nope': W&B refuses it (Input should be 'auto', "
                                                  "'off', 'wrap', 'redirect', 'wrap_raw' or 'wrap_emu'); correct or "
                                                  "unset it"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_values_wandb_would_refuse_are_one_line_each(case):
    environment, values, expected = REFUSED[case]
    with pytest.raises(UsageError) as error:
        tracking.check({**CHECKED, **values}, env(**environment))
    assert error.value.problems == [expected]


def test_every_value_wandb_would_refuse_is_reported_at_once(qlora_recipe):
    with pytest.raises(UsageError) as error:
        tracking.check({**CHECKED, "wandb_tags": ["t" * 65]}, env(WANDB_PROJECT="team/proj", WANDB_MODE="cloud"))
    assert [problem.split(":")[0].split("=")[0] for problem in error.value.problems] == \
        ["WANDB_MODE", "WANDB_PROJECT", "wandb_tags"]
    # resolve() checks the same way: the recipe's keys, with the environment's.
    with pytest.raises(UsageError) as error:
        tracking.resolve(qlora_recipe("--wandb_tags", "t" * 65), env())
    assert error.value.problems == [f"wandb_tags: tag '{'t' * 20}...{'t' * 20}' is 65 characters; a W&B tag has at "
                                    "most 64"]


def test_values_for_wandb_are_not_checked_when_nothing_goes_to_wandb():
    bad = {"WANDB_PROJECT": "team/proj", "WANDB_TAGS": "t" * 65, "WANDB_RUN_ID": "a/b"}
    assert tracking.check(CHECKED, env(WANDB_DISABLED="true", **bad))["disabled"] == "WANDB_DISABLED=true"
    assert tracking.check(CHECKED, env(WANDB_MODE="disabled", **bad))["disabled"] == "WANDB_MODE=disabled"
    tracking.check({**CHECKED, "report_to": "none", "wandb_project": "team/proj"}, env(**bad))
    tracking.check({**CHECKED, "report_to": ["tensorboard"]}, env(**bad))


WANDB_VARIABLES = {"project": "WANDB_PROJECT", "run_id": "WANDB_RUN_ID", "run_tags": "WANDB_TAGS",
                   "api_key": "WANDB_API_KEY"}


@pytest.mark.parametrize("setting, value", [
    ("project", "p" * 128), ("project", "p" * 129), ("project", "a b-c.d_e"),
    *[("project", f"a{character}b") for character in "/\\#?%:"],
    ("run_id", "a\\b%c"), ("run_id", " a"), ("run_id", "a\t"),
    *[("run_id", f"a{character}b") for character in ":;,#?/'"],
    ("run_tags", "t" * 64), ("run_tags", "t" * 65), ("api_key", "k" * 40), ("api_key", " " + "k" * 40),
])
def test_the_limits_are_wandbs_own(setting, value):
    """tracking.check refuses exactly what wandb's own Settings refuse, boundaries included."""
    import wandb
    from wandb.sdk.wandb_settings import Settings

    try:
        Settings(**{setting: (value,) if setting == "run_tags" else value})
        wandb_refuses = False
    except (ValueError, wandb.Error):
        wandb_refuses = True
    try:
        tracking.check(CHECKED, env(**{WANDB_VARIABLES[setting]: value}))
        toolkit_refuses = False
    except UsageError:
        toolkit_refuses = True
    assert toolkit_refuses == wandb_refuses


def test_recipe_tags_are_trimmed_and_empties_dropped_like_the_environments(qlora_recipe):
    plan = tracking.resolve(qlora_recipe("--wandb_tags", " r1 ", "", "r1"), env(WANDB_TAGS="e1, ,r1"))
    assert plan.init["tags"] == ["e1", "int4", "lora", "qlora", "r1"]


def test_raw_values_the_toolkit_resolves_reach_wandb_resolved(tmp_path, monkeypatch):
    """wandb reads the WANDB_* variables itself, as written: ' Allow', an empty run id, 'a,,b' and 'Offline' are
    values the toolkit takes, and wandb is given what the toolkit made of them."""
    import wandb

    raw = {"WANDB_RESUME": " Allow", "WANDB_RUN_ID": "", "WANDB_TAGS": "a,,b", "WANDB_MODE": "Offline",
           "WANDB_DIR": str(tmp_path), "WANDB_DISABLED": "false", "WANDB_SILENT": "true"}
    before = {key: value for key, value in os.environ.items() if key.startswith("WANDB_")}
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent/netrc")
    try:
        os.environ.update(raw)
        plan = tracking.resolve_job("evaluation", "n")
        run = tracking.start(plan, {})
        assert (run.settings.mode, run.tags, run.settings.resume) == ("offline", ("a", "b"), None)
        run.finish()
    finally:
        wandb.teardown()
        for key in [key for key in os.environ if key.startswith("WANDB_")]:
            del os.environ[key]
        os.environ.update(before)


def test_mode_follows_credentials(qlora_recipe, tmp_path):
    recipe = qlora_recipe()
    offline = tracking.resolve(recipe, env())
    assert offline.init["mode"] == "offline" and "no W&B credentials" in offline.offline_reason
    assert tracking.resolve(recipe, env(WANDB_API_KEY="k" * 40)).init["mode"] == "online"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert tracking.resolve(recipe, env(NETRC=str(netrc))).init["mode"] == "online"
    # Asked for online without credentials: offline rather than a login prompt.
    assert tracking.resolve(recipe, env(WANDB_MODE="online")).init["mode"] == "offline"
    assert tracking.resolve(recipe, env(WANDB_MODE="dryrun")).init["mode"] == "offline"
    assert tracking.resolve(recipe, env(WANDB_MODE="disabled")).report_to == []


def test_generated_name_and_explicit_names(qlora_recipe, llama_dir):
    plan = tracking.resolve(qlora_recipe("--lora_r", "8", "--learning_rate", "2e-4"), env(), now=0)
    stamp = time.strftime("%m%d-%H%M", time.localtime(0))
    assert plan.init["name"] == f"{llama_dir.name}-qlora-int4-r8-lr2e-04-{stamp}"
    assert tracking.resolve(qlora_recipe("--run_name", "mine"), env()).init["name"] == "mine"
    assert tracking.resolve(qlora_recipe("--run_name", "mine"), env(WANDB_NAME="exact name")).init["name"] == \
        "exact name"


def test_run_names_tell_local_models_apart(tmp_path):
    def model_dir(*parts: str, recorded: str | None = None) -> str:
        path = tmp_path.joinpath(*parts)
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps({"_name_or_path": recorded} if recorded else {}))
        return str(path)

    assert tracking.model_label("Qwen/Qwen2.5-0.5B-Instruct") == "qwen2.5-0.5b-instruct"
    assert tracking.model_label(model_dir("Llama-3.2-1B")) == "llama-3.2-1b"
    assert tracking.model_label(model_dir("tiny", "model")) == "tiny-model"
    assert tracking.model_label(model_dir("run7", "checkpoint-400")) == "run7-checkpoint-400"
    assert tracking.model_label(model_dir("snapshots", "a" * 40, recorded="Qwen/Qwen2.5-0.5B")) == "qwen2.5-0.5b"
    assert tracking.model_label(model_dir("y", "model", recorded="/old/machine/path")) == "y-model"


def test_pass_through_variables(qlora_recipe):
    plan = tracking.resolve(qlora_recipe(), env(WANDB_PROJECT="p", WANDB_ENTITY="team", WANDB_RUN_GROUP="g",
                                                WANDB_NOTES="n", WANDB_JOB_TYPE="sweep", WANDB_DIR="/tmp/x",
                                                WANDB_RUN_ID="abc123", WANDB_RESUME="must"))
    assert {k: plan.init[k] for k in ("project", "entity", "group", "notes", "job_type", "dir", "id", "resume")} == \
        {"project": "p", "entity": "team", "group": "g", "notes": "n", "job_type": "sweep", "dir": "/tmp/x",
         "id": "abc123", "resume": "must"}
    defaults = tracking.resolve(qlora_recipe("--wandb_project", "from-recipe", "--wandb_tags", "r1"), env())
    assert defaults.init["project"] == "from-recipe" and defaults.init["job_type"] == "training"
    assert "r1" in defaults.init["tags"]
    assert tracking.resolve(qlora_recipe("--wandb_project", "from-recipe"), env(WANDB_PROJECT="env")).init[
        "project"] == "env"


def test_resume_continues_the_saved_online_run_but_not_an_offline_one(qlora_recipe, tmp_path):
    recipe = qlora_recipe()
    out = Path(recipe.training.output_dir)
    out.mkdir(parents=True)
    (out / rundir.WANDB_RUN).write_text(json.dumps({"id": "run42", "mode": "online"}))
    online = tracking.resolve(recipe, env(WANDB_API_KEY="k" * 40, WANDB_NAME="n"), resuming=True)
    assert (online.init["id"], online.init["resume"], online.init["name"]) == ("run42", "allow", "n")
    fresh = tracking.resolve(recipe, env(WANDB_API_KEY="k" * 40), resuming=False)
    assert "id" not in fresh.init
    offline = tracking.resolve(recipe, env(WANDB_NAME="n"), resuming=True)
    assert "id" not in offline.init and offline.init["name"] == "n-resumed" and "resumed" in offline.init["tags"]


def test_run_config_has_variant_fields_recipe_and_no_secrets(qlora_recipe):
    config = tracking.run_config(qlora_recipe())
    assert config["model_variant"] == "qlora-int4" and config["quantization"] == "int4"
    assert config["lora_r"] == 16 and config["recipe"]["lora_r"] == 16
    assert config["finetune_version"]
    assert not [key for key in config["recipe"] if looks_secret(key)]


# Real runs, read back from the offline run file.

def run_cli(tmp_path: Path, model_dir: Path, dataset: Path, environment: dict, *extra: str, timeout: int = 300,
            python_flags: tuple[str, ...] = ()):
    """Run the documented launch line in a clean environment (`python_flags` for the interpreter); returns
    (result, seconds)."""
    base = subprocess_env(HOME=str(tmp_path / "home"), WANDB_DIR=str(tmp_path / "wb"),
                          HF_HOME=str(Path.home() / ".cache/huggingface"), **environment)
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "wb").mkdir(exist_ok=True)
    keys = {"model_name_or_path": model_dir, "dataset": dataset, "max_steps": 3, "output_dir": tmp_path / "out",
            "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "logging_steps": 1,
            "disable_tqdm": "true"}
    for name, value in zip(extra[::2], extra[1::2], strict=True):
        keys[name.removeprefix("--")] = value
    args = recipe_argv(QLORA, **keys)
    started = time.monotonic()
    result = subprocess.run([sys.executable, *python_flags, str(REPO / "finetune/run.py"), *args], capture_output=True,
                            text=True, cwd=tmp_path, env=base, timeout=timeout)
    return result, time.monotonic() - started


def files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_offline_run_records_exactly_what_the_environment_says(tmp_path, llama_dir, data_files):
    result, _ = run_cli(tmp_path, llama_dir, data_files["messages"], {
        "WANDB_MODE": "offline", "WANDB_PROJECT": "p", "WANDB_NAME": "n", "WANDB_TAGS": "qlora, int4,x",
        "WANDB_NOTES": "notes with, commas", "WANDB_RUN_GROUP": "grp", "WANDB_JOB_TYPE": "train-sweep",
        "WANDB_LOG_MODEL": "end", "MY_SERVICE_TOKEN": SECRET, "HF_TOKEN": SECRET + "-hf",
    })
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = offline_runs(tmp_path / "wb")
    run = load_run(run_dir)
    assert (run.run.project, run.run.display_name, run.run.notes, run.run.run_group, run.run.job_type) == \
        ("p", "n", "notes with, commas", "grp", "train-sweep")
    assert run.tags == ["int4", "lora", "qlora", "x"]
    assert run.config["model_variant"] == "qlora-int4" and run.config["quantization"] == "int4"
    assert run.config["recipe"]["max_steps"] == 3 and run.config["recipe"]["lora_r"] == 16
    assert run.config["recipe"]["model_name_or_path"] == str(llama_dir)
    assert any("train/loss" in row for row in run.history)
    assert f"wandb sync {run_dir}" in result.stderr
    saved = json.loads((tmp_path / "out" / rundir.WANDB_RUN).read_text())
    assert saved["id"] == run.run.run_id and saved["mode"] == "offline"
    # WANDB_LOG_MODEL=end: one model artifact with the adapter, no optimizer state.
    (artifact,) = run.artifacts
    paths = {entry.path for entry in artifact.manifest.contents}
    assert {"adapter_model.safetensors", "adapter_config.json", "recipe.yaml"} <= paths
    assert not any(p.startswith(("optimizer", "scheduler", "rng_state")) for p in paths)
    # Secrets from the environment are in no file the run wrote.
    assert files_containing(tmp_path / "wb", SECRET) == []
    assert files_containing(tmp_path / "out", SECRET) == []


def test_wandb_disabled_writes_nothing(tmp_path, llama_dir, data_files):
    result, _ = run_cli(tmp_path, llama_dir, data_files["text"], {"WANDB_DISABLED": "true", "WANDB_MODE": "online"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tracking is off (WANDB_DISABLED=true)" in result.stderr
    assert not list((tmp_path / "wb").iterdir())
    assert not list(tmp_path.rglob("wandb")) and not (tmp_path / "out" / rundir.WANDB_RUN).exists()
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_bad_mode_exits_2_before_training(tmp_path, llama_dir, data_files):
    result, _ = run_cli(tmp_path, llama_dir, data_files["text"], {"WANDB_MODE": "cloud"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: WANDB_MODE='cloud' is not a W&B mode" in result.stderr
    assert not (tmp_path / "out").exists() and not list((tmp_path / "wb").iterdir())


def test_values_wandb_would_refuse_stop_the_run_before_torch_loads(tmp_path, llama_dir, data_files):
    from finetune.recipe import keys as config

    config.trainer_keys()  # the key cache, warm: a cold one imports transformers once to fill it
    environment = {"WANDB_MODE": "offline", "WANDB_PROJECT": "team/proj", "FINETUNE_CACHE": str(config.cache_dir())}
    result, _ = run_cli(tmp_path, llama_dir, data_files["text"], environment, "--wandb_tags", "t" * 200,
                        python_flags=("-X", "importtime"))
    imports = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    said = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert said == [f"error: WANDB_PROJECT: 'team/proj' contains '/' {PROJECT_RULE}; for a team's project set "
                    "WANDB_ENTITY=team WANDB_PROJECT=proj",
                    f"error: wandb_tags: tag {SHORT_200} is 200 characters; a W&B tag has at most 64"]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in imports}
    assert "finetune" in imported and not imported & {"torch", "transformers", "wandb"}
    assert not (tmp_path / "out").exists() and not list((tmp_path / "wb").iterdir())


def test_secret_on_the_command_line_is_refused_and_written_nowhere(tmp_path, llama_dir, data_files):
    result, _ = run_cli(tmp_path, llama_dir, data_files["text"], {"WANDB_MODE": "offline"}, "--hub_token", SECRET)
    assert result.returncode == 2
    assert "--hub_token: secrets don't belong on the command line" in result.stderr
    assert SECRET not in result.stderr
    assert files_containing(tmp_path, SECRET) == []


def test_no_credentials_gives_an_offline_run(tmp_path, llama_dir, data_files):
    result, seconds = run_cli(tmp_path, llama_dir, data_files["text"], {}, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no W&B credentials" in result.stderr and "wandb sync" in result.stderr
    (run_dir,) = offline_runs(tmp_path / "wb")
    assert any("train/loss" in row for row in load_run(run_dir).history)


def test_unreachable_server_falls_back_to_offline(tmp_path, llama_dir, data_files):
    with socket.socket() as probe:  # a local port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fake_key = "0123456789abcdef" * 2 + "01234567"
    result, seconds = run_cli(tmp_path, llama_dir, data_files["text"], {
        "WANDB_MODE": "online", "WANDB_BASE_URL": f"http://127.0.0.1:{port}", "WANDB_API_KEY": fake_key,
        "WANDB_INIT_TIMEOUT": "5",
    }, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logging offline instead, nothing is lost" in result.stderr
    (run_dir,) = offline_runs(tmp_path / "wb")
    run = load_run(run_dir)
    assert any("train/loss" in row for row in run.history)
    assert run.summary["train/global_step"] == 3
    assert files_containing(tmp_path / "wb", fake_key) == []


def test_resumed_offline_training_is_a_new_run_told_apart(tmp_path, llama_dir, data_files):
    first, _ = run_cli(tmp_path, llama_dir, data_files["text"],
                       {"WANDB_MODE": "offline", "WANDB_NAME": "n", "WANDB_LOG_MODEL": "checkpoint"},
                       "--save_steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoint-3" / "optimizer.pt").is_file()
    (first_run,) = [load_run(d) for d in offline_runs(tmp_path / "wb")]
    # WANDB_LOG_MODEL=checkpoint: the checkpoint's model files and the final adapter, never optimizer state.
    aliases = sorted(alias for a in first_run.artifacts for alias in a.aliases if alias != "latest")
    assert aliases == ["final", "step-3"]
    for artifact in first_run.artifacts:
        paths = {entry.path for entry in artifact.manifest.contents}
        assert "adapter_model.safetensors" in paths
        assert not any(p.startswith(("optimizer", "scheduler", "rng_state", "training_args")) for p in paths)
    (tmp_path / "out" / "summary.json").unlink()  # as if it had stopped after its checkpoint
    second, _ = run_cli(tmp_path, llama_dir, data_files["text"], {"WANDB_MODE": "offline", "WANDB_NAME": "n"},
                        "--max_steps", "5", "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-3"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "W&B can't resume an offline run" in second.stderr
    runs = [load_run(d) for d in offline_runs(tmp_path / "wb")]
    assert sorted(r.run.display_name for r in runs) == ["n", "n-resumed"]
    resumed = next(r for r in runs if r.run.display_name == "n-resumed")
    assert "resumed" in resumed.tags
    steps = [row["train/global_step"] for row in resumed.history if "train/loss" in row]
    assert steps and min(steps) > 3  # logging keys off the global step, continuing after the checkpoint


@pytest.mark.slow
def test_two_processes_make_one_run(tmp_path, llama_dir, data_files):
    """Real 2-process DDP on CPU (gloo): exactly one W&B run."""
    base = subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wb"), WANDB_NAME="ddp")
    (tmp_path / "wb").mkdir()
    args = recipe_argv(QLORA, model_name_or_path=llama_dir, dataset=data_files["text"], max_steps=2,
                       output_dir=tmp_path / "out", use_cpu="true", per_device_train_batch_size=2,
                       disable_tqdm="true")
    result = run_to_end(accelerate_launch(*args, processes=2), cwd=tmp_path, env=base, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = offline_runs(tmp_path / "wb")
    run = load_run(run_dir)
    assert run.run.display_name == "ddp"
    assert run.summary["train/global_step"] == 2
    assert "trained 2 steps on 2 processes" in result.stderr


@pytest.mark.slow
def test_launch_wrapper_passes_the_environment_and_sets_defaults(tmp_path, llama_dir, data_files):
    base = subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_PROJECT="x", WANDB_TAGS="a,b",
                          PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(
        [str(REPO / "launch/train.sh"), str(QLORA), "--model_name_or_path", str(llama_dir), "--dataset",
         str(data_files["text"]), "--max_steps", "2", "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true",
         "--num_train_epochs", "1"],
        capture_output=True, text=True, cwd=tmp_path, env=base, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = offline_runs(tmp_path)
    run = load_run(run_dir)
    assert run.run.project == "x" and {"a", "b", "qlora"} <= set(run.tags)
    assert run.run.job_type == "training"
