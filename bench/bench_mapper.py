"""Binary mapper: backward time against its FLOP bound, forward time, and extra peak memory
against the dense formulation (paper Eq. 8).

The exact backward of r = W^T (Y + G − sg(G)) needs s_d = <W_d, dr_t> for every token t and
code d: 2·N·2^H·D FLOPs of GEMM, nothing less. The yardstick is therefore a plain GEMM loop
of exactly those shapes (the (n × D) @ (D × C) products the mapper performs, written into
one preallocated buffer), timed alternately with the mapper in the same run; the ratio
mapper / GEMM is the backward's distance from its FLOP bound on this machine. A second,
larger GEMM gives the machine's best FP32 rate, and the bound is also reported against it.

Memory: the extra peak of forward + backward, i.e. the peak of live PyTorch allocations
during the call minus what the call returns (r, the two gradients, the codes), so both
formulations are charged only for their working memory. The dense formulation
(one_hot(codes) + G − G.detach()) @ table holds several N × 2^H float32 tensors (2 GiB each
at N = 8192, H = 16); it is measured at smaller N and extrapolated linearly in N (fit
quality printed), unless --dense-full.

    python bench/bench_mapper.py            # ~4 min on 2 loaded CPU cores
    python bench/bench_mapper.py --quick    # < 1 min
    python bench/bench_mapper.py --write    # also update bench/RESULTS.md
    python bench/bench_mapper.py --device cuda --dtype bf16
    python bench/bench_mapper.py --smoke        # tiny sizes: the script runs (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys

import common as C
import torch
import torch.nn.functional as F
from mapper_candidates import mapper_logit_grad_bf16

import freeformer.latent as latent
from freeformer.latent import binary_mapper, bit_matrix


def dense_mapper(bit_logits, table, codes):
    """The reference formulation, materialising one-hot and G: r = (Y + G − sg(G)) W."""
    H = bit_logits.shape[-1]
    bits = bit_matrix(H, bit_logits.dtype, bit_logits.device)              # (2^H, H)
    logp, logq = F.logsigmoid(bit_logits), F.logsigmoid(-bit_logits)
    G = (logp @ bits.T + logq @ (1 - bits).T).exp()                        # (N, 2^H)
    Y = F.one_hot(codes, 1 << H).to(bit_logits.dtype)                      # (N, 2^H)
    return (Y + G - G.detach()) @ table


def make_inputs(N: int, H: int, D: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    L = (2 * torch.randn(N, H, generator=g)).to(device, dtype).requires_grad_()
    W = torch.randn(1 << H, D, generator=g).to(device, dtype).requires_grad_()
    dr = torch.randn(N, D, generator=g).to(device, dtype)
    return L, W, dr


class _MapperBF16(torch.autograd.Function):
    """The shipped autograd function with the bf16-GEMM candidate logit gradient (bench only)."""

    @staticmethod
    def forward(ctx, bit_logits, table, codes):
        ctx.save_for_backward(bit_logits, table, codes)
        return F.embedding(codes, table)

    @staticmethod
    def backward(ctx, grad_r):
        bit_logits, table, codes = ctx.saved_tensors
        g = grad_r.reshape(-1, table.shape[1])
        gl = mapper_logit_grad_bf16(bit_logits.reshape(-1, bit_logits.shape[-1]), table, g)
        gt = torch.zeros_like(table).index_add_(0, codes.reshape(-1), g.to(table.dtype))
        return gl.to(bit_logits.dtype).view_as(bit_logits), gt, None


# ---------------------------------------------------------------------------------------
def time_backward(N, H, D, rounds, device, dtype, candidate: bool) -> dict:
    """Mapper backward vs the same-shape GEMM loop vs a large GEMM, alternately."""
    L, W, dr = make_inputs(N, H, D, device, dtype)
    f = torch.promote_types(dtype, torch.float32)
    k, nt = latent.mapper_chunks(N, H, device)
    Cc = 1 << k
    Wf, drf = W.detach().to(f), dr.to(f)
    S = torch.empty(nt, Cc, dtype=f, device=device)

    def gemm_same():  # exactly the S products of the backward: 2·N·2^H·D FLOPs
        for t0 in range(0, N, nt):
            g = drf[t0:t0 + nt]
            out = S[:g.shape[0]]
            for j in range(0, 1 << H, Cc):
                torch.mm(g, Wf[j:j + Cc].T, out=out)

    big_a = torch.randn(2048, D, dtype=f, device=device)
    big_b = torch.randn(4096, D, dtype=f, device=device)
    big_out = torch.empty(2048, 4096, dtype=f, device=device)
    big_flops = 2 * 2048 * 4096 * D
    big_reps = max(1, int(2 * N * (1 << H) * D / big_flops / 8))  # ~1/8 of the bound's work

    def gemm_big():
        for _ in range(big_reps):
            torch.mm(big_a, big_b.T, out=big_out)

    state = {}
    gen = torch.Generator(device=device).manual_seed(0)

    def fwd_shipped():
        state["r"], state["codes"] = binary_mapper(L, W, gen)

    def fwd_bf16():
        codes = latent.sample_codes(L, gen)
        state["r"] = _MapperBF16.apply(L, W, codes)

    def bwd():
        torch.autograd.grad(state.pop("r"), (L, W), dr)

    fns = {"gemm": gemm_same, "mapper": bwd, "big": gemm_big}
    before = {"mapper": fwd_shipped}
    if candidate:
        fns["bf16"] = bwd
        before["bf16"] = fwd_bf16
    t = C.alternate(fns, rounds, warmup=1, before=before, device=device)
    flops = 2 * N * (1 << H) * D
    rate_same = flops / t.median("gemm")
    rate_big = big_flops * big_reps / t.median("big")
    best = max(rate_same, rate_big)
    res = dict(N=N, H=H, D=D, threads=torch.get_num_threads(), flops=flops,
               gemm_s=t.median("gemm"), mapper_s=t.median("mapper"),
               rate_same=rate_same, rate_big=rate_big,
               ratio_same=t.ratio("mapper", "gemm"), ratio_range=t.ratio_range("mapper", "gemm"),
               ratio_best=t.median("mapper") * best / flops, load=t.load_range(), rounds=rounds)
    if candidate:
        # Accuracy of the candidate against a float64 evaluation, on the first 256 tokens.
        n = min(N, 256)
        Ld, Wd, gd = L.detach()[:n].double(), W.detach().double(), dr[:n].double()
        ref = latent._mapper_logit_grad(Ld, Wd, gd)
        got = mapper_logit_grad_bf16(L.detach()[:n].float(), W.detach().float(), dr[:n].float())
        err = ((got.double() - ref).norm(dim=1) / ref.norm(dim=1)).median().item()
        shipped = latent._mapper_logit_grad(L.detach()[:n].float(), W.detach().float(),
                                            dr[:n].float())
        err32 = ((shipped.double() - ref).norm(dim=1) / ref.norm(dim=1)).median().item()
        res.update(c_s=t.median("bf16"), c_ratio_same=t.ratio("bf16", "gemm"),
                   c_vs_shipped=t.ratio("bf16", "mapper"), c_err=err, shipped_err=err32)
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
    return dict(N=N, H=H, D=D, ours_fwd=t.median("ours"),
                dense_fwd=t.median("dense") if dense else None, load=t.load_range())


def memory(N, H, D, device, dtype, which: str) -> dict:
    """Working (transient) and total peak of forward + backward; RSS peak as a cross-check."""
    L, W, dr = make_inputs(N, H, D, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    codes = latent.sample_codes(L, gen)
    keep: list = []

    def run():
        if which == "ours":
            r, c = binary_mapper(L, W, gen)
        else:
            r, c = dense_mapper(L, W, codes), None
        keep.extend([r, c, *torch.autograd.grad(r, (L, W), dr)])

    m = C.peak_alloc(run, device)
    keep.clear()
    rss = C.peak_rss(run) if device.type == "cpu" else None
    keep.clear()
    return dict(N=N, H=H, D=D, which=which, peak=m.peak, returned=m.final,
                extra=m.transient, rss_peak=rss)


def fit_line(xs, ys):
    """Least-squares y = a·x + b and the largest relative residual."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    b = my - a * mx
    resid = max(abs(a * x + b - y) / y for x, y in zip(xs, ys))
    return a, b, resid


# ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="small sizes only (< 1 min)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes (N 256, H 10, D 64), seconds: checks the script runs "
                         "(bench/gpu_check.sh --smoke); the figures mean nothing")
    ap.add_argument("--write", action="store_true", help="update the mapper section of bench/RESULTS.md")
    ap.add_argument("--threads", default="1",
                    help="comma-separated intra-op thread counts to time (default 1: on a shared "
                         "2-core machine, 2-thread runs mostly measure the co-tenants)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3)")
    ap.add_argument("--section", default=None,
                    help="name of the RESULTS.md section --write replaces (default from device "
                         "and threads)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="dtype of the inputs (logits, table, upstream gradient); the mapper "
                         "backward always computes in float32")
    ap.add_argument("--no-candidate", action="store_true",
                    help="do not time the bf16-GEMM candidate of bench/mapper_candidates.py")
    ap.add_argument("--parts", default="bwd,fwd,mem",
                    help="which measurements: any of bwd (backward vs FLOP bound), fwd, mem")
    ap.add_argument("--dense-full", action="store_true",
                    help="measure the dense formulation at N = 8192 too (~10 GiB) instead of "
                         "extrapolating")
    args = ap.parse_args(argv)
    if args.smoke and args.write:
        ap.error("--smoke figures mean nothing: do not --write them")
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rounds = args.rounds or 3
    threads = [int(x) for x in args.threads.split(",")]
    parts = set(args.parts.split(","))
    D = 1024
    if args.smoke:
        D = 64
        bwd_sizes = fwd_sizes = mem_ours = [(256, 10, D)]
        dense_ns, big_n = [], 256
    elif args.quick:
        bwd_sizes = [(1024, 16, D)]
        fwd_sizes = [(256, 16, D), (1024, 16, D)]
        mem_ours = [(1024, 16, D), (2048, 16, D)]
        dense_ns, big_n = [128, 256, 512], 8192
    else:
        bwd_sizes = [(1024, 16, D), (8192, 8, D), (8192, 16, D)]
        fwd_sizes = [(1024, 16, D), (8192, 16, D)]
        mem_ours = [(1024, 16, D), (2048, 16, D), (8192, 8, D), (8192, 16, D)]
        dense_ns, big_n = [256, 512, 1024, 2048], 8192
    if args.dense_full:
        dense_ns = dense_ns + [big_n]

    C.setup_threads(threads[0])
    header = C.machine_line(device)
    print(header, flush=True)

    # 1. backward vs FLOP bound
    bwd_rows = []
    for th in (threads if "bwd" in parts else []):
        C.setup_threads(th)
        for N, H, Dd in bwd_sizes:
            # Short calls (H = 8: ~40 ms) are noisier: give them more rounds.
            n_rounds = rounds if 2 * N * (1 << H) * Dd > 1e11 else max(rounds, 15)
            r = time_backward(N, H, Dd, n_rounds, device, dtype, not args.no_candidate)
            bwd_rows.append(r)
            print(r, flush=True)
    C.setup_threads(threads[0])

    # 2. forward
    dense_fwd_max = 256 if args.quick else 1024
    fwd_rows = [time_forward(N, H, Dd, rounds, device, dtype, dense=N <= dense_fwd_max)
                for N, H, Dd in (fwd_sizes if "fwd" in parts else [])]
    for r in fwd_rows:
        print(r, flush=True)

    # 3. memory (after the timings: pinning glibc's mmap threshold makes every large block a
    # fresh mmap, whose page faults would slow the timed code down)
    if "mem" in parts:
        C.pin_malloc()
    else:
        mem_ours, dense_ns = [], []
    ours_mem = {}
    for N, H, Dd in mem_ours:
        m = memory(N, H, Dd, device, dtype, "ours")
        ours_mem[(N, H, Dd)] = m
        print(m, flush=True)
    dense_mem = {}
    for N in dense_ns:
        m = memory(N, 16, D, device, dtype, "dense")
        dense_mem[N] = m
        print(m, flush=True)
    for N, H, Dd in mem_ours:
        if H != 16 and (N, H, Dd) not in dense_mem:
            dense_mem[(N, H, Dd)] = memory(N, H, Dd, device, dtype, "dense")
    # ---- tables
    cmd = C.command_line(sys.argv)
    sections = [
        "## Binary mapper (`bench/bench_mapper.py`)" + (f", {args.threads} thread(s)"
                                                        if args.threads != "1" else ""),
        f"Command: `{cmd}`  \nMachine: {header}  \nInput dtype {args.dtype}; "
        f"{rounds} alternating rounds (15 for calls under 0.1 TFLOP); threads timed: "
        f"{args.threads}.",
    ]
    if bwd_rows:
        cand = not args.no_candidate
        t1 = C.md_table(
            ["N", "H", "D", "threads", "rounds", "bound 2·N·2^H·D (GFLOP)", "same-shape GEMM (s)",
             "GEMM rate same / large (GFLOP/s)", "mapper bwd (s)", "bwd / same-shape GEMM",
             "bwd / best-rate bound", "bwd / same-shape ≤ 1.15?"]
            + (["bf16-GEMM candidate bwd (s)", "candidate / shipped",
                "rel. error shipped / candidate"] if cand else [])
            + ["load"],
            [[r["N"], r["H"], r["D"], r["threads"], r["rounds"], f"{r['flops'] / 1e9:.1f}",
              C.fmt_s(r["gemm_s"]), f"{r['rate_same'] / 1e9:.0f} / {r['rate_big'] / 1e9:.0f}",
              C.fmt_s(r["mapper_s"]),
              f"{r['ratio_same']:.3f} ({r['ratio_range'][0]:.2f}–{r['ratio_range'][1]:.2f})",
              f"{r['ratio_best']:.3f}",
              "yes" if r["ratio_same"] <= 1.15 else "no"]
             + ([C.fmt_s(r["c_s"]), f"{r['c_vs_shipped']:.3f}",
                 f"{r['shipped_err']:.1e} / {r['c_err']:.1e}"] if cand else []) + [r["load"]]
             for r in bwd_rows])
        sections.append(
            "### Backward vs its FLOP bound\n\n" + t1 +
            "\n\nbwd / same-shape GEMM: median over rounds of (mapper backward) / (the same "
            "GEMMs alone), with the range over rounds. bwd / best-rate bound: mapper backward × "
            "max(same-shape, large 2048×4096 GEMM rate) / (2·N·2^H·D). The backward timed is the "
            "whole autograd backward: logit gradient, and the table gradient (zero-filled "
            "2^H × D, then an index_add), which the bound does not count. Candidate: "
            "`bench/mapper_candidates.py::mapper_logit_grad_bf16` (S products from bf16 "
            "operands; not exact); rel. error = median over tokens of ‖grad − grad_float64‖ / "
            "‖grad_float64‖ for the shipped float32 function and for the candidate.")
    if fwd_rows:
        t2 = C.md_table(
            ["N", "H", "D", "ours forward (ms)", "dense forward (ms)", "load"],
            [[r["N"], r["H"], r["D"], C.fmt_ms(r["ours_fwd"]),
              C.fmt_ms(r["dense_fwd"]) if r["dense_fwd"] is not None else "—", r["load"]]
             for r in fwd_rows])
        sections.append("### Forward (sample codes + row lookup)\n\n" + t2)
    if ours_mem:
        xs = sorted(n for n in dense_mem if isinstance(n, int))
        a, b, resid = (fit_line([float(n) for n in xs], [float(dense_mem[n]["extra"]) for n in xs])
                       if len(xs) >= 2 else (0.0, 0.0, 0.0))
        n_codes = 1 << 16
        elt = torch.tensor([], dtype=dtype).element_size()
        mem_rows = []
        for (N, H, Dd), m in ours_mem.items():
            key = N if H == 16 and Dd == D else (N, H, Dd)
            if key in dense_mem:
                dx, how = dense_mem[key]["extra"], "measured"
            elif H == 16 and Dd == D:
                dx, how = a * N + b, "extrapolated"
            else:
                dx, how = None, "—"
            mem_rows.append([N, H, Dd, f"{m['extra'] / C.MiB:.1f}",
                             "—" if dx is None else f"{dx / C.MiB:,.0f} ({how})",
                             "—" if dx is None else f"{dx / max(m['extra'], 1):,.0f}×",
                             "yes" if m["extra"] <= 64 * C.MiB else "no",
                             f"{m['peak'] / C.MiB:.0f}",
                             "—" if m["rss_peak"] is None else f"{m['rss_peak'] / C.MiB:.0f}",
                             f"{m['returned'] / C.MiB:.0f}"])
        t3 = C.md_table(["N", "H", "D", "ours extra (working) peak (MiB)",
                         "dense extra peak (MiB)", "dense / ours", "ours ≤ 64 MiB?",
                         "ours total peak (MiB)", "ours total peak, RSS (MiB)",
                         "returned r + grads (MiB)"], mem_rows)
        t4 = C.md_table(["N (H = 16, D = 1024)", "dense extra peak (MiB, measured)",
                         "N × 2^H tensors"],
                        [[n, f"{dense_mem[n]['extra'] / C.MiB:,.0f}",
                          f"{dense_mem[n]['extra'] / (n * n_codes * elt):.2f}"] for n in xs])
        fit = (f"Linear fit of the dense extra peak over N = {xs}: {a / C.MiB * 1024:,.0f} MiB "
               f"per 1024 tokens + {b / C.MiB:,.0f} MiB (largest relative residual {resid:.1%}); "
               f"slope = {a / (n_codes * elt):.2f} live N × 2^H tensors at the peak.")
        sections.append(
            "### Extra peak memory of forward + backward\n\n" + t3 +
            "\n\nExtra (working) peak = the highest total of blocks that were allocated *and "
            "freed* during forward + backward, i.e. memory beyond the returned r, gradients and "
            "codes (replayed from the profiler's allocation events of PyTorch's CPU allocator). "
            "Total peak = highest live total above the start, returned tensors included (the "
            "2^H × D table gradient dominates it: 256 MiB at H = 16, D = 1024, the same for any "
            "formulation); its RSS column is the kernel's peak resident set above the start "
            "(VmHWM reset through /proc/self/clear_refs, glibc mmap threshold pinned), an "
            "independent cross-check of the allocator replay.\n\n" + t4 + "\n\n" + fit)
    body = "\n\n".join(sections)
    print()
    print(body)
    if args.write:
        name = "mapper" if args.threads == "1" and args.device == "cpu" else (
            f"mapper-{args.device}-t{args.threads}")
        C.write_section(args.section or name, body)
        print(f"\nwrote {C.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
