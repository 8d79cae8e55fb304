"""CPU cost of one training step of the synthetic-experiment models, by H (one thread).

Measures process CPU time (not wall time), so a run on a shared machine still gives the
cost of the work itself. Models: the baseline and Free Transformers with H = 6, 8, 16 at the
shipped synthetic shape (D 64, 4 blocks), batch 64, side by side in one process.

usage: OMP_NUM_THREADS=1 python bench/synthetic_step_cost.py [--steps 10] [--batch 64]
"""
import argparse
import time

import torch

from freeformer.config import ModelConfig
from freeformer.data.synthetic import SyntheticBatches
from freeformer.model import FreeTransformer

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--batch", type=int, default=64)
args = ap.parse_args()
torch.set_num_threads(1)
for H, latent in [(8, False), (6, True), (8, True), (16, True)]:
    m = FreeTransformer(ModelConfig.preset("synthetic", latent_bits=H, free_bits=1.0,
                                           latent=latent))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    data = SyntheticBatches(args.batch, 0)
    for i in range(args.steps + 4):
        if i == 4:
            c0 = time.process_time()
        x, y = data.next_batch()
        m(x, y).loss.backward()
        opt.step()
        opt.zero_grad()
    ms = (time.process_time() - c0) / args.steps * 1000
    name = f"Free Transformer H = {H}" if latent else "baseline"
    print(f"{name}: {ms:.0f} ms CPU per step (batch {args.batch}, 1 thread)", flush=True)
