#!/usr/bin/env bash
# The paper's synthetic experiment (Section 4.1, Figure 4), quick version: a few minutes
# on 2 CPU cores. Extra args go to `freeformer synthetic` (e.g. --out DIR, or drop --quick
# by calling `freeformer synthetic` directly for the full run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec freeformer synthetic --quick --out runs/synthetic-quick "$@"
