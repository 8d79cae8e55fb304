"""CPU precision: one full training step (forward, loss, backward, clip, AdamW) in FP32 against
bf16 autocast, at the shipped presets' shapes, Free Transformer and baseline: the measurement
behind ``train.precision = "auto"`` on CPU (runtime.py::resolve_precision), which picks bf16
where the CPU has native bf16 matmul (AVX512-BF16 or AMX-BF16) and the model is at least
``CPU_BF16_MIN_DIM`` wide.

The step is ``freeformer.train.train_step`` itself, on random tokens of the preset's shape,
with the preset's batch, micro-batches and optimizer. FP32 and bf16 are separate models built
with the same seed, timed alternately in rounds; speed-up = median of per-round fp32 / bf16.

    python bench/bench_precision.py                       # synthetic + stdlib-code (~2 min)
    python bench/bench_precision.py --presets stdlib-code --rounds 7 --write
    python bench/bench_precision.py --smoke               # debug preset, 1 round (seconds)
"""

from __future__ import annotations

import dataclasses
import sys

import common as C
import theory
import torch

from freeformer import FreeTransformer
from freeformer.optim import build_optimizer
from freeformer.runconfig import available_presets, load_run_config
from freeformer.runtime import autocast, bf16_native_cpu, resolve_precision
from freeformer.train import train_step


def make_step(cfg, latent: bool, precision: str):
    """A closure doing one optimizer step of ``cfg`` (latent on/off) at ``precision``."""
    mc, tc = cfg.model.replace(latent=latent), cfg.train
    model = FreeTransformer(mc, seed=tc.seed).train()
    opt = build_optimizer(model, tc)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, mc.vocab_size, (tc.batch_size, tc.seq_len + 1), generator=g)
    x, y = x[:, :-1], x[:, 1:]
    n_micro = tc.batch_size // (tc.micro_batch_size or tc.batch_size)
    ctx = autocast(C.CPU, precision)

    def step():
        noise = (
            torch.rand(tc.batch_size, tc.seq_len, mc.latent_bits, generator=g) if latent else None
        )
        m = train_step(model, opt, x, y, noise, n_micro, tc, ctx)
        return float(m["loss"])

    return step


def run_config(name: str):
    """A shipped preset's RunConfig, or stdlib-code's with the model, T and B of a shape of
    bench_train.py (d128-L4, d256-L8, d512-L8); a preset wins where a name is both (debug)."""
    if name in available_presets():
        return load_run_config(preset=name, overrides=["train.progress=false"])
    if name not in theory.CPU_SHAPES:
        return None
    mc, T, B = theory.bench_shape(name, 12)
    cfg = load_run_config(preset="stdlib-code", overrides=["train.progress=false"])
    return dataclasses.replace(
        cfg,
        model=mc.replace(max_seq_len=max(T, mc.max_seq_len)),
        train=dataclasses.replace(cfg.train, seq_len=T, batch_size=B),
    )


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument(
        "--presets",
        default="synthetic,stdlib-code",
        help="shipped presets, or bench shapes d128-L4, d256-L8, d512-L8 (stdlib-code's run "
        "settings with that model, T and B)",
    )
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    ap.add_argument("--smoke", action="store_true", help="debug preset, 1 round: the script runs")
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    ap.add_argument(
        "--section", default="precision-cpu", help="RESULTS.md section --write replaces"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    presets = ["debug"] if args.smoke else [p for p in args.presets.split(",") if p]
    rounds = 1 if args.smoke else args.rounds
    header = C.machine_line(C.CPU)
    native = bf16_native_cpu()
    print(header, f"native bf16 matmul: {native}", sep="\n", flush=True)
    rows = []
    for name in presets:
        cfg = run_config(name)
        if cfg is None:
            ap.error(f"unknown preset or shape {name!r}")
        tc, mc = cfg.train, cfg.model
        for latent in (True, False):
            fns = {p: make_step(cfg, latent, p) for p in ("fp32", "bf16")}
            t = C.alternate(fns, rounds, warmup=1)
            lo, hi = t.ratio_range("fp32", "bf16")
            label = "FT" if latent else "baseline"
            rows.append(
                [
                    name,
                    label,
                    f"D {mc.dim}, L {mc.n_layers}, H {mc.latent_bits}",
                    f"{tc.batch_size}×{tc.seq_len}",
                    C.fmt_ms(t.median("fp32")),
                    C.fmt_ms(t.median("bf16")),
                    f"{t.ratio('fp32', 'bf16'):.2f} ({lo:.2f}–{hi:.2f})",
                    resolve_precision(C.CPU, "auto", mc.dim),
                    t.load_range(),
                ]
            )
            print(rows[-1], flush=True)
    head = (
        "preset|model|shape|B×T|FP32 step (ms)|bf16 autocast step (ms)|"
        "speed-up fp32/bf16 (range)|precision=auto picks (this CPU)|load"
    )
    C.report(
        "## CPU precision: FP32 vs bf16 autocast (`bench/bench_precision.py`)",
        f"{header}; native bf16 matmul (AVX512-BF16 or AMX-BF16): {'yes' if native else 'no'}",
        f"{rounds} alternating rounds; one step = `train.train_step` (forward, loss, backward, "
        "clip, AdamW) at the preset's batch, on random tokens; speed-up = median of per-round "
        "fp32 / bf16 ratios.",
        head,
        rows,
        args,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
