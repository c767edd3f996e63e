"""Weights & Biases: resolving WANDB_* settings and starting exactly one run (`wandb_run`)."""
