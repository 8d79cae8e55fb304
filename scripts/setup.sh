#!/usr/bin/env bash
# Creates .venv (if missing) and installs freeformer with the extras the tests and demo use.
# torch is pinned to 2.13.0 (the CPU wheel this project is developed with); on a CUDA
# machine set FREEFORMER_TORCH="torch" (or a CUDA wheel spec) to get your build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.freeformer-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip >/dev/null
  python -m pip install -q "${FREEFORMER_TORCH:-torch==2.13.0}"
  python -m pip install -q -e ".[dev,hf,plot,eval,pretrained-gguf]"
  touch "$stamp"
fi
