#!/usr/bin/env bash
# The paper's synthetic experiment (Section 4.1, Figure 4), quick version: a few minutes on
# 2 CPU cores. Trains a Free Transformer with κ = 2 bits on both cores (--baseline adds the
# matched baseline), then shows groups of samples that share one latent Z next to groups
# that do not: with a shared Z the targets (or the noise) tend to land at the same place.
# How strongly depends on the seed: the effect cleared its bar in 7 of 10 fresh seeds
# (docs/synthetic/results.md lists every seed tried). Extra args go to
# `freeformer synthetic` (e.g. --out DIR, --seed N); drop --quick for the full run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh plot   # only what the demo needs (the tests install the rest)
. .venv/bin/activate
exec freeformer synthetic --quick --out runs/synthetic-quick "$@"
