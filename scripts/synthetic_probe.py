"""Score checkpoints of synthetic-task runs: Figure-4 groups (paper protocol) + reconstruction.

usage: python scripts/synthetic_probe.py CHECKPOINT_OR_RUN_DIR [...] [--groups 20] [--seed 0]
Prints one summary line per checkpoint and appends a JSON record to probe.jsonl next to the
run directory (used for the search log in docs/synthetic/results.md).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from freeformer.experiments.reconstruction import format_reconstruction
from freeformer.experiments.synthetic import score_model

ap = argparse.ArgumentParser()
ap.add_argument("paths", nargs="+")
ap.add_argument("--groups", type=int, default=20)
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
torch.set_num_threads(1)
for path in args.paths:
    t0 = time.perf_counter()
    r = score_model(Path(path), args.groups, args.seed)
    i, s, v = r["ind"], r["sha"], r["val"]

    def f(x):
        return "—" if x is None else f"{x:.2f}"

    line = (
        f"{path} step {r['steps']}: valid {f(i['validity'])}/{f(s['validity'])} "
        f"pos {f(i['position_agreement'])}/{f(s['position_agreement'])} "
        f"|Δpos| {f(i['position_abs_diff'])}/{f(s['position_abs_diff'])} "
        f"jac {f(i['noise_jaccard'])}/{f(s['noise_jaccard'])} "
        f"KL {f(v.get('kl_bits'))} CEprior {f(v.get('ce_prior', v.get('ce')))} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    print(line, flush=True)
    if r["recon"]:
        print("   " + format_reconstruction(r["recon"]), flush=True)
    rec = {
        "path": str(path),
        "steps": r["steps"],
        "ind": i,
        "sha": s,
        "val": v,
        "recon": r["recon"],
        "panel": r["panel"],
    }
    p = Path(path)
    run = p if (p / "config.json").is_file() else p.parent.parent
    with open(run.parent / "probe.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")
