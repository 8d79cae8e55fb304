#!/usr/bin/env bash
# Creates .venv (if missing) and installs freeformer with the extras it is asked for:
# `setup.sh` alone installs what the tests use; `setup.sh plot` only what the demo needs
# (a fresh machine runs the demo without waiting for transformers, lm-eval, ...).
# torch is pinned to 2.13.0 (the CPU wheel this project is developed with); on a CUDA
# machine set FREEFORMER_TORCH="torch" (or a CUDA wheel spec) to get your build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
ALL="dev,hf,plot,eval,pretrained-gguf"
EXTRAS="${1:-$ALL}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
fresh() {  # installed for these extras (or for all of them) since pyproject.toml changed?
  for s in ".venv/.freeformer-installed-$1" ".venv/.freeformer-installed-$ALL"; do
    if [ -f "$s" ] && [ ! pyproject.toml -nt "$s" ]; then return 0; fi
  done
  return 1
}
if ! fresh "$EXTRAS"; then
  python -m pip install -q --upgrade pip >/dev/null
  python -m pip install -q "${FREEFORMER_TORCH:-torch==2.13.0}"
  python -m pip install -q -e ".[$EXTRAS]"
  touch ".venv/.freeformer-installed-$EXTRAS"
fi
