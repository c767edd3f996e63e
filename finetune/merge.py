"""Merge a trained adapter into its base model and save a standalone model that `from_pretrained` loads.

    python -m finetune.merge outputs/qlora_int4                 # writes outputs/qlora_int4/merged
    python -m finetune.merge outputs/qlora_int4 --out models/my-model

The base is loaded as it was trained (same quantization), so a 4-bit or 8-bit base is dequantized first and the
adapter is merged into exactly the weights it was trained against, in the recipe's dtype (fp32 when that is
`auto` on a CPU). The result has no LoRA layers and no bitsandbytes dependency.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from finetune.recipe import RecipeError, load_recipe


def trained_recipe(output_dir: Path):
    """The recipe of a finished LoRA run in `output_dir`. Raises RecipeError when it is not one."""
    recipe_file = output_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise RecipeError([f"{output_dir}: no recipe.yaml; give the output_dir of a finished training run"])
    recipe = load_recipe([str(recipe_file)])
    if recipe.model.use_lora and not (output_dir / "adapter_model.safetensors").is_file():
        raise RecipeError([f"{output_dir}: no adapter_model.safetensors; has the training finished?"])
    return recipe


def load_trained(output_dir: Path):
    """(recipe, tokenizer, model) for inference: the base loaded as trained plus the adapter, or the full model."""
    from peft import PeftModel

    from finetune.model import load_model, load_tokenizer

    recipe = trained_recipe(output_dir)
    tokenizer = load_tokenizer(recipe.model)
    if not recipe.model.use_lora:
        full = dataclasses.replace(recipe.model, model_name_or_path=str(output_dir))
        return recipe, tokenizer, load_model(full, for_training=False)
    base = load_model(recipe.model, for_training=False)
    return recipe, tokenizer, PeftModel.from_pretrained(base, str(output_dir)).eval()


def merge(output_dir: Path, destination: Path) -> Path:
    """Dequantize the base (if quantized), merge the adapter, save model and tokenizer to `destination`."""
    from peft import PeftModel

    from finetune.model import load_model, load_tokenizer

    recipe = trained_recipe(output_dir)
    if not recipe.model.use_lora:
        raise RecipeError([f"{output_dir}: a full fine-tuning run has nothing to merge; its model.safetensors "
                           "loads as it is"])
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
    except RecipeError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in destination.glob("*.safetensors")) / 2**30
    print(f"merged model: {destination} ({size:.3f} GB of safetensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
