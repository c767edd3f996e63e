#!/usr/bin/env bash
# Train a recipe through accelerate, with W&B settings from the environment; exit codes and signals as the README
# says (finetune/commands/launch.py: bad input before anything starts, exact exit codes, SIGTERM/Ctrl-C reach training).
#
#   launch/train.sh recipes/qlora_int4.yaml --max_steps 10
#   WANDB_PROJECT=x WANDB_TAGS=a,b launch/train.sh recipes/qlora_int4.yaml --max_steps 10
#   ACCELERATE_CONFIG=path/to/accelerate.yaml launch/train.sh recipes/lora_bf16.yaml
#
# Each export below is a default: a value already in the caller's environment wins. Everything else of the
# WANDB_* family (PROJECT, NAME, TAGS, NOTES, ENTITY, RUN_GROUP, MODE, DIR, RUN_ID, RESUME, DISABLED) passes
# through untouched; see the README for what each does.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

export WANDB_JOB_TYPE="${WANDB_JOB_TYPE:-training}"
export WANDB_LOG_MODEL="${WANDB_LOG_MODEL:-false}"     # end | checkpoint: upload the adapter as an artifact
export WANDB_WATCH="${WANDB_WATCH:-false}"             # gradients | parameters | all: histograms, costs speed
export WANDB_INIT_TIMEOUT="${WANDB_INIT_TIMEOUT:-20}"  # seconds to reach the server before logging offline
# WANDB_MODE stays unset unless you set it: online with credentials, offline (then `make sync`) without.
# WANDB_NAME stays unset unless you set it: the run is named model-variant-rank-lr-time.

python="python3"
[ -x "$root/.venv/bin/python" ] && python="$root/.venv/bin/python"
exec "$python" -m finetune.commands.launch "$@"
