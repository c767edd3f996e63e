"""Model: tokenizer, base model (optionally quantized with bitsandbytes) and LoRA adapters through peft."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from finetune.errors import UsageError
from finetune.recipe.keys import ModelArguments

logger = logging.getLogger(__name__)


# CPU features that compute bf16 natively (/proc/cpuinfo flags): x86's AVX512-BF16 and AMX, Arm's BF16 extension.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags, from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    lines = [line.split(":", 1)[1] for line in text.splitlines() if line.split(":", 1)[0].strip() in ("flags",
                                                                                                       "Features")]
    return frozenset(lines[0].split()) if lines else frozenset()


def auto_dtype(cuda: bool, cuda_bf16: bool, flags: frozenset[str] | set[str]) -> tuple[str, str]:
    """(dtype name, why) for `dtype: auto`: bf16 where the device computes it natively (a CUDA GPU with bf16; a CPU
    with AVX512-BF16, AMX or Arm's BF16), fp16 on older GPUs, fp32 on every other CPU, where bf16 is emulated (a
    matmul costs about an fp32 forward and backward, a 4-bit layer computing in bf16 ~10x its fp32 time)."""
    if cuda:
        return ("bfloat16", "the GPU computes bf16") if cuda_bf16 else ("float16", "the GPU has no bf16")
    native = [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags]
    if native:
        return "bfloat16", f"the CPU computes bf16 natively: {native[0]}"
    return "float32", "the CPU has no native bf16 (no AVX512-BF16, AMX or Arm BF16): bf16 would be emulated"


def dtype_choice(name: str) -> tuple[str, str]:
    """(dtype name, why) on this machine: the recipe's own choice, or auto_dtype's."""
    if name != "auto":
        return name, "the recipe's choice"
    import torch

    cuda = torch.cuda.is_available()
    return auto_dtype(cuda, cuda and torch.cuda.is_bf16_supported(), cpu_flags())


def resolve_dtype(name: str):
    """A recipe dtype as torch's; auto as dtype_choice decides it on this machine."""
    import torch

    return getattr(torch, dtype_choice(name)[0])


def inference_dtype(recipe_dtype: str) -> str:
    """The dtype a finished run is loaded in for chat, bench and merge: the recipe's own, but `auto` on a CPU is
    fp32, so that what is scored and timed there is the same on every CPU kind (and merged weights are exact)."""
    import torch

    return "float32" if recipe_dtype == "auto" and not torch.cuda.is_available() else recipe_dtype


def report_dtype(model_args: ModelArguments) -> str:
    """Log the weights' and 4-bit layers' compute dtype and why (one line), warning when a 16-bit dtype the recipe
    asks for is emulated on this CPU; returns the dtype's name."""
    import torch

    name, why = dtype_choice(model_args.dtype)
    native_bf16 = auto_dtype(False, False, cpu_flags())[0] == "bfloat16"
    if not torch.cuda.is_available() and (name == "float16" or (name == "bfloat16" and not native_bf16)):
        logger.warning("dtype: %s is emulated on this CPU (no native %s): expect several times fp32's step time "
                       "(~10x for 4-bit layers); dtype: auto (or float32) trains at full speed here", name,
                       "fp16" if name == "float16" else "bf16")
    else:
        logger.info("dtype: %s (%s)", name, why if model_args.dtype == "auto" else "the recipe's choice")
    return name


def hardware_defaults(model_args: ModelArguments, training_values: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments defaults that follow the machine (the recipe's own keys win):
    `finetune.recipe.load.load_recipe` takes this as its `hardware` hook, so that parsing a recipe queries no
    hardware unless the runner asks.

    On a GPU, half-precision weights compute under autocast (`bf16`/`fp16` to match the dtype), except full
    fine-tuning in fp16, whose fp16 gradients the grad scaler refuses. Without a GPU, pinned memory buys nothing,
    and several processes train with DDP over gloo. Raises UsageError for settings this machine can't run.
    """
    import os

    import torch

    if training_values.get("use_liger_kernel") and not torch.cuda.is_available():
        raise UsageError("use_liger_kernel: Liger's kernels run on CUDA GPUs only and this machine has none; set "
                         "use_liger_kernel: false")
    if not torch.cuda.is_available():
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launch/accelerate/cpu_ddp.yaml
        return {"dataloader_pin_memory": False, **({"use_cpu": True} if several else {})}
    dtype = resolve_dtype(model_args.dtype)
    if dtype == torch.bfloat16:
        return {"bf16": True}
    if dtype == torch.float16 and model_args.use_lora:
        return {"fp16": True}
    return {}


def source(model_args: ModelArguments) -> str:
    """Where the base model loads from: model_name_or_path, or for a GGUF file its plain copy in the cache (made on
    first use, see finetune.model.gguf). Raises UsageError for a GGUF file transformers can't read."""
    from finetune.embedded import smollm2
    from finetune.model import gguf as gguf_import
    from finetune.recipe.keys import embedded_asset

    if embedded_asset(Path(model_args.model_name_or_path)) == "smollm2":
        smollm2.ensure_assets()
    return gguf_import.plain_model(model_args.model_name_or_path)


def prepare(recipe) -> None:
    """Make the files a recipe reads that are made on first use: the embedded tiny model and data, the shipped SmolLM2
    model and task (finetune.embedded.smollm2), a GGUF base's plain copy. Under a launcher the main process makes
    them while the others wait."""
    from finetune.embedded import smollm2, tiny

    with recipe.training.main_process_first(desc="preparing the model and data"):
        if tiny.used_by(recipe):
            tiny.ensure_assets()
        if smollm2.used_by(recipe):
            smollm2.ensure_assets()
        source(recipe.model)


def load_tokenizer(model_args: ModelArguments):
    """The model's tokenizer, with padding set to EOS where it has no pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source(model_args), trust_remote_code=model_args.trust_remote_code)
    except OSError as exc:
        raise UsageError(f"model_name_or_path: can't load a tokenizer from {model_args.model_name_or_path!r} "
                         f"({str(exc).splitlines()[0]})") from None
    if not tokenizer.is_fast:
        raise UsageError(f"model_name_or_path: {model_args.model_name_or_path!r} has only a slow tokenizer; "
                         "answer-only labels need a fast tokenizer (offsets)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(model_args: ModelArguments):
    """A BitsAndBytesConfig for int4 (QLoRA) or int8 (LLM.int8), or None."""
    if model_args.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if model_args.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = resolve_dtype(model_args.dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # FSDP shards floating-point tensors only: packed 4-bit weights are stored in the compute dtype under it.
        **({"bnb_4bit_quant_storage": compute_dtype} if fsdp_enabled() else {}),
    )


def fsdp_enabled() -> bool:
    """True when accelerate launched this process with FSDP (launch/accelerate/fsdp.yaml)."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def device_map(model_args: ModelArguments):
    """Quantized weights must be placed at load time: each process puts the whole model on its own device."""
    if model_args.quantization == "none" or fsdp_enabled():
        return None  # Trainer/accelerate (or FSDP, which shards it) places the model
    import torch
    from accelerate import PartialState

    if torch.cuda.is_available():
        return {"": PartialState().local_process_index}
    return {"": "cpu"}


def load_model(model_args: ModelArguments, for_training: bool = True, attention: str | None = None,
               adapter: str | None = None, loss_head: bool = True):
    """Load the base model, prepare it for k-bit training if quantized, and wrap it with LoRA when asked: a new
    adapter, or the trained one in `adapter` (a LoRA run's output_dir, `init_from`), trained on.

    With `for_training=False`, only the base model as the recipe describes it (quantized or not), for inference.
    `attention` overrides the recipe's attn_implementation (the padding-free plan, `finetune.data.padding_free.plan`).
    `loss_head=False` leaves the output head to the trainer (TRL's preference trainers compute log-probabilities
    through their own chunked head). Raises UsageError when the model can't be loaded from `model_name_or_path`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if for_training and model_args.use_lora and adapter is None:
        check_target_modules(model_args)
    dtype = report_dtype(model_args) if for_training else dtype_choice(model_args.dtype)[0]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source(model_args),
            dtype=getattr(torch, dtype),
            quantization_config=quantization_config(model_args),
            device_map=device_map(model_args),
            attn_implementation=attention or model_args.attn_implementation,
            trust_remote_code=model_args.trust_remote_code,
        )
    except OSError as exc:
        raise UsageError(f"model_name_or_path: can't load a model from {model_args.model_name_or_path!r} "
                         f"({str(exc).splitlines()[0]})") from None
    if model_args.quantization == "int4":
        # Inference in bf16 may take bitsandbytes' packed CPU kernel: its result is bf16, as the compute is.
        bf16_inference = not for_training and dtype == "bfloat16"
        keep_4bit_cpu_path_exact(model, allow_packed=bf16_inference)
    if not for_training:
        return model.eval()
    # The KV cache is for generation; training only pays for it, and with it on transformers does not keep the
    # examples of a flattened (padding-free) batch apart.
    model.config.use_cache = False

    if model_args.quantization != "none":
        prepare_kbit_for_training(model)

    if model_args.use_lora and adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        logger.info("LoRA adapter of %s loaded, trained on from here", adapter)
    elif model_args.use_lora:
        from peft import LoraConfig, get_peft_model

        targets = model_args.lora_target_modules
        config = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as exc:
            raise UsageError([f"lora_target_modules: {str(exc).splitlines()[0]}"]) from None
    if model_args.use_lora:
        from finetune.kernels import lora_layers

        lora_layers.speed_up(model)
    from finetune.kernels import norms

    norms.speed_up(model)
    if model_args.chunked_loss and loss_head:
        from finetune.kernels import chunked_loss

        chunked_loss.install(model)  # after peft, which may have put an adapter on the head
    return model


# bitsandbytes 0.50's switch, per Linear4bit, for its packed CPU path (set from has_avx512bf16() at init).
PACKED_CPU_SWITCH = "support_avx512bf16_for_cpu"


def keep_4bit_cpu_path_exact(model, allow_packed: bool = False) -> int:
    """Keep every 4-bit layer on bitsandbytes' ordinary dequantize-and-matmul path on CPUs with AVX512-BF16.

    On such a CPU, the first eval-mode `no_grad` forward of a `Linear4bit` repacks its weight for a fused kernel
    (`gemv_4bit`) and every later forward, training included, goes through it: bf16 activations and result
    whatever the compute dtype, and no backward, so the gradient through the frozen base is silently dropped after
    the first evaluation, and a save re-quantizes from bf16-rounded constants. Turning the switch off before any
    forward keeps training, evaluation and saving what they are on every other CPU. `allow_packed` keeps the fast
    kernel for bf16 inference, where nothing trains afterwards. Returns the number of 4-bit layers seen.
    """
    import bitsandbytes as bnb

    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for layer in layers:
        if not hasattr(layer, PACKED_CPU_SWITCH):  # a bitsandbytes without it; tests/test_kbit.py fails on this
            logger.warning("bitsandbytes %s: Linear4bit has no %s; on CPUs with AVX512-BF16 an evaluation may "
                           "change training", bnb.__version__, PACKED_CPU_SWITCH)
            break
        setattr(layer, PACKED_CPU_SWITCH, getattr(layer, PACKED_CPU_SWITCH) and allow_packed)
    return len(layers)


def check_target_modules(model_args: ModelArguments) -> None:
    """Every name in lora_target_modules matches a linear layer of the model (as peft matches them: the module's
    name or its last parts). Checked on the model's architecture built without weights (the meta device), before
    any weight loads. Raises UsageError naming each name that matches nothing, with the names there are."""
    targets = model_args.lora_target_modules
    if targets == ["all-linear"]:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.recipe.load import did_you_mean

    try:
        config = AutoConfig.from_pretrained(source(model_args), trust_remote_code=model_args.trust_remote_code)
    except OSError:
        return  # load_model says what is wrong with the model
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
    linear = [name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
    unknown = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in linear)]
    if unknown:
        raise UsageError([f"lora_target_modules: no linear layer of this model is named `{t}`"
                          f"{did_you_mean(t, leaves)}; its linear layers are {', '.join(leaves)}" for t in unknown])


def prepare_kbit_for_training(model) -> None:
    """Freeze a k-bit base model; its non-quantized parameters keep the compute dtype.

    This is peft's `prepare_model_for_kbit_training` without its fp32 copies: peft casts every 16-bit parameter to
    fp32, the embeddings and LM head included, which for a 1B model with a 128k vocabulary is ~0.5 GB more weights
    and an fp32 LM-head matmul, for no gain: the norms compute in fp32 inside (RMSNorm upcasts its input), and the
    loss upcasts the logits itself. So QLoRA runs its residual stream in 16 bits, as 16-bit LoRA does.
    Activation checkpointing is the Trainer's job, from the recipe's `activation_checkpointing`, as for every other
    variant.
    """
    for param in model.parameters():
        param.requires_grad = False


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit layers counted at their true size (two values per stored byte)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe(model) -> str:
    """One line: trainable and total parameters, 4-bit layers counted at their true size."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
