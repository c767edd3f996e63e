"""Tracking: resolve W&B settings from the environment (and recipe defaults), then start exactly one run.

`check()` is pure and cheap: it reads the WANDB_* variables and the recipe's W&B keys, and refuses every bad value,
and every value wandb itself would refuse, at once (run.main calls it before torch loads: exit 2, nothing written).
`resolve()` checks the same way and returns the fully resolved `wandb.init` arguments. `start()` runs on the main
process only, creates the run with a bounded init timeout, and falls back to offline logging when the server can't be
reached.
The Trainer's own `WandbCallback` then finds `wandb.run` and logs into it.

| variable | default | effect |
|---|---|---|
| WANDB_DISABLED | unset | truthy (true/1/yes/on): no run, nothing written |
| WANDB_MODE | online with credentials, else offline | online, offline, disabled (also wandb's dryrun, run, shared) |
| WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_NOTES | recipe's wandb_* keys | passed through |
| WANDB_NAME | generated from the recipe | used exactly, even over the recipe's run_name |
| WANDB_TAGS | none | comma-separated; trimmed, empties dropped, de-duplicated, variant tags added |
| WANDB_JOB_TYPE | training | passed through |
| WANDB_DIR, WANDB_RUN_ID, WANDB_RESUME | wandb's | passed through |
| WANDB_INIT_TIMEOUT | 20 | seconds to reach the server before falling back to offline |
| WANDB_LOG_MODEL | false | end: log the adapter at the end; checkpoint: also each checkpoint (never optimizer state) |

W&B's own limits (wandb 0.31, `wandb/sdk/wandb_settings.py`): a project name of at most 128 characters without
/ \\ # ? % :, a run id without : ; , # ? / ' or surrounding whitespace, tags of 1 to 64 characters, an API key
without surrounding whitespace. Other WANDB_* variables are checked by wandb's own `Settings`.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from finetune.errors import UsageError
from finetune.recipe.keys import TOOLKIT_DEFAULTS, Recipe, looks_secret
from finetune.training import rundir

logger = logging.getLogger(__name__)

TRUTHY = {"1", "true", "yes", "on"}
FALSY = {"", "0", "false", "no", "off"}
# wandb's own aliases: dryrun is offline, run is online; shared is online with several writers.
WANDB_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline",
               "run": "online", "shared": "shared"}
RESUME_VALUES = ("allow", "must", "never", "auto")
LOG_MODEL_VALUES = {"false": "false", "": "false", "end": "end", "true": "end", "checkpoint": "checkpoint"}
WATCH_VALUES = ("false", "gradients", "parameters", "all")
DEFAULT_INIT_TIMEOUT = 20.0
# What wandb.init refuses (wandb/sdk/wandb_settings.py, Settings' validators): refused here before the model loads.
PROJECT_MAX_CHARS = 128  # validate_project
PROJECT_RESERVED = "/\\#?%:"  # validate_project
RUN_ID_RESERVED = ":;,#?/'"  # validate_run_id; nor whitespace at either end
TAG_MAX_CHARS = 64  # validate_run_tags: 1 to 64 characters (empty tags are dropped here)
# The variables this module reads and resolves itself; wandb's Settings check any other WANDB_* variable.
OWN_VARIABLES = {"WANDB_DISABLED", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_NOTES",
                 "WANDB_NAME", "WANDB_TAGS", "WANDB_JOB_TYPE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME",
                 "WANDB_INIT_TIMEOUT", "WANDB_LOG_MODEL", "WANDB_WATCH", "WANDB_API_KEY"}
# wandb also reads these itself, as written, when it sets up, and refuses some values the toolkit takes (' Allow',
# an empty WANDB_RUN_ID, 'a,,b', 'Offline'): they are set to the resolved `wandb.init` values first (`export`).
RESOLVED_VARIABLES = {"WANDB_PROJECT": "project", "WANDB_MODE": "mode", "WANDB_TAGS": "tags", "WANDB_RUN_ID": "id",
                      "WANDB_RESUME": "resume"}


def is_truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in TRUTHY


@dataclass
class Tracking:
    """Resolved tracking: what the Trainer reports to and the exact `wandb.init` arguments."""

    report_to: list[str]
    init: dict[str, Any] = field(default_factory=dict)  # wandb.init keyword arguments, config excluded
    offline_reason: str | None = None  # why the run logs offline when the user didn't ask for it
    init_timeout: float = DEFAULT_INIT_TIMEOUT
    log_model: str = "false"

    @property
    def uses_wandb(self) -> bool:
        return "wandb" in self.report_to or "all" in self.report_to


def has_credentials(env: Mapping[str, str]) -> bool:
    """An API key in the environment, or a saved `wandb login` (netrc entry for the W&B host)."""
    if env.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    netrc_path = Path(env.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        return host in netrc.netrc(str(netrc_path)).hosts
    except (OSError, netrc.NetrcParseError):
        return False


def online_problem(env: Mapping[str, str] = os.environ, timeout: float = 5.0) -> str | None:
    """Why W&B's server can't be used from here (no credentials, or not reachable within `timeout` seconds), with
    what to do; None when it can. Checked before syncing or reading a project, which would otherwise print a login
    prompt or wait on retries for minutes."""
    import urllib.error
    import urllib.request

    base = env.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    host = urlparse(base).hostname
    if not has_credentials(env):
        return f"no W&B credentials for {host}: run `wandb login` (or set WANDB_API_KEY) first"
    try:
        urllib.request.urlopen(base.rstrip("/") + "/healthz", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # the server answered
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return f"W&B's server {host} can't be reached from here ({reason}); do this on a machine with internet access"
    return None


def split_tags(text: str | None) -> list[str]:
    """'a, b,,b' -> ['a', 'b']: split on commas, trimmed, empties dropped, first occurrence kept."""
    return clean_tags((text or "").split(","))


def clean_tags(tags: Iterable[Any] | None) -> list[str]:
    """[' a', '', 'a'] -> ['a']: trimmed, empties dropped, first occurrence kept."""
    return list(dict.fromkeys(str(tag).strip() for tag in tags or [] if str(tag).strip()))


def model_variant(recipe: Recipe) -> str:
    """A short variant name: qlora-int4, lora-int8, lora-bf16, full-fp32, ... (`dtype: auto` as this machine
    resolves it)."""
    from finetune.model.load import dtype_choice

    return variant_name(recipe.model.quantization, dtype_choice(recipe.model.dtype)[0], recipe.model.use_lora)


def variant_name(quantization: str, dtype: str, use_lora: bool) -> str:
    if quantization == "int4":
        return "qlora-int4"
    if quantization == "int8":
        return "lora-int8"
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "auto": "auto"}[dtype]
    return f"{'lora' if use_lora else 'full'}-{short}"


def variant_tags(recipe: Recipe) -> list[str]:
    kind, precision = model_variant(recipe).split("-", 1)
    objective = [recipe.objective.objective] if recipe.objective.preference else []
    return objective + ([kind, precision] if kind != "qlora" else ["qlora", "lora", precision])


def variant_fields(recipe: Recipe) -> dict[str, Any]:
    """The fields runs are grouped and filtered by (with a GGUF base: its file, architecture and quantization)."""
    from finetune.model import gguf as gguf_import
    from finetune.model.load import dtype_choice

    model = recipe.model
    return {
        "model_variant": model_variant(recipe),
        "model_name_or_path": model.model_name_or_path,
        **gguf_import.info(model.model_name_or_path),
        "quantization": model.quantization,
        "dtype": model.dtype,
        "compute_dtype": dtype_choice(model.dtype)[0],
        "use_lora": model.use_lora,
        "lora_r": model.lora_r if model.use_lora else None,
        "lora_alpha": model.lora_alpha if model.use_lora else None,
        "dataset": recipe.data.dataset,
        "learning_rate": recipe.training.learning_rate,
        "objective": recipe.objective.objective,
        "init_from": recipe.objective.init_from,
    }


GENERIC_DIRECTORY_NAMES = {"model", "models", "base", "merged", "final", "hf", "weights", "output", "outputs"}


def model_label(name_or_path: str) -> str:
    """The model's short name for run names: a hub id's last part; for a local directory, the hub id its
    config.json records (`_name_or_path`), else its own name, with its parent's when the name says nothing
    (`assets/tiny/model` -> tiny-model, `runs/x/checkpoint-400` -> x-checkpoint-400, a hub cache snapshot's hash)."""
    import json
    import re

    path = Path(name_or_path.rstrip("/")).expanduser()
    if not path.is_dir():
        return (path.stem if path.suffix.lower() == ".gguf" else path.name).lower()
    try:
        recorded = str(json.loads((path / "config.json").read_text()).get("_name_or_path") or "")
    except (OSError, ValueError, AttributeError):
        recorded = ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", recorded) and not Path(recorded).exists():  # a hub id, not a path
        return recorded.split("/")[-1].lower()
    name = path.name
    if name.lower() in GENERIC_DIRECTORY_NAMES or name.startswith("checkpoint-") or re.fullmatch(r"[0-9a-f]{40}",
                                                                                               name):
        name = f"{path.parent.name}-{name}"
    return name.lower()


def generated_name(recipe: Recipe, now: float | None = None) -> str:
    """model-variant-rank-lr-time, e.g. qwen2.5-0.5b-instruct-qlora-int4-r16-lr2e-04-1123-1905."""
    parts = [model_label(recipe.model.model_name_or_path), *([recipe.objective.objective] if
                                                              recipe.objective.preference else []),
             model_variant(recipe)]
    if recipe.model.use_lora:
        parts.append(f"r{recipe.model.lora_r}")
    parts.append(f"lr{recipe.training.learning_rate:.0e}")
    parts.append(time.strftime("%m%d-%H%M", time.localtime(now)))
    return "-".join(parts)


def git_commit() -> str | None:
    """The toolkit's git commit (with -dirty for local changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def environment(env: Mapping[str, str] = os.environ) -> tuple[dict[str, Any], list[str]]:
    """The WANDB_* settings every job shares: disabled (and why), mode, resume, log_model, init_timeout,
    offline_reason, warning (for the job to log); and what is wrong with them, one line each, naming the variable
    and its allowed values (the settings mean something only without problems). Reads nothing else."""
    problems: list[str] = []
    disabled_value = env.get("WANDB_DISABLED", "")
    if disabled_value.strip().lower() not in TRUTHY | FALSY:
        problems.append(f"WANDB_DISABLED={disabled_value!r}: use true/1/yes/on to turn tracking off, "
                        "false/0/no/off or unset to keep it on")
    raw_mode = env.get("WANDB_MODE", "").strip()
    mode = WANDB_MODES.get(raw_mode.lower()) if raw_mode else None
    if raw_mode and mode is None:
        problems.append(f"WANDB_MODE={raw_mode!r} is not a W&B mode; use one of online, offline, disabled "
                        "(or unset it: offline without credentials, online with them)")
    resume = env.get("WANDB_RESUME", "").strip().lower() or None
    if resume and resume not in RESUME_VALUES:
        problems.append(f"WANDB_RESUME={resume!r}: use one of {', '.join(RESUME_VALUES)}")
    log_model = env.get("WANDB_LOG_MODEL", "false").strip().lower()
    if log_model not in LOG_MODEL_VALUES:
        problems.append(f"WANDB_LOG_MODEL={log_model!r}: use one of false, end, checkpoint")
    watch = env.get("WANDB_WATCH", "false").strip().lower() or "false"
    if watch not in WATCH_VALUES:
        problems.append(f"WANDB_WATCH={watch!r}: use one of {', '.join(WATCH_VALUES)}")
    timeout_text = env.get("WANDB_INIT_TIMEOUT", "").strip()
    init_timeout = DEFAULT_INIT_TIMEOUT
    if timeout_text:
        try:
            init_timeout = float(timeout_text)
            if not 0 < init_timeout < math.inf:  # nan and inf too: wandb refuses a timeout that isn't finite
                raise ValueError
        except ValueError:
            problems.append(f"WANDB_INIT_TIMEOUT={timeout_text!r}: give a positive number of seconds")
    disabled = None
    if is_truthy(disabled_value) or mode == "disabled":
        disabled = f"WANDB_DISABLED={disabled_value}" if is_truthy(disabled_value) else "WANDB_MODE=disabled"
    offline_reason = warning = None
    if disabled is None and mode is None:
        if has_credentials(env):
            mode = "online"
        else:
            mode, offline_reason = "offline", "no W&B credentials (WANDB_API_KEY or `wandb login`)"
    elif mode in ("online", "shared") and not has_credentials(env):
        mode, offline_reason = "offline", f"WANDB_MODE={raw_mode} without credentials"
        warning = (f"WANDB_MODE={raw_mode} but no W&B credentials: logging offline instead of waiting at a login "
                   "prompt; run `wandb login` or set WANDB_API_KEY")
    return {"disabled": disabled, "mode": mode, "resume": resume, "log_model": LOG_MODEL_VALUES.get(log_model),
            "init_timeout": init_timeout, "offline_reason": offline_reason, "warning": warning}, problems


def check(keys: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Check tracking before anything heavy loads: the WANDB_* variables of `env` and, when the run reports to W&B,
    every value wandb.init would refuse, from `env` or the recipe's checked `keys` (read_checked's values:
    wandb_project, wandb_tags, report_to; absent keys take their defaults). Returns environment()'s settings.

    Raises UsageError with every problem, one line each with its fix. Imports nothing heavy (wandb only to check a
    WANDB_* variable this module doesn't resolve, such as WANDB_BASE_URL).
    """
    settings, problems = environment(env)
    report_to = keys.get("report_to", TOOLKIT_DEFAULTS["report_to"])
    wanted = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if settings["disabled"] is None and {"wandb", "all"} & set(wanted):
        problems += init_problems(keys, env)
    if problems:
        raise UsageError(problems)
    return settings


def shortened(text: str) -> str:
    """`text` quoted, its middle left out when long (as wandb shows a long tag)."""
    return repr(text if len(text) <= 43 else f"{text[:20]}...{text[-20:]}")


def init_problems(keys: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """What wandb.init would refuse of the values this run passes it (the environment's, else the recipe's), one
    line each with what to do instead."""
    problems = []
    source, project = ("WANDB_PROJECT", env["WANDB_PROJECT"]) if env.get("WANDB_PROJECT") else \
        ("wandb_project", keys.get("wandb_project"))
    if project and len(project) > PROJECT_MAX_CHARS:
        problems.append(f"{source}: {shortened(project)} is {len(project)} characters; a W&B project name has at "
                        f"most {PROJECT_MAX_CHARS}")
    team, _, name = (project or "").partition("/")
    team_fix = None  # 'team/proj' is most likely a team's project
    if team and name and not set(team + name) & set(PROJECT_RESERVED):
        team_fix = (f"for a team's project set WANDB_ENTITY={team} WANDB_PROJECT={name}" if source == "WANDB_PROJECT"
                    else f"for a team's project set wandb_entity: {team} and wandb_project: {name}")
    problems += holding(source, project or "", PROJECT_RESERVED, "project name", team_fix)
    for source, tags in (("WANDB_TAGS", split_tags(env.get("WANDB_TAGS"))),
                         ("wandb_tags", clean_tags(keys.get("wandb_tags")))):
        problems += [f"{source}: tag {shortened(tag)} is {len(tag)} characters; a W&B tag has at most {TAG_MAX_CHARS}"
                     for tag in tags if len(tag) > TAG_MAX_CHARS]
    run_id = env.get("WANDB_RUN_ID") or ""  # empty: unset (`export` keeps it from wandb)
    if run_id != run_id.strip():
        problems.append(f"WANDB_RUN_ID: {shortened(run_id)} starts or ends with whitespace, which a W&B run id can't; "
                        "remove it")
    problems += holding("WANDB_RUN_ID", run_id, RUN_ID_RESERVED, "run id")
    api_key = env.get("WANDB_API_KEY")
    if api_key and api_key != api_key.strip():
        problems.append("WANDB_API_KEY starts or ends with whitespace (a newline read with it?), which W&B refuses; "
                        "export it without")
    return problems + sdk_problems({k: v for k, v in env.items() if k.startswith("WANDB_") and
                                         k not in OWN_VARIABLES})


def holding(source: str, value: str, reserved: str, what: str, fix: str | None = None) -> list[str]:
    """The problem with `value` holding characters of `reserved` that a W&B `what` can't hold, with `fix` (default:
    leave them out); none when it holds none."""
    found = list(dict.fromkeys(character for character in value if character in reserved))
    if not found:
        return []
    fix = fix or ("leave them out" if len(found) > 1 else "leave it out")
    return [f"{source}: {shortened(value)} contains {', '.join(map(repr, found))} (a W&B {what} can't hold "
            f"{' '.join(reserved)}); {fix}"]


def sdk_problems(variables: Mapping[str, str]) -> list[str]:
    """What wandb's own Settings refuse of these WANDB_* variables, one line each (a secret's value not shown)."""
    if not variables:
        return []
    try:
        from pydantic import ValidationError
        from wandb.errors import Error
        from wandb.sdk.wandb_settings import Settings
    except ImportError:  # no wandb: the Trainer says so when it needs it
        return []
    problems = []
    for name, value in sorted(variables.items()):
        try:
            Settings().update_from_env_vars({name: value})
            continue
        except ValidationError as error:
            reason = error.errors()[0]["msg"].removeprefix("Value error, ")
        except (Error, ValueError, TypeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        shown = "" if looks_secret(name) else f"={shortened(value)}"
        problems.append(f"{name}{shown}: W&B refuses it ({reason}); correct or unset it")
    return problems


def resolve(recipe: Recipe, env: Mapping[str, str] = os.environ, resuming: bool = False,
            now: float | None = None, job_type: str = "training", report_to: list[str] | None = None) -> Tracking:
    """Resolve tracking for a job about `recipe` from the environment, the recipe's defaults and any saved run in
    its output_dir. `report_to` (default: the recipe's) says whether W&B is wanted at all.

    Raises UsageError as check() does, for the environment and the recipe's W&B keys. Writes nothing.
    """
    wanted = list(recipe.training.report_to or []) if report_to is None else list(report_to)
    settings = check({"wandb_project": recipe.tracking.wandb_project, "wandb_tags": recipe.tracking.wandb_tags,
                      "report_to": wanted}, env)
    if settings["disabled"]:
        return Tracking(report_to=[r for r in wanted if r not in ("wandb", "all")],
                        offline_reason=settings["disabled"])
    tracking = Tracking(report_to=wanted, init_timeout=settings["init_timeout"], log_model=settings["log_model"],
                        offline_reason=settings["offline_reason"])
    if not tracking.uses_wandb:
        return tracking
    if settings["warning"]:
        logger.warning(settings["warning"])
    tags = sorted(dict.fromkeys(split_tags(env.get("WANDB_TAGS")) + clean_tags(recipe.tracking.wandb_tags) +
                                variant_tags(recipe)))
    mode, resume = settings["mode"], settings["resume"]
    saved = read_saved_run(Path(recipe.training.output_dir))
    kept = (saved or {}).get("name") if resuming else None  # a resumed run keeps its name
    name = env.get("WANDB_NAME") or recipe.source.get("run_name") or kept or generated_name(recipe, now)
    run_id = env.get("WANDB_RUN_ID") or None
    if run_id is None and resuming and saved:
        if mode == "offline":
            logger.info("W&B can't resume an offline run: this resumed training logs to a new offline run, "
                        "named %s-resumed and tagged `resumed`, after run %s", name, saved.get("id"))
            name = name if name.endswith("-resumed") else f"{name}-resumed"  # once, however often it resumes
            tags = sorted({*tags, "resumed"})
        else:
            run_id, resume = saved.get("id"), resume or "allow"
    init = {
        "project": env.get("WANDB_PROJECT") or recipe.tracking.wandb_project,
        "entity": env.get("WANDB_ENTITY") or recipe.tracking.wandb_entity,
        "group": env.get("WANDB_RUN_GROUP") or recipe.tracking.wandb_group,
        "name": str(name),
        "notes": env.get("WANDB_NOTES") or recipe.tracking.wandb_notes,
        "tags": tags,
        "job_type": (env.get("WANDB_JOB_TYPE") or job_type) if job_type == "training" else job_type,
        "dir": env.get("WANDB_DIR") or None,
        "id": run_id,
        "resume": resume,
        "mode": mode,
    }
    tracking.init = {key: value for key, value in init.items() if value is not None}
    return tracking


def resolve_job(job_type: str, name: str, env: Mapping[str, str] = os.environ) -> Tracking:
    """Tracking for a job that belongs to no one recipe (a comparison): project, name and group from the
    environment, W&B wanted unless it is disabled. Raises UsageError as check() does."""
    settings = check({"report_to": ["wandb"]}, env)
    if settings["disabled"]:
        return Tracking(report_to=[], offline_reason=settings["disabled"])
    if settings["warning"]:
        logger.warning(settings["warning"])
    init = {"project": env.get("WANDB_PROJECT") or "finetune", "entity": env.get("WANDB_ENTITY") or None,
            "group": env.get("WANDB_RUN_GROUP") or None, "name": env.get("WANDB_NAME") or name,
            "tags": split_tags(env.get("WANDB_TAGS")), "job_type": job_type, "dir": env.get("WANDB_DIR") or None,
            "mode": settings["mode"]}
    return Tracking(report_to=["wandb"], init={k: v for k, v in init.items() if v is not None},
                    init_timeout=settings["init_timeout"], offline_reason=settings["offline_reason"])


def start_follow_up(output_dir: Path, job_type: str, extra_config: dict[str, Any] | None = None):
    """A W&B run about a finished training run (its benchmark, its evaluation): job type `job_type`, in the
    training run's group, named `<training run>-<job_type>`. Tracking follows this environment, not the report_to
    the training ran with. Returns the run, or None when tracking is off."""
    recipe = rundir.trained_recipe(output_dir)
    plan = resolve(recipe, job_type=job_type, report_to=["wandb"])
    if not plan.uses_wandb:
        return None
    trained = read_saved_run(output_dir) or {}
    name = trained.get("name") or plan.init["name"]
    plan.init.update({"name": f"{name}-{job_type}", "group": plan.init.get("group") or name})
    prepare(plan)
    return start(plan, {**run_config(recipe), **(extra_config or {})})


def read_saved_run(output_dir: Path) -> dict | None:
    """The W&B run a training in `output_dir` logged to (id, name, project, mode), or None."""
    return rundir.read_json(output_dir / rundir.WANDB_RUN)


def run_config(recipe: Recipe) -> dict[str, Any]:
    """What the run records as config: variant fields, the whole resolved recipe, toolkit version and commit.

    No key that looks secret is included (the recipe is resolved without them).
    """
    from finetune import __version__
    from finetune.training.ranks import launch_record

    config = {**variant_fields(recipe), "recipe": recipe.resolved(), "finetune_version": __version__,
              "git_commit": git_commit(), **{key.split("/")[1]: value for key, value in launch_record().items()}}
    return {key: value for key, value in config.items() if not looks_secret(key)}


def prepare(tracking: Tracking, training_args=None, env=os.environ) -> None:
    """Point the Trainer at the resolved tracking: its `report_to` and `run_name`, and the environment its
    WandbCallback reads in this process (our resolved values, and no model upload of its own: ours never includes
    optimizer state)."""
    if training_args is not None:
        training_args.report_to = tracking.report_to
        if tracking.uses_wandb:
            training_args.run_name = tracking.init["name"]
    if not tracking.uses_wandb:
        return
    env["WANDB_LOG_MODEL"] = "false"
    export(tracking.init, env)


def export(init: Mapping[str, Any], env=os.environ) -> None:
    """Set RESOLVED_VARIABLES to the `wandb.init` arguments `init` (unset where it has none): wandb reads them
    itself when it sets up, and the raw values the toolkit takes it may refuse."""
    for variable, key in RESOLVED_VARIABLES.items():
        value = init.get(key)
        if value in (None, "", []):
            env.pop(variable, None)
        else:
            env[variable] = ",".join(value) if isinstance(value, list) else str(value)


def start(tracking: Tracking, config: dict[str, Any], output_dir: Path | None = None):
    """Create the run (main process only) with `config`; returns the wandb Run, or None when tracking is off.
    With `output_dir`, the run id is saved there so that a resumed training continues the run.

    Online init is bounded by WANDB_INIT_TIMEOUT; a server that can't be reached in time, or refuses the key,
    turns the run into an offline one with a warning, and the job goes on.
    """
    if not tracking.uses_wandb:
        logger.info("tracking is off (%s)", tracking.offline_reason or "report_to has no wandb")
        return None
    import wandb

    from finetune import logs

    # silent: W&B's banner, its offline notes and its end-of-run history/summary; the toolkit prints its summary
    # and one line saying where the run went (and how to upload it). Failures still raise.
    settings = wandb.Settings(init_timeout=tracking.init_timeout, silent=not logs.verbose())
    export(tracking.init)
    try:
        run = wandb.init(**tracking.init, config=config, settings=settings)
    except wandb.Error as error:
        if tracking.init["mode"] == "offline":
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        logger.warning("W&B could not start an online run within %.0f s (%s); logging offline instead, nothing "
                       "is lost", tracking.init_timeout, reason)
        offline = {key: value for key, value in tracking.init.items() if key not in ("resume",)}
        offline["mode"] = "offline"
        tracking.offline_reason = f"server unreachable ({reason})"
        export(offline)
        run = wandb.init(**offline, config=config, settings=settings)
    if is_offline(run):
        sync_dir = Path(run.settings.sync_dir)
        logger.info("W&B run %s logs offline (%s); upload it later with: wandb sync %s",
                    run.name, tracking.offline_reason or "WANDB_MODE=offline", sync_dir)
    if output_dir is not None:
        save_run_file(run, output_dir)
    return run


def is_offline(run) -> bool:
    return run.settings.mode in ("offline", "dryrun")


def save_run_file(run, output_dir: Path) -> None:
    """Record the run id in output_dir, atomically, so that resuming continues the same run."""
    output_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_json(output_dir / rundir.WANDB_RUN, {
        "id": run.id, "name": run.name, "project": run.project, "entity": run.entity or None,
        "mode": "offline" if is_offline(run) else "online", "sync_dir": str(run.settings.sync_dir)})


def log_model_artifact(run, directory: Path, recipe: Recipe, metrics: dict[str, Any], aliases: list[str]) -> None:
    """Upload the adapter (or full model) files of `directory` as a model artifact; never optimizer state."""
    import wandb

    files = rundir.model_files(directory)
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    logger.warning("WANDB_LOG_MODEL: uploading %d files, %.1f MB, from %s (storage counts against your W&B quota)",
                   len(files), size_mb, directory)
    metadata = {"recipe": recipe.resolved(), "metrics": {k: v for k, v in metrics.items()
                                                         if isinstance(v, (int, float))}}
    artifact = wandb.Artifact(name=f"model-{run.id}", type="model", metadata=metadata)
    for path in files:
        artifact.add_file(str(path))
    run.log_artifact(artifact, aliases=aliases)


def checkpoint_callback(run, recipe: Recipe):
    """A TrainerCallback that uploads each checkpoint's model files when WANDB_LOG_MODEL=checkpoint."""
    from transformers import TrainerCallback

    class CheckpointArtifacts(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                directory = rundir.checkpoint_dir(Path(args.output_dir), state.global_step)
                last = state.log_history[-1] if state.log_history else {}
                survive(log_model_artifact, run, directory, recipe, last, [f"step-{state.global_step}"])

    return CheckpointArtifacts()


_service_lost = False


def survive(action, *args, **kwargs):
    """`action(*args, **kwargs)`, a W&B call, unless W&B's service process is gone: a scheduler's stop signal
    reaches every process of a job (Slurm signals the whole step, wandb-core included, which does not survive it),
    and the training must still checkpoint and exit 75. The first lost connection is reported in one line; later
    W&B calls are skipped. Returns the action's result, or None."""
    global _service_lost
    if _service_lost:
        return None
    try:
        return action(*args, **kwargs)
    except ConnectionError as error:
        _service_lost = True
        logger.warning("W&B's service process stopped (%s): this run goes on without W&B; its numbers are in the "
                       "run directory, and a resumed run continues the W&B run", error)
        import wandb

        try:
            wandb.teardown()  # unregisters wandb's exit hook (which would print a traceback), then fails the same way
        except ConnectionError:
            pass
        return None


def survive_service_loss(callbacks) -> None:
    """Route every event of the Trainer's WandbCallback through `survive`."""
    import functools

    from transformers.integrations import WandbCallback

    for callback in callbacks:
        if isinstance(callback, WandbCallback):
            for name in [name for name in dir(callback) if name.startswith("on_")]:
                setattr(callback, name, functools.partial(survive, getattr(callback, name)))


def callbacks(run, tracking: Tracking, recipe: Recipe) -> list:
    """The Trainer callbacks this tracking needs beyond the Trainer's own W&B logging."""
    return [checkpoint_callback(run, recipe)] if run is not None and tracking.log_model == "checkpoint" else []


def finish(run, tracking: Tracking, recipe: Recipe, output_dir: Path, summary: dict[str, Any]) -> None:
    """End a finished training's run: the summary, the model artifact when WANDB_LOG_MODEL asks, and finish."""
    if run is None:
        return
    survive(run.summary.update, summary)
    if tracking.log_model != "false":
        survive(log_model_artifact, run, output_dir, recipe, summary, ["final"])
    survive(run.finish)
