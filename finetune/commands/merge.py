"""Merge a trained adapter into its base model and save a standalone model that `from_pretrained` loads.

    python -m finetune.commands.merge outputs/qlora_int4                 # writes outputs/qlora_int4/merged
    python -m finetune.commands.merge outputs/qlora_int4 --out models/my-model

The base is loaded as it was trained (same quantization), so a 4-bit or 8-bit base is dequantized first and the
adapter is merged into exactly the weights it was trained against, in the recipe's dtype (fp32 when that is
`auto` on a CPU). The result has no LoRA layers and no bitsandbytes dependency.

The destination is new, empty, or an earlier merge's: never the run's own directory, the base model's or the
dataset's, nor a directory of other files. The model is written beside it and renamed into place, so a merge that
fails leaves what was there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune import errors
from finetune.errors import UsageError
from finetune.training import rundir


def destination_problem(destination: Path, output_dir: Path) -> str | None:
    """Why the merged model must not be written to `destination`, or None. Reads the run's recipe.yaml as text:
    answered before anything heavy loads."""
    from finetune.recipe.keys import protected_problem

    if destination.expanduser().resolve() == output_dir.resolve():
        return (f"--out: {destination} is the run's own directory; give a new directory (the default is "
                f"{output_dir / 'merged'})")
    keys = rundir.results(output_dir)[0]
    problem = protected_problem(destination, str(keys.get("model_name_or_path") or ""), str(keys.get("dataset") or ""),
                                option="--out")
    if problem:
        return problem
    # Written beside the destination and renamed into place: its parent is what must be writable.
    return rundir.destination_problem(destination, "merge", merged_files(destination), writable=destination.parent)


def merged_files(directory: Path) -> set[str]:
    """The files an earlier merge wrote into `directory` (listed in its marker), the marker included; {} when none
    did. A marker of an earlier version lists nothing: the model's and tokenizer's usual files count as the merge's."""
    import fnmatch

    marker = directory / rundir.MERGED_MARKER
    if not marker.is_file():
        return set()
    listed = (rundir.read_json(marker) or {}).get("files")
    if listed is None:
        listed = [path.name for path in directory.iterdir()
                  if any(fnmatch.fnmatch(path.name, pattern) for pattern in rundir.WRITTEN_BY_RUN)]
    return {*listed, rundir.MERGED_MARKER}


def merged_model(output_dir: Path):
    """(model, tokenizer) of a finished run as one plain model: a LoRA run's adapter merged into its base, loaded
    as it was trained (a 4-bit or 8-bit base dequantized first), in the recipe's dtype (fp32 when that is `auto`
    on a CPU); a full run's own model."""
    import dataclasses

    from finetune.model.load import inference_dtype, load_model, load_tokenizer

    recipe = rundir.trained_recipe(output_dir)
    recipe.model = dataclasses.replace(recipe.model, dtype=inference_dtype(recipe.model.dtype))
    if not recipe.model.use_lora:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(output_dir, dtype="auto"), load_tokenizer(recipe.model)
    from peft import PeftModel

    base = load_model(recipe.model, for_training=False)
    if recipe.model.quantization != "none":
        base = base.dequantize()  # bitsandbytes layers -> plain Linear holding the dequantized weights
    return PeftModel.from_pretrained(base, str(output_dir)).merge_and_unload(), load_tokenizer(recipe.model)


def merge(output_dir: Path, destination: Path) -> Path:
    """Dequantize the base (if quantized), merge the adapter, save model and tokenizer to `destination` (written
    beside it, then renamed into place; an earlier merge there is replaced)."""
    problem = destination_problem(destination, output_dir)
    if problem:
        raise UsageError(problem)
    recipe = rundir.trained_recipe(output_dir)
    if not recipe.model.use_lora:
        raise UsageError(f"{output_dir}: a full fine-tuning run has nothing to merge; its model.safetensors loads "
                         "as it is")
    import os
    import shutil

    merged, tokenizer = merged_model(output_dir)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        rundir.write_json(staging / rundir.MERGED_MARKER, {"run": str(output_dir.resolve()),
                                                          "files": sorted(p.name for p in staging.iterdir())})
        replaced = destination.parent / f".{destination.name}.replaced-{os.getpid()}"
        if destination.exists():  # empty, or an earlier merge (destination_problem)
            os.replace(destination, replaced)
        try:
            os.replace(staging, destination)
        except OSError:
            if replaced.exists():
                os.replace(replaced, destination)  # the earlier merge stays
            raise
        shutil.rmtree(replaced, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="a finished LoRA/QLoRA run's output_dir")
    parser.add_argument("--out", type=Path, default=None, help="where to save (default: OUTPUT_DIR/merged)")
    parser.add_argument("--gguf", type=Path, help="write one GGUF file instead (finetune export)")
    parser.add_argument("--type", help="with --gguf: the weight type, default f16 (finetune export --help)")
    args = parser.parse_args(argv)
    if args.gguf is None and args.type is not None:
        return errors.report(UsageError("--type: it sets the weight type of a GGUF file; give --gguf OUT.gguf too"))
    if args.gguf is not None and args.out is not None:
        return errors.report(UsageError("--out and --gguf: give one (a merged model's directory, or a GGUF file)"))
    if args.gguf is not None:
        from finetune.commands import export

        return export.main([str(args.output_dir), "--gguf", str(args.gguf), "--type", args.type or "f16"])
    try:
        destination = merge(args.output_dir, args.out or args.output_dir / "merged")
    except UsageError as error:
        return errors.report(error)
    size = sum(p.stat().st_size for p in rundir.weight_files(destination)) / 1e9
    print(f"merged model: {destination} ({size:.3f} GB of weights)")
    return errors.OK


if __name__ == "__main__":
    sys.exit(main())
