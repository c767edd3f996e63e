"""Loading a recipe: YAML files, `extends`, and `--key value` overrides from the command line, checked against the
schema (`finetune.recipe.keys`) with every problem reported at once.

    finetune/run.py recipes/qlora_int4.yaml --max_steps 3 --learning_rate 1e-4

A recipe is a flat YAML mapping; `extends: other.yaml` (a path relative to the recipe) starts from another recipe
and overrides it key by key. Values are checked against each key's type and choices before anything heavy is
imported (a typo costs about a second); the dataclasses then check their combinations, and only then is
`transformers.TrainingArguments` built, with its own checks.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import UsageError
from finetune.recipe import keys as config
from finetune.recipe.keys import Key, Recipe

# Keys that describe one choice: a layer (a child recipe, the command line) that sets one of them replaces the
# choice made by the layers below, instead of clashing with it.
EXCLUSIVE_KEYS = [("eval_split", "eval_fraction", "eval_size")]
TRUE, FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}
# A sweep trial's output directory, which no recipe names: `finetune sweep` gives each trial its own (this variable),
# and under `wandb agent` (WANDB_SWEEP_ID, WANDB_RUN_ID) each trial writes to <output_dir>/sweep-<id>/<run id>.
SWEEP_TRIAL = "FINETUNE_SWEEP_TRIAL"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (YAML itself keeps the last silently)."""

    duplicates: list[str]

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                self.duplicates.append(f"`{key}` is set twice (lines {seen[key]} and {key_node.start_mark.line + 1});"
                                       " keep one")
            seen.setdefault(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, what: str, loader_class: type[_UniqueKeyLoader] = _UniqueKeyLoader) -> Any:
    """The YAML document in `path`. Raises UsageError (`{what} {path}: ...`) for YAML that doesn't parse (where
    and why) and for each key written twice in one mapping."""
    loader = loader_class(path.read_text())
    loader.duplicates = []
    try:
        content = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{what} {path}: invalid YAML{where}: {problem}") from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise UsageError([f"{what} {path}: {duplicate}" for duplicate in loader.duplicates])
    return content


def read_recipe_file(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load one recipe file and the chain of recipes it extends, child keys winning.

    Raises UsageError for a missing file, YAML that doesn't parse, a key set twice, a non-mapping, an empty
    recipe, or an `extends` cycle.
    """
    path = path.expanduser()
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise UsageError(f"recipe {path}: `extends` forms a cycle ({chain}); remove one of the links")
    if not path.is_file():
        raise UsageError(f"recipe {path}: no such file; pass the path of a YAML recipe (see recipes/)")
    content = read_yaml(path, "recipe")
    if content is None:
        raise UsageError(f"recipe {path}: the file is empty; a recipe needs at least model_name_or_path and dataset "
                         "(or `extends: <recipe>`)")
    if not isinstance(content, dict):
        raise UsageError(f"recipe {path}: expected a mapping of `key: value` lines, got a {type(content).__name__}")
    parent = content.pop("extends", None)
    if parent is None:
        return content
    if not isinstance(parent, str):
        raise UsageError(f"recipe {path}: `extends` must be a recipe path, got {parent!r}")
    return overlay(read_recipe_file(path.parent / parent, (*_seen, path.resolve())), content)


def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, key by key; setting one of a group of EXCLUSIVE_KEYS drops the others from `base`."""
    merged = dict(base)
    for group in EXCLUSIVE_KEYS:
        if any(key in top for key in group):
            for key in group:
                merged.pop(key, None)
    merged.update(top)
    return merged


class BareFlag(str):
    """The value of a `--key` given with no value: "true", which only a boolean key takes (check_keys)."""


def parse_cli_overrides(tokens: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Turn `--key value`, `--key=value`, `--flag` and `--key v1 v2` into a mapping of strings.

    A key with no value means true (for boolean keys); several values make a list.
    Returns the mapping and a list of problems (stray words, repeated keys).
    """
    overrides: dict[str, Any] = {}
    problems: list[str] = []
    key: str | None = None
    values: list[str] = []

    def flush():
        if key is None:
            return
        if key in overrides:
            problems.append(f"--{key} is given twice on the command line; keep one")
        overrides[key] = BareFlag("true") if not values else values[0] if len(values) == 1 else list(values)

    for token in tokens:
        if token.startswith("--") and len(token) > 2:
            flush()
            name, eq, value = token[2:].partition("=")
            key, values = name.replace("-", "_"), ([_listed(value)] if eq else [])
        elif key is None:
            problems.append(f"unexpected argument {token!r}: write overrides as `--key value` after the recipe path")
        else:
            values.append(token)
    flush()
    return overrides, problems


def _listed(value: str):
    """`--key=[a, b]`, as `wandb agent` writes a list value (Python's repr), as a list; any other value as is."""
    if value.startswith("[") and value.endswith("]"):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(parsed, list):
            return [str(item) for item in parsed]
    return value


def sweep_output_dir(output_dir: str, env=os.environ) -> str:
    """Where a recipe with `output_dir` writes when it runs as a sweep trial (see SWEEP_TRIAL); else output_dir."""
    if env.get(SWEEP_TRIAL):
        return env[SWEEP_TRIAL]
    if env.get("WANDB_SWEEP_ID") and env.get("WANDB_RUN_ID"):
        return str(Path(output_dir) / f"sweep-{env['WANDB_SWEEP_ID']}" / env["WANDB_RUN_ID"])
    return output_dir


def did_you_mean(word: str, options) -> str:
    """' (did you mean `a` or `b`?)' for the closest options: truncations first (lora_rank -> lora_r), then spelling."""
    options = sorted(options)
    truncations = [o for o in options if len(o) >= 4 and (word.startswith(o) or o.startswith(word))]
    truncations.sort(key=lambda o: abs(len(o) - len(word)))
    close = difflib.get_close_matches(word, options, n=2, cutoff=0.6)
    picks = list(dict.fromkeys(truncations + close))[:2]
    return f" (did you mean {' or '.join(f'`{p}`' for p in picks)}?)" if picks else ""


def coerce(key: Key, value: Any, problems: list[str]) -> Any:
    """A YAML value or a command-line string checked against its key and converted; problems are appended."""
    if value is None or (key.optional and isinstance(value, str) and value.strip() in ("null", "~")):
        return None  # `--key null` on the command line unsets a key, as `key: null` does in YAML
    if key.kind in ("list", "str_or_list") and isinstance(value, list):
        return [str(item) for item in value]
    if key.kind == "list":
        return [str(value)]
    if key.kind in ("dict", "any"):
        return value
    if isinstance(value, (list, dict)):
        problems.append(f"{key.name}: expected {_expected(key)}, got {type(value).__name__} {value!r}")
        return value
    if key.kind == "choice":
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if text not in key.choices:
            shown = ", ".join(key.choices) if len(key.choices) <= 12 else ", ".join(key.choices[:12]) + ", ..."
            problems.append(f"{key.name}: {value!r} is not one of {shown}{did_you_mean(text, key.choices)}")
        return text
    if key.kind == "bool":
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in TRUE | FALSE:
            return str(value).strip().lower() in TRUE
        problems.append(f"{key.name}: expected a boolean (true/false), got {value!r}")
        return value
    if key.kind in ("int", "float"):
        if isinstance(value, bool):
            problems.append(f"{key.name}: expected {_expected(key)}, got boolean {value!r}")
            return value
        try:
            number = float(value) if key.kind == "float" else int(str(value))
        except (TypeError, ValueError):
            problems.append(f"{key.name}: expected {_expected(key)}, got {value!r}")
            return value
        return number
    return str(value)


def _expected(key: Key) -> str:
    return {"bool": "a boolean (true/false)", "int": "an int", "float": "a float"}.get(key.kind, "a string")


def check_keys(merged: dict[str, Any], overrides: dict[str, Any], path: Path,
               problems: list[str]) -> dict[str, Any]:
    """Every key known and every value of its type: the checked values. Imports nothing heavy."""
    keys = config.recipe_keys()
    values = {}
    for name, value in merged.items():
        if config.looks_secret(name):
            where = ("on the command line (it ends up in shell history and logs)" if name in overrides else
                     f"in {path} (recipe files get copied, shared and logged)")
            problems.append(f"{'--' if name in overrides else ''}{name}: secrets don't belong {where}; export it in "
                            "the environment instead (e.g. HF_TOKEN, WANDB_API_KEY)")
            continue
        if name not in keys:
            origin = "on the command line" if name in overrides else f"in {path}"
            problems.append(f"unknown key `{name}` {origin}{did_you_mean(name, keys)}; keys are fields of "
                            "ModelArguments, DataArguments, TrackingArguments, RunArguments, ObjectiveArguments or "
                            "transformers.TrainingArguments (`--help` lists them)")
            continue
        if isinstance(value, BareFlag) and keys[name].kind != "bool":
            problems.append(f"--{name}: no value given; write `--{name} VALUE` (a shell variable that is empty or "
                            "unset gives none)")
            continue
        values[name] = coerce(keys[name], value, problems)
    return values


Hardware = Callable[[config.ModelArguments, dict[str, Any]], dict[str, Any]]


def read_checked(argv: list[str], data_needed: bool = True) -> tuple[Path, dict[str, Any], dict[str, Any],
                                                                     dict[type, Any]]:
    """Everything `load_recipe` checks that needs no torch: the files (the dataset's only when `data_needed`),
    every key and value, and the combinations of the toolkit's own keys. Returns (recipe path, merged keys,
    checked values, the toolkit's groups)."""
    if not argv or argv[0].startswith("--"):
        raise UsageError("usage: finetune/run.py RECIPE.yaml [--key value ...]; the recipe path comes first (see "
                         "recipes/)")
    path = Path(argv[0])
    overrides, problems = parse_cli_overrides(argv[1:])
    merged = overlay(read_recipe_file(path), overrides)
    merged.setdefault("output_dir", str(Path("outputs") / path.stem))
    trial_dir = sweep_output_dir(str(merged["output_dir"]))
    if trial_dir != str(merged["output_dir"]):  # (a bare `--output_dir` stays one, to be reported as such)
        merged["output_dir"] = trial_dir
    values = check_keys(merged, overrides, path, problems)
    if problems:
        raise UsageError(problems)
    if data_needed:  # a finished run's recipe.yaml holds what init_from decided; that run may be gone since
        leaf = read_yaml(path.expanduser(), "recipe")  # its own keys; those it extends yield to init_from's
        started_from(values, problems, written={*overrides, *leaf} - {"extends"})
    variables = config.path_variable_problems(values)
    problems += config.range_problems(values) + variables
    problems += config.dataset_problems(values) if data_needed and not variables else []
    output_dir = str(values.get("output_dir", ""))
    problems += [p for p in [config.output_dir_problem(output_dir), output_dir.strip() and config.protected_problem(
        Path(output_dir), values.get("model_name_or_path") or "", values.get("dataset") or "")] if p]
    groups = {}
    for cls in config.GROUPS:
        try:
            groups[cls] = cls(**{k: v for k, v in values.items() if k in config.group_fields(cls)})
        except UsageError as error:
            problems += error.problems
    if problems:
        raise UsageError(problems)
    return path, merged, values, groups


# What a run started from (init_from) decides: its base model and, for a LoRA run, the adapter's shape.
INIT_FROM_KEYS = ("model_name_or_path", "use_lora", "lora_r", "lora_alpha", "lora_target_modules")


def started_from(values: dict[str, Any], problems: list[str], written: set[str]) -> None:
    """With `init_from`, fill in from that run's recipe what it decides (INIT_FROM_KEYS; for a fully trained run,
    model_name_or_path is the run's directory, which holds its weights), over what the recipe inherits (`extends`).
    A value `written` in the recipe itself or on the command line that differs is a problem, as the adapter or
    weights train on as they were made. Whether the run finished is checked later
    (finetune.training.rundir.check_init_from)."""
    run = values.get("init_from")
    if not run:
        return
    directory = Path(run).expanduser()
    recipe_file = directory / "recipe.yaml"  # finetune.training.rundir.RECIPE
    if not recipe_file.is_file():
        what = "no such directory" if not directory.is_dir() else "not a training run's output_dir (no recipe.yaml)"
        problems.append(f"init_from: {run} is {what}{config.relative_note(directory)}; give the output_dir of a "
                        "finished training run")
        return
    output_dir = values.get("output_dir")
    if output_dir and Path(str(output_dir)).expanduser().absolute() == directory.absolute():
        problems.append(f"output_dir: {output_dir} is the init_from run; give this run a directory of its own")
        return
    trained = read_yaml(recipe_file, "init_from's recipe") or {}
    wanted = ({key: trained.get(key) for key in INIT_FROM_KEYS} if trained.get("use_lora") else
              {"model_name_or_path": str(directory.absolute())})
    for key, value in wanted.items():
        if key not in values or key not in written:
            values[key] = value
        elif values[key] != value and not (key == "model_name_or_path" and is_same_path(values[key], value)):
            hint = (" (to train every weight of it, merge it first with `finetune merge` and give the merged "
                    "directory as model_name_or_path)" if key == "use_lora" else
                    " (a fully trained run's weights are the base)" if not trained.get("use_lora") else "")
            problems.append(f"{key}: {values[key]!r} differs from the init_from run's {value!r} ({run}){hint}; "
                            f"leave {key} out of the recipe or match it")


def is_same_path(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and config.is_local_path(a) and \
        Path(a).expanduser().absolute() == Path(b).expanduser().absolute()


def load_recipe(argv: list[str], hardware: Hardware | None = None, data_needed: bool = True) -> Recipe:
    """Parse `RECIPE.yaml [--key value ...]` into a validated Recipe.

    `hardware`, given the model arguments and the Trainer's keys, returns TrainingArguments defaults that follow
    the machine (the runner passes `finetune.model.load.hardware_defaults`); keys the recipe sets keep their value.
    `data_needed=False`: a local dataset may be gone (a finished run's recipe, for commands that don't train).
    Raises UsageError listing every problem found: unknown keys (with a suggestion), wrong types, values outside
    their choices, impossible combinations and missing local files. Nothing is written and no model is loaded.
    """
    path, merged, values, groups = read_checked(argv, data_needed)
    ours = set().union(*(config.group_fields(cls) for cls in config.GROUPS))
    training_values = {k: v for k, v in values.items() if k not in ours}
    if "gradient_checkpointing_kwargs" in training_values:
        training_values.setdefault("activation_checkpointing_kwargs", None)
    machine = hardware(groups[config.ModelArguments], training_values) if hardware else {}
    defaults = {**config.TOOLKIT_DEFAULTS, **machine}
    if {"bf16", "fp16"} & set(values):  # the recipe chose its precision: no automatic autocast on top
        defaults = {key: value for key, value in defaults.items() if key not in ("bf16", "fp16")}
    for key, value in defaults.items():
        training_values.setdefault(key, value)
    from transformers import TrainingArguments

    try:
        training = TrainingArguments(**training_values)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"training arguments: {str(exc).strip().splitlines()[0]}") from None
    model, data, tracking, run, objective = (groups[cls] for cls in config.GROUPS)
    return Recipe(model=model, data=data, tracking=tracking, run=run, training=training, source=merged, path=path,
                  objective=objective)


def recipe_yaml(recipe: Recipe, absolute: bool = False) -> str:
    """The recipe as YAML: every key with its effective value (see Recipe.resolved); loads back with load_recipe.
    `absolute`: local paths made absolute (`config.absolute_paths`), as a run's recipe.yaml records them."""
    header = f"# Resolved from {recipe.path} with command-line overrides; every key with its effective value.\n"
    values = config.absolute_paths(recipe.resolved()) if absolute else recipe.resolved()
    return header + yaml.safe_dump(values, sort_keys=False, default_flow_style=False)



GROUP_TITLES = {"model": "Model", "quantization": "Quantization (bitsandbytes)", "lora": "LoRA (peft)",
                "data": "Data", "tracking": "Tracking (W&B defaults; WANDB_* variables win)",
                "run": "Run (output directory, resuming, non-finite losses)",
                "objective": "Objective (sft, or preference tuning with TRL: dpo, kto)",
                "trainer": "Trainer (transformers.TrainingArguments; the toolkit's defaults where it sets them)"}
USAGE = """usage: finetune/run.py RECIPE.yaml [--key value ...] [--print_config] [--dry_run]

Train as RECIPE.yaml says; any key below overrides it: `--key value`, `--key=value`, `--flag` (true), `--key v1 v2`.
  --print_config   print the resolved recipe (every key with its effective value) and exit
  --dry_run        load and tokenize the data, show two examples with the loss-bearing text in [[ ]], token
                   lengths and the detected format, and exit without training
  --help           this list
"""


def help_text(width: int = 118) -> str:
    """Every recipe key, by group, with its default and a one-line description. Imports nothing heavy."""
    import textwrap

    keys = config.recipe_keys()
    lines = [USAGE]
    for group, title in GROUP_TITLES.items():
        lines.append(f"{title}:")
        for key in (k for k in keys.values() if k.group == group):
            default = config.TOOLKIT_DEFAULTS.get(key.name, key.default)
            choices = f" {{{', '.join(key.choices)}}}" if key.choices and len(key.choices) <= 8 else ""
            head = f"  --{key.name} (default {default!r}){choices}"
            summary = textwrap.shorten(key.help, 2 * (width - 6), placeholder=" ...") if key.help else ""
            lines.append(head)
            if summary:
                lines += textwrap.wrap(summary, width, initial_indent="      ", subsequent_indent="      ")
        lines.append("")
    return "\n".join(lines)
