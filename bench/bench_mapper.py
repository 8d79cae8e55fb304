"""Binary mapper: backward time against its FLOP bound, forward time, and extra peak memory
against the dense formulation (paper Eq. 8).

The exact backward of r = W^T (Y + G − sg(G)) needs s_d = <W_d, dr_t> for every token t and
code d: 2·N·2^H·D FLOPs of GEMM, nothing less. The yardstick is therefore a plain GEMM loop
of exactly those shapes (the (n × D) @ (D × C) products the mapper performs, written into
one preallocated buffer), timed alternately with the mapper in the same run; the ratio
mapper / GEMM is the backward's distance from its FLOP bound on this machine. A second,
larger GEMM gives the machine's best FP32 rate, and the bound is also reported against it.
The backward is also timed after a forward under bf16 autocast, where the shipped code forms
the S products from bf16 operands (``_mapper_logit_grad(matmul_dtype=bfloat16)``).

Memory: the extra peak of forward + backward, i.e. the peak of live PyTorch allocations
during the call minus what the call returns (r, the two gradients, the codes), so both
formulations are charged only for their working memory. The dense formulation
(tests/dense_reference.py: (one_hot(codes) + G − G.detach()) @ table) holds several
N × 2^H float32 tensors (2 GiB each at N = 8192, H = 16); it is measured at smaller N and
extrapolated linearly in N (fit quality printed), unless --dense-full.

    python bench/bench_mapper.py            # ~4 min on 2 loaded CPU cores
    python bench/bench_mapper.py --quick    # < 1 min
    python bench/bench_mapper.py --write    # also update bench/RESULTS.md
    python bench/bench_mapper.py --device cuda --dtype bf16
    python bench/bench_mapper.py --smoke    # tiny sizes: the script runs (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from types import SimpleNamespace

import common as C
import torch
from bench_train import mapper_gemm

import freeformer.latent as latent
from freeformer.latent import binary_mapper

sys.path.insert(0, str(C.REPO / "tests"))
from dense_reference import dense_mapper  # noqa: E402  (the one dense reference, Eq. 8)


def make_inputs(N: int, H: int, D: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    L = (2 * torch.randn(N, H, generator=g)).to(device, dtype).requires_grad_()
    W = torch.randn(1 << H, D, generator=g).to(device, dtype).requires_grad_()
    dr = torch.randn(N, D, generator=g).to(device, dtype)
    return L, W, dr


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Median over tokens of ‖got − ref‖ / ‖ref‖."""
    return ((got.double() - ref).norm(dim=1) / ref.norm(dim=1)).median().item()


def time_backward(N, H, D, rounds, device, dtype, bf16_path: bool) -> dict:
    """Mapper backward vs the same-shape GEMM loop vs a large GEMM, alternately."""
    L, W, dr = make_inputs(N, H, D, device, dtype)
    # exactly the S products of the backward (2·N·2^H·D FLOPs), in float32
    gemm_same = mapper_gemm(SimpleNamespace(latent_bits=H, dim=D), N, device)
    big_a = torch.randn(2048, D, device=device)
    big_b = torch.randn(4096, D, device=device)
    big_out = torch.empty(2048, 4096, device=device)
    big_flops = 2 * 2048 * 4096 * D
    big_reps = max(1, int(2 * N * (1 << H) * D / big_flops / 8))  # ~1/8 of the bound's work

    def gemm_big():
        for _ in range(big_reps):
            torch.mm(big_a, big_b.T, out=big_out)

    state = {}
    gen = torch.Generator(device=device).manual_seed(0)

    def fwd():
        state["r"] = binary_mapper(L, W, gen)[0]

    def fwd_bf16():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            fwd()

    def bwd():
        torch.autograd.grad(state.pop("r"), (L, W), dr)

    fns, before = {"gemm": gemm_same, "mapper": bwd, "big": gemm_big}, {"mapper": fwd}
    if bf16_path:
        fns["bf16"], before["bf16"] = bwd, fwd_bf16
    t = C.alternate(fns, rounds, warmup=1, before=before, device=device)
    flops = 2 * N * (1 << H) * D
    rate_same = flops / t.median("gemm")
    rate_big = big_flops * big_reps / t.median("big")
    res = dict(
        N=N,
        H=H,
        D=D,
        threads=torch.get_num_threads(),
        flops=flops,
        gemm_s=t.median("gemm"),
        mapper_s=t.median("mapper"),
        rate_same=rate_same,
        rate_big=rate_big,
        ratio_same=t.ratio("mapper", "gemm"),
        ratio_range=t.ratio_range("mapper", "gemm"),
        ratio_best=t.median("mapper") * max(rate_same, rate_big) / flops,
        load=t.load_range(),
        rounds=rounds,
    )
    if bf16_path:  # accuracy against float64, on the first 256 tokens
        n = min(N, 256)
        Ln, Wn, gn = L.detach()[:n].float(), W.detach().float(), dr[:n].float()
        ref = latent._mapper_logit_grad(Ln.double(), Wn.double(), gn.double())
        res.update(
            c_s=t.median("bf16"),
            c_vs_fp32=t.ratio("bf16", "mapper"),
            c_err=rel_error(latent._mapper_logit_grad(Ln, Wn, gn, torch.bfloat16), ref),
            fp32_err=rel_error(latent._mapper_logit_grad(Ln, Wn, gn), ref),
        )
    return res


def time_forward(N, H, D, rounds, device, dtype, dense: bool) -> dict:
    L, W, _ = make_inputs(N, H, D, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    codes = latent.sample_codes(L, gen)
    fns = {"ours": lambda: binary_mapper(L, W, gen)}
    if dense:
        fns["dense"] = lambda: dense_mapper(L, W, codes)
    with torch.enable_grad():
        t = C.alternate(fns, rounds, warmup=1, device=device, inner=1 if dense else 5)
    return dict(
        N=N,
        H=H,
        D=D,
        ours_fwd=t.median("ours"),
        dense_fwd=t.median("dense") if dense else None,
        load=t.load_range(),
    )


def memory(N, H, D, device, dtype, which: str) -> dict:
    """Working (transient) and total peak of forward + backward; RSS peak as a cross-check."""
    L, W, dr = make_inputs(N, H, D, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    codes = latent.sample_codes(L, gen)
    keep: list = []

    def run():
        r, c = binary_mapper(L, W, gen) if which == "ours" else (dense_mapper(L, W, codes), None)
        keep.extend([r, c, *torch.autograd.grad(r, (L, W), dr)])

    m = C.peak_alloc(run, device)
    keep.clear()
    rss = C.peak_rss(run) if device.type == "cpu" else None
    keep.clear()
    return dict(
        N=N, H=H, D=D, which=which, peak=m.peak, returned=m.final, extra=m.transient, rss_peak=rss
    )


def fit_line(xs, ys):
    """Least-squares y = a·x + b and the largest relative residual."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    b = my - a * mx
    return a, b, max(abs(a * x + b - y) / y for x, y in zip(xs, ys))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--quick", action="store_true", help="small sizes only (< 1 min)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes (N 256, H 10, D 64), seconds: checks the script runs "
        "(bench/gpu_check.sh --smoke); the figures mean nothing",
    )
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (default 1: on a shared 2-core machine, 2-thread "
        "runs mostly measure the co-tenants)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument(
        "--section",
        default=None,
        help="name of the RESULTS.md section --write replaces (default from device and threads)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="dtype of the inputs (logits, table, upstream gradient); the mapper "
        "backward computes in float32 (S products in bf16 under autocast)",
    )
    ap.add_argument(
        "--fp32-only",
        action="store_true",
        help="do not time the backward after a bf16-autocast forward",
    )
    ap.add_argument(
        "--parts",
        default="bwd,fwd,mem",
        help="which measurements: any of bwd (backward vs FLOP bound), fwd, mem",
    )
    ap.add_argument(
        "--dense-full",
        action="store_true",
        help="measure the dense formulation at N = 8192 too (~10 GiB) instead of extrapolating",
    )
    args = ap.parse_args(argv)
    if args.smoke and args.write:
        ap.error("--smoke figures mean nothing: do not --write them")
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    parts = set(args.parts.split(","))
    D = 64 if args.smoke else 1024
    if args.smoke:
        bwd_sizes = fwd_sizes = mem_ours = [(256, 10, D)]
        dense_ns, big_n = [], 256
    elif args.quick:
        bwd_sizes, fwd_sizes = [(1024, 16, D)], [(256, 16, D), (1024, 16, D)]
        mem_ours = [(1024, 16, D), (2048, 16, D)]
        dense_ns, big_n = [128, 256, 512], 8192
    else:
        bwd_sizes = [(1024, 16, D), (8192, 8, D), (8192, 16, D)]
        fwd_sizes = [(1024, 16, D), (8192, 16, D)]
        mem_ours = [(1024, 16, D), (2048, 16, D), (8192, 8, D), (8192, 16, D)]
        dense_ns, big_n = [256, 512, 1024, 2048], 8192
    if args.dense_full:
        dense_ns = dense_ns + [big_n]
    if "mem" not in parts:
        mem_ours, dense_ns = [], []
    C.setup_threads(args.threads)
    header = C.machine_line(device)
    print(header, flush=True)
    bf16 = not args.fp32_only

    # Short calls (H = 8: ~40 ms) are noisier: give them more rounds.
    bwd_rows = [
        time_backward(
            N,
            H,
            Dd,
            args.rounds if 2 * N * (1 << H) * Dd > 1e11 else max(args.rounds, 15),
            device,
            dtype,
            bf16,
        )
        for N, H, Dd in (bwd_sizes if "bwd" in parts else [])
    ]
    dense_fwd_max = 256 if args.quick else 1024
    fwd_rows = [
        time_forward(N, H, Dd, args.rounds, device, dtype, dense=N <= dense_fwd_max)
        for N, H, Dd in (fwd_sizes if "fwd" in parts else [])
    ]
    for r in bwd_rows + fwd_rows:
        print(r, flush=True)
    # Memory after the timings: pinning glibc's mmap threshold makes every large block a
    # fresh mmap, whose page faults would slow the timed code down.
    if mem_ours:
        C.pin_malloc()
    ours_mem = {(N, H, Dd): memory(N, H, Dd, device, dtype, "ours") for N, H, Dd in mem_ours}
    dense_mem = {N: memory(N, 16, D, device, dtype, "dense") for N in dense_ns}
    dense_mem |= {
        (N, H, Dd): memory(N, H, Dd, device, dtype, "dense") for N, H, Dd in mem_ours if H != 16
    }
    for m in [*ours_mem.values(), *dense_mem.values()]:
        print(m, flush=True)

    sections = [
        "## Binary mapper (`bench/bench_mapper.py`)"
        + (f", {args.threads} thread(s)" if args.threads != 1 else ""),
        f"Command: `{C.command_line(sys.argv)}`  \nMachine: {header}  \nInput dtype "
        f"{args.dtype}; {args.rounds} alternating rounds (15 for calls under 0.1 TFLOP).",
    ]
    if bwd_rows:
        t1 = C.md_table(
            [
                "N",
                "H",
                "D",
                "rounds",
                "bound 2·N·2^H·D (GFLOP)",
                "same-shape GEMM (s)",
                "GEMM rate same / large (GFLOP/s)",
                "mapper bwd (s)",
                "bwd / same-shape GEMM",
                "bwd / best-rate bound",
                "bwd / same-shape ≤ 1.15?",
            ]
            + (
                ["bwd after bf16-autocast fwd (s)", "bf16 / fp32 bwd", "rel. error fp32 / bf16"]
                if bf16
                else []
            )
            + ["load"],
            [
                [
                    r["N"],
                    r["H"],
                    r["D"],
                    r["rounds"],
                    f"{r['flops'] / 1e9:.1f}",
                    C.fmt_s(r["gemm_s"]),
                    f"{r['rate_same'] / 1e9:.0f} / {r['rate_big'] / 1e9:.0f}",
                    C.fmt_s(r["mapper_s"]),
                    f"{r['ratio_same']:.3f} ({r['ratio_range'][0]:.2f}–{r['ratio_range'][1]:.2f})",
                    f"{r['ratio_best']:.3f}",
                    "yes" if r["ratio_same"] <= 1.15 else "no",
                ]
                + (
                    [
                        C.fmt_s(r["c_s"]),
                        f"{r['c_vs_fp32']:.3f}",
                        f"{r['fp32_err']:.1e} / {r['c_err']:.1e}",
                    ]
                    if bf16
                    else []
                )
                + [r["load"]]
                for r in bwd_rows
            ],
        )
        sections.append(
            "### Backward vs its FLOP bound\n\n"
            + t1
            + "\n\nbwd / same-shape GEMM: median over rounds of (mapper backward) / (the same "
            "GEMMs alone), with the range over rounds. bwd / best-rate bound: mapper backward × "
            "max(same-shape, large 2048×4096 GEMM rate) / (2·N·2^H·D). The backward timed is the "
            "whole autograd backward: logit gradient, and the table gradient (zero-filled "
            "2^H × D, then an index_add), which the bound does not count. bf16: the backward "
            "after a forward under bf16 autocast (S products from bf16 operands; not exact); "
            "rel. error = median over tokens of ‖grad − grad_float64‖ / ‖grad_float64‖."
        )
    if fwd_rows:
        sections.append(
            "### Forward (sample codes + row lookup)\n\n"
            + C.md_table(
                ["N", "H", "D", "ours forward (ms)", "dense forward (ms)", "load"],
                [
                    [
                        r["N"],
                        r["H"],
                        r["D"],
                        C.fmt_ms(r["ours_fwd"]),
                        C.fmt_ms(r["dense_fwd"]) if r["dense_fwd"] is not None else "—",
                        r["load"],
                    ]
                    for r in fwd_rows
                ],
            )
        )
    if ours_mem:
        xs = sorted(n for n in dense_mem if isinstance(n, int))
        a, b, resid = (
            fit_line([float(n) for n in xs], [float(dense_mem[n]["extra"]) for n in xs])
            if len(xs) >= 2
            else (0.0, 0.0, 0.0)
        )
        per_tensor = (1 << 16) * torch.tensor([], dtype=dtype).element_size()  # N × 2^16 / N
        rows = []
        for (N, H, Dd), m in ours_mem.items():
            key = N if H == 16 and Dd == D else (N, H, Dd)
            dx, how = (
                (dense_mem[key]["extra"], "measured")
                if key in dense_mem
                else (a * N + b, "extrapolated")
                if H == 16 and Dd == D
                else (None, "—")
            )
            rows.append(
                [
                    N,
                    H,
                    Dd,
                    f"{m['extra'] / C.MiB:.1f}",
                    "—" if dx is None else f"{dx / C.MiB:,.0f} ({how})",
                    "—" if dx is None else f"{dx / max(m['extra'], 1):,.0f}×",
                    "yes" if m["extra"] <= 64 * C.MiB else "no",
                    f"{m['peak'] / C.MiB:.0f}",
                    "—" if m["rss_peak"] is None else f"{m['rss_peak'] / C.MiB:.0f}",
                    f"{m['returned'] / C.MiB:.0f}",
                ]
            )
        t3 = C.md_table(
            [
                "N",
                "H",
                "D",
                "ours extra (working) peak (MiB)",
                "dense extra peak (MiB)",
                "dense / ours",
                "ours ≤ 64 MiB?",
                "ours total peak (MiB)",
                "ours total peak, RSS (MiB)",
                "returned r + grads (MiB)",
            ],
            rows,
        )
        t4 = C.md_table(
            ["N (H = 16, D = 1024)", "dense extra peak (MiB, measured)", "N × 2^H tensors"],
            [
                [
                    n,
                    f"{dense_mem[n]['extra'] / C.MiB:,.0f}",
                    f"{dense_mem[n]['extra'] / (n * per_tensor):.2f}",
                ]
                for n in xs
            ],
        )
        sections.append(
            "### Extra peak memory of forward + backward\n\n"
            + t3
            + "\n\nExtra (working) peak = the highest total of blocks that were allocated *and "
            "freed* during forward + backward, i.e. memory beyond the returned r, gradients and "
            "codes (replayed from the profiler's allocation events of PyTorch's CPU allocator). "
            "Total peak = highest live total above the start, returned tensors included (the "
            "2^H × D table gradient dominates it: 256 MiB at H = 16, D = 1024, the same for any "
            "formulation); its RSS column is the kernel's peak resident set above the start "
            "(VmHWM reset through /proc/self/clear_refs, glibc mmap threshold pinned), an "
            "independent cross-check of the allocator replay.\n\n" + t4 + "\n\n"
            f"Linear fit of the dense extra peak over N = {xs}: {a / C.MiB * 1024:,.0f} MiB "
            f"per 1024 tokens + {b / C.MiB:,.0f} MiB (largest relative residual {resid:.1%}); "
            f"slope = {a / per_tensor:.2f} live N × 2^H tensors at the peak."
        )
    body = "\n\n".join(sections)
    print()
    print(body)
    if args.write:
        name = (
            "mapper"
            if args.threads == 1 and args.device == "cpu"
            else (f"mapper-{args.device}-t{args.threads}")
        )
        C.write_section(args.section or name, body)
        print(f"\nwrote {C.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
