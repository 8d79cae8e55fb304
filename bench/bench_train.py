"""Training step (forward + loss + backward) time and peak memory: our Free Transformer and
baseline against x-transformers' FreeTransformer (2.31.10) and its decoder, and the PyPI
free-transformer 0.1.2 and its baseline, at the same shapes.

"Same shape" = same width D, depth L (the FT's decoder split L/2 + L/2, one encoder
block), query/KV heads, SwiGLU width (the Llama rule 8/3·D rounded up to 64, bias-free),
vocabulary, sequence length, batch and latent bits H, κ = 1/2 bit, RoPE, RMSNorm, PyTorch's
SDPA where the library offers it (x-transformers: attn_flash=True; free-transformer 0.1.2
has no SDPA path and no RoPE in its encoder, and its encoder block ignores GQA). No
optimizer step: only forward, loss and backward are timed, gradients dropped in between.

All competitors of one shape are timed alternately in rounds (order rotated every round),
and compared by the median of per-round ratios. Peak memory of one step (after a warm-up
step, gradients set to None first) is measured separately, untimed: the peak of live PyTorch
allocations above the start, from the profiler's allocation events (CPU) or the CUDA
allocator's counters (bench_mapper.py cross-checks the CPU method against the RSS
high-water mark).

    python bench/bench_train.py              # H ∈ {8, 16}, debug → d256-L8 (~4 min)
    python bench/bench_train.py --quick      # debug and d128 at H = 16 (< 1 min)
    python bench/bench_train.py --large      # adds d512-L8, 2048 tokens per step
    python bench/bench_train.py --write      # also RESULTS.md + bench/train_results.json
    python bench/bench_train.py --device cuda --dtype bf16 --compile \\
        --shapes paper-1.5b --impls ours-ft,ours-base   # GPU: MFU at the paper's 1.5B shape
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable

import common as C
import theory
import torch
import torch.nn.functional as F
from torch import nn

from freeformer import FreeTransformer, ModelConfig

KAPPA_NATS = 0.5 * math.log(2.0)  # κ = 1/2 bit, for every implementation

IMPLS = ("ours-ft", "ours-base", "xt-ft", "xt-dec", "ft012-ft", "ft012-base")
LABELS = {
    "ours-ft": "ours FT",
    "ours-base": "ours baseline",
    "xt-ft": "x-transformers FT",
    "xt-dec": "x-transformers decoder",
    "ft012-ft": "free-transformer 0.1.2 FT",
    "ft012-base": "free-transformer 0.1.2 baseline",
}


class Runner:
    """One implementation at one shape: ``step()`` = forward + loss + backward."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> None:
        self.model, self.loss_fn = model, loss_fn

    def zero(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def step(self) -> None:
        self.loss_fn().backward()

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def build(
    impl: str, cfg: ModelConfig, T: int, B: int, device: torch.device, amp: Callable, compile_: bool
) -> Runner:
    """Build one implementation with the shape of ``cfg`` and its step on fixed data."""
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(device)
    inp, tgt = seq[:, :-1], seq[:, 1:]
    D, L, H = cfg.dim, cfg.n_layers, cfg.latent_bits
    torch.manual_seed(0)

    def maybe_compile(m: nn.Module) -> nn.Module:
        if not compile_:
            return m
        if isinstance(m, FreeTransformer):  # regional, as `freeformer train` does
            from freeformer.distributed import compile_blocks

            return compile_blocks(m)
        return torch.compile(m)

    if impl.startswith("ours"):
        model = FreeTransformer(cfg.replace(latent=impl != "ours-base")).to(device).train()
        fwd = maybe_compile(model)
        gen = torch.Generator(device=device).manual_seed(0)

        def loss():
            with amp():
                return fwd(inp, tgt, generator=gen, return_logits=False).loss
    elif impl.startswith("xt"):
        from x_transformers import Decoder, TransformerWrapper
        from x_transformers.free_transformer import FreeTransformer as XFreeTransformer

        try:  # x-transformers warns (loguru) about short rotary dims at the debug shape
            from loguru import logger

            logger.disable("x_transformers")
        except ImportError:
            pass
        # Rotary over the whole head, as ours (x-transformers' default rotates half of it).
        shared = dict(
            attn_kv_heads=cfg.n_kv_heads,
            attn_flash=True,
            ff_glu=True,
            ff_swish=True,
            ff_mult=cfg.mlp_hidden / D,
            ff_no_bias=True,
            rotary_emb_dim=cfg.head_dim,
        )
        if impl == "xt-ft":
            model = XFreeTransformer(
                num_tokens=cfg.vocab_size,
                dim=D,
                dec_head_depth=L // 2,
                dec_tail_depth=L - L // 2,
                max_seq_len=T,
                enc_depth=1,
                attn_dim_head=cfg.head_dim,
                heads=cfg.n_heads,
                latent_bits=H,
                kl_loss_threshold=KAPPA_NATS,
                **shared,
            )
            model = model.to(device).train()
            fwd = maybe_compile(model)

            def loss():
                with amp():
                    return fwd(seq)  # shifts internally: predicts seq[:, 1:] from seq[:, :-1]
        else:
            model = TransformerWrapper(
                num_tokens=cfg.vocab_size,
                max_seq_len=T,
                use_abs_pos_emb=False,
                attn_layers=Decoder(
                    dim=D,
                    depth=L,
                    heads=cfg.n_heads,
                    attn_dim_head=cfg.head_dim,
                    rotary_pos_emb=True,
                    use_rmsnorm=True,
                    **shared,
                ),
            )
            model = model.to(device).train()
            fwd = maybe_compile(model)

            def loss():
                with amp():
                    return F.cross_entropy(fwd(inp).flatten(0, 1).float(), tgt.flatten())
    else:
        import free_transformer as ft012

        mc = ft012.ModelConfig(
            vocab_size=cfg.vocab_size,
            hidden_dim=D,
            num_layers=L,
            num_heads=cfg.n_heads,
            num_kv_heads=cfg.n_kv_heads,
            ffn_hidden_dim=cfg.mlp_hidden,
            max_seq_len=T,
            latent_dim=H,
        )
        if impl == "ft012-ft":
            model = ft012.FreeTransformer(mc).to(device).train()
            fwd = maybe_compile(model)

            def loss():
                with amp():
                    logits, z_logits = fwd(inp, mode="training")
                    total, _ = ft012.compute_vae_loss(
                        logits.float(), tgt, z_logits.float(), H, beta_kl=1.0, free_bits=KAPPA_NATS
                    )
                return total
        else:
            model = ft012.TransformerBaseline(mc).to(device).train()
            fwd = maybe_compile(model)

            def loss():
                with amp():
                    return F.cross_entropy(fwd(inp).flatten(0, 1).float(), tgt.flatten())

    return Runner(model, loss)


def mapper_gemm(cfg: ModelConfig, N: int, device: torch.device) -> Callable[[], None]:
    """The GEMMs the mapper backward cannot avoid (2·N·2^H·D FLOPs), at its chunk shapes."""
    from freeformer import latent

    H, D = cfg.latent_bits, cfg.dim
    k, nt = latent.mapper_chunks(N, H, device)
    Cc = 1 << k
    W = torch.randn(1 << H, D, device=device)
    dr = torch.randn(N, D, device=device)
    S = torch.empty(nt, Cc, device=device)

    def run():
        for t0 in range(0, N, nt):
            g = dr[t0 : t0 + nt]
            for j in range(0, 1 << H, Cc):
                torch.mm(g, W[j : j + Cc].T, out=S[: g.shape[0]])

    return run


def measure_shape(
    name: str,
    cfg: ModelConfig,
    T: int,
    B: int,
    impls: list[str],
    rounds: int,
    device: torch.device,
    amp: Callable,
    compile_: bool,
) -> dict:
    runners, failed, first = {}, {}, {}
    for i in impls:
        try:
            r = build(i, cfg, T, B, device, amp, compile_)
            C.sync(device)
            t0 = time.perf_counter()
            r.step()  # one untimed step: an implementation that fails is reported, not timed
            C.sync(device)
            first[i] = time.perf_counter() - t0  # with --compile: mostly compilation
            r.zero()
            runners[i] = r
        except Exception as e:  # noqa: BLE001 — a peer library's failure is a result
            failed[i] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            print(f"{i} fails at {name} H={cfg.latent_bits}: {failed[i]}", flush=True)
    warm = 2 if compile_ else 1
    fns = {i: r.step for i, r in runners.items()}
    if "ours-ft" in runners and "ours-base" in runners:
        fns["mapper-gemm"] = mapper_gemm(cfg, B * T, device)
    t = C.alternate(
        fns, rounds, warmup=warm, before={i: r.zero for i, r in runners.items()}, device=device
    )
    res = dict(
        shape=name,
        H=cfg.latent_bits,
        D=cfg.dim,
        L=cfg.n_layers,
        T=T,
        B=B,
        load=t.load_range(),
        rounds=rounds,
        times={i: t.times[i] for i in runners},
        median={i: t.median(i) for i in runners},
        params={},
        mem={},
        failed=failed,
        first=first,
    )
    for i, r in runners.items():
        r.zero()
        res["params"][i] = r.param_bytes()
    res["_runners"] = runners
    res["_timings"] = t
    return res


def measure_memory(res: dict, device: torch.device) -> None:
    for i, r in res.pop("_runners").items():
        r.zero()
        res["mem"][i] = C.peak_alloc(r.step, device).peak
        r.zero()


def fmt_mib(b) -> str:
    return "—" if b is None else f"{b / C.MiB:,.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--quick", action="store_true", help="two small shapes at H = 16 (< 1 min)")
    ap.add_argument("--large", action="store_true", help="add d512-L8 (2048 tokens per step)")
    ap.add_argument(
        "--write", action="store_true", help="update bench/RESULTS.md and bench/train_results.json"
    )
    ap.add_argument("--bits", default="8,16", help="latent bits H to measure (default 8,16)")
    ap.add_argument(
        "--shapes",
        default=None,
        help="comma-separated shape names (debug, d128-L4, d256-L8, d512-L8, paper-1.5b, paper-8b)",
    )
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="alternating rounds (default 5, 3 for shapes with a step over ~1 s)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (default 1: on a shared 2-core machine the second "
        "thread mostly measures the co-tenants)",
    )
    ap.add_argument(
        "--section",
        default=None,
        help="name of the RESULTS.md section --write replaces (default from device)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: autocast around forward and loss (fp32 master weights)",
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile every model")
    ap.add_argument("--batch", type=int, default=None, help="override B for every shape")
    ap.add_argument("--seq", type=int, default=None, help="override T for every shape")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="accelerator peak (dense TFLOP/s of --dtype) for an MFU column, e.g. 989 "
        "for an H100 SXM in bf16",
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    C.setup_threads(args.threads)
    amp = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if args.dtype == "bf16"
        else (lambda: torch.autocast(device.type, enabled=False))
    )
    impls = [i for i in args.impls.split(",") if i]
    bad = set(impls) - set(IMPLS)
    if bad:
        ap.error(f"unknown --impls {sorted(bad)}; choose from {', '.join(IMPLS)}")
    cols = list(IMPLS)
    bits = [int(b) for b in args.bits.split(",")]
    if args.quick:
        bits, names = [16], ["debug", "d128-L4"]
        args.rounds = args.rounds or 3
    else:
        names = ["debug", "d128-L4", "d256-L8"] + (["d512-L8"] if args.large else [])
    if args.shapes:
        names = args.shapes.split(",")

    def shape_list(H):
        table = {n: (cfg, T, B) for n, cfg, T, B in theory.bench_train_shapes(H)}
        for p in ("paper-1.5b", "paper-8b"):
            table[p] = (ModelConfig.preset(p, latent_bits=H), 4096, 1)
        for n in names:
            if n not in table:
                ap.error(f"unknown shape {n!r}; choose from {', '.join(table)}")
            cfg, T, B = table[n]
            T, B = args.seq or T, args.batch or B
            yield n, cfg.replace(max_seq_len=max(cfg.max_seq_len, T)), T, B

    header = C.machine_line(device)
    print(header, flush=True)
    results = []
    for H in bits:
        for name, cfg, T, B in shape_list(H):
            big = cfg.dim >= 512 or T * B >= 4096
            rounds = args.rounds or (3 if big or (cfg.dim >= 256 and H >= 16) else 5)
            print(f"-- {name} H={H} B×T={B}×{T} ({rounds} rounds)", flush=True)
            res = measure_shape(name, cfg, T, B, impls, rounds, device, amp, args.compile)
            res["theory"] = theory.ratio(theory.Shape.from_config(name, cfg, T, B, H))
            res["flops"] = theory.costs(theory.Shape.from_config(name, cfg, T, B, H))
            results.append(res)
            print(
                {k: v for k, v in res.items() if not k.startswith("_") and k != "times"}, flush=True
            )
    failures = [
        f"{LABELS[i]} fails at {r['shape']}, H = {r['H']}: `{e}`"
        for r in results
        for i, e in r["failed"].items()
    ]
    for res in results:
        measure_memory(res, device)
        print(res["shape"], res["H"], {i: fmt_mib(m) for i, m in res["mem"].items()}, flush=True)

    # ---- tables
    time_rows, ratio_rows, mem_rows, measured = [], [], [], {}
    for r in results:
        t: C.Timings = r.pop("_timings")

        def has(*i, r=r):
            return all(x in r["median"] for x in i)

        def cell(i, text, r=r):
            return text if i in r["median"] else ("fails" if i in r["failed"] else "—")

        key = f"{r['shape']}/H{r['H']}"
        time_rows.append(
            [r["shape"], r["H"], f"{r['B']}×{r['T']}"]
            + [cell(i, C.fmt_ms(r["median"].get(i, 0.0))) for i in cols]
            + [r["load"]]
        )
        row = [r["shape"], r["H"]]
        if has("ours-ft", "ours-base"):
            m = t.ratio("ours-ft", "ours-base")
            lo, hi = t.ratio_range("ours-ft", "ours-base")
            dev = m / r["theory"] - 1
            # Rate-calibrated prediction, per round: the encoder block runs at the baseline's
            # achieved FLOP rate, the mapper backward at the measured rate of its GEMMs.
            f = r["flops"]
            pred = sorted(
                1 + f["encoder"] / f["base"] + g / b
                for g, b in zip(t.times["mapper-gemm"], t.times["ours-base"])
            )[len(t.loads) // 2]
            dev_c = m / pred - 1
            measured[key] = dict(
                ratio=m,
                range=[lo, hi],
                theory=r["theory"],
                calibrated=pred,
                load=r["load"],
                command=C.command_line(sys.argv),
            )
            row += [
                f"{m:.2f} ({lo:.2f}–{hi:.2f})",
                f"{r['theory']:.2f}",
                f"{dev:+.0%}",
                "yes" if abs(dev) <= 0.10 else "no",
                f"{pred:.2f}",
                f"{dev_c:+.0%}",
            ]
        else:
            row += ["—"] * 6
        row.append(f"{t.ratio('xt-ft', 'xt-dec'):.2f}" if has("xt-ft", "xt-dec") else "—")
        row.append(
            f"{t.ratio('ft012-ft', 'ft012-base'):.2f}" if has("ft012-ft", "ft012-base") else "—"
        )
        if has("ours-ft", "xt-ft"):
            sp = t.ratio("xt-ft", "ours-ft")
            row += (
                [f"{sp:.2f}×", "yes" if sp >= 5 else "no"] if r["H"] == 16 else [f"{sp:.2f}×", ""]
            )
        else:
            row += ["—", ""]
        row.append(f"{t.ratio('ft012-ft', 'ours-ft'):.2f}×" if has("ours-ft", "ft012-ft") else "—")
        ratio_rows.append(row)
        mrow = [r["shape"], r["H"]]
        for i in cols:
            mrow.append(cell(i, f"{fmt_mib(r['mem'].get(i))} (+{fmt_mib(r['params'].get(i))})"))
        if has("ours-ft", "xt-ft"):
            q = r["mem"]["ours-ft"] / r["mem"]["xt-ft"]
            qp = (r["mem"]["ours-ft"] + r["params"]["ours-ft"]) / (
                r["mem"]["xt-ft"] + r["params"]["xt-ft"]
            )
            ok = "yes" if max(q, qp) <= 0.4 else "no"
            mrow += [f"{q:.2f} ({qp:.2f})", ok if r["H"] == 16 else ""]
        else:
            mrow += ["—", ""]
        mem_rows.append(mrow)
        if args.peak_tflops and has("ours-ft"):
            f = r["flops"]
            r["mfu"] = {"ours-ft": f["ft"] / r["median"]["ours-ft"] / (args.peak_tflops * 1e12)}
            if has("ours-base"):
                r["mfu"]["ours-base"] = (
                    f["base"] / r["median"]["ours-base"] / (args.peak_tflops * 1e12)
                )

    t1 = C.md_table(
        ["shape", "H", "B×T"] + [LABELS[i] + " (ms)" for i in cols] + ["load"], time_rows
    )
    t2 = C.md_table(
        [
            "shape",
            "H",
            "ours FT / ours base (range)",
            "theory (FLOPs)",
            "vs theory",
            "within 10 %?",
            "calibrated",
            "vs calibrated",
            "x-transformers FT / its decoder",
            "free-transformer FT / its baseline",
            "x-transformers FT / ours FT",
            "≥ 5× at H = 16?",
            "free-transformer FT / ours FT",
        ],
        ratio_rows,
    )
    t3 = C.md_table(
        ["shape", "H"]
        + [LABELS[i] for i in cols]
        + ["ours FT / x-transformers FT: step (with params)", "≤ 0.4× at H = 16?"],
        mem_rows,
    )
    parts = [
        "## Training step (`bench/bench_train.py`)" + (f": {args.section}" if args.section else ""),
        f"Command: `{C.command_line(sys.argv)}`  \nMachine: {header}  \n"
        f"dtype {args.dtype}{', torch.compile' if args.compile else ''}; forward + loss + "
        "backward, no optimizer step; shapes: debug = preset debug (D 32, L 4, heads 4:2, "
        "vocab 64); d128-L4 = D 128, L 4, heads 4:2; d256-L8 = D 256, L 8, heads 8:4; "
        "d512-L8 = D 512, L 8, heads 8:4 (vocab 256, SwiGLU 8/3·D).",
        "### Step time, median over rounds (ms)\n\n" + t1,
        "### Ratios (median of per-round ratios)\n\n"
        + t2
        + "\n\n*theory (FLOPs)*: `bench/theory.py`, matmul FLOPs of forward + backward. "
        "*calibrated*: the same model at this machine's achieved rates, per round: 1 + "
        "encoder FLOPs / baseline FLOPs + (time of the mapper's 2·N·2^H·D GEMMs, timed in "
        "the same round) / (baseline step time); a gap to it is implementation overhead.",
        "### Peak memory of one step (MiB), (+ parameters)\n\n"
        + t3
        + "\n\nStep peak = highest live PyTorch allocation above the start of the step "
        "(activations, gradients, temporaries), parameters excluded and shown in parentheses; "
        "the ratio in parentheses includes the parameters.",
    ]
    if failures:
        parts.append(
            "Failures (the step raised; not timed):\n\n" + "\n".join(f"- {f}" for f in failures)
        )
    if args.peak_tflops:
        parts.append(
            C.md_table(
                [
                    "shape",
                    "H",
                    "MFU ours FT",
                    "MFU ours base",
                    "first step ours FT (s)",
                    "first step ours base (s)",
                ],
                [
                    [
                        r["shape"],
                        r["H"],
                        f"{r['mfu']['ours-ft']:.1%}",
                        f"{r['mfu'].get('ours-base', float('nan')):.1%}",
                        f"{r['first'].get('ours-ft', float('nan')):.1f}",
                        f"{r['first'].get('ours-base', float('nan')):.1f}",
                    ]
                    for r in results
                    if "mfu" in r
                ],
            )
        )
        parts.append(
            "*first step*: the untimed first step, compilation included with "
            "`--compile` (regional: each block, `freeformer.distributed.compile_blocks`)."
        )
    body = "\n\n".join(parts)
    print()
    print(body)
    if args.write:
        C.write_section(
            args.section or ("train" if args.device == "cpu" else f"train-{args.device}"), body
        )
        if args.device == "cpu" and args.dtype == "fp32" and not args.compile:
            old = json.loads(theory.MEASURED.read_text()) if theory.MEASURED.exists() else {}
            old.update(measured)
            theory.MEASURED.write_text(json.dumps(old, indent=1) + "\n")
        print(f"\nwrote {C.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
