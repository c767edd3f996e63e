"""The recipe schema: every key a recipe may hold, its type, choices, default and meaning, and the checks that
need more than one value.

Keys are the fields of the four dataclasses below plus every `transformers.TrainingArguments` field, flat, so
`--learning_rate 1e-4` means what it means everywhere in the HF world. Each dataclass refuses its own impossible
combinations in `__post_init__` (every problem of the group at once); `Recipe.__post_init__` checks the ones that
span groups. `recipe_keys()` describes every key without importing torch: the TrainingArguments part is read
from transformers once and cached per transformers version, so a typo is reported in about a second.

Loading a recipe (YAML, `extends`, the command line) is `finetune.recipe.load`; this module only describes and checks.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import importlib.util
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune.errors import UsageError

DATA_FILE_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
GGUF_SUFFIX = ".gguf"  # a local GGUF model file (finetune.model.gguf)
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
DEFAULT_EVAL_FRACTION = 0.05
# TrainingArguments defaults the toolkit changes (a recipe that sets the key keeps its value):
TOOLKIT_DEFAULTS = {
    "report_to": "wandb",  # tracked in W&B, configured by the WANDB_* environment (finetune.tracking.wandb_run)
    "logging_nan_inf_filter": False,  # it hides a diverged loss from the guard and syncs the device every step
    # Reentrant checkpointing fails under DDP and with frozen inputs; non-reentrant works everywhere.
    "activation_checkpointing_kwargs": {"use_reentrant": False},
}


@dataclass
class ModelArguments:
    """Which model to load, how to quantize it, and whether to train LoRA adapters or every weight."""

    # Model
    model_name_or_path: str = field(
        default=None, metadata={"help": "Hub model id (e.g. Qwen/Qwen2.5-0.5B), a local model directory, or a local "
                                        ".gguf file (converted once into a plain model in the cache; see "
                                        "finetune.model.gguf)."})
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto", metadata={"help": "Weight dtype; auto = bfloat16 where the device computes it natively "
                                          "(GPUs with bf16; CPUs with AVX512-BF16, AMX or Arm BF16), float16 on older "
                                          "GPUs, float32 on other CPUs. Also the compute dtype of 4-bit layers."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager | sdpa | flash_attention_2; None lets transformers choose."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run modelling code shipped with the model."})
    chunked_loss: bool = field(
        default=True, metadata={"help": "Training loss computed a chunk of tokens at a time, never the full-vocabulary "
                                        "logits; where the model allows it (finetune.kernels.chunked_loss), else "
                                        "full logits."})

    # Quantization (bitsandbytes)
    quantization: Literal["none", "int8", "int4"] = field(
        default="none", metadata={"help": "none | int8 (LLM.int8) | int4 (QLoRA). int8/int4 need use_lora."})
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Quantize the quantization constants too (~0.4 bits/param saved)."})

    # LoRA (peft)
    use_lora: bool = field(default=True, metadata={"help": "Train LoRA adapters; false = full fine-tuning."})
    lora_r: int = field(default=16, metadata={"help": "Adapter rank."})
    lora_alpha: int = field(default=32, metadata={"help": "Adapter scale numerator; usually 2 * lora_r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names to adapt (e.g. q_proj v_proj); all-linear = every linear layer except the "
                          "output head."})

    def __post_init__(self):
        problems = []
        if not self.model_name_or_path:
            problems.append("model_name_or_path: missing; set it in the recipe or pass --model_name_or_path")
        if self.quantization != "none" and not self.use_lora:
            problems.append(f"quantization: {self.quantization} needs use_lora: true (quantized weights can't be "
                            "trained directly); set quantization: none for full fine-tuning")
        if self.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"quantization: {self.quantization} needs bitsandbytes; pip install bitsandbytes")
        four_bit = [name for name in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant")
                    if getattr(self, name) != _default(ModelArguments, name)]
        if four_bit and self.quantization != "int4":
            problems.append(f"{', '.join(four_bit)}: only apply to quantization: int4 (this recipe has "
                            f"quantization: {self.quantization})")
        if self.lora_r < 1:
            problems.append(f"lora_r: must be a positive integer, got {self.lora_r}")
        if self.lora_alpha < 1:
            problems.append(f"lora_alpha: must be a positive integer, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            problems.append("lora_target_modules: empty; list module names or use all-linear")
        if self.model_name_or_path and is_local_path(self.model_name_or_path):
            path = Path(self.model_name_or_path).expanduser()
            gguf = path.suffix.lower() == GGUF_SUFFIX
            if not (path.is_file() if gguf else path.is_dir()) and not is_embedded_asset(path):
                problems.append(f"model_name_or_path: no such {'file' if gguf else 'directory'} "
                                f"{self.model_name_or_path!r}{relative_note(path)}; give a local model directory, a "
                                ".gguf file or a hub model id")
        _raise(problems)


@dataclass
class DataArguments:
    """Where the examples come from, how they become token ids, and how the eval split is made."""

    dataset: str = field(
        default=None, metadata={"help": "A local .json/.jsonl/.csv/.parquet file or a hub dataset name."})
    dataset_format: Literal["auto", "text", "alpaca", "messages", "prompt_completion", "preference",
                            "unpaired_preference"] = field(
        default="auto", metadata={"help": "auto picks from the columns and logs what it picked."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Named split to evaluate on; otherwise a held-out part of the train split."})
    eval_fraction: float | None = field(
        default=None, metadata={"help": "Fraction of the train split held out for eval, in [0, 1). Default 0.05 "
                                        "when neither eval_split nor eval_size is set."})
    eval_size: int | None = field(default=None, metadata={"help": "Number of train examples held out for eval."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many training examples (after shuffling)."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per example; longer examples are truncated."})
    train_on_prompt: bool = field(
        default=False, metadata={"help": "Compute the loss on prompt tokens too; default is answers only."})
    padding_free: bool = field(
        default=True, metadata={"help": "Train on each micro-batch's examples laid end to end in one row, with no "
                                        "padding and no attention between examples; false = padded batches."})

    def __post_init__(self):
        problems = []
        if not self.dataset:
            problems.append("dataset: missing; set it in the recipe or pass --dataset")
        if self.max_length < 1:
            problems.append(f"max_length: must be a positive integer, got {self.max_length}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            problems.append(f"max_train_samples: must be a positive integer, got {self.max_train_samples}")
        held_out = [name for name in ("eval_fraction", "eval_size") if getattr(self, name) is not None]
        if len(held_out) == 2:
            problems.append("eval_fraction and eval_size are both set; keep one (a fraction or a count of examples)")
        if self.eval_split and held_out:
            problems.append(f"eval_split and {held_out[0]} are both set; evaluate on a named split or on held-out "
                            "train examples, not both")
        if self.eval_fraction is not None and not 0 <= self.eval_fraction < 1:
            problems.append(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if self.eval_size is not None and self.eval_size < 0:
            problems.append(f"eval_size: must be zero or more, got {self.eval_size}")
        _raise(problems)
        if self.eval_split is None and self.eval_fraction is None and self.eval_size is None:
            self.eval_fraction = DEFAULT_EVAL_FRACTION

    @property
    def holds_out_nothing(self) -> bool:
        return holds_out_nothing(self.eval_split, self.eval_fraction, self.eval_size)


def holds_out_nothing(eval_split: str | None, eval_fraction: float | None, eval_size: int | None) -> bool:
    """Whether a recipe has no eval split: none named, and none held out of the training data (0 of it)."""
    return eval_split is None and (eval_fraction == 0 or eval_size == 0)


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


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
              "sigmoid_norm")  # TRL's DPOTrainer loss_type values the toolkit offers (each one loss over pairs)
KTO_LOSSES = ("kto", "apo_zero_unpaired")
PREFERENCE_KEYS = {  # key: the objectives it applies to
    "init_from": ("sft", "dpo", "kto"), "beta": ("dpo", "kto"), "loss_type": ("dpo", "kto"),
    "max_prompt_length": ("dpo", "kto"), "precompute_ref_log_probs": ("dpo", "kto"), "sft_weight": ("dpo",),
    "desirable_weight": ("kto",), "undesirable_weight": ("kto",),
}


@dataclass
class ObjectiveArguments:
    """What training optimises: supervised answers (sft), or preferences between answers (dpo, kto) through TRL."""

    objective: Literal["sft", "dpo", "kto"] = field(
        default="sft", metadata={"help": "sft: the loss on the answers; dpo: pairs of a chosen and a rejected answer "
                                         "(prompt/chosen/rejected rows); kto: single answers labelled desirable or "
                                         "not (prompt/completion/label rows). dpo and kto run TRL's trainers."})
    init_from: str | None = field(
        default=None, metadata={"help": "A finished run's output_dir to start from: its base model and its LoRA "
                                        "adapter (trained on), or its fully trained weights. For dpo and kto it is "
                                        "also the reference model."})
    beta: float = field(
        default=0.1, metadata={"help": "dpo, kto: how far the model may move from the reference; higher keeps it "
                                       "closer. 0.1 is the papers' usual value."})
    loss_type: str | None = field(
        default=None, metadata={"help": f"dpo: {' | '.join(DPO_LOSSES)} (default sigmoid, the DPO paper's); kto: "
                                        f"{' | '.join(KTO_LOSSES)} (default kto). TRL's names."})
    sft_weight: float = field(
        default=0.0, metadata={"help": "dpo: weight of a supervised loss on the chosen answers (their mean token "
                                       "cross-entropy) added to the DPO loss, as in RPO and Llama 3: it keeps the "
                                       "chosen answers likely, where DPO alone may lower both answers and break "
                                       "generation. 0: DPO alone."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "dpo, kto: prompts longer than this many tokens keep their end (where the "
                                        "answer begins); max_length still bounds prompt plus answer."})
    precompute_ref_log_probs: bool | None = field(
        default=None, metadata={"help": "dpo, kto: the reference model's log-probabilities computed once before "
                                        "training instead of at every step. Default: true for full fine-tuning "
                                        "(no second copy of the model in memory), false with LoRA (the reference is "
                                        "the model with its adapter switched off, no copy either)."})
    desirable_weight: float = field(
        default=1.0, metadata={"help": "kto: weight of the desirable examples' loss (raise it when they are fewer)."})
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "kto: weight of the undesirable examples' loss."})

    def __post_init__(self):
        problems = []
        for name, objectives in PREFERENCE_KEYS.items():
            if self.objective not in objectives and getattr(self, name) != _default(ObjectiveArguments, name):
                problems.append(f"{name}: only applies to objective: {' or '.join(objectives)} (this recipe has "
                                f"objective: {self.objective})")
        if self.beta <= 0:
            problems.append(f"beta: must be more than 0, got {self.beta}")
        losses = DPO_LOSSES if self.objective == "dpo" else KTO_LOSSES
        if self.loss_type is not None and self.objective in ("dpo", "kto") and self.loss_type not in losses:
            from finetune.recipe.load import did_you_mean

            problems.append(f"loss_type: {self.loss_type!r} is not a {self.objective} loss"
                            f"{did_you_mean(self.loss_type, losses)}; choose one of {', '.join(losses)}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            problems.append(f"max_prompt_length: must be a positive integer, got {self.max_prompt_length}")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}: must be more than 0, got {getattr(self, name)}")
        if self.sft_weight < 0:
            problems.append(f"sft_weight: must be 0 or more, got {self.sft_weight}")
        _raise(problems)
        if self.loss_type is None and self.objective in ("dpo", "kto"):
            self.loss_type = "sigmoid" if self.objective == "dpo" else "kto"

    @property
    def preference(self) -> bool:
        """Whether the objective learns from preferences (TRL's trainers) rather than from answers alone."""
        return self.objective != "sft"


GROUPS = (ModelArguments, DataArguments, TrackingArguments, RunArguments, ObjectiveArguments)

# Values the Trainer's arguments take without complaint but that cannot train: (lowest, whether it is allowed).
RANGES = {
    "per_device_train_batch_size": (1, True), "per_device_eval_batch_size": (1, True),
    "gradient_accumulation_steps": (1, True), "learning_rate": (0, False), "warmup_steps": (0, True),
    "weight_decay": (0, True), "max_grad_norm": (0, True), "logging_steps": (0, False), "eval_steps": (0, False),
    "save_steps": (0, False), "save_total_limit": (1, True), "dataloader_num_workers": (0, True),
    "num_train_epochs": (0, True), "adam_epsilon": (0, False),
}


def range_problems(values: dict[str, Any]) -> list[str]:
    """One line for each value outside RANGES."""
    problems = []
    for key, (lowest, inclusive) in RANGES.items():
        value = values.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                (value < lowest or (value == lowest and not inclusive)):
            problems.append(f"{key}: must be {'at least' if inclusive else 'more than'} {lowest}, got {value}")
    return problems


PATH_KEYS = ("model_name_or_path", "dataset", "output_dir", "resume_from_checkpoint", "init_from")
RUN_PATH_KEYS = ("output_dir", "resume_from_checkpoint", "init_from")  # always local: never a hub name


def dataset_problems(values: dict[str, Any]) -> list[str]:
    """A local dataset that isn't there (checked for training; a finished run's follow-up commands don't need
    its data)."""
    dataset = values.get("dataset")
    if not dataset or not is_local_path(dataset):
        return []
    path = Path(dataset).expanduser()
    if path.exists() or is_embedded_asset(path):
        return []
    return [f"dataset: no such file {dataset!r}{relative_note(path)}; give a local .json/.jsonl/.csv/.parquet file "
            "or a hub dataset name"]


def relative_note(path: Path) -> str:
    """For a missing path: where a relative one was looked for (recipes' paths are read from the working directory,
    as on the command line; only `extends` is read from the recipe's own directory)."""
    return "" if path.is_absolute() else f" (relative paths are read from the working directory, {Path.cwd()})"


def absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with each local path (PATH_KEYS) made absolute against the working directory, as a run resolves
    them: what a finished run's recipe.yaml records, so that its follow-up commands work from any directory. Hub
    names stay as they are."""
    out = dict(values)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and (key in RUN_PATH_KEYS or is_local_path(value)):
            out[key] = str(Path(value).expanduser().absolute())
    return out


def path_variable_problems(values: dict[str, Any]) -> list[str]:
    """A shell variable in a path (`$HOME/runs`), which nothing expands: a directory named `$HOME` would be
    created. `~` is expanded; variables are left to the shell, on the command line."""
    import re

    problems = []
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and re.search(r"\$(\w|\{)", value):
            problems.append(f"{key}: {value} holds a shell variable, which recipes don't expand; write the path out, "
                            f"or pass it on the command line, where the shell expands it (--{key} \"{value}\")")
    return problems


def output_dir_problem(output_dir: str) -> str | None:
    """Why output_dir can't be a run's directory (empty, a file, not writable), or None."""
    if not str(output_dir).strip():
        return "output_dir: empty; give a directory to write the run to"
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        return f"output_dir: {output_dir} is a file; give a directory"
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return f"output_dir: {existing} is not writable; choose a directory you can write to"
    return None


@dataclass
class Recipe:
    """A validated recipe: the four groups, the Trainer's arguments, and the merged keys they came from."""

    model: ModelArguments
    data: DataArguments
    tracking: TrackingArguments
    run: RunArguments
    training: Any  # transformers.TrainingArguments, imported only once the keys are known to be right
    source: dict[str, Any]  # merged keys as written in the recipe and on the command line
    path: Path | None = None
    objective: ObjectiveArguments = field(default_factory=ObjectiveArguments)

    def __post_init__(self):
        problems = []
        strategy = str(getattr(self.training.eval_strategy, "value", self.training.eval_strategy))
        if self.data.holds_out_nothing and strategy != "no":
            problems.append("eval_strategy is set but the eval split is empty (eval_fraction/eval_size 0); set "
                            "eval_strategy: no or hold out some examples")
        if self.data.holds_out_nothing and self.training.eval_on_start:
            problems.append("eval_on_start is set but the eval split is empty (eval_fraction/eval_size 0); set "
                            "eval_on_start: false or hold out some examples")
        if self.training.max_steps <= 0 and self.training.num_train_epochs <= 0:
            problems.append("max_steps and num_train_epochs are both <= 0; set one of them to a positive number")
        if self.objective.preference and self.data.train_on_prompt:
            problems.append(f"train_on_prompt: objective {self.objective.objective} scores answers only (its loss "
                            "compares the answers' log-probabilities); set train_on_prompt: false")
        if self.objective.objective == "kto" and self.objective.loss_type != "apo_zero_unpaired" and \
                self.training.per_device_train_batch_size < 2:
            problems.append(f"per_device_train_batch_size: objective kto (loss_type {self.objective.loss_type}) needs "
                            "2 or more rows per batch (its KL term pairs each answer with another row's prompt); "
                            "raise it, or use loss_type: apo_zero_unpaired")
        if self.objective.preference and self.model.use_lora and "lm_head" in self.model.lora_target_modules:
            problems.append(f"lora_target_modules: lm_head can't take an adapter with objective "
                            f"{self.objective.objective} (TRL computes log-probabilities from lm_head's weight "
                            "directly, so the adapter would never train); leave lm_head out")
        if self.training.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
            problems.append("use_liger_kernel: needs the liger-kernel package (Triton kernels for CUDA GPUs); pip "
                            "install liger-kernel, or set use_liger_kernel: false")
        _raise(problems)

    def resolved(self) -> dict[str, Any]:
        """Every key with its effective value, secrets removed; loads back with `finetune.recipe.load.load_recipe`."""
        out: dict[str, Any] = {}
        for group in (self.model, self.data, self.tracking, self.run, self.objective):
            out.update(dataclasses.asdict(group))
        # Deprecated aliases mirror their new names; writing both would warn when the file is loaded back.
        current = {f.name for f in dataclasses.fields(self.training)
                   if f.init and not f.metadata.get("help", "").startswith("Deprecated")}
        for key, value in self.training.to_dict().items():
            if key in current and not looks_secret(key):
                out[key] = value
        # What to do with an existing output_dir is this invocation's choice, not the run's: a saved recipe that
        # is run again must refuse a finished run like any other command.
        out.update(overwrite_output_dir=False, resume_from_checkpoint=None)
        return out


def _default(cls, name: str):
    spec = cls.__dataclass_fields__[name]
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def _raise(problems: list[str]) -> None:
    if problems:
        raise UsageError(problems)


def protected_problem(output_dir: Path, model: str, dataset: str, option: str = "output_dir") -> str | None:
    """Why `output_dir` (given as `option`) must never be written to: it is (or is inside) the base model's
    directory or the dataset's directory, or it is the directory that holds the dataset file. None when it is
    safe."""
    target = output_dir.expanduser().resolve()
    for key, name in (("model_name_or_path", model), ("dataset", dataset)):
        source = Path(name).expanduser() if name else None
        if source is None or not source.exists():
            continue
        source = source.resolve()
        if source.is_file():
            if target == source.parent:
                return f"{option}: {output_dir} is the directory of the {key} file ({name}); choose another"
            continue
        if target == source or source in target.parents:
            return (f"{option}: {output_dir} is {'inside ' if target != source else ''}the {key} directory "
                    f"({name}); writing there would overwrite it. Choose another {option}")
    return None


def looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS) and not upper.endswith("_TOKENS_SEEN") \
        and upper not in {"AVERAGE_TOKENS_ACROSS_DEVICES", "INCLUDE_NUM_INPUT_TOKENS_SEEN"}


def is_local_path(name: str) -> bool:
    """True when a model or dataset name can only mean a local path (not a hub id)."""
    path = Path(name).expanduser()
    return (path.exists() or name.startswith((".", "/", "~"))
            or path.suffix.lower() in (*DATA_FILE_EXTENSIONS, GGUF_SUFFIX) or name.count("/") > 1)


EMBEDDED_ASSETS = ("tiny", "smollm2")  # finetune.embedded.tiny and finetune.embedded.smollm2 write them on first use


def embedded_asset(path: Path) -> str | None:
    """Which of EMBEDDED_ASSETS a path points into (the embedded tiny model and data, or the shipped real model's
    files), or None."""
    assets = Path(__file__).resolve().parents[2] / "assets"
    for name in EMBEDDED_ASSETS:
        try:
            path.expanduser().resolve().relative_to((assets / name).resolve())
            return name
        except ValueError:
            pass
    return None


def embedded_assets(*names: str | None) -> set[str]:
    """Which of EMBEDDED_ASSETS the given model and dataset names point into (None and empty names skipped)."""
    return {asset for asset in (embedded_asset(Path(name)) for name in names if name) if asset}


def is_embedded_asset(path: Path) -> bool:
    """Whether a path is one of the files written on first use (see embedded_asset)."""
    return embedded_asset(path) is not None


# The key table ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    """One recipe key: its group, kind (bool, int, float, str, choice, list, str_or_list, dict, any), choices,
    whether None is allowed, its default and its help line."""

    name: str
    group: str
    kind: str
    choices: tuple[str, ...] = ()
    optional: bool = False
    default: Any = None
    help: str = ""


GROUP_NAMES = {"ModelArguments": "model", "DataArguments": "data", "TrackingArguments": "tracking",
               "RunArguments": "run", "ObjectiveArguments": "objective", "TrainingArguments": "trainer"}


def _kind(annotation) -> tuple[str, tuple[str, ...]]:
    """(kind, choices) of a field's type annotation."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "choice", tuple(str(a) for a in typing.get_args(annotation))
    if origin is list:
        return "list", ()
    if origin is dict or annotation is dict:
        return "dict", ()
    if annotation in (bool, int, float, str):
        return annotation.__name__, ()
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "choice", tuple(str(member.value) for member in annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]  # a union: X | None, Enum | str, ...
    enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
    if enums:
        return _kind(enums[0])
    if len(args) == 1:
        return _kind(args[0])
    kinds = {_kind(a)[0] for a in args}
    if kinds == {"str", "list"}:
        return "str_or_list", ()
    if "dict" in kinds:
        return "dict", ()
    return "any", ()


def _key(cls, spec: dataclasses.Field, annotation) -> Key:
    group = GROUP_NAMES[cls.__name__]
    if group == "model" and spec.name.startswith(("quantization", "bnb_")):
        group = "quantization"
    elif group == "model" and (spec.name.startswith("lora_") or spec.name == "use_lora"):
        group = "lora"
    kind, choices = _kind(annotation)
    default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    if isinstance(default, enum.Enum):
        default = default.value
    if not isinstance(default, (bool, int, float, str, list, dict, type(None))):
        default = repr(default)
    optional = type(None) in typing.get_args(annotation) or default is None
    help_text = " ".join(str(spec.metadata.get("help", "")).split())
    return Key(spec.name, group, kind, choices, optional, default, help_text)


def keys_of(cls) -> dict[str, Key]:
    hints = typing.get_type_hints(cls)
    return {spec.name: _key(cls, spec, hints[spec.name]) for spec in dataclasses.fields(cls) if spec.init}


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                         Path.home() / ".cache") / "finetune")


def trainer_keys() -> dict[str, Key]:
    """TrainingArguments' keys, from a per-version cache (importing transformers' TrainingArguments costs seconds:
    it imports torch). The first call with a new transformers version builds the cache."""
    version = importlib.metadata.version("transformers")
    cache = cache_dir() / f"training-arguments-{version}.json"
    try:
        return {name: Key(**{**spec, "choices": tuple(spec["choices"])})
                for name, spec in json.loads(cache.read_text()).items()}
    except (OSError, ValueError, TypeError):
        pass
    from transformers import TrainingArguments

    keys = keys_of(TrainingArguments)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({name: dataclasses.asdict(key) for name, key in keys.items()}))
        os.replace(tmp, cache)
    except OSError:  # a read-only home: no cache, the next run imports again
        pass
    return keys


def recipe_keys() -> dict[str, Key]:
    """Every key a recipe may hold: the toolkit's groups first, then the Trainer's."""
    ours: dict[str, Key] = {}
    for cls in GROUPS:
        ours.update(keys_of(cls))
    return {**ours, **{name: key for name, key in trainer_keys().items() if name not in ours}}


def group_fields(cls) -> set[str]:
    return {spec.name for spec in dataclasses.fields(cls)}

