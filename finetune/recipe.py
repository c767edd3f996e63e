"""Recipes: flat YAML whose keys are dataclass field names, overridden from the command line.

A recipe is a YAML mapping. Its keys are the fields of `ModelArguments`, `DataArguments`, `TrackingArguments`,
`RunArguments` and `transformers.TrainingArguments`, so `--learning_rate 1e-4` means what it means everywhere
in the HF world.
`extends: other.yaml` (a path relative to the recipe) starts from another recipe and overrides it key by key.

    finetune/run.py recipes/qlora_int4.yaml --max_steps 3 --learning_rate 1e-4

Types, choices and defaults come from the dataclasses through `HfArgumentParser`; this module only adds the
positional recipe path, `extends`, and validation that reports every problem at once, before anything heavy loads.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# Keys that describe one choice: a layer (a child recipe, the command line) that sets one of them replaces the
# choice made by the layers below, instead of clashing with it.
EXCLUSIVE_KEYS = [("eval_split", "eval_fraction", "eval_size")]
DATA_FILE_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


class RecipeError(Exception):
    """Every problem found in a recipe, one line each. The runner prints them and exits with code 2."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class ModelArguments:
    """Which model to load, how to quantize it, and whether to train LoRA adapters or every weight."""

    # Model
    model_name_or_path: str = field(
        default=None, metadata={"help": "Hub model id (e.g. Qwen/Qwen2.5-0.5B) or a local model directory."}
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata={"help": "Weight dtype; auto = bfloat16 on GPUs that support it, float16 on older GPUs, "
                          "float32 on CPU. Also the compute dtype of 4-bit layers."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager | sdpa | flash_attention_2; None lets transformers choose."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run modelling code shipped with the model."})

    # Quantization (bitsandbytes)
    quantization: Literal["none", "int8", "int4"] = field(
        default="none", metadata={"help": "none | int8 (LLM.int8) | int4 (QLoRA). int8/int4 need use_lora."}
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Quantize the quantization constants too (~0.4 bits/param saved)."}
    )

    # LoRA (peft)
    use_lora: bool = field(default=True, metadata={"help": "Train LoRA adapters; false = full fine-tuning."})
    lora_r: int = field(default=16, metadata={"help": "Adapter rank."})
    lora_alpha: int = field(default=32, metadata={"help": "Adapter scale numerator; usually 2 * lora_r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names to adapt (e.g. q_proj v_proj); all-linear = every linear layer "
                          "except the output head."},
    )


@dataclass
class DataArguments:
    """Where the examples come from, how they become token ids, and how the eval split is made."""

    dataset: str = field(
        default=None, metadata={"help": "A local .json/.jsonl/.csv/.parquet file or a hub dataset name."}
    )
    dataset_format: Literal["auto", "text", "alpaca", "messages", "prompt_completion"] = field(
        default="auto", metadata={"help": "auto picks from the columns and logs what it picked."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Named split to evaluate on; otherwise a held-out part of the train split."}
    )
    eval_fraction: float | None = field(
        default=None, metadata={"help": "Fraction of the train split held out for eval, in [0, 1). "
                                        "Default 0.05 when neither eval_split nor eval_size is set."}
    )
    eval_size: int | None = field(default=None, metadata={"help": "Number of train examples held out for eval."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many training examples (after shuffling)."}
    )
    max_length: int = field(default=1024, metadata={"help": "Tokens per example; longer examples are truncated."})
    train_on_prompt: bool = field(
        default=False, metadata={"help": "Compute the loss on prompt tokens too; default is answers only."}
    )
    padding_free: bool = field(
        default=True, metadata={"help": "Train on each micro-batch's examples laid end to end in one row, with no "
                                        "padding and no attention between examples; false = padded batches."}
    )


@dataclass
class TrackingArguments:
    """Recipe defaults for W&B; the matching WANDB_* environment variable always wins."""

    wandb_project: str = field(default="finetune", metadata={"help": "Default for WANDB_PROJECT."})
    wandb_entity: str | None = field(default=None, metadata={"help": "Default for WANDB_ENTITY."})
    wandb_group: str | None = field(default=None, metadata={"help": "Default for WANDB_RUN_GROUP."})
    wandb_tags: list[str] = field(default_factory=list, metadata={"help": "Tags added to WANDB_TAGS."})
    wandb_notes: str | None = field(default=None, metadata={"help": "Default for WANDB_NOTES."})


@dataclass
class RunArguments:
    """What happens to an existing output_dir, and to a loss that stops being finite."""

    auto_resume: bool = field(
        default=True, metadata={"help": "Continue from the newest valid checkpoint in output_dir, if any."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over: remove checkpoints, summary and run id of a previous run."})
    on_nonfinite_loss: Literal["stop", "skip"] = field(
        default="stop", metadata={"help": "stop: end training, keep the last good checkpoint; skip: drop the "
                                          "batch's gradient (costs a device sync per micro-batch)."})


DEFAULT_EVAL_FRACTION = 0.05
# TrainingArguments defaults the toolkit changes (a recipe that sets the key keeps its value):
# the NaN/inf filter hides a diverged loss from the guard and syncs the device every micro-step.
TOOLKIT_DEFAULTS = {"logging_nan_inf_filter": False}


@dataclass
class Recipe:
    """A validated recipe: the three argument groups plus the raw mapping they came from."""

    model: ModelArguments
    data: DataArguments
    tracking: TrackingArguments
    run: RunArguments
    training: Any  # transformers.TrainingArguments, imported lazily
    source: dict[str, Any]  # merged keys as written in the recipe and on the command line
    path: Path | None = None

    def resolved(self) -> dict[str, Any]:
        """Every key with its effective value, secrets removed; loads back with `load_recipe`."""
        out: dict[str, Any] = {}
        out.update(dataclasses.asdict(self.model))
        out.update(dataclasses.asdict(self.data))
        out.update(dataclasses.asdict(self.tracking))
        out.update(dataclasses.asdict(self.run))
        # Deprecated aliases mirror their new names; writing both would warn when the file is loaded back.
        current = {f.name for f in dataclasses.fields(self.training)
                   if f.init and not f.metadata.get("help", "").startswith("Deprecated")}
        for key, value in self.training.to_dict().items():
            if key in current and not looks_secret(key):
                out[key] = value
        return out


def looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS) and not upper.endswith("_TOKENS_SEEN") \
        and upper not in {"AVERAGE_TOKENS_ACROSS_DEVICES", "INCLUDE_NUM_INPUT_TOKENS_SEEN"}


def _argument_classes():
    from transformers import TrainingArguments

    return (ModelArguments, DataArguments, TrackingArguments, RunArguments, TrainingArguments)


def read_recipe_file(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load one recipe file and the chain of recipes it extends, child keys winning.

    Raises RecipeError for a missing file, YAML that doesn't parse, a non-mapping, an empty recipe,
    or an `extends` cycle.
    """
    path = path.expanduser()
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise RecipeError([f"recipe {path}: `extends` forms a cycle ({chain}); remove one of the links"])
    if not path.is_file():
        raise RecipeError([f"recipe {path}: no such file; pass the path of a YAML recipe (see recipes/)"])
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"recipe {path}: invalid YAML{where}: {problem}"]) from None
    if content is None:
        raise RecipeError([f"recipe {path}: the file is empty; a recipe needs at least model_name_or_path "
                           "and dataset (or `extends: <recipe>`)"])
    if not isinstance(content, dict):
        raise RecipeError([f"recipe {path}: expected a mapping of `key: value` lines, got a "
                           f"{type(content).__name__}"])
    parent = content.pop("extends", None)
    if parent is None:
        return content
    if not isinstance(parent, str):
        raise RecipeError([f"recipe {path}: `extends` must be a recipe path, got {parent!r}"])
    base = read_recipe_file(path.parent / parent, (*_seen, path.resolve()))
    return overlay(base, content)


def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, key by key; setting one of a group of EXCLUSIVE_KEYS drops the others from `base`."""
    merged = dict(base)
    for group in EXCLUSIVE_KEYS:
        if any(key in top for key in group):
            for key in group:
                merged.pop(key, None)
    merged.update(top)
    return merged


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
        overrides[key] = "true" if not values else values[0] if len(values) == 1 else list(values)

    for token in tokens:
        if token.startswith("--") and len(token) > 2:
            flush()
            name, eq, value = token[2:].partition("=")
            key, values = name.replace("-", "_"), ([value] if eq else [])
        elif key is None:
            problems.append(f"unexpected argument {token!r}: write overrides as `--key value` after the recipe path")
        else:
            values.append(token)
    flush()
    return overrides, problems


def _actions_by_key(parser) -> dict[str, Any]:
    actions = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and not option.startswith("--no_") and "-" not in option[2:]:
                actions.setdefault(option[2:], action)
    return actions


def _choices(action) -> list[str] | None:
    if not action.choices:
        return None
    return [str(getattr(choice, "value", choice)) for choice in action.choices]


def _type_name(action) -> str:
    from transformers.hf_argparser import string_to_bool

    if action.type is string_to_bool:
        return "a boolean (true/false)"
    if action.type in (int, float):
        return f"{'an' if action.type is int else 'a'} {action.type.__name__}"
    return "a string"


def _coerce(key: str, value: Any, action, problems: list[str]) -> Any:
    """Check one value against its parser action; YAML-typed values are kept, strings are converted."""
    from transformers.hf_argparser import string_to_bool

    if value is None:
        return None
    choices = _choices(action)
    if action.nargs in ("+", "*") or (isinstance(value, list) and key in _list_fields()):
        items = value if isinstance(value, list) else [value]
        return [_coerce(key, item, _list_item_action(action), problems) for item in items]
    if isinstance(value, (list, dict)) and not key.endswith("_kwargs") and not key.endswith("_config"):
        problems.append(f"{key}: expected {_type_name(action)}, got {type(value).__name__} {value!r}")
        return value
    if choices:
        text = str(value)
        if text not in choices:
            hint = _did_you_mean(text, choices)
            shown = ", ".join(choices) if len(choices) <= 12 else ", ".join(choices[:12]) + ", ..."
            problems.append(f"{key}: {value!r} is not one of {shown}{hint}")
        return text
    if action.type is string_to_bool:
        if isinstance(value, bool):
            return value
        try:
            return string_to_bool(str(value))
        except Exception:
            problems.append(f"{key}: expected a boolean (true/false), got {value!r}")
            return value
    if action.type in (int, float):
        if isinstance(value, bool):
            problems.append(f"{key}: expected {_type_name(action)}, got boolean {value!r}")
            return value
        if action.type is float and isinstance(value, int):
            return float(value)
        if isinstance(value, action.type):
            return value
        try:
            number = float(value) if action.type is float else int(str(value))
            return number
        except (TypeError, ValueError):
            problems.append(f"{key}: expected {_type_name(action)}, got {value!r}")
            return value
    return value if isinstance(value, dict) else str(value)


def _did_you_mean(word: str, options) -> str:
    """' (did you mean `a` or `b`?)' for the closest options: truncations first (lora_rank -> lora_r), then spelling."""
    options = sorted(options)
    truncations = [o for o in options if len(o) >= 4 and (word.startswith(o) or o.startswith(word))]
    truncations.sort(key=lambda o: abs(len(o) - len(word)))
    close = difflib.get_close_matches(word, options, n=2, cutoff=0.6)
    picks = list(dict.fromkeys(truncations + close))[:2]
    return f" (did you mean {' or '.join(f'`{p}`' for p in picks)}?)" if picks else ""


def _list_fields() -> set[str]:
    """Fields whose type admits a list (e.g. report_to: str | list[str]), though the parser reads one string."""
    # Read the class annotations: HfArgumentParser rewrites the dataclass fields' `type` in place.
    return {name for cls in _argument_classes() for klass in cls.__mro__
            for name, annotation in vars(klass).get("__annotations__", {}).items() if "list" in str(annotation)}


def _list_item_action(action):
    """A copy of a list-valued action that describes one item of it."""
    item = copy.copy(action)
    item.nargs = None
    return item


def _check_paths(model: ModelArguments, data: DataArguments, problems: list[str]) -> None:
    dataset_path = Path(data.dataset or "").expanduser()
    missing = data.dataset and is_local_path(data.dataset) and not dataset_path.exists()
    if missing and not is_embedded_asset(dataset_path):
        problems.append(f"dataset: no such file {data.dataset!r}; give a local .json/.jsonl/.csv/.parquet "
                        "file or a hub dataset name")
    if model.model_name_or_path and is_local_path(model.model_name_or_path):
        model_path = Path(model.model_name_or_path).expanduser()
        if not model_path.is_dir() and not is_embedded_asset(model_path):
            problems.append(f"model_name_or_path: no such directory {model.model_name_or_path!r}; give a local "
                            "model directory or a hub model id")


def is_local_path(name: str) -> bool:
    """True when a model or dataset name can only mean a local path (not a hub id)."""
    path = Path(name).expanduser()
    return (
        path.exists()
        or name.startswith((".", "/", "~"))
        or path.suffix.lower() in DATA_FILE_EXTENSIONS
        or name.count("/") > 1
    )


def is_embedded_asset(path: Path) -> bool:
    from finetune.tiny import ASSETS_DIR

    try:
        path.resolve().relative_to(ASSETS_DIR.resolve())
        return True
    except ValueError:
        return False


def _check_combinations(recipe: dict[str, Any], model: ModelArguments, data: DataArguments, training,
                        problems: list[str]) -> None:
    if not model.model_name_or_path:
        problems.append("model_name_or_path: missing; set it in the recipe or pass --model_name_or_path")
    if not data.dataset:
        problems.append("dataset: missing; set it in the recipe or pass --dataset")
    if model.quantization != "none" and not model.use_lora:
        problems.append(f"quantization: {model.quantization} needs use_lora: true (quantized weights can't be "
                        "trained directly); set quantization: none for full fine-tuning")
    if model.quantization != "none":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"quantization: {model.quantization} needs bitsandbytes; pip install bitsandbytes")
    defaults = ModelArguments()
    explicit_4bit = [k for k in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant")
                     if k in recipe and getattr(model, k) != getattr(defaults, k)]
    if explicit_4bit and model.quantization != "int4":
        problems.append(f"{', '.join(explicit_4bit)}: only apply to quantization: int4 "
                        f"(this recipe has quantization: {model.quantization})")
    if model.lora_r < 1:
        problems.append(f"lora_r: must be a positive integer, got {model.lora_r}")
    if model.lora_alpha < 1:
        problems.append(f"lora_alpha: must be a positive integer, got {model.lora_alpha}")
    if not 0 <= model.lora_dropout < 1:
        problems.append(f"lora_dropout: must be in [0, 1), got {model.lora_dropout}")
    if not model.lora_target_modules:
        problems.append("lora_target_modules: empty; list module names or use all-linear")
    if data.max_length < 1:
        problems.append(f"max_length: must be a positive integer, got {data.max_length}")
    if data.max_train_samples is not None and data.max_train_samples < 1:
        problems.append(f"max_train_samples: must be a positive integer, got {data.max_train_samples}")
    held_out = [k for k in ("eval_fraction", "eval_size") if getattr(data, k) is not None]
    if len(held_out) == 2:
        problems.append("eval_fraction and eval_size are both set; keep one (a fraction or a count of examples)")
    if data.eval_split and held_out:
        problems.append(f"eval_split and {held_out[0]} are both set; evaluate on a named split or on held-out "
                        "train examples, not both")
    if data.eval_fraction is not None and not 0 <= data.eval_fraction < 1:
        problems.append(f"eval_fraction: must be in [0, 1), got {data.eval_fraction}")
    if data.eval_size is not None and data.eval_size < 0:
        problems.append(f"eval_size: must be zero or more, got {data.eval_size}")
    no_eval = data.eval_split is None and (data.eval_fraction == 0 or data.eval_size == 0)
    if training is not None:
        if no_eval and str(getattr(training.eval_strategy, "value", training.eval_strategy)) != "no":
            problems.append("eval_strategy is set but the eval split is empty (eval_fraction/eval_size 0); "
                            "set eval_strategy: no or hold out some examples")
        if training.max_steps <= 0 and training.num_train_epochs <= 0:
            problems.append("max_steps and num_train_epochs are both <= 0; set one of them to a positive number")
        if training.use_liger_kernel:
            import importlib.util

            if importlib.util.find_spec("liger_kernel") is None:
                problems.append("use_liger_kernel: needs the liger-kernel package (Triton kernels for CUDA GPUs); "
                                "pip install liger-kernel, or set use_liger_kernel: false")
            else:
                import torch

                if not torch.cuda.is_available():
                    problems.append("use_liger_kernel: Liger's kernels run on CUDA GPUs only and this machine has "
                                    "none; set use_liger_kernel: false")


def load_recipe(argv: list[str]) -> Recipe:
    """Parse `RECIPE.yaml [--key value ...]` into a validated Recipe.

    Raises RecipeError listing every problem found: unknown keys (with a suggestion), wrong types, values outside
    their choices, impossible combinations and missing local files. Nothing is written and no model is loaded.
    """
    if not argv or argv[0].startswith("--"):
        raise RecipeError(["usage: finetune/run.py RECIPE.yaml [--key value ...]; the recipe path comes first "
                           "(see recipes/)"])
    path = Path(argv[0])
    recipe = read_recipe_file(path)
    overrides, problems = parse_cli_overrides(argv[1:])
    for key in overrides:
        if looks_secret(key):
            problems.append(f"--{key}: secrets don't belong on the command line (it ends up in shell history and "
                            "logs); export it in the environment instead")
    for key in recipe:
        if looks_secret(key):
            problems.append(f"{key}: secrets don't belong in recipe files (they get copied, shared and logged); "
                            "export it in the environment instead (e.g. HF_TOKEN, WANDB_API_KEY)")
    merged = overlay(recipe, overrides)
    if "output_dir" not in merged:
        merged["output_dir"] = str(Path("outputs") / path.stem)

    from transformers import HfArgumentParser

    classes = _argument_classes()
    parser = HfArgumentParser(classes)
    actions = _actions_by_key(parser)
    known = set(actions)
    values: dict[str, Any] = {}
    for key, value in merged.items():
        if key not in known:
            hint = _did_you_mean(key, known)
            origin = "on the command line" if key in overrides else f"in {path}"
            problems.append(f"unknown key `{key}` {origin}{hint}; keys are fields of ModelArguments, "
                            "DataArguments, TrackingArguments, RunArguments or transformers.TrainingArguments")
            continue
        values[key] = _coerce(key, value, actions[key], problems)
    if problems:
        raise RecipeError(problems)

    groups = {cls: {f.name for f in dataclasses.fields(cls)} for cls in classes[:-1]}
    model, data, tracking, run = (cls(**{k: v for k, v in values.items() if k in names})
                                  for cls, names in groups.items())
    ours = set().union(*groups.values())
    training_values = {k: v for k, v in values.items() if k not in ours}
    # Reentrant checkpointing fails under DDP and with frozen inputs; non-reentrant works everywhere.
    if "gradient_checkpointing_kwargs" not in training_values:
        training_values.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    from finetune.model import hardware_defaults

    defaults = hardware_defaults(model)
    if {"bf16", "fp16"} & set(values):  # the recipe chose its precision: no automatic autocast on top
        defaults = {key: value for key, value in defaults.items() if key not in ("bf16", "fp16")}
    for key, value in {**TOOLKIT_DEFAULTS, **defaults}.items():
        training_values.setdefault(key, value)
    training = None
    try:
        training = classes[-1](**training_values)
    except (ValueError, TypeError) as exc:
        problems.append(f"training arguments: {str(exc).strip().splitlines()[0]}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if training is not None and launched > 1 and training.world_size != launched:
        problems.append(f"the launcher started {launched} processes but they formed a group of "
                        f"{training.world_size}; check the accelerate config (see launch/accelerate/)")
    _check_combinations(merged, model, data, training, problems)
    _check_paths(model, data, problems)
    if problems:
        raise RecipeError(problems)
    if data.eval_split is None and data.eval_fraction is None and data.eval_size is None:
        data.eval_fraction = DEFAULT_EVAL_FRACTION
    return Recipe(model=model, data=data, tracking=tracking, run=run, training=training, source=merged, path=path)


def write_resolved_recipe(recipe: Recipe, path: Path) -> None:
    """Write every effective key as YAML, atomically (a crash never leaves half a file)."""
    text = yaml.safe_dump(recipe.resolved(), sort_keys=False, default_flow_style=False)
    header = f"# Resolved from {recipe.path} with command-line overrides; every key with its effective value.\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(header + text)
    os.replace(tmp, path)
