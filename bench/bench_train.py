"""Training step (forward + loss + backward) time and peak memory: our Free Transformer and
baseline against x-transformers' FreeTransformer (2.31.10) and its decoder, and the PyPI
free-transformer 0.1.2 and its baseline, at the same shapes.

"Same shape" = same D, L (the FT's decoder split L/2 + L/2, one encoder block), query/KV
heads, SwiGLU width, vocabulary, T, B and H, κ = 1/2 bit, RoPE, RMSNorm, SDPA where offered
(free-transformer 0.1.2 has no SDPA, no RoPE in its encoder, no GQA in its encoder block).
No optimizer step. Competitors alternate in rounds; peak memory is measured after, untimed.

    python bench/bench_train.py              # H ∈ {8, 16}, debug → d256-L8 (~4 min)
    python bench/bench_train.py --quick      # debug and d128 at H = 16 (< 1 min)
    python bench/bench_train.py --large      # adds d512-L8, 2048 tokens per step
    python bench/bench_train.py --write      # also RESULTS.md + bench/train_results.json
    python bench/bench_train.py --device cuda --dtype bf16 --compile \\
        --shapes paper-1.5b --impls ours-ft,ours-base   # GPU: MFU at the paper's 1.5B shape
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import common as C
import theory
import torch
import torch.nn.functional as F
from torch import nn

from freeformer import FreeTransformer, ModelConfig

KAPPA_NATS = 0.5 * math.log(2.0)  # κ = 1/2 bit, for every implementation
LABELS = {
    "ours-ft": "ours FT",
    "ours-base": "ours baseline",
    "xt-ft": "x-transformers FT",
    "xt-dec": "x-transformers decoder",
    "ft012-ft": "free-transformer 0.1.2 FT",
    "ft012-base": "free-transformer 0.1.2 baseline",
}
IMPLS = tuple(LABELS)


@dataclass
class Runner:
    """One implementation at one shape: ``step()`` = forward + loss + backward."""

    model: nn.Module
    loss_fn: Callable[[], torch.Tensor]

    def zero(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def step(self) -> None:
        self.loss_fn().backward()


def build(
    impl: str, cfg: ModelConfig, T: int, B: int, device: torch.device, amp: Callable, compile_: bool
) -> Runner:
    """Build one implementation with the shape of ``cfg`` and its step on fixed data."""
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(device)
    inp, tgt = seq[:, :-1], seq[:, 1:]
    D, L, H = cfg.dim, cfg.n_layers, cfg.latent_bits
    torch.manual_seed(0)

    def ce(logits):
        return F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten())

    def ce_of_inp(f):  # the peers' baselines return logits
        return ce(f(inp))

    loss_of = ce_of_inp
    if impl.startswith("ours"):
        model = FreeTransformer(cfg.replace(latent=impl != "ours-base"))
        gen = torch.Generator(device=device).manual_seed(0)

        def loss_of(f):
            return f(inp, tgt, generator=gen, return_logits=False).loss
    elif impl.startswith("xt"):
        from x_transformers import Decoder, TransformerWrapper
        from x_transformers.free_transformer import FreeTransformer as XFreeTransformer

        try:  # x-transformers warns (loguru) about short rotary dims at the debug shape
            from loguru import logger

            logger.disable("x_transformers")
        except ImportError:
            pass
        # Rotary over the whole head, as ours (x-transformers' default rotates half of it).
        shared = dict(attn_kv_heads=cfg.n_kv_heads, attn_flash=True, ff_glu=True, ff_swish=True)
        shared |= dict(ff_mult=cfg.mlp_hidden / D, ff_no_bias=True, rotary_emb_dim=cfg.head_dim)
        heads = dict(heads=cfg.n_heads, attn_dim_head=cfg.head_dim)
        if impl == "xt-ft":
            model = XFreeTransformer(
                num_tokens=cfg.vocab_size,
                dim=D,
                dec_head_depth=L // 2,
                dec_tail_depth=L - L // 2,
                max_seq_len=T,
                enc_depth=1,
                latent_bits=H,
                kl_loss_threshold=KAPPA_NATS,
                **heads,
                **shared,
            )

            def loss_of(f):
                return f(seq)  # shifts internally: predicts seq[:, 1:] from seq[:, :-1]
        else:
            dec = Decoder(dim=D, depth=L, rotary_pos_emb=True, use_rmsnorm=True, **heads, **shared)
            model = TransformerWrapper(
                num_tokens=cfg.vocab_size, max_seq_len=T, use_abs_pos_emb=False, attn_layers=dec
            )
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
            model = ft012.FreeTransformer(mc)

            def loss_of(f):
                logits, z = f(inp, mode="training")
                return ft012.compute_vae_loss(
                    logits.float(), tgt, z.float(), H, beta_kl=1.0, free_bits=KAPPA_NATS
                )[0]
        else:
            model = ft012.TransformerBaseline(mc)
    model = model.to(device).train()
    fwd = model
    if compile_ and isinstance(model, FreeTransformer):  # regional, as `freeformer train` does
        from freeformer.distributed import compile_blocks

        fwd = compile_blocks(model)
    elif compile_:
        fwd = torch.compile(model)

    def loss():
        with amp():
            return loss_of(fwd)

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


def measure_shape(name, cfg, T, B, impls, rounds, device, amp, compile_) -> dict:
    """Time every implementation that builds and runs one step, alternately, with the
    mapper's GEMMs; the runners stay in the result for the memory pass."""
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
    fns = {i: r.step for i, r in runners.items()}
    if "ours-ft" in runners and "ours-base" in runners:
        fns["mapper-gemm"] = mapper_gemm(cfg, B * T, device)
    before = {i: r.zero for i, r in runners.items()}
    t = C.alternate(fns, rounds, warmup=2 if compile_ else 1, before=before, device=device)
    for r in runners.values():
        r.zero()
    res = dict(shape=name, H=cfg.latent_bits, T=T, B=B, load=t.load_range(), failed=failed)
    res.update(median={i: t.median(i) for i in runners}, first=first, runners=runners, timings=t)
    res["params"] = {
        i: sum(p.numel() * p.element_size() for p in r.model.parameters())
        for i, r in runners.items()
    }
    return res


def fmt_mib(b) -> str:
    return "—" if b is None else f"{b / C.MiB:,.0f}"


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="two small shapes at H = 16 (< 1 min)")
    ap.add_argument("--large", action="store_true", help="add d512-L8 (2048 tokens per step)")
    ap.add_argument("--write", action="store_true", help="update RESULTS.md, train_results.json")
    ap.add_argument("--bits", default="8,16", help="latent bits H to measure (default 8,16)")
    ap.add_argument("--shapes", help="debug, d128-L4, d256-L8, d512-L8, paper-1.5b, paper-8b")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    ap.add_argument("--rounds", type=int, help="default 5, 3 for shapes with a step over ~1 s")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    ap.add_argument("--section", help="RESULTS.md section --write replaces (default by device)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model")
    ap.add_argument("--peak-tflops", type=float, help="dense peak of --dtype, for MFU (H100: 989)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    bf16 = args.dtype == "bf16"

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    impls = [i for i in args.impls.split(",") if i]
    bad = set(impls) - set(IMPLS)
    if bad:
        ap.error(f"unknown --impls {sorted(bad)}; choose from {', '.join(IMPLS)}")
    bits = [int(b) for b in args.bits.split(",")]
    if args.quick:
        bits, names = [16], ["debug", "d128-L4"]
        args.rounds = args.rounds or 3
    else:
        names = ["debug", "d128-L4", "d256-L8"] + (["d512-L8"] if args.large else [])
    names = args.shapes.split(",") if args.shapes else names
    header = C.machine_line(device)
    print(header, flush=True)
    results = []
    for H in bits:
        for name in names:
            cfg, T, B = theory.bench_shape(name, H)
            cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, T))
            big = cfg.dim >= 512 or T * B >= 4096
            rounds = args.rounds or (3 if big or (cfg.dim >= 256 and H >= 16) else 5)
            print(f"-- {name} H={H} B×T={B}×{T} ({rounds} rounds)", flush=True)
            res = measure_shape(name, cfg, T, B, impls, rounds, device, amp, args.compile)
            res["theory"], res["flops"] = theory.ratio(cfg, T, B), theory.costs(cfg, T, B)
            results.append(res)
    for res in results:  # memory after all timings, untimed
        res["mem"] = {}
        for i, r in res.pop("runners").items():
            r.zero()
            res["mem"][i] = C.peak_alloc(r.step, device).peak
            r.zero()

    time_rows, ratio_rows, mem_rows, measured = [], [], [], {}
    for r in results:
        t: C.Timings = r["timings"]

        def has(*i, r=r):
            return all(x in r["median"] for x in i)

        def cell(i, text, r=r):
            return text if i in r["median"] else ("fails" if i in r["failed"] else "—")

        def ratio(a, b, fmt="{:.2f}", t=t):
            return fmt.format(t.ratio(a, b)) if has(a, b) else "—"

        time_rows.append(
            [r["shape"], r["H"], f"{r['B']}×{r['T']}"]
            + [cell(i, C.fmt_ms(r["median"].get(i, 0.0))) for i in IMPLS]
            + [r["load"]]
        )
        row = [r["shape"], r["H"]]
        if has("ours-ft", "ours-base"):
            m = t.ratio("ours-ft", "ours-base")
            lo, hi = t.ratio_range("ours-ft", "ours-base")
            dev = m / r["theory"] - 1
            pred = theory.calibrated(r["flops"], t)
            measured[f"{r['shape']}/H{r['H']}"] = dict(
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
                f"{m / pred - 1:+.0%}",
            ]
        else:
            row += ["—"] * 6
        row += [ratio("xt-ft", "xt-dec"), ratio("ft012-ft", "ft012-base")]
        row.append(ratio("xt-ft", "ours-ft", "{:.2f}×"))
        five = has("ours-ft", "xt-ft") and r["H"] == 16
        row.append(("yes" if t.ratio("xt-ft", "ours-ft") >= 5 else "no") if five else "")
        ratio_rows.append(row + [ratio("ft012-ft", "ours-ft", "{:.2f}×")])
        mrow = [r["shape"], r["H"]]
        for i in IMPLS:
            mrow.append(cell(i, f"{fmt_mib(r['mem'].get(i))} (+{fmt_mib(r['params'].get(i))})"))
        if has("ours-ft", "xt-ft"):
            mem, par = r["mem"], r["params"]
            q = mem["ours-ft"] / mem["xt-ft"]
            qp = (mem["ours-ft"] + par["ours-ft"]) / (mem["xt-ft"] + par["xt-ft"])
            ok = "yes" if max(q, qp) <= 0.4 else "no"
            mrow += [f"{q:.2f} ({qp:.2f})", ok if r["H"] == 16 else ""]
        else:
            mrow += ["—", ""]
        mem_rows.append(mrow)

    ratio_head = (
        "shape|H|ours FT / ours base (range)|theory (FLOPs)|vs theory|within 10 %?|calibrated|"
        "vs calibrated|x-transformers FT / its decoder|free-transformer FT / its baseline|"
        "x-transformers FT / ours FT|≥ 5× at H = 16?|free-transformer FT / ours FT"
    )
    mem_head = ["shape", "H", *LABELS.values()]
    mem_head += ["ours FT / x-transformers FT: step (with params)", "≤ 0.4× at H = 16?"]
    parts = [
        "## Training step (`bench/bench_train.py`)" + (f": {args.section}" if args.section else ""),
        f"Command: `{C.command_line(sys.argv)}`  \nMachine: {header}  \n"
        f"dtype {args.dtype}{', torch.compile' if args.compile else ''}; forward + loss + "
        "backward, no optimizer step; shapes: debug = preset debug (D 32, L 4, heads 4:2, "
        "vocab 64); d128-L4 = D 128, L 4, heads 4:2; d256-L8 = D 256, L 8, heads 8:4; "
        "d512-L8 = D 512, L 8, heads 8:4 (vocab 256, SwiGLU 8/3·D).",
        "### Step time, median over rounds (ms)\n\n"
        + C.md_table(
            ["shape", "H", "B×T", *(v + " (ms)" for v in LABELS.values()), "load"], time_rows
        ),
        "### Ratios (median of per-round ratios)\n\n"
        + C.md_table(ratio_head, ratio_rows)
        + "\n\n*theory (FLOPs)*: `bench/theory.py`, matmul FLOPs of forward + backward. "
        "*calibrated*: the same model at this machine's achieved rates, per round: 1 + "
        "encoder FLOPs / baseline FLOPs + (time of the mapper's 2·N·2^H·D GEMMs, timed in "
        "the same round) / (baseline step time); a gap to it is implementation overhead.",
        "### Peak memory of one step (MiB), (+ parameters)\n\n"
        + C.md_table(mem_head, mem_rows)
        + "\n\nStep peak = highest live PyTorch allocation above the start of the step "
        "(activations, gradients, temporaries), parameters excluded and shown in parentheses; "
        "the ratio in parentheses includes the parameters.",
    ]
    failures = [
        f"- {LABELS[i]} fails at {r['shape']}, H = {r['H']}: `{e}`"
        for r in results
        for i, e in r["failed"].items()
    ]
    if failures:
        parts.append("Failures (the step raised; not timed):\n\n" + "\n".join(failures))
    if args.peak_tflops:
        nan = float("nan")

        def mfu(r, impl, part):
            time = r["median"].get(impl)
            return r["flops"][part] / time / (args.peak_tflops * 1e12) if time else nan

        mfu_rows = [
            [
                r["shape"],
                r["H"],
                f"{mfu(r, 'ours-ft', 'ft'):.1%}",
                f"{mfu(r, 'ours-base', 'base'):.1%}",
            ]
            + [f"{r['first'].get(i, nan):.1f}" for i in ("ours-ft", "ours-base")]
            for r in results
            if "ours-ft" in r["median"]
        ]
        head = "shape|H|MFU ours FT|MFU ours base|first step ours FT (s)|first step ours base (s)"
        parts.append(
            C.md_table(head, mfu_rows) + "\n\n*first step*: the untimed first step, compilation "
            "included with `--compile` (regional: each block, "
            "`freeformer.distributed.compile_blocks`)."
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
