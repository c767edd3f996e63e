#!/usr/bin/env bash
# Create $VENV (default .venv) and install requirements.txt into it. Idempotent.
#
# torch goes first and alone: asking pip for `torch` together with packages that depend on it lets the resolver
# take the newest build from PyPI, which on Linux is a multi-GB CUDA build. Without an NVIDIA GPU we ask for the
# CPU build: a local CPU wheel (pip's find-links) or PyTorch's CPU index.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON_BIN=${PYTHON_BIN:-python3}
TORCH_VERSION=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements.txt)

[ -x "$VENV/bin/python" ] || "$PYTHON_BIN" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch==$TORCH_VERSION"
  else
    # A +cpu wheel sorts above the plain version, so pip prefers it wherever one is offered.
    "${pip[@]}" "torch==$TORCH_VERSION" --extra-index-url https://download.pytorch.org/whl/cpu \
      --timeout 20 --retries 1
  fi
fi
"${pip[@]}" -r requirements.txt
# The toolkit itself, editable: `import finetune` works from any directory (`accelerate launch finetune/run.py`,
# `-m finetune.run`), and the `finetune` command lands in $VENV/bin.
"${pip[@]}" --no-deps --no-build-isolation -e .

if ! command -v nvidia-smi >/dev/null 2>&1 && "$VENV/bin/python" -m pip list 2>/dev/null | grep -q '^nvidia-'; then
  echo "warning: CUDA packages (nvidia-*) were installed on a machine without an NVIDIA GPU;" \
       "remove $VENV and install torch==$TORCH_VERSION from https://download.pytorch.org/whl/cpu first" >&2
fi
echo "installed into $VENV: $("$VENV/bin/python" -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')"
