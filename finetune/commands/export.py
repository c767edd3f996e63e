"""Export a trained run as one GGUF file, for llama.cpp, Ollama and LM Studio.

    finetune export outputs/smollm2-lora --gguf smollm2-contacts.gguf                 # f16
    finetune export outputs/smollm2-lora --gguf smollm2-contacts.q8_0.gguf --type q8_0
    finetune merge outputs/smollm2-lora --gguf smollm2-contacts.gguf                  # the same, through merge

The adapter is merged into its base (a 4-bit or 8-bit base dequantized first, as `finetune merge` does), and the
weights, the tokenizer and its chat template are written with the `gguf` package's writer, as llama.cpp's own
converter lays them out, for the llama-family architectures (Llama, Mistral, SmolLM, Qwen2). Types: f32, f16, bf16
(llama.cpp's), q8_0 (8-bit blocks of 32 weights with one scale: about 1.06 bytes a weight). Norms stay f32.
An architecture, tokenizer or type the export can't write, and a destination it must not write, are refused in one
line before anything loads; the file is written beside the destination and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finetune import errors
from finetune.errors import UsageError
from finetune.model import gguf
from finetune.training import rundir

MODELFILE = ".Modelfile"  # OUT.gguf.Modelfile: Ollama's, beside a ChatML model's file


def check(output_dir: Path, out: Path, file_type: str) -> Path | None:
    """Everything that refuses the export before torch loads. Returns the GGUF file the run's base came from
    (None: a plain base); raises UsageError."""
    from finetune.recipe.keys import protected_problem

    if file_type not in gguf.EXPORT_TYPES:
        raise UsageError(f"--type: {file_type!r} is not one of {', '.join(gguf.EXPORT_TYPES)}")
    keys = rundir.results(output_dir)[0]
    if not keys or not rundir.is_finished(output_dir):
        raise UsageError(f"{output_dir}: not a finished run ({rundir.SUMMARY} and {rundir.RECIPE}); give the "
                         "output_dir of a training that ended")
    if not str(out).endswith(gguf.SUFFIX):
        raise UsageError(f"--gguf: {out} should end in {gguf.SUFFIX}, as llama.cpp and Ollama expect")
    if out.exists():
        raise UsageError(f"--gguf: {out} already exists; give another path, or remove it first")
    modelfile = out.with_name(out.name + MODELFILE)
    if modelfile.exists():
        raise UsageError(f"--gguf: {modelfile} already exists (the export writes its Ollama Modelfile there); give "
                         "another path, or remove it first")
    place = out.parent.expanduser().resolve()
    if place == output_dir.resolve() or output_dir.resolve() in place.parents:
        raise UsageError(f"--gguf: {out.parent} is inside the run's own directory; write the file elsewhere")
    problem = protected_problem(out.parent, str(keys.get("model_name_or_path") or ""),
                                str(keys.get("dataset") or ""), option="--gguf")
    blocked = rundir.unwritable(out.parent)
    if problem or blocked:
        raise UsageError(problem or f"--gguf: {blocked} is not writable; give a writable place")
    base = str(keys.get("model_name_or_path") or "")
    source = Path(base).expanduser() if gguf.is_gguf(base) else None
    if source is not None and not source.is_file():
        raise UsageError(f"{output_dir}: its base {base} is not here (relative paths are read from the working "
                         f"directory, {Path.cwd()}); run the export where the run was trained")
    if keys.get("use_lora", True) is False:
        config_file = output_dir / "config.json"
    elif source is not None:
        config_file = gguf.converted_dir(source) / "config.json" if source.is_file() else None
        if config_file is None or not config_file.is_file():  # not converted on this machine: its header says
            why = gguf.export_problem({"model_type": gguf.read_info(source).architecture},
                                      output_dir / "tokenizer.json")
            if why:
                raise UsageError(f"{output_dir}: {why}")
            return source
    else:
        config_file = Path(base).expanduser() / "config.json"
    if config_file is None or not config_file.is_file():
        raise UsageError(f"{output_dir}: its base's config.json is not here ({config_file or base}); export on the "
                         "machine that trained it, or download the base first (finetune download)")
    why = gguf.export_problem(json.loads(config_file.read_text()), output_dir / "tokenizer.json")
    if why:
        raise UsageError(f"{output_dir}: {why}")
    return source


def export(output_dir: Path, out: Path, file_type: str = "f16") -> Path:
    """Check, merge and write `output_dir`'s model to the GGUF file `out`; returns it."""
    source = check(output_dir, out, file_type)
    from finetune.commands.merge import merged_model

    model, tokenizer = merged_model(output_dir)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        modelfile = ollama_modelfile(tokenizer, out.name)
        if modelfile:
            rundir.write_text(out.with_name(out.name + MODELFILE), modelfile)
        gguf.write_gguf(model.eval(), tokenizer, out, file_type, name=output_dir.resolve().name, source=source)
    except BaseException:
        out.with_name(out.name + MODELFILE).unlink(missing_ok=True)
        for directory in made:  # the directories this export made, innermost first, if nothing else is in them
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        raise
    return out


def ollama_modelfile(tokenizer, gguf_name: str) -> str | None:
    """An Ollama Modelfile for a ChatML model (`<|im_start|>role ... <|im_end|>`, as SmolLM2 and Qwen2 chat): its
    template in Ollama's form (Ollama passes a system message both as .System and among .Messages: it is written
    once), the stop token, and the system prompt the model's own template adds when a chat has none (the run
    trained with it). None for other templates: Ollama reads the GGUF's template for those it knows."""
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template or "<|im_end|>" not in template:
        return None
    marker = "\u0000user\u0000"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
    prefix = rendered.split(marker)[0]
    start = "<|im_start|>system\n"
    system = prefix[prefix.index(start) + len(start):prefix.index("<|im_end|>")] if start in prefix else ""
    lines = [f"# Ollama: ollama create NAME -f {gguf_name}.Modelfile && ollama run NAME", f"FROM ./{gguf_name}",
             'TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
             '{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
             '{{ end }}{{ end }}'
             '<|im_start|>assistant\n"""', 'PARAMETER stop "<|im_end|>"']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune export", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="a finished run's output_dir (LoRA, QLoRA, int8 or full)")
    parser.add_argument("--gguf", type=Path, required=True, help="the GGUF file to write (OUT.gguf)")
    parser.add_argument("--type", default="f16", help=f"weight type: {', '.join(gguf.EXPORT_TYPES)} (default f16)")
    args = parser.parse_args(argv)
    from finetune import logs

    logs.setup()
    try:
        path = export(args.output_dir, args.gguf, args.type)
    except UsageError as error:
        return errors.report(error)
    print(f"GGUF: {path} ({path.stat().st_size / 1e6:.1f} MB, {args.type})")
    modelfile = path.with_name(path.name + MODELFILE)
    if modelfile.is_file():
        print(f"Ollama: ollama create {path.name.split('.')[0] or 'model'} -f {modelfile}")
    print(f"llama.cpp: llama-cli -m {path} -cnv")
    return errors.OK


if __name__ == "__main__":
    sys.exit(main())
