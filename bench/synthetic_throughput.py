"""Synthetic-experiment throughput choices, measured side by side in one process.

1. RoPE: the previous ``apply_rope`` (four ops on strided halves and a cat) against the
   current one (x·[c, c] + roll(x)·[−s, s]): the op alone (q and k of one layer, forward +
   backward), and a full training step of the κ = 1 bit Free Transformer (D 64, 4 blocks,
   H 8, batch 64, one thread), alternating rounds; process CPU time.
2. Threads: wall time per step of the Free Transformer and of the baseline with 1 and 2
   torch threads, alternating rounds. Decides how `freeformer synthetic` spreads five models
   over 2 cores (`experiments.synthetic.rounds`).

usage: python bench/synthetic_throughput.py [--steps 15] [--rounds 4]   (on a quiet machine)
"""
import argparse
import statistics
import time

import torch

from freeformer import layers
from freeformer.config import ModelConfig
from freeformer.data.synthetic import SyntheticBatches
from freeformer.model import FreeTransformer

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=15)
ap.add_argument("--rounds", type=int, default=4)
args = ap.parse_args()


def rope_before(x, cos, sin):  # the implementation this commit replaced, for the comparison
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).type_as(x)


def stepper(latent: bool):
    m = FreeTransformer(ModelConfig.preset("synthetic", free_bits=1.0, latent=latent))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    data = SyntheticBatches(64, 0)

    def run(n: int, clock) -> float:
        c0 = clock()
        for _ in range(n):
            x, y = data.next_batch()
            m(x, y).loss.backward()
            opt.step()
            opt.zero_grad()
        return (clock() - c0) / n * 1000
    run(4, time.process_time)
    return run


def rope_op(f, n: int) -> float:
    """CPU ms of RoPE forward + backward on q and k of one attention layer (batch 64)."""
    cos, sin = layers.rope_tables(16, 65, 1e4)
    w = torch.randn(64, 192, requires_grad=True)
    x = torch.randn(64, 65, 64)
    c0 = time.process_time()
    for _ in range(n):
        q, k, _ = (x @ w).view(64, 65, 3, 4, 16).unbind(2)  # strided views, as in Attention
        (f(q, cos, sin).sum() + f(k, cos, sin).square().sum()).backward()
    return (time.process_time() - c0) / n * 1000


torch.set_num_threads(1)
current = layers.apply_rope
ident = lambda x, cos, sin: x * 1.0  # noqa: E731  the harness's own cost, subtracted
op = {"before": [], "current": [], "none": []}
ft = stepper(True)
step = {"before": [], "current": []}
for _ in range(args.rounds):
    for name, f in (("before", rope_before), ("current", current), ("none", ident)):
        op[name].append(rope_op(f, 50))
    for name, f in (("before", rope_before), ("current", current)):
        layers.apply_rope = f
        step[name].append(ft(args.steps, time.process_time))
layers.apply_rope = current
o = {k: statistics.median(v) - statistics.median(op["none"]) for k, v in op.items()}
print(f"RoPE on q and k, forward + backward, CPU ms (median of {args.rounds} rounds, harness "
      f"subtracted): before {o['before']:.2f}, current {o['current']:.2f}: "
      f"{o['before'] / o['current']:.2f}× faster")
b, c = statistics.median(step["before"]), statistics.median(step["current"])
print(f"FT training step CPU ms (median of {args.rounds} rounds): before {b:.0f}, current {c:.0f} "
      f"(current / before {c / b:.3f}; per-round spread {min(step['current']):.0f}–"
      f"{max(step['current']):.0f})")

base = stepper(False)
for name, run in (("Free Transformer", ft), ("baseline", base)):
    wall = {1: [], 2: []}
    for _ in range(args.rounds):
        for th in (1, 2):
            torch.set_num_threads(th)
            wall[th].append(run(args.steps, time.perf_counter))
    w1, w2 = statistics.median(wall[1]), statistics.median(wall[2])
    print(f"{name}: wall ms/step 1 thread {w1:.0f}, 2 threads {w2:.0f}: speed-up {w1 / w2:.2f}×")
