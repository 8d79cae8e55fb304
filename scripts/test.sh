#!/usr/bin/env bash
# The test suite on a fresh machine (installs what it needs). Extra args go to pytest,
# e.g. `bash scripts/test.sh -m "not dist"` or `-m gpu` on a CUDA machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
exec python -m pytest -q "$@"
