"""GGUF in and out. In: a local GGUF file as a recipe's base model (`model_name_or_path: path/to/model.gguf`). Out:
`write_gguf`, a trained model as one GGUF file (`finetune export`, finetune.commands.export).

    finetune train recipes/smollm2/lora.yaml --model_name_or_path ~/models/SmolLM2-135M-Instruct.Q4_1.gguf

transformers reads GGUF with the `gguf` package: it parses the file, dequantizes every tensor and rebuilds the
config, the weights and the tokenizer (its chat template included). That takes ~25 s for a 135M model on a CPU, on
every load (config, tokenizer and weights each parse the file again), and the object it gives refuses
`save_pretrained`. So the file is converted once into a plain model directory in the cache (fp32 safetensors: the
dequantized values exactly, with the config's GGUF quantization entry removed, and the tokenizer), keyed by the
file's path, size and modification time; every later load (training, resume, merge, chat, bench, eval) reads that
directory in about a second, quantized by bitsandbytes or cast to the recipe's dtype like any other model. The copy
takes 4 bytes per parameter on disk (0.54 GB for 135M) and converting needs about twice that in memory.

An architecture transformers can't read as a causal LM, or a tensor type the `gguf` package can't dequantize, is
refused in one line before anything is loaded or written (`problem`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UsageError

logger = logging.getLogger(__name__)
SUFFIX = ".gguf"
INFO = "gguf.json"  # in the converted directory: where it came from (file, architecture, quantization type)
INSTALL = "pip install -r requirements.txt (it pins gguf)"


def is_gguf(name: str | None) -> bool:
    return bool(name) and str(name).lower().endswith(SUFFIX)


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file holds, from its header: `architecture` (llama.cpp's name), `quantization` (the file type,
    e.g. Q4_1) and the tensor types it stores (e.g. Q4_1, Q8_0, F32)."""

    file: str
    architecture: str
    quantization: str
    tensor_types: tuple[str, ...]
    has_tokenizer: bool = True
    split_count: int = 1

    def as_dict(self) -> dict:
        return {"gguf_file": self.file, "gguf_architecture": self.architecture,
                "gguf_quantization": self.quantization}


def read_info(path: Path) -> GGUFInfo:
    """The header of a GGUF file (the `gguf` package's reader; ~3 s for 100 MB: it indexes every tensor).
    Raises UsageError when the file is not GGUF or the package is missing."""
    try:
        import gguf
    except ImportError:
        raise UsageError(f"model_name_or_path: {path} is a GGUF file, which needs the gguf package: {INSTALL}") \
            from None
    try:
        reader = gguf.GGUFReader(path)
        architecture = str(reader.fields["general.architecture"].contents())
        file_type = reader.fields.get("general.file_type")
    except (ValueError, KeyError, OSError) as error:
        raise UsageError(f"model_name_or_path: {path} is not a readable GGUF file ({str(error)[:100]})") from None
    types = tuple(sorted({tensor.tensor_type.name for tensor in reader.tensors}))
    split = reader.fields.get("split.count")
    split_count = int(split.contents()) if split is not None else 1
    if file_type is not None:
        try:
            quantization = gguf.LlamaFileType(int(file_type.contents())).name.removeprefix("MOSTLY_")
        except ValueError:
            quantization = f"file type {file_type.contents()}"
    else:
        quantization = "/".join(types)
    return GGUFInfo(str(path), architecture, quantization, types, "tokenizer.ggml.tokens" in reader.fields,
                    split_count)


def problem(path: Path) -> str | None:
    """Why transformers can't train `path`, in one line, or None: not a file, not GGUF, an architecture that
    transformers' GGUF loader doesn't map to a causal LM, or a tensor type that the gguf package can't dequantize.
    A file already converted (see `plain_model`) is known to be good and not read again."""
    if not path.is_file():
        return f"model_name_or_path: no such file {str(path)!r}; give a local .gguf file"
    if (converted_dir(path) / INFO).is_file():
        return None
    try:
        info = read_info(path)
    except UsageError as error:
        return error.problems[0]
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = info.architecture.replace("-", "_").replace("qwen2moe", "qwen2_moe").replace("qwen3moe", "qwen3_moe")
    if model_type not in GGUF_SUPPORTED_ARCHITECTURES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
        return (f"model_name_or_path: {path.name} holds a `{info.architecture}` model, which transformers can't "
                f"load from GGUF as a causal LM; it can: {', '.join(readable)}")
    if info.split_count > 1:
        return (f"model_name_or_path: {path.name} is one part of a model split in {info.split_count} files, which "
                "transformers can't read; merge them first (llama.cpp's llama-gguf-split --merge)")
    if not info.has_tokenizer:
        return f"model_name_or_path: {path.name} holds no tokenizer (tokenizer.ggml.*), which training needs"
    unreadable = [name for name in info.tensor_types if not _dequantizes(name)]
    if unreadable:
        return (f"model_name_or_path: {path.name} stores tensors as {', '.join(unreadable)}, which the gguf "
                f"package can't dequantize; convert it to another type (e.g. Q8_0 or F16) with llama.cpp")
    return None


def _dequantizes(type_name: str) -> bool:
    """Whether the gguf package dequantizes this tensor type: one block of zeros, tried."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[type_name]
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        return True
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        quants.dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
    except (RuntimeError, ValueError, KeyError):  # RuntimeError: the gguf package says "not implemented"
        return False
    return True


def cache_root() -> Path:
    from finetune.recipe.keys import cache_dir

    return cache_dir() / "gguf"


def converted_dir(path: Path) -> Path:
    """Where `path`'s plain model directory lives: named after the file, keyed by its absolute path, size and
    modification time (a file replaced in place converts again) and the versions of the readers (a fixed reader
    converts again)."""
    import importlib.metadata

    path = path.expanduser().resolve()
    stat = path.stat()
    readers = "/".join(importlib.metadata.version(name) for name in ("transformers", "gguf"))
    key = hashlib.sha1(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{readers}".encode()).hexdigest()[:12]
    return cache_root() / f"{path.stem}-{key}"


def info(name: str) -> dict:
    """The run's record of a GGUF base (gguf_file, gguf_architecture, gguf_quantization), {} for other models;
    only the file's name when it is gone."""
    if not is_gguf(name):
        return {}
    path = Path(name).expanduser()
    if not path.is_file():
        return {"gguf_file": str(path)}
    recorded = converted_dir(path) / INFO
    data = json.loads(recorded.read_text()) if recorded.is_file() else read_info(path).as_dict()
    return {key: data[key] for key in ("gguf_file", "gguf_architecture", "gguf_quantization")}


def plain_model(name: str) -> str:
    """The directory to load `name` from: `name` itself, or for a GGUF file its converted copy (made on first use,
    ~25 s for 135M parameters, written to a temporary directory and renamed into place, so that a crash or a
    concurrent conversion never leaves half a model). Raises UsageError for a file transformers can't read."""
    if not is_gguf(name):
        return name
    path = Path(name).expanduser()
    why = problem(path)
    if why:
        raise UsageError(why)
    target = converted_dir(path)
    if (target / INFO).is_file():
        return str(target)
    logger.info("converting %s into a plain model directory, once (~40 s for 135M parameters): %s", path.name, target)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        convert(path, staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process converted it first
            if not (target / INFO).is_file():
                raise
    except OSError as error:
        raise UsageError(f"model_name_or_path: can't write the plain copy of {path.name} to {target.parent} "
                         f"({error.strerror or error}); set FINETUNE_CACHE to a writable directory with room for "
                         "4 bytes per parameter") from None
    except Exception as error:  # whatever transformers' GGUF reader raises on a file it can't map
        first = (str(error).splitlines() or [""])[0][:160]
        raise UsageError(f"model_name_or_path: transformers could not read {path.name} "
                         f"({type(error).__name__}: {first})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def convert(path: Path, out: Path) -> None:
    """Write `path` as a plain model directory: config (without the GGUF quantization entry), fp32 safetensors,
    generation config, tokenizer with its chat template, and INFO."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, file = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(directory, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF entry: save_pretrained refuses a model that has it
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    out.mkdir(parents=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {**read_info(path).as_dict(), "gguf_file": str(path.resolve())}
    (out / INFO).write_text(json.dumps(record, indent=2) + "\n")


# Out: a model as a GGUF file for llama.cpp, Ollama and LM Studio ----------------------------------------------------

# transformers' model_type -> llama.cpp's architecture. Mistral is llama-shaped in GGUF; SmolLM2 is a llama.
EXPORT_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# --type -> (the file type written in the header, the type of each 2-D weight). Norms and biases stay F32, as
# llama.cpp's own converter keeps them; a Q8_0 weight needs rows in blocks of 32 values, else it is written F16.
EXPORT_TYPES = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"),
                "q8_0": ("MOSTLY_Q8_0", "Q8_0")}


def export_problem(config: dict, tokenizer_file: Path | None) -> str | None:
    """Why a model with this config.json (and tokenizer.json, when it has one) can't be written as GGUF, or None.
    Reads files only: answered before anything heavy loads."""
    model_type = config.get("model_type")
    if model_type not in EXPORT_ARCHITECTURES:
        return (f"a {model_type} model has no GGUF export here; the llama-family architectures are exported "
                f"({', '.join(sorted(EXPORT_ARCHITECTURES))})")
    scaling = config.get("rope_scaling") or (config.get("rope_parameters") or {})
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        return f"rope scaling `{kind}` is not exported to GGUF here (only plain RoPE)"
    if tokenizer_file is None or not tokenizer_file.is_file():
        return "the model has no tokenizer.json (a fast tokenizer), which GGUF's tokenizer is written from"
    model = json.loads(tokenizer_file.read_text()).get("model", {})
    if model.get("type") != "BPE":
        return (f"its {model.get('type')} tokenizer has no GGUF form here (byte-level BPE tokenizers are exported, "
                "as llama.cpp and transformers read them)")
    return None


def pre_tokenizer_name(tokenizer, source: Path | None = None) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how `tokenizer` splits text before BPE: the source GGUF's, for a
    model that came from one; else the name whose split pattern transformers' GGUF reader uses for this
    tokenizer's; `gpt2` for GPT-2's own. Raises UsageError for a split no reader would rebuild."""
    if source is not None and source.is_file():
        import gguf

        field = gguf.GGUFReader(source).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    state = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = state.get("pretokenizers", [state])
    patterns = [step.get("pattern", {}).get("Regex") for step in steps if step.get("type") == "Split"]
    if not patterns and [step.get("type") for step in steps] == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
        if patterns == [split]:
            return name
    raise UsageError("its tokenizer splits text in a way no GGUF reader rebuilds (a pre-tokenizer without a "
                     "llama.cpp name); export a model whose tokenizer is GPT-2's, Llama 3's, Qwen2's or one of a "
                     "GGUF file")


def llama_permute(weights, heads: int):
    """Q and K rows reordered as llama.cpp's llama architecture applies RoPE (pairs of adjacent values, where
    transformers rotates halves): the inverse of what GGUF readers undo."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(model, tokenizer, path: Path, file_type: str, name: str, source: Path | None = None) -> Path:
    """Write `model` (a plain transformers causal LM: merged, no LoRA, no quantization) and `tokenizer` (its chat
    template included) to the GGUF file `path` with weights of `file_type` (EXPORT_TYPES). Written to a temporary
    file beside `path` and renamed into place. `source`: the GGUF file the model came from (its tokenizer's name)."""
    import gguf
    import numpy as np

    config = model.config
    architecture = EXPORT_ARCHITECTURES[config.model_type]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    header_type, weight_type = EXPORT_TYPES[file_type]
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(partial, architecture)
    try:
        writer.add_name(name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != config.hidden_size // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        rope = getattr(config, "rope_parameters", None) or {}
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(gguf.LlamaFileType[header_type])
        add_tokenizer(writer, tokenizer, config.vocab_size, pre_tokenizer_name(tokenizer, source))

        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], config.num_hidden_layers)
        tied = getattr(config, "tie_word_embeddings", False)
        for key, tensor in model.state_dict().items():
            if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                continue
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UsageError(f"{key}: a tensor GGUF's {architecture} architecture has no place for")
            data = tensor.detach().float().cpu().numpy()
            if architecture == "llama" and key.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias",
                                                          "k_proj.bias")):
                data = llama_permute(data, heads if "q_proj" in key else kv_heads)
            kind = weight_type if data.ndim == 2 else "F32"
            if kind == "Q8_0" and data.shape[-1] % 32:
                kind = "F16"
            if kind == "F16":
                writer.add_tensor(gguf_name, data.astype(np.float16))
            elif kind == "F32":
                writer.add_tensor(gguf_name, data.astype(np.float32))
            else:
                qtype = gguf.GGMLQuantizationType[kind]
                writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)  # a full disk, Ctrl-C: no half file left behind
        raise
    return path


def add_tokenizer(writer, tokenizer, vocab_size: int, pre: str) -> None:
    """A byte-level BPE tokenizer as llama.cpp's converter writes it (`gpt2`): every token in id order, padded to
    the model's vocabulary, its type (special added tokens are control tokens, other added ones user-defined),
    the merges, the special tokens, whether BOS is added, and the chat template."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = {index: token for index, token in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    merges = state["model"].get("merges", [])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id), (tokenizer.eos_token_id,
                          writer.add_eos_token_id), (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    encoded = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(encoded) and encoded[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
