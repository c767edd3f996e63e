"""Merge a trained adapter into its base model and save a standalone model that `from_pretrained` loads.

    python -m finetune.merge outputs/qlora_int4                 # writes outputs/qlora_int4/merged
    python -m finetune.merge outputs/qlora_int4 --out models/my-model

The base is loaded as it was trained (same quantization), so a 4-bit or 8-bit base is dequantized first and the
adapter is merged into exactly the weights it was trained against, in the recipe's dtype (fp32 when that is
`auto` on a CPU). The result has no LoRA layers and no bitsandbytes dependency.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune import errors, rundir
from finetune.errors import UsageError


def merge(output_dir: Path, destination: Path) -> Path:
    """Dequantize the base (if quantized), merge the adapter, save model and tokenizer to `destination`."""
    from peft import PeftModel

    from finetune.model import load_model, load_tokenizer

    recipe = rundir.trained_recipe(output_dir)
    if not recipe.model.use_lora:
        raise UsageError(f"{output_dir}: a full fine-tuning run has nothing to merge; its model.safetensors loads "
                         "as it is")
    import dataclasses

    from finetune.model import inference_dtype

    recipe.model = dataclasses.replace(recipe.model, dtype=inference_dtype(recipe.model.dtype))
    base = load_model(recipe.model, for_training=False)
    if recipe.model.quantization != "none":
        base = base.dequantize()  # bitsandbytes layers -> plain Linear holding the dequantized weights
    merged = PeftModel.from_pretrained(base, str(output_dir)).merge_and_unload()
    destination.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(destination)
    load_tokenizer(recipe.model).save_pretrained(destination)
    return destination


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="a finished LoRA/QLoRA run's output_dir")
    parser.add_argument("--out", type=Path, default=None, help="where to save (default: OUTPUT_DIR/merged)")
    args = parser.parse_args(argv)
    try:
        destination = merge(args.output_dir, args.out or args.output_dir / "merged")
    except UsageError as error:
        return errors.report(error)
    size = sum(p.stat().st_size for p in rundir.weight_files(destination)) / 1e9
    print(f"merged model: {destination} ({size:.3f} GB of weights)")
    return errors.OK


if __name__ == "__main__":
    sys.exit(main())
