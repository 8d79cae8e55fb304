"""Synthetic-experiment training cost: the figures behind its H and its process layout.

1. By H: process CPU time (not wall time, so a shared machine still gives the work's own
   cost) of one training step of the baseline and of Free Transformers with H = 6, 8, 16
   at the shipped synthetic shape (D 64, 4 blocks), batch 64, one thread, side by side.
   docs/synthetic/results.md chose H and sized its runs from it.
2. Threads: wall time per step of the shipped synthetic Free Transformer and of its baseline
   with 1 and 2 torch threads, alternating rounds. Decides how `freeformer synthetic` spreads
   five models over 2 cores (`experiments.synthetic.rounds`).

    OMP_NUM_THREADS=1 python bench/synthetic_cost.py [--steps 10] [--rounds 4] [--batch 64]
"""

from __future__ import annotations

import argparse
import time

import common as C
import torch

from freeformer.config import ModelConfig
from freeformer.data.synthetic import SyntheticBatches
from freeformer.model import FreeTransformer


def stepper(batch: int, **overrides):
    """``run(n)``: n training steps (forward, loss, backward, AdamW) on synthetic batches."""
    m = FreeTransformer(ModelConfig.preset("synthetic", free_bits=1.0, **overrides))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    data = SyntheticBatches(batch, 0)

    def run(n: int) -> None:
        for _ in range(n):
            x, y = data.next_batch()
            m(x, y).loss.backward()
            opt.step()
            opt.zero_grad()

    run(4)  # warm-up
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="steps per measurement")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds of part 2")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    print(C.machine_line(C.CPU), flush=True)
    torch.set_num_threads(1)
    for H, latent in [(8, False), (6, True), (8, True), (16, True)]:
        run = stepper(args.batch, latent_bits=H, latent=latent)
        c0 = time.process_time()
        run(args.steps)
        ms = (time.process_time() - c0) / args.steps * 1000
        name = f"Free Transformer H = {H}" if latent else "baseline"
        print(f"{name}: {ms:.0f} ms CPU per step (batch {args.batch}, 1 thread)", flush=True)
    for name, latent in (("Free Transformer", True), ("baseline", False)):
        run = stepper(args.batch, latent=latent)

        def on(threads: int, run=run):
            return lambda: (torch.set_num_threads(threads), run(args.steps))

        t = C.alternate({1: on(1), 2: on(2)}, args.rounds, warmup=1)
        w1, w2 = (t.median(k) / args.steps * 1000 for k in (1, 2))
        print(
            f"{name}: wall ms/step 1 thread {w1:.0f}, 2 threads {w2:.0f}: speed-up "
            f"{t.ratio(1, 2):.2f}× (median of per-round ratios, load {t.load_range()})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
