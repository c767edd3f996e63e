"""finetune: LoRA, QLoRA and int8 fine-tuning from YAML recipes, on Hugging Face Trainer, tracked in W&B."""

__version__ = "0.1.0"
