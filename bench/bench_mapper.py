"""Binary mapper: backward time against its FLOP bound, forward time, and extra peak memory
against the dense formulation (paper Eq. 8).

The exact backward of r = W^T (Y + G − sg(G)) needs s_d = <W_d, dr_t> for every token t and
code d: 2·N·2^H·D FLOPs of GEMM, nothing less. The yardstick is a GEMM loop of exactly those
shapes (bench_train.mapper_gemm) timed alternately with the mapper, and a large GEMM for the
best FP32 rate; the backward is also timed after a bf16-autocast forward (S products from
bf16 operands). Memory: working memory of forward + backward (blocks allocated and freed in
the call); the dense formulation (tests/dense_reference.py, several N × 2^H float32 tensors)
is measured at smaller N and extrapolated linearly, unless --dense-full.

    python bench/bench_mapper.py            # ~4 min on 2 loaded CPU cores
    python bench/bench_mapper.py --quick    # < 1 min
    python bench/bench_mapper.py --write    # also update bench/RESULTS.md
    python bench/bench_mapper.py --device cuda --dtype bf16
    python bench/bench_mapper.py --smoke    # tiny sizes: the script runs (seconds)
"""

from __future__ import annotations

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


def time_backward(N, H, D, rounds, device, dtype) -> list:
    """A row of the backward table: mapper backward (after an fp32 and a bf16-autocast
    forward) vs the same-shape GEMM loop vs a large GEMM, alternately; the logit gradient's
    error against float64."""
    L, W, dr = make_inputs(N, H, D, device, dtype)
    if 2 * N * (1 << H) * D <= 1e11:  # short calls (H = 8: ~40 ms) are noisier: more rounds
        rounds = max(rounds, 15)
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

    fns = {"gemm": gemm_same, "mapper": bwd, "big": gemm_big, "bf16": bwd}
    t = C.alternate(fns, rounds, warmup=1, before={"mapper": fwd, "bf16": fwd_bf16}, device=device)
    flops = 2 * N * (1 << H) * D
    rate_same = flops / t.median("gemm")
    rate_big = big_flops * big_reps / t.median("big")
    ratio, (lo, hi) = t.ratio("mapper", "gemm"), t.ratio_range("mapper", "gemm")
    n = min(N, 256)  # accuracy against float64, on the first 256 tokens
    Ln, Wn, gn = L.detach()[:n].float(), W.detach().float(), dr[:n].float()
    ref = latent._mapper_logit_grad(Ln.double(), Wn.double(), gn.double())
    bf16_err = rel_error(latent._mapper_logit_grad(Ln, Wn, gn, torch.bfloat16), ref)
    fp32_err = rel_error(latent._mapper_logit_grad(Ln, Wn, gn), ref)
    return [
        N,
        H,
        D,
        rounds,
        f"{flops / 1e9:.1f}",
        C.fmt_s(t.median("gemm")),
        f"{rate_same / 1e9:.0f} / {rate_big / 1e9:.0f}",
        C.fmt_s(t.median("mapper")),
        f"{ratio:.3f} ({lo:.2f}–{hi:.2f})",
        f"{t.median('mapper') * max(rate_same, rate_big) / flops:.3f}",
        "yes" if ratio <= 1.15 else "no",
        C.fmt_s(t.median("bf16")),
        f"{t.ratio('bf16', 'mapper'):.3f}",
        f"{fp32_err:.1e} / {bf16_err:.1e}",
        t.load_range(),
    ]


def time_forward(N, H, D, rounds, device, dtype, dense: bool) -> list:
    """A row of the forward table: ours (and the dense forward, if ``dense``)."""
    L, W, _ = make_inputs(N, H, D, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    codes = latent.sample_codes(L, gen)
    fns = {"ours": lambda: binary_mapper(L, W, gen)}
    if dense:
        fns["dense"] = lambda: dense_mapper(L, W, codes)
    with torch.enable_grad():
        t = C.alternate(fns, rounds, warmup=1, device=device, inner=1 if dense else 5)
    dense_ms = C.fmt_ms(t.median("dense")) if dense else "—"
    return [N, H, D, C.fmt_ms(t.median("ours")), dense_ms, t.load_range()]


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
    return dict(peak=m.peak, returned=m.final, extra=m.transient, rss_peak=rss)


def fit_line(xs, ys):
    """Least-squares y = a·x + b and the largest relative residual."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    b = my - a * mx
    return a, b, max(abs(a * x + b - y) / y for x, y in zip(xs, ys))


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes only (< 1 min)")
    ap.add_argument("--smoke", action="store_true", help="N 256, H 10, D 64: the script runs")
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--section", help="RESULTS.md section --write replaces")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="of the inputs")
    ap.add_argument("--parts", default="bwd,fwd,mem", help="any of bwd, fwd, mem")
    ap.add_argument("--dense-full", action="store_true", help="dense at N 8192 too (~10 GiB)")
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
    torch.set_num_threads(args.threads)
    header = C.machine_line(device)
    print(header, flush=True)

    bwd_rows = [
        time_backward(N, H, Dd, args.rounds, device, dtype)
        for N, H, Dd in (bwd_sizes if "bwd" in parts else [])
    ]
    dense_fwd_max = 256 if args.quick else 1024
    fwd_rows = [
        time_forward(N, H, Dd, args.rounds, device, dtype, dense=N <= dense_fwd_max)
        for N, H, Dd in (fwd_sizes if "fwd" in parts else [])
    ]
    # Memory after the timings: pinning glibc's mmap threshold makes every large block a
    # fresh mmap, whose page faults would slow the timed code down.
    if mem_ours:
        C.pin_malloc()
    ours_mem = {(N, H, Dd): memory(N, H, Dd, device, dtype, "ours") for N, H, Dd in mem_ours}
    dense_mem = {N: memory(N, 16, D, device, dtype, "dense") for N in dense_ns}
    dense_mem |= {
        (N, H, Dd): memory(N, H, Dd, device, dtype, "dense") for N, H, Dd in mem_ours if H != 16
    }

    sections = [
        "## Binary mapper (`bench/bench_mapper.py`)"
        + (f", {args.threads} thread(s)" if args.threads != 1 else ""),
        f"Command: `{C.command_line(sys.argv)}`  \nMachine: {header}  \nInput dtype "
        f"{args.dtype}; {args.rounds} alternating rounds (15 for calls under 0.1 TFLOP).",
    ]
    if bwd_rows:
        head = (
            "N|H|D|rounds|bound 2·N·2^H·D (GFLOP)|same-shape GEMM (s)|"
            "GEMM rate same / large (GFLOP/s)|mapper bwd (s)|bwd / same-shape GEMM|"
            "bwd / best-rate bound|bwd / same-shape ≤ 1.15?|bwd after bf16-autocast fwd (s)|"
            "bf16 / fp32 bwd|rel. error fp32 / bf16|load"
        )
        sections.append(
            "### Backward vs its FLOP bound\n\n"
            + C.md_table(head, bwd_rows)
            + "\n\nbwd / same-shape GEMM: median over rounds of (mapper backward) / (the same "
            "GEMMs alone), with the range over rounds. bwd / best-rate bound: mapper backward × "
            "max(same-shape, large 2048×4096 GEMM rate) / (2·N·2^H·D). The backward timed is the "
            "whole autograd backward: logit gradient, and the table gradient (zero-filled "
            "2^H × D, then an index_add), which the bound does not count. bf16: the backward "
            "after a forward under bf16 autocast (S products from bf16 operands; not exact); "
            "rel. error = median over tokens of ‖grad − grad_float64‖ / ‖grad_float64‖."
        )
    if fwd_rows:
        head = "N|H|D|ours forward (ms)|dense forward (ms)|load"
        sections.append("### Forward (sample codes + row lookup)\n\n" + C.md_table(head, fwd_rows))
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
        head = (
            "N|H|D|ours extra (working) peak (MiB)|dense extra peak (MiB)|dense / ours|"
            "ours ≤ 64 MiB?|ours total peak (MiB)|ours total peak, RSS (MiB)|"
            "returned r + grads (MiB)"
        )
        fit_rows = [
            [
                n,
                f"{dense_mem[n]['extra'] / C.MiB:,.0f}",
                f"{dense_mem[n]['extra'] / (n * per_tensor):.2f}",
            ]
            for n in xs
        ]
        sections.append(
            "### Extra peak memory of forward + backward\n\n"
            + C.md_table(head, rows)
            + "\n\nExtra (working) peak = the highest total of blocks that were allocated *and "
            "freed* during forward + backward, i.e. memory beyond the returned r, gradients and "
            "codes (replayed from the profiler's allocation events of PyTorch's CPU allocator). "
            "Total peak = highest live total above the start, returned tensors included (the "
            "2^H × D table gradient dominates it: 256 MiB at H = 16, D = 1024, the same for any "
            "formulation); its RSS column is the kernel's peak resident set above the start "
            "(VmHWM reset through /proc/self/clear_refs, glibc mmap threshold pinned), an "
            "independent cross-check of the allocator replay.\n\n"
            + C.md_table(
                "N (H = 16, D = 1024)|dense extra peak (MiB, measured)|N × 2^H tensors", fit_rows
            )
            + "\n\n"
            f"Linear fit of the dense extra peak over N = {xs}: {a / C.MiB * 1024:,.0f} MiB "
            f"per 1024 tokens + {b / C.MiB:,.0f} MiB (largest relative residual {resid:.1%}); "
            f"slope = {a / per_tensor:.2f} live N × 2^H tensors at the peak."
        )
    body = "\n\n".join(sections)
    print()
    print(body)
    if args.write:
        cpu1 = args.threads == 1 and args.device == "cpu"
        C.write_section(
            args.section or ("mapper" if cpu1 else f"mapper-{args.device}-t{args.threads}"), body
        )
        print(f"\nwrote {C.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
